//! Command-line flags: `sandboxd serve` (turned into a [`ServeConfig`]),
//! `sandboxd template build`, and the hidden per-microVM `sandboxd vmm`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    auth::ApiKeys,
    backend::{
        microvm::{vmm_process::RestoreMemory, GuestImages},
        BackendChoice, ResourceLimits,
    },
    manager::Policy,
    pool::PoolConfig,
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
    Serve(Box<ServeArgs>),
    /// Build microVM templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Run one microVM (the per-sandbox VMM process the daemon starts).
    #[command(hide = true)]
    Vmm {
        /// JSON VMM configuration (boot or restore, serial log, control socket).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Boot a guest, snapshot it once its agent is up and idle, and record
    /// the working set of a first use, for restores to prefetch.
    Build(TemplateBuildArgs),
}

#[derive(Args, Debug)]
pub struct TemplateBuildArgs {
    /// Guest kernel (vmlinux, from kernel-config/build.sh).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest root image (ext4, from scripts/guest-image.sh).
    #[arg(long)]
    pub rootfs_image: PathBuf,
    /// Directory the template is written to (replaced once the new one is complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Guest memory; sandboxes restored from the template have this much.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
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
    /// Extra template as NAME=DIR (repeatable): a root filesystem directory for jails, a
    /// `sandboxd template build` directory for microVMs. "default" is built in.
    #[arg(long = "template", value_parser = parse_template)]
    pub templates: Vec<(String, PathBuf)>,
    /// Paused guests kept ready per template at all times; with --pool-max 0 there is no warm pool.
    #[arg(long, default_value_t = 2)]
    pub pool_size: usize,
    /// Most paused guests per template after a burst of Creates [default: twice --pool-size].
    #[arg(long)]
    pub pool_max: Option<usize>,
    /// Most host memory the paused guests of one template's pool may use, in MiB (0: no budget).
    #[arg(long, default_value_t = 0)]
    pub pool_memory_budget_mib: u64,
    /// How microVMs restored from a template get their memory.
    #[arg(long, value_enum, default_value_t = RestoreMemory::Uffd)]
    pub restore_memory: RestoreMemory,
    #[arg(long, default_value_t = 512)]
    pub default_memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    pub default_vcpus: u32,
    #[arg(long, default_value_t = 256)]
    pub default_max_processes: u32,
    /// Writable disk of a sandbox whose Create names none, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub default_disk_mib: u32,
    /// Largest writable disk a Create may ask for, in MiB.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_disk_mib: u32,
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
            pool: PoolConfig {
                min: self.pool_size,
                max: self.pool_max.unwrap_or(self.pool_size * 2).max(self.pool_size),
                memory_budget_bytes: self.pool_memory_budget_mib << 20,
            },
            restore_memory: self.restore_memory,
            policy: Policy {
                default_limits: ResourceLimits {
                    memory_mib: self.default_memory_mib,
                    vcpus: self.default_vcpus,
                    max_processes: self.default_max_processes,
                    disk_mib: self.default_disk_mib,
                },
                default_ttl: Duration::from_secs(self.default_ttl_seconds),
                max_ttl: Duration::from_secs(self.max_ttl_seconds),
                max_memory_mib: 16 * 1024,
                max_vcpus: host_cpus,
                max_processes: 32_768,
                max_disk_mib: self.max_disk_mib,
                max_sandboxes: self.max_sandboxes,
            },
            api_keys,
        })
    }
}
