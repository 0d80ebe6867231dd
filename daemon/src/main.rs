//! The `sandboxd` binary.

use clap::Parser;
use sandboxd::{
    auth::KeyList,
    cli::{Cli, Command, TemplateBuildArgs, TemplateCommand},
    server,
};

fn main() -> std::process::ExitCode {
    // The jail launcher must stay single-threaded: dispatch it before
    // logging or the async runtime start any thread.
    if std::env::args().nth(1).as_deref() == Some("jail-exec") {
        sandboxd::backend::jail::launcher::exec_main();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Vmm { config } => return run_vmm(&config),
        Command::Template(TemplateCommand::Build(args)) => return build_template(args),
    };
    if let Err(error) = sandboxd::backend::jail::enter_private_mount_namespace() {
        tracing::error!("{error}");
        return std::process::ExitCode::FAILURE;
    }
    let keys = KeyList::parse(&std::env::var("SANDBOXD_API_KEYS").unwrap_or_default());
    let config = match args.into_config(keys) {
        Ok(config) => config,
        Err(message) => {
            tracing::error!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::serve(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `sandboxd template build`: builds a microVM template, printing progress.
fn build_template(args: TemplateBuildArgs) -> std::process::ExitCode {
    let host = sandbox_vmm::probe::probe_host();
    if !host.microvms {
        tracing::error!("templates need a host that runs microVMs: {}", host.reason);
        return std::process::ExitCode::from(2);
    }
    let launcher = match std::env::current_exe() {
        Ok(path) => path,
        Err(error) => {
            tracing::error!(%error, "cannot find the sandboxd binary");
            return std::process::ExitCode::FAILURE;
        }
    };
    let options = sandboxd::template::BuildOptions {
        kernel: args.kernel,
        rootfs: args.rootfs_image,
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        out: args.out,
        launcher,
    };
    let built = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|runtime| runtime.block_on(sandboxd::template::build(&options, &|line| eprintln!("{line}"))).map_err(|e| e.to_string()));
    match built {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `sandboxd vmm`: runs one microVM until it exits or is shut down.
fn run_vmm(config: &std::path::Path) -> std::process::ExitCode {
    let config = match std::fs::read_to_string(config).map_err(|e| e.to_string()).and_then(|text| {
        serde_json::from_str::<sandbox_vmm::process::VmmConfig>(&text).map_err(|e| e.to_string())
    }) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("cannot read the VMM configuration {}: {error}", config.display());
            return std::process::ExitCode::from(2);
        }
    };
    match sandbox_vmm::process::run(config) {
        Ok(exit) if exit.is_failure() => {
            tracing::error!(?exit, "microVM failed");
            std::process::ExitCode::FAILURE
        }
        Ok(exit) => {
            tracing::info!(?exit, "microVM ended");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}
