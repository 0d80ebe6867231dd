//! Command-line flags: `sandboxd serve` (turned into a [`ServeConfig`]),
//! `sandboxd template build`, and the hidden per-microVM `sandboxd vmm`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    admission::{HostFacts, Quotas},
    auth::KeyList,
    backend::{
        microvm::{vmm_process::RestoreMemory, GuestImages},
        BackendChoice, ResourceLimits,
    },
    manager::{OnStop, Policy},
    pool::PoolConfig,
    connections::ConnectionLimits,
    server::{E2bConfig, ServeConfig},
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
    /// TCP address of the gRPC API. Every call but health checks needs an API key:
    /// one of SANDBOXD_API_KEYS or, without it, the admin key in STATE_DIR/api-key.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Unix socket of the gRPC API [default: STATE_DIR/sandboxd.sock].
    #[arg(long)]
    pub unix_socket: Option<PathBuf>,
    /// Address of the E2B-compatible HTTP API (control plane and sandbox data plane on one
    /// port, HTTP/1.1 and h2c): point E2B_API_URL and E2B_SANDBOX_URL at http://ADDR.
    #[arg(long)]
    pub e2b_listen: Option<SocketAddr>,
    /// Domain sandboxes are addressed under on the E2B API, as `{port}-{id}.{domain}` (wildcard
    /// DNS to this daemon) [default: localhost:PORT of --e2b-listen].
    #[arg(long)]
    pub e2b_domain: Option<String>,
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
    /// What SIGTERM or SIGINT does with the sandboxes: keep them running for the next start
    /// to re-adopt, or delete them. `suspend` pauses microVMs to disk before keeping them;
    /// for jails it is the same as `keep`. Pooled guests are always destroyed.
    #[arg(long, value_enum, default_value_t = OnStop::Keep)]
    pub on_stop: OnStop,
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
    /// Most sandboxes of the whole daemon (running, paused or being created).
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Most sandboxes of one API key [default: half of --max-sandboxes].
    #[arg(long)]
    pub key_max_sandboxes: Option<usize>,
    /// Most memory (sum of limits, MiB) of one API key's sandboxes [default: half of --host-memory-budget-mib].
    #[arg(long)]
    pub key_max_memory_mib: Option<u64>,
    /// Most vCPUs (sum of limits) of one API key's sandboxes [default: --key-max-sandboxes, at least the host's CPUs].
    #[arg(long)]
    pub key_max_vcpus: Option<u64>,
    /// Largest memory limit of one sandbox, in MiB [default: half of the host's memory].
    #[arg(long)]
    pub max_memory_mib: Option<u32>,
    /// Largest max_processes of one sandbox [default: pid_max / 8, at most 32768].
    #[arg(long)]
    pub max_processes: Option<u32>,
    /// Most memory, in MiB, that all sandboxes' limits may add up to [default: 7/8 of the host's memory].
    #[arg(long)]
    pub host_memory_budget_mib: Option<u64>,
    /// Most processes that all sandboxes' max_processes may add up to [default: half of the kernel's pid_max].
    #[arg(long)]
    pub host_pids_budget: Option<u64>,
    /// Most open API connections (TCP and unix socket together); when full, the oldest
    /// connection that has not yet sent its HTTP/2 preface is closed to make room.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a new API connection has to send its HTTP/2 preface.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout_seconds: u64,
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
    pub fn into_config(self, api_keys: KeyList) -> Result<ServeConfig, String> {
        let host = HostFacts::probe().map_err(|e| e.to_string())?;
        let (quotas, per_sandbox) = self.quotas(&host)?;
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
        Ok(ServeConfig {
            listen: self.listen,
            e2b: self.e2b_listen.map(|listen| E2bConfig {
                listen,
                domain: self.e2b_domain.clone().unwrap_or_else(|| format!("localhost:{}", listen.port())),
            }),
            unix_socket: self.unix_socket.unwrap_or_else(|| self.state_dir.join("sandboxd.sock")),
            metrics_listen,
            backend: self.backend,
            rootfs_image: self.rootfs_image.clone(),
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
            on_stop: self.on_stop,
            connections: ConnectionLimits {
                max_connections: self.max_connections.max(1),
                handshake_timeout: Duration::from_secs(self.handshake_timeout_seconds.max(1)),
            },
            policy: Policy {
                default_limits: ResourceLimits {
                    memory_mib: self.default_memory_mib,
                    vcpus: self.default_vcpus,
                    max_processes: self.default_max_processes,
                    disk_mib: self.default_disk_mib,
                },
                default_ttl: Duration::from_secs(self.default_ttl_seconds),
                max_ttl: Duration::from_secs(self.max_ttl_seconds),
                max_memory_mib: per_sandbox.memory_mib,
                max_vcpus: host.cpus,
                max_processes: per_sandbox.max_processes,
                max_disk_mib: self.max_disk_mib,
                quotas,
                host,
            },
            api_keys,
        })
    }
}

/// The largest limits one sandbox may ask for.
struct SandboxBounds {
    memory_mib: u32,
    max_processes: u32,
}

impl ServeArgs {
    /// The admission caps, with defaults derived from the host, and the
    /// per-sandbox bounds; refuses settings beyond what the host has.
    fn quotas(&self, host: &HostFacts) -> Result<(Quotas, SandboxBounds), String> {
        let host_memory_budget_mib = self.host_memory_budget_mib.unwrap_or(host.memory_mib / 8 * 7);
        if host_memory_budget_mib > host.memory_mib {
            return Err(format!("--host-memory-budget-mib {host_memory_budget_mib} is more than this host's {} MiB of memory: lower it", host.memory_mib));
        }
        let host_pids_budget = self.host_pids_budget.unwrap_or(host.pid_max / 2);
        if host_pids_budget >= host.pid_max {
            return Err(format!("--host-pids-budget {host_pids_budget} must stay below the kernel's pid_max ({}): lower it", host.pid_max));
        }
        let memory_mib = self.max_memory_mib.unwrap_or((host.memory_mib / 2).min(u64::from(u32::MAX)) as u32);
        if u64::from(memory_mib) > host_memory_budget_mib {
            return Err(format!("--max-memory-mib {memory_mib} is more than the host memory budget of {host_memory_budget_mib} MiB: lower it"));
        }
        let max_processes = self.max_processes.unwrap_or((host.pid_max / 8).min(32_768) as u32);
        if u64::from(max_processes) > host_pids_budget {
            return Err(format!("--max-processes {max_processes} is more than the host pids budget of {host_pids_budget}: lower it"));
        }
        if self.default_memory_mib > memory_mib || self.default_max_processes > max_processes {
            return Err(format!(
                "the default limits ({} MiB, {} processes) exceed what one sandbox may have on this host ({memory_mib} MiB, {max_processes} processes): lower --default-memory-mib or --default-max-processes",
                self.default_memory_mib, self.default_max_processes
            ));
        }
        let key_max_sandboxes = self.key_max_sandboxes.unwrap_or(self.max_sandboxes.div_ceil(2)).max(1);
        let quotas = Quotas {
            max_sandboxes: self.max_sandboxes,
            key_max_sandboxes,
            key_max_memory_mib: self.key_max_memory_mib.unwrap_or(host_memory_budget_mib / 2),
            key_max_vcpus: self.key_max_vcpus.unwrap_or((key_max_sandboxes as u64).max(host.cpus.into())),
            host_memory_budget_mib,
            host_pids_budget,
        };
        Ok((quotas, SandboxBounds { memory_mib, max_processes }))
    }
}
