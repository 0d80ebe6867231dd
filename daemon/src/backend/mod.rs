//! Sandbox backends behind one trait: the daemon's core asks a backend to
//! launch an isolated guest running `sandbox-agent`, and from then on talks
//! only to that agent. `jail` uses namespaces and cgroups; `microvm` uses a
//! KVM microVM per sandbox. A backend that can says how to find a guest
//! again ([`Instance::adoption_record`]), so that a restarted daemon
//! re-adopts it ([`Backend::adopt`]) and reaps the rest
//! ([`Backend::reap_unknown`]).

pub mod cgroup;
pub mod jail;
pub mod microvm;
pub mod process_identity;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

/// Which isolation a backend gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Jail,
    MicroVm,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Jail => "jail",
            BackendKind::MicroVm => "microvm",
        }
    }
}

/// Resource limits of one sandbox, with defaults already filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimits {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub max_processes: u32,
    /// Writable disk of the sandbox in MiB.
    pub disk_mib: u32,
}

/// What a backend needs to launch one guest.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub id: String,
    /// Root filesystem of the template; `None` means the host's own
    /// read-only system directories.
    pub rootfs: Option<PathBuf>,
    pub limits: ResourceLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot launch the sandbox: {0}")]
    Launch(String),
    #[error("the sandbox's template cannot be used: {0}")]
    Template(String),
    #[error("the sandbox agent did not answer within {0:?}: {1}")]
    AgentTimeout(Duration, String),
    #[error("cannot {action} the sandbox: {reason}")]
    Control { action: &'static str, reason: String },
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("cannot re-adopt the sandbox: {0}")]
    Adopt(String),
    #[error("{0}")]
    Gone(String),
}

/// A backend creates guests.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// Whether a guest's memory and CPUs can change after launch (through
    /// [`Instance::set_limits`]); if not, a pooled guest only serves
    /// Creates that ask for the pool's shape.
    fn resizes_guests(&self) -> bool {
        true
    }

    /// Whether guests run on the host's own kernel, sharing its clock and
    /// CRNG (a jail), so that nothing needs refreshing before hand-out.
    fn guests_share_host_kernel(&self) -> bool {
        false
    }

    /// Launches a guest and returns once its agent answers `Hello`.
    async fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError>;

    /// Finds the guest `id` of an earlier run of the daemon again, from
    /// the record its instance gave ([`Instance::adoption_record`]);
    /// `paused`: it was left paused (and stays so). A guest that died
    /// meanwhile is [`BackendError::Gone`], with the reason.
    async fn adopt(&self, id: &str, record: &str, paused: bool) -> Result<Box<dyn Instance>, BackendError> {
        let _ = (id, record, paused);
        Err(BackendError::Unsupported("re-adopting a guest after a daemon restart"))
    }

    /// Kills and removes every guest an earlier run of the daemon left
    /// whose id is not in `keep` (the re-adopted ones), and logs what it
    /// did. Blocking; called once at start, before any launch. By default
    /// there is nothing to do (the backend cleans up when it starts).
    fn reap_unknown(&self, keep: &HashSet<String>) {
        let _ = keep;
    }
}

/// One running guest.
#[tonic::async_trait]
pub trait Instance: Send + Sync {
    /// A client of the guest's agent.
    fn agent(&self) -> AgentClient<Channel>;

    /// Stops every process of the guest in place.
    async fn pause(&self) -> Result<(), BackendError>;

    /// Continues a paused guest.
    async fn resume(&self) -> Result<(), BackendError>;

    /// Sets the guest aside for a long time, releasing what it can: a
    /// microVM is snapshotted to disk and its VMM ends. By default the guest
    /// is paused in place.
    async fn suspend(&self) -> Result<(), BackendError> {
        self.pause().await
    }

    /// Brings back a suspended guest with its files and processes.
    async fn wake(&self) -> Result<(), BackendError> {
        self.resume().await
    }

    /// Host memory the guest uses now, in bytes (its cgroup's count).
    fn memory_bytes(&self) -> u64;

    /// CPU time the guest has used so far, in nanoseconds, where the
    /// backend can tell.
    fn cpu_nanos(&self) -> Option<u64> {
        None
    }

    /// Host disk the guest's writable disk takes now, in bytes, where the
    /// backend can tell.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Changes the limits of a running guest.
    async fn set_limits(&self, limits: ResourceLimits) -> Result<(), BackendError>;

    /// Whether the guest is still there (its init has not died).
    fn is_alive(&self) -> bool;

    /// What the guest and its monitor last printed, to say why it stopped.
    fn diagnostics(&self) -> String;

    /// Stops the guest and frees everything it held.
    async fn destroy(self: Box<Self>) -> Result<(), BackendError>;

    /// What [`Backend::adopt`] needs to find this guest after a restart
    /// (the backend's own text); empty when the backend cannot re-adopt.
    fn adoption_record(&self) -> String {
        String::new()
    }

    /// Lets the guest run on without this daemon, which is stopping and
    /// will re-adopt it. By default that is not supported: the guest is
    /// destroyed and the error says so.
    async fn release(self: Box<Self>) -> Result<(), BackendError> {
        self.destroy().await?;
        Err(BackendError::Unsupported("keeping a guest running across a daemon restart"))
    }
}

/// The last `count` lines of `text`, joined with " | " (for error messages).
pub fn last_lines(text: &str, count: usize) -> String {
    let mut last: Vec<_> = text.lines().rev().take(count).collect();
    last.reverse();
    last.join(" | ")
}

/// A short name for this daemon's state directory, so that daemons with
/// different state directories never reap each other's guests.
pub fn daemon_scope(state_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = <sha2::Sha256 as sha2::Digest>::digest(canonical.as_os_str().as_encoded_bytes());
    digest.iter().take(6).map(|byte| format!("{byte:02x}")).collect()
}

/// The `--backend` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// microvm where the host can run it, else jail.
    Auto,
    Jail,
    #[value(name = "microvm")]
    MicroVm,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("the microvm backend cannot run on this host: {0}; use --backend jail or --backend auto")]
    MicroVmUnavailable(String),
    #[error("the jail backend cannot run on this host: {0}")]
    JailUnavailable(String),
}

/// What the microvm backend needs besides the host's support.
pub struct MicroVmOptions {
    /// What microVMs boot, when configured.
    pub images: Option<microvm::GuestImages>,
    /// The root image jails mount read-only as `/` (the one microVMs boot).
    pub rootfs_image: Option<PathBuf>,
    /// The shape of the default template's guest.
    pub default_limits: ResourceLimits,
    pub restore_memory: microvm::vmm_process::RestoreMemory,
}

/// Builds the backend the flag asks for, saying in one line why `auto`
/// did not pick microvm. For microvm it first builds (or reuses) the
/// default template under `state_dir`.
pub async fn select(
    choice: BackendChoice,
    state_dir: &Path,
    agent_binary: &Path,
    options: MicroVmOptions,
) -> Result<Arc<dyn Backend>, SelectError> {
    let host = sandbox_vmm::probe::probe_host();
    let rootfs_image = options.rootfs_image.clone();
    let microvm = match (host.microvms, options.images) {
        (false, _) => Err(host.reason),
        (true, None) => Err("no guest kernel and root image are configured (--kernel, --rootfs-image)".to_string()),
        (true, Some(images)) => Ok(images),
    };
    match (choice, microvm) {
        (BackendChoice::Jail, _) => jail_backend(state_dir, agent_binary, rootfs_image),
        (BackendChoice::MicroVm, Err(reason)) => Err(SelectError::MicroVmUnavailable(reason)),
        (BackendChoice::Auto, Err(reason)) => {
            tracing::warn!("microVMs cannot run on this host ({reason}); using the jail backend");
            jail_backend(state_dir, agent_binary, rootfs_image)
        }
        (BackendChoice::Auto | BackendChoice::MicroVm, Ok(images)) => {
            let backend = microvm::MicroVmBackend::new(state_dir.join("microvms"), images, options.restore_memory)
                .map_err(SelectError::MicroVmUnavailable)?;
            Ok(Arc::new(backend.with_default_template(state_dir, options.default_limits).await))
        }
    }
}

fn jail_backend(state_dir: &Path, agent_binary: &Path, rootfs_image: Option<PathBuf>) -> Result<Arc<dyn Backend>, SelectError> {
    let backend = jail::JailBackend::new(state_dir, agent_binary.to_path_buf(), rootfs_image)
        .map_err(|error| SelectError::JailUnavailable(error.to_string()))?;
    Ok(Arc::new(backend))
}
