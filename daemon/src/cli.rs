//! Command-line flags of `sandboxd serve`, turned into a [`ServeConfig`].

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    auth::ApiKeys,
    backend::{microvm::GuestImages, BackendChoice, ResourceLimits},
    manager::Policy,
    server::ServeConfig,
};

#[derive(Parser, Debug)]
#[command(name = "sandboxd", version, about = "Isolated Linux sandboxes for AI agents, over gRPC")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the sandbox.v1 gRPC API.
    Serve(ServeArgs),
    /// Run one microVM (the per-sandbox VMM process the daemon starts).
    #[command(hide = true)]
    Vmm {
        /// JSON VMM configuration (boot or restore, serial log, control socket).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TCP address of the gRPC API. Without SANDBOXD_API_KEYS it must be loopback.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Unix socket of the gRPC API [default: STATE_DIR/sandboxd.sock].
    #[arg(long)]
    pub unix_socket: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint; "off" disables it.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Directory for sockets, sandbox state and logs.
    #[arg(long, default_value = "/var/lib/sandboxd")]
    pub state_dir: PathBuf,
    /// Audit log (JSON lines) [default: STATE_DIR/audit.log].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// The guest agent binary [default: sandbox-agent next to this binary].
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
    /// Extra template as NAME=ROOTFS_DIR (repeatable). "default" uses the host's system directories.
    #[arg(long = "template", value_parser = parse_template)]
    pub templates: Vec<(String, PathBuf)>,
    /// Paused guests kept ready per template; 0 disables the warm pool.
    #[arg(long, default_value_t = 2)]
    pub pool_size: usize,
    #[arg(long, default_value_t = 512)]
    pub default_memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    pub default_vcpus: u32,
    #[arg(long, default_value_t = 256)]
    pub default_max_processes: u32,
    /// Lifetime of a sandbox whose Create names none.
    #[arg(long, default_value_t = 300)]
    pub default_ttl_seconds: u64,
    #[arg(long, default_value_t = 86_400)]
    pub max_ttl_seconds: u64,
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Guest kernel (vmlinux) for the microvm backend (from kernel-config/build.sh).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest root image (ext4) for the microvm backend (from scripts/guest-image.sh).
    #[arg(long)]
    pub rootfs_image: Option<PathBuf>,
}

fn parse_template(value: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = value
        .split_once('=')
        .ok_or_else(|| format!("template '{value}' is not NAME=ROOTFS_DIR"))?;
    Ok((name.to_string(), PathBuf::from(dir)))
}

impl ServeArgs {
    /// Builds the configuration; `api_keys` comes from SANDBOXD_API_KEYS.
    pub fn into_config(self, api_keys: ApiKeys) -> Result<ServeConfig, String> {
        let metrics_listen = match self.metrics_listen.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|e| format!("--metrics-listen {addr}: {e}"))?),
        };
        let agent_binary = match self.agent_binary {
            Some(path) => path,
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find this binary's directory ({e}): pass --agent-binary"))?
                .with_file_name("sandbox-agent"),
        };
        let mut templates: BTreeMap<String, Option<PathBuf>> = BTreeMap::from([("default".to_string(), None)]);
        templates.extend(self.templates.into_iter().map(|(name, dir)| (name, Some(dir))));
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(ServeConfig {
            listen: self.listen,
            unix_socket: self.unix_socket.unwrap_or_else(|| self.state_dir.join("sandboxd.sock")),
            metrics_listen,
            backend: self.backend,
            guest_images: self.kernel.zip(self.rootfs_image).map(|(kernel, rootfs)| GuestImages { kernel, rootfs }),
            audit_log: self.audit_log.unwrap_or_else(|| self.state_dir.join("audit.log")),
            state_dir: self.state_dir,
            agent_binary,
            templates,
            pool_size: self.pool_size,
            policy: Policy {
                default_limits: ResourceLimits {
                    memory_mib: self.default_memory_mib,
                    vcpus: self.default_vcpus,
                    max_processes: self.default_max_processes,
                },
                default_ttl: Duration::from_secs(self.default_ttl_seconds),
                max_ttl: Duration::from_secs(self.max_ttl_seconds),
                max_memory_mib: 16 * 1024,
                max_vcpus: host_cpus,
                max_processes: 32_768,
                max_sandboxes: self.max_sandboxes,
            },
            api_keys,
        })
    }
}
