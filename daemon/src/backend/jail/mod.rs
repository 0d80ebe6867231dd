//! Jails: sandboxes made of Linux namespaces for hosts without hardware
//! virtualization. Each jail's root is the template's root image,
//! read-only; its writable `/tmp` and `/home/user` live on a disk of its
//! own (a sparse ext4 file with a size limit, mounted only inside the
//! jail); its root is an unprivileged host uid of a range no other jail
//! shares (a user namespace, entered after every mount is made); it has a
//! cgroup (memory, CPU, pids, freezer) and a cgroup namespace, a masked
//! `/proc`, no `/sys`, a read-only `/dev`, lo only, a seccomp allow-list
//! and no inherited fds. The agent runs as PID 1 and serves on a socket
//! the daemon created in a directory the jail cannot see.

mod backend;
mod caps;
mod console;
mod disk;
pub mod launcher;
mod loopdev;
mod mounts;
mod seccomp;

use std::{
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::PermissionsExt, net::UnixListener, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use backend::JailBackend;
pub use super::cgroup::{CgroupFlavor, Limits as JailLimits};
use super::cgroup::{self, Cgroup, CgroupError};
use launcher::{LaunchConfig, AGENT_FD, CONFIG_ENV};

/// How long a launcher has to exit once its jail is killed.
const LAUNCHER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most open files of one process in a jail.
const MAX_OPEN_FILES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("jail id {0:?} is invalid: use lowercase letters, digits and dashes")]
    InvalidId(String),
    #[error("cannot prepare {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot start the jail launcher {launcher}: {source}")]
    Launch { launcher: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("{0}")]
    Setup(String),
}

/// Everything needed to start one jail.
#[derive(Clone, Debug)]
pub struct JailSpec {
    /// Sandbox id: lowercase letters, digits and dashes.
    pub id: String,
    /// Host directory of this jail (0700); created here and deleted on destroy.
    pub state_dir: PathBuf,
    /// The `sandboxd` binary, which runs the `jail-exec` launcher.
    pub launcher: PathBuf,
    /// The guest agent binary, mounted read-only as the jail's init.
    pub agent_binary: PathBuf,
    /// The template's root image, mounted read-only on the host.
    pub image: PathBuf,
    pub limits: JailLimits,
    /// Size of the jail's writable disk.
    pub disk_mib: u32,
    /// The cgroup group jails of this daemon live in (`sandboxd/<group>/<id>`).
    pub cgroup_group: String,
    /// PID 1's command inside the jail; `None` runs the agent on its socket.
    pub command: Option<Vec<String>>,
}

/// A range of host uids and gids, held by one jail at a time.
pub struct IdLease {
    slot: u32,
    leases: Arc<Mutex<std::collections::BTreeSet<u32>>>,
}

impl IdLease {
    /// First host id of the range: root inside the jail.
    pub fn base(&self) -> u32 {
        ID_BASE + self.slot * launcher::ID_RANGE
    }
}

impl Drop for IdLease {
    fn drop(&mut self) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.slot);
    }
}

/// Host ids of jails start here (far above ordinary users and the VMMs' ids).
const ID_BASE: u32 = 0x1000_0000;
/// Ranges available, so that the last ends below 0x2000_0000.
const ID_SLOTS: u32 = 0x1000_0000 / launcher::ID_RANGE;

/// Leases ranges of host ids to jails.
#[derive(Clone, Default)]
pub struct IdLeases(Arc<Mutex<std::collections::BTreeSet<u32>>>);

impl IdLeases {
    pub fn lease(&self) -> Result<IdLease, JailError> {
        let mut taken = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (0..ID_SLOTS)
            .find(|slot| !taken.contains(slot))
            .ok_or_else(|| JailError::Setup(format!("all {ID_SLOTS} uid ranges for jails are in use")))?;
        taken.insert(slot);
        Ok(IdLease { slot, leases: Arc::clone(&self.0) })
    }
}

/// A running jail. Dropping it destroys it.
pub struct Jail {
    state_dir: PathBuf,
    cgroup: Cgroup,
    launcher: Mutex<Child>,
    /// Write end of the launcher's stdin; closing it kills the jail.
    lifeline: Option<OwnedFd>,
    ids: IdLease,
    torn_down: bool,
}

/// Gives the daemon a mount namespace of its own, in which host mounts
/// still appear but its own never reach the host: the root images it
/// mounts for jails are invisible to other host users and go away with the
/// daemon, however it ends. Call it before any thread starts (a mount
/// namespace belongs to the thread that unshares it).
pub fn enter_private_mount_namespace() -> Result<(), JailError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| JailError::Setup(format!("cannot give the daemon its own mount namespace: {e}; run it as root")))?;
    nix::mount::mount(None::<&str>, "/", None::<&str>, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|e| JailError::Setup(format!("cannot make the daemon's mounts private: {e}")))
}

/// Checks that this host can run jails, and which cgroups it has.
pub fn host_support() -> Result<CgroupFlavor, JailError> {
    Ok(cgroup::detect()?)
}

fn state_dir_error(path: &Path) -> impl Fn(std::io::Error) -> JailError + '_ {
    move |source| JailError::StateDir { path: path.to_path_buf(), source }
}

/// Creates `path` (and its parents) with mode 0700.
fn private_dir(path: &Path) -> Result<(), JailError> {
    fs::create_dir_all(path).map_err(state_dir_error(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(state_dir_error(path))
}

impl Jail {
    /// Starts the jail; returns once its launcher runs. The caller dials
    /// [`Jail::agent_socket`], which accepts as soon as it exists.
    pub fn spawn(spec: JailSpec, ids: IdLease) -> Result<Jail, JailError> {
        if spec.id.is_empty() || !spec.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(JailError::InvalidId(spec.id));
        }
        let flavor = cgroup::detect()?;
        let (root, disk_mount) = (spec.state_dir.join("root"), spec.state_dir.join("disk-mount"));
        for dir in [&spec.state_dir, &root, &disk_mount] {
            private_dir(dir)?;
        }
        let disk = spec.state_dir.join("disk.ext4");
        disk::create(&disk, spec.disk_mib)?;
        let socket = spec.state_dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).map_err(state_dir_error(&socket))?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(state_dir_error(&socket))?;
        let cgroup = Cgroup::create(flavor, &format!("{}/{}", spec.cgroup_group, spec.id), &spec.limits)?;
        let command = spec.command.clone().unwrap_or_else(|| {
            vec![mounts::AGENT_PATH.into(), "--listen-fd".into(), AGENT_FD.to_string()]
        });
        let config = LaunchConfig {
            image: spec.image.clone(),
            root,
            disk,
            disk_mount,
            agent: spec.agent_binary.clone(),
            console: spec.state_dir.join("console.log"),
            cgroup,
            id_base: ids.base(),
            max_open_files: MAX_OPEN_FILES,
            command,
        };
        let (lifeline_read, lifeline) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| JailError::Setup(format!("cannot create the jail's lifeline pipe: {e}")))?;
        let child = console::create(&config.console)
            .and_then(|console| launch(&spec.launcher, &config, lifeline_read, &listener, console));
        let cgroup = config.cgroup;
        match child {
            Ok(child) => Ok(Jail {
                state_dir: spec.state_dir,
                cgroup,
                launcher: Mutex::new(child),
                lifeline: Some(lifeline),
                ids,
                torn_down: false,
            }),
            Err(source) => {
                let _ = cgroup.remove();
                let _ = fs::remove_dir_all(&spec.state_dir);
                Err(JailError::Launch { launcher: spec.launcher, source })
            }
        }
    }

    /// Host path of the agent's socket: in the jail's state directory,
    /// which no path inside the jail reaches.
    pub fn agent_socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    /// The last few KiB the jail's init printed, sanitised.
    pub fn console_tail(&self) -> String {
        console::tail(&self.state_dir.join("console.log"))
    }

    pub fn freeze(&self) -> Result<(), JailError> {
        Ok(self.cgroup.freeze()?)
    }

    pub fn thaw(&self) -> Result<(), JailError> {
        Ok(self.cgroup.thaw()?)
    }

    /// Memory the jail uses now, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.cgroup.memory_bytes()
    }

    pub fn set_limits(&self, limits: &JailLimits) -> Result<(), JailError> {
        Ok(self.cgroup.set_limits(limits)?)
    }

    /// First host uid of the jail's range (root inside).
    pub fn host_root_uid(&self) -> u32 {
        self.ids.base()
    }

    /// Whether the jail's init is still running.
    pub fn is_alive(&self) -> bool {
        let mut launcher = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        matches!(launcher.try_wait(), Ok(None))
    }

    /// Kills everything in the jail and deletes its cgroup and state.
    pub fn destroy(mut self) -> Result<(), JailError> {
        self.tear_down()
    }

    fn tear_down(&mut self) -> Result<(), JailError> {
        self.torn_down = true;
        // The launcher kills and thaws the jail when its lifeline closes;
        // the cgroup's removal kills whatever is left.
        drop(self.lifeline.take());
        let removed = self.cgroup.remove();
        let mut launcher = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        reap_within(&mut launcher, LAUNCHER_EXIT_TIMEOUT);
        drop(launcher);
        removed?;
        fs::remove_dir_all(&self.state_dir).map_err(state_dir_error(&self.state_dir))
    }
}

/// Starts `sandboxd jail-exec` with the lifeline on stdin, its own errors
/// going to the console file, and the agent's listening socket as fd 3.
fn launch(launcher: &Path, config: &LaunchConfig, lifeline: OwnedFd, listener: &UnixListener, console: fs::File) -> std::io::Result<Child> {
    let config = serde_json::to_string(config).map_err(std::io::Error::other)?;
    let listener_fd = listener.as_raw_fd();
    let mut command = Command::new(launcher);
    command
        .arg("jail-exec")
        .env_clear()
        .env(CONFIG_ENV, config)
        .stdin(Stdio::from(lifeline))
        .stdout(Stdio::null())
        .stderr(console);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2 and fcntl, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let moved = if listener_fd == AGENT_FD {
                libc::fcntl(AGENT_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(listener_fd, AGENT_FD)
            };
            if moved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Waits up to `timeout` for `child` to exit, then kills it and waits as
/// long again; never blocks for good on a process that will not die.
fn reap_within(child: &mut Child, timeout: Duration) {
    for kill in [false, true] {
        if kill {
            let _ = child.kill();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    tracing::warn!(pid = child.id(), "a jail launcher did not exit after SIGKILL; leaving it");
}

impl Drop for Jail {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(error) = self.tear_down() {
                tracing::warn!(%error, "cannot clean up a jail");
            }
        }
    }
}

/// Kills and removes what an earlier run of this daemon left: jail
/// cgroups under `group` and jail directories under `jails_dir`. Their
/// launchers killed the jails when the daemon's lifelines closed; this
/// catches the rest. Returns how many of each it removed.
pub fn reap_leftovers(flavor: CgroupFlavor, group: &str, jails_dir: &Path) -> (usize, usize) {
    let cgroups = Cgroup::children(flavor, group);
    let mut reaped_cgroups = 0;
    for cgroup in &cgroups {
        match cgroup.remove() {
            Ok(()) => reaped_cgroups += 1,
            Err(error) => tracing::warn!(%error, "cannot remove a jail cgroup left by an earlier run"),
        }
    }
    let mut reaped_dirs = 0;
    for entry in fs::read_dir(jails_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => reaped_dirs += 1,
            Err(error) => tracing::warn!(%error, path = %path.display(), "cannot remove a jail directory left by an earlier run"),
        }
    }
    (reaped_cgroups, reaped_dirs)
}
