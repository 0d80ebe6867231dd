//! The jail backend: each sandbox is a [`Jail`] whose PID 1 is the guest
//! agent, serving on a socket the daemon created and handed in. The
//! template's root image is mounted read-only once on the host, in the
//! daemon's private state directory, and bound into every jail as `/`.
//! A restarted daemon re-adopts its jails from their [`JailRecord`]s and
//! reaps the others.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::mount::{umount2, MntFlags, MsFlags};
use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::{host_support, loopdev, private_dir, reap_leftovers, CgroupFlavor, IdLeases, Jail, JailError, JailLimits, JailRecord, JailSpec};
use crate::backend::{cgroup::Cgroup, Backend, BackendError, BackendKind, Instance, LaunchSpec, ResourceLimits};
use crate::agent_client::{self, AgentAddress};

/// How long a new jail's agent has to answer `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a re-adopted running jail's agent has to answer `Hello`.
const ADOPT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct JailBackend {
    jails_dir: PathBuf,
    image: PathBuf,
    agent_binary: PathBuf,
    launcher: PathBuf,
    cgroup_group: String,
    flavor: CgroupFlavor,
    ids: IdLeases,
}

impl JailBackend {
    /// Checks that the host can run jails and mounts the root image
    /// read-only. What an earlier run left is re-adopted or reaped later
    /// ([`Backend::adopt`], [`Backend::reap_unknown`]).
    pub fn new(state_dir: &Path, agent_binary: PathBuf, rootfs_image: Option<PathBuf>) -> Result<Self, JailError> {
        let flavor = host_support()?;
        if !agent_binary.is_file() {
            return Err(JailError::Setup(format!(
                "the guest agent {} does not exist: build it with `cargo build -p sandbox-agent` or pass --agent-binary",
                agent_binary.display()
            )));
        }
        let rootfs_image = rootfs_image.ok_or_else(|| JailError::Setup(
            "jails need a root image and never use the host's: pass --rootfs-image (scripts/guest-image.sh builds one)".into(),
        ))?;
        let launcher = std::env::current_exe()
            .map_err(|e| JailError::Setup(format!("cannot find the sandboxd binary to launch jails: {e}")))?;
        let jails_dir = state_dir.join("jails");
        private_dir(&jails_dir)?;
        let cgroup_group = format!("jails-{}", crate::backend::daemon_scope(state_dir));
        let image = state_dir.join("images").join("jail-root");
        mount_image(&rootfs_image, &image)?;
        tracing::info!(cgroups = ?flavor, image = %rootfs_image.display(), "jail backend: user, mount, pid, network, ipc, uts and cgroup namespaces, a disk and a cgroup per sandbox, seccomp allow-list");
        Ok(Self { jails_dir, image, agent_binary, launcher, cgroup_group, flavor, ids: IdLeases::default() })
    }
}

impl Drop for JailBackend {
    /// When the daemon ends with no jails left (they were deleted, or this
    /// daemon never had any), its cgroup group goes too.
    fn drop(&mut self) {
        Cgroup::at(self.flavor, &self.cgroup_group).remove_if_empty();
    }
}

/// Mounts `image` (ext4) read-only at `target`, replacing an earlier
/// run's mount there.
fn mount_image(image: &Path, target: &Path) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        private_dir(parent)?;
    }
    let _ = umount2(target, MntFlags::MNT_DETACH);
    fs::create_dir_all(target).map_err(|source| JailError::StateDir { path: target.to_path_buf(), source })?;
    let device = loopdev::attach(image, true).map_err(|e| JailError::Setup(e.to_string()))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(Some(device.path()), target, Some("ext4"), flags, None::<&str>).map_err(|e| {
        JailError::Setup(format!("cannot mount the root image {} at {}: {e}; is it an ext4 image from scripts/guest-image.sh?", image.display(), target.display()))
    })
}

fn jail_limits(limits: ResourceLimits) -> JailLimits {
    JailLimits {
        memory_bytes: u64::from(limits.memory_mib) * 1024 * 1024,
        cpu_millis: limits.vcpus.saturating_mul(1000),
        max_pids: limits.max_processes,
    }
}

fn control_error(action: &'static str) -> impl Fn(JailError) -> BackendError {
    move |error| BackendError::Control { action, reason: error.to_string() }
}

#[tonic::async_trait]
impl Backend for JailBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Jail
    }

    fn guests_share_host_kernel(&self) -> bool {
        true
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        let ids = self.ids.lease().map_err(|error| BackendError::Launch(error.to_string()))?;
        let jail_spec = JailSpec {
            state_dir: self.jails_dir.join(&spec.id),
            id: spec.id,
            launcher: self.launcher.clone(),
            agent_binary: self.agent_binary.clone(),
            image: spec.rootfs.unwrap_or_else(|| self.image.clone()),
            limits: jail_limits(spec.limits),
            disk_mib: spec.limits.disk_mib,
            cgroup_group: self.cgroup_group.clone(),
            command: None,
        };
        let jail = blocking(move || Jail::spawn(jail_spec, ids))
            .await
            .map_err(|error| BackendError::Launch(error.to_string()))?;
        let jail = Arc::new(jail);
        match agent_client::wait_for_hello(AgentAddress::Unix(jail.agent_socket()), HELLO_TIMEOUT).await {
            Ok(agent) => Ok(Box::new(JailInstance { jail, agent })),
            Err(error) => {
                let console = console_tail(&jail).await;
                let _ = destroy(jail).await;
                Err(BackendError::AgentTimeout(HELLO_TIMEOUT, format!("{error}; jail console: {}", console.trim())))
            }
        }
    }

    async fn adopt(&self, id: &str, record: &str, paused: bool) -> Result<Box<dyn Instance>, BackendError> {
        let record: JailRecord = serde_json::from_str(record)
            .map_err(|error| BackendError::Adopt(format!("its jail record is unreadable: {error}")))?;
        if record.state_dir != self.jails_dir.join(id) {
            return Err(BackendError::Adopt(format!("its state directory {} is not this daemon's", record.state_dir.display())));
        }
        let ids = self.ids.clone();
        let jail = blocking(move || Jail::adopt(&record, &ids)).await.map_err(|error| match error {
            JailError::Gone(_) => BackendError::Gone(error.to_string()),
            other => BackendError::Adopt(other.to_string()),
        })?;
        let jail = Arc::new(jail);
        // The registry has the last word: a daemon that died between
        // freezing (or thawing) a jail and recording it left the two apart.
        let settle = Arc::clone(&jail);
        if let Err(error) = blocking(move || if paused { settle.freeze() } else { settle.thaw() }).await {
            tracing::warn!(%error, sandbox = %id, paused, "cannot bring a re-adopted jail back to its recorded state; keeping it as it is");
        }
        let address = AgentAddress::Unix(jail.agent_socket());
        // A frozen agent cannot answer until it is resumed.
        let agent = if paused {
            agent_client::client(agent_client::channel(address))
        } else {
            match agent_client::wait_for_hello(address.clone(), ADOPT_HELLO_TIMEOUT).await {
                Ok(agent) => agent,
                Err(error) => {
                    tracing::warn!(%error, sandbox = %id, "a re-adopted jail's agent does not answer yet; keeping the jail");
                    agent_client::client(agent_client::channel(address))
                }
            }
        };
        Ok(Box::new(JailInstance { jail, agent }))
    }

    fn reap_unknown(&self, keep: &HashSet<String>) {
        let (cgroups, dirs) = reap_leftovers(self.flavor, &self.cgroup_group, &self.jails_dir, keep);
        ::metrics::counter!(crate::metrics::GUESTS_REAPED, "backend" => "jail").increment(dirs as u64);
        if cgroups + dirs > 0 {
            tracing::warn!(cgroups, dirs, kept = keep.len(), "removed jails of an earlier run that the registry does not know (pooled or half-made ones)");
        }
    }
}

/// The jail's console tail, read off the async runtime.
async fn console_tail(jail: &Arc<Jail>) -> String {
    let jail = Arc::clone(jail);
    tokio::task::spawn_blocking(move || jail.console_tail()).await.unwrap_or_default()
}

struct JailInstance {
    jail: Arc<Jail>,
    agent: AgentClient<Channel>,
}

#[tonic::async_trait]
impl Instance for JailInstance {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.freeze()).await.map_err(control_error("pause"))
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.thaw()).await.map_err(control_error("resume"))
    }

    async fn set_limits(&self, limits: ResourceLimits) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.set_limits(&jail_limits(limits))).await.map_err(control_error("limit"))
    }

    fn memory_bytes(&self) -> u64 {
        self.jail.memory_bytes()
    }

    fn cpu_nanos(&self) -> Option<u64> {
        self.jail.cpu_nanos()
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.jail.disk_bytes()
    }

    fn is_alive(&self) -> bool {
        self.jail.is_alive()
    }

    fn diagnostics(&self) -> String {
        // A bounded read (a few KiB) of a file only the launcher writes.
        format!("jail console: {}", crate::backend::last_lines(&self.jail.console_tail(), 3))
    }

    async fn destroy(self: Box<Self>) -> Result<(), BackendError> {
        destroy(self.jail).await
    }

    fn adoption_record(&self) -> String {
        serde_json::to_string(&self.jail.record()).unwrap_or_default()
    }

    async fn release(self: Box<Self>) -> Result<(), BackendError> {
        let Ok(jail) = Arc::try_unwrap(self.jail) else {
            return Err(BackendError::Control { action: "release", reason: "the jail is still in use".to_string() });
        };
        jail.release();
        Ok(())
    }
}

async fn destroy(jail: Arc<Jail>) -> Result<(), BackendError> {
    let Ok(jail) = Arc::try_unwrap(jail) else {
        return Err(BackendError::Control { action: "destroy", reason: "the jail is still in use".to_string() });
    };
    blocking(move || jail.destroy()).await.map_err(control_error("destroy"))
}

/// Runs blocking jail work (process spawning, cgroup polling) off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, JailError> + Send + 'static) -> Result<T, JailError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(JailError::Setup(format!("jail task failed: {join}"))))
}
