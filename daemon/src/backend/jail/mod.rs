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
//!
//! A jail outlives the daemon: its launcher supervises it on its own, and
//! a restarted daemon re-adopts it from its [`JailRecord`] (the launcher
//! watched through a pidfd, the cgroup found by name, the id range
//! reserved again). A daemon that wants a jail gone kills it explicitly.

mod backend;
mod caps;
mod console;
mod disk;
pub mod launcher;
mod loopdev;
mod mounts;
mod seccomp;

use std::{
    collections::HashSet,
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
use super::{cgroup::{self, Cgroup, CgroupError}, process_identity};
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
    #[error("cannot re-adopt the jail: {0}")]
    Adopt(String),
    #[error("the jail's init exited while the daemon was away; last console output: {0}")]
    Gone(String),
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

    /// Takes `slot` again for a re-adopted jail, which held it before the
    /// daemon restarted.
    pub fn reserve(&self, slot: u32) -> Result<IdLease, JailError> {
        let mut taken = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot >= ID_SLOTS || !taken.insert(slot) {
            return Err(JailError::Adopt(format!("its uid range {slot} is out of bounds or already held by another jail")));
        }
        Ok(IdLease { slot, leases: Arc::clone(&self.0) })
    }
}

/// What a restarted daemon needs to re-adopt a jail (stored, as JSON, in
/// the daemon's registry).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailRecord {
    /// Its range of host ids.
    pub id_slot: u32,
    pub launcher_pid: i32,
    /// The launcher's start time (clock ticks after boot, /proc/PID/stat),
    /// so that a reused pid is never taken for the launcher.
    pub launcher_started: u64,
    /// Its cgroup, `sandboxd/<name>`.
    pub cgroup_name: String,
    pub state_dir: PathBuf,
}

/// The process supervising a jail: our child, or, after a restart, a
/// launcher an earlier run started, watched through a pidfd.
enum Launcher {
    Child(Child),
    Adopted { pid: i32, pidfd: OwnedFd },
}

impl Launcher {
    fn pid(&self) -> i32 {
        match self {
            Launcher::Child(child) => child.id() as i32,
            Launcher::Adopted { pid, .. } => *pid,
        }
    }

    fn has_exited(&mut self) -> bool {
        match self {
            Launcher::Child(child) => !matches!(child.try_wait(), Ok(None)),
            Launcher::Adopted { pidfd, .. } => process_identity::has_exited(pidfd),
        }
    }

    /// Sends `signal` to the launcher (SIGTERM: kill your jail).
    fn signal(&mut self, signal: libc::c_int) {
        match self {
            // An unreaped child's pid cannot have been reused.
            Launcher::Child(child) => {
                if matches!(child.try_wait(), Ok(None)) {
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(child.id() as i32, signal) };
                }
            }
            // SAFETY: pidfd_send_signal on a pidfd we own; it cannot reach a reused pid.
            Launcher::Adopted { pidfd, .. } => unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0);
            },
        }
    }
}

/// A running jail. Dropping it destroys it, unless it was released to
/// outlive the daemon.
/// The jail's writable disk, in its state directory.
const DISK_FILE: &str = "disk.ext4";

pub struct Jail {
    state_dir: PathBuf,
    cgroup: Cgroup,
    cgroup_name: String,
    launcher: Mutex<Launcher>,
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
        let disk = spec.state_dir.join(DISK_FILE);
        disk::create(&disk, spec.disk_mib)?;
        let socket = spec.state_dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).map_err(state_dir_error(&socket))?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(state_dir_error(&socket))?;
        let cgroup_name = format!("{}/{}", spec.cgroup_group, spec.id);
        let cgroup = Cgroup::create(flavor, &cgroup_name, &spec.limits)?;
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
        let child = console::create(&config.console).and_then(|console| launch(&spec.launcher, &config, &listener, console));
        let cgroup = config.cgroup;
        match child {
            Ok(child) => Ok(Jail {
                state_dir: spec.state_dir,
                cgroup,
                cgroup_name,
                launcher: Mutex::new(Launcher::Child(child)),
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

    /// Finds the jail of `record` again after the daemon restarted: its
    /// launcher must be the very process that started it (same pid and
    /// start time) and still running. A jail whose launcher is gone is
    /// [`JailError::Gone`], with what its console said last.
    pub fn adopt(record: &JailRecord, leases: &IdLeases) -> Result<Jail, JailError> {
        let flavor = cgroup::detect()?;
        let console = || console::tail(&record.state_dir.join("console.log"));
        if process_identity::start_time(record.launcher_pid) != Some(record.launcher_started) {
            return Err(JailError::Gone(crate::backend::last_lines(&console(), 3)));
        }
        let pidfd = process_identity::open(record.launcher_pid).map_err(|e| JailError::Adopt(format!("cannot watch its launcher {}: {e}", record.launcher_pid)))?;
        // The start time was read before the pidfd was opened: check again
        // that the pidfd is the launcher's and not a newcomer's.
        if process_identity::start_time(record.launcher_pid) != Some(record.launcher_started) || process_identity::has_exited(&pidfd) {
            return Err(JailError::Gone(crate::backend::last_lines(&console(), 3)));
        }
        if !record.state_dir.join("agent.sock").exists() {
            return Err(JailError::Adopt(format!("its agent socket {} is missing", record.state_dir.join("agent.sock").display())));
        }
        let ids = leases.reserve(record.id_slot)?;
        Ok(Jail {
            state_dir: record.state_dir.clone(),
            cgroup: Cgroup::at(flavor, &record.cgroup_name),
            cgroup_name: record.cgroup_name.clone(),
            launcher: Mutex::new(Launcher::Adopted { pid: record.launcher_pid, pidfd }),
            ids,
            torn_down: false,
        })
    }

    /// What a restarted daemon needs to re-adopt this jail.
    pub fn record(&self) -> JailRecord {
        let launcher_pid = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pid();
        JailRecord {
            id_slot: self.ids.slot,
            launcher_pid,
            launcher_started: process_identity::start_time(launcher_pid).unwrap_or_default(),
            cgroup_name: self.cgroup_name.clone(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// Lets the jail run on without this daemon (which is stopping and
    /// will re-adopt it): nothing is killed or removed.
    pub fn release(mut self) {
        self.torn_down = true;
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

    /// CPU time the jail has used, in nanoseconds, when its cgroup says.
    pub fn cpu_nanos(&self) -> Option<u64> {
        self.cgroup.cpu_nanos()
    }

    /// Host disk the jail's writable disk takes now (its sparse file's
    /// allocated blocks), in bytes.
    pub fn disk_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.state_dir.join(DISK_FILE)).ok().map(|metadata| metadata.blocks() * 512)
    }

    pub fn set_limits(&self, limits: &JailLimits) -> Result<(), JailError> {
        Ok(self.cgroup.set_limits(limits)?)
    }

    /// Whether the jail's init is still running.
    pub fn is_alive(&self) -> bool {
        // The launcher exits as soon as the jail's init does.
        !self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).has_exited()
    }

    /// Kills everything in the jail and deletes its cgroup and state.
    pub fn destroy(mut self) -> Result<(), JailError> {
        self.tear_down()
    }

    fn tear_down(&mut self) -> Result<(), JailError> {
        self.torn_down = true;
        // The launcher kills the jail's init (and so its pid namespace) on
        // SIGTERM and thaws it; removing the cgroup kills whatever is left.
        // The launcher, outside the cgroup, then exits with the init.
        let mut launcher = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        launcher.signal(libc::SIGTERM);
        let removed = self.cgroup.remove();
        reap_within(&mut launcher, LAUNCHER_EXIT_TIMEOUT);
        drop(launcher);
        removed?;
        fs::remove_dir_all(&self.state_dir).map_err(state_dir_error(&self.state_dir))
    }
}

/// Starts `sandboxd jail-exec` in a session of its own (a signal to the
/// daemon's terminal or process group never reaches it), with its own
/// errors going to the console file and the agent's listening socket as
/// fd 3.
fn launch(launcher: &Path, config: &LaunchConfig, listener: &UnixListener, console: fs::File) -> std::io::Result<Child> {
    let config = serde_json::to_string(config).map_err(std::io::Error::other)?;
    let listener_fd = listener.as_raw_fd();
    let mut command = Command::new(launcher);
    command
        .arg("jail-exec")
        .env_clear()
        .env(CONFIG_ENV, config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(console);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid, dup2 and fcntl, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
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

/// Waits up to `timeout` for the launcher to exit, then kills it and
/// waits as long again; never blocks for good on a process that will not
/// die.
fn reap_within(launcher: &mut Launcher, timeout: Duration) {
    for kill in [false, true] {
        if kill {
            launcher.signal(libc::SIGKILL);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if launcher.has_exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    tracing::warn!(pid = launcher.pid(), "a jail launcher did not exit after SIGKILL; leaving it");
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

/// Kills and removes what an earlier run of this daemon left that is not
/// in `keep` (the ids of re-adopted jails): jail cgroups under `group`
/// (their launchers exit with the jails' inits) and jail directories
/// under `jails_dir`. Returns how many of each it removed.
pub fn reap_leftovers(flavor: CgroupFlavor, group: &str, jails_dir: &Path, keep: &HashSet<String>) -> (usize, usize) {
    let unknown = |name: Option<String>| name.is_none_or(|name| !keep.contains(&name));
    let cgroups = Cgroup::children(flavor, group);
    let mut reaped_cgroups = 0;
    for cgroup in cgroups.iter().filter(|cgroup| unknown(cgroup_leaf_name(cgroup))) {
        match cgroup.remove() {
            Ok(()) => reaped_cgroups += 1,
            Err(error) => tracing::warn!(%error, "cannot remove a jail cgroup left by an earlier run"),
        }
    }
    let mut reaped_dirs = 0;
    for entry in fs::read_dir(jails_dir).into_iter().flatten().flatten() {
        if !unknown(entry.file_name().into_string().ok()) {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => reaped_dirs += 1,
            Err(error) => tracing::warn!(%error, path = %path.display(), "cannot remove a jail directory left by an earlier run"),
        }
    }
    (reaped_cgroups, reaped_dirs)
}

/// The last part of a cgroup's name: the jail's id.
fn cgroup_leaf_name(cgroup: &Cgroup) -> Option<String> {
    let procs = cgroup.procs_files().into_iter().next()?;
    procs.parent()?.file_name()?.to_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of(pid: i32, started: u64, state_dir: PathBuf) -> JailRecord {
        JailRecord { id_slot: 7, launcher_pid: pid, launcher_started: started, cgroup_name: "test/none".into(), state_dir }
    }

    #[test]
    fn a_reused_launcher_pid_is_never_adopted() {
        let me = std::process::id() as i32;
        let started = process_identity::start_time(me).expect("this process has a start time");
        let leases = IdLeases::default();
        let stranger = Jail::adopt(&record_of(me, started + 1, PathBuf::from("/nonexistent")), &leases);
        assert!(matches!(stranger, Err(JailError::Gone(_))), "another process under the launcher's pid must read as gone");
        let no_socket = Jail::adopt(&record_of(me, started, PathBuf::from("/nonexistent")), &leases);
        assert!(matches!(no_socket, Err(JailError::Adopt(_))), "a jail without its agent socket is not adopted");
        assert!(leases.reserve(7).is_ok(), "a failed adoption leaves its uid range free");
    }
}
