//! One `sandboxd vmm` process as the daemon sees it: its directory (see
//! [`super::vm_dir`]: the VMM's configuration and log, links to its
//! control and vsock sockets, its jail), the jailed child process, and the
//! JSON-lines control requests it answers. A suspended microVM keeps its
//! directory while no process runs; waking it starts a new process there.
//!
//! Every VMM is jailed ([`sandbox_vmm::jailer`]): it runs as its own uid
//! ([`super::uid_slots`]) in its own PID, mount, network, IPC and UTS
//! namespaces, with `DIR/jail` as its whole file system, in its cgroup. The
//! host files it needs (kernel, root image, the snapshot it restores) are
//! bound in read-only at fixed names, and every path in its configuration
//! and in control requests is a path inside the jail.
//!
//! Nothing waits on a VMM without a deadline: a control request that gets
//! no answer in time, or a VMM that does not die within seconds of
//! SIGKILL, is reported with the states of its threads (and, for the
//! first, killed). What a VMM prints goes to `vmm.log` in its directory.
//!
//! A sandbox's VMM outlives the daemon ([`Lifetime::OutlivesDaemon`]): it
//! runs in a session of its own with nothing tying it to the daemon, and
//! the daemon notes who it is in `DIR/vmm.process` (pid, start time, boot
//! id and uid), from which a restarted daemon finds it again
//! ([`VmProcess::reattach`]). A VMM that serves the daemon only for a
//! while (a template build) holds the read end of a pipe on its standard
//! input instead, and exits when the daemon's end closes.

use std::{
    collections::HashSet,
    ffi::OsStr,
    io::{Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::{
    super::{cgroup::Cgroup, process_identity::{self, ProcessIdentity}},
    uid_slots::{self, UidLease, UidSlotError},
    vm_dir::{self, VmDirError, JAIL},
    vmm_child::VmmChild,
};
use crate::{
    agent_client::{self, AgentAddress},
    metrics,
};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 1024;
/// The guest's vsock context id (each VM has its own device, so one id serves all).
pub const GUEST_CID: u64 = 3;
/// How long a snapshot request may take (it writes guest memory out).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long any other control request may take (a pause waits up to 5 s for vCPUs).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VMM that is being stopped gets to answer, and then to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Who a VMM that outlives the daemon is, in its directory.
const IDENTITY_FILE: &str = "vmm.process";
/// Longest identity file read back.
const MAX_IDENTITY: u64 = 4096;
/// How long a VMM gets to die after SIGKILL before it is reported stuck.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply line the daemon reads from a VMM.
const MAX_REPLY: usize = 1 << 20;
/// The VMM's sockets, as named inside its jail and linked into its directory.
const CONTROL_SOCKET: &str = "control.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Where host files are bound read-only inside the jail.
const KERNEL_BIND: &str = "kernel";
const ROOTFS_BIND: &str = "rootfs";
const SNAPSHOT_BIND: &str = "snapshot";
const WORKING_SET_BIND: &str = "working-set";

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error(transparent)]
    Dir(#[from] VmDirError),
    #[error(transparent)]
    Uid(#[from] UidSlotError),
    #[error("cannot start the VMM process {launcher}: {source}")]
    Spawn { launcher: PathBuf, source: std::io::Error },
    #[error("the jailed VMM runs as an unprivileged uid and cannot read {0}: make it readable by others (chmod a+rX), or rebuild the template")]
    Unreadable(PathBuf),
    #[error("the process {pid} named in {file} runs as uid {found:?}, not as its VMM's uid {uid}: it was not re-adopted")]
    ForeignProcess { pid: i32, file: PathBuf, uid: u32, found: Option<u32> },
    #[error("{file} is unreadable ({reason}); its VMM, if any, is not re-adopted")]
    Identity { file: PathBuf, reason: String },
    #[error("{0} is outside the VMM's jail directory, which is all a VMM can see: put it under {1}")]
    OutsideJail(PathBuf, PathBuf),
    #[error("no VMM runs in {0}")]
    NotRunning(PathBuf),
    #[error("the VMM did not answer {op}: {reason}")]
    Control { op: String, reason: String },
    #[error("the VMM refused {op}: {reason}")]
    Refused { op: String, reason: String },
    #[error("the VMM did not answer {op} within {waited:?} and was killed; its threads were: {threads}")]
    Stuck { op: String, waited: Duration, threads: String },
    #[error("the VMM (pid {pid}) did not die within {KILL_TIMEOUT:?} of SIGKILL; a thread reaps it when it does; its threads: {threads}")]
    Unkillable { pid: u32, threads: String },
}

/// Whether a VMM may outlive the daemon that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// A sandbox's (or a pooled guest's) VMM: it runs on when the daemon
    /// dies, and a restarted daemon re-adopts or reaps it.
    OutlivesDaemon,
    /// A VMM the daemon needs only for a while (a template build): it
    /// stops its VM and exits when the daemon goes away.
    WithDaemon,
}

/// Who a VMM that outlives the daemon is (`DIR/vmm.process`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct VmmIdentity {
    process: ProcessIdentity,
    uid: u32,
}

/// Where a VM's memory and state come from.
pub enum VmSource<'a> {
    Boot { kernel: &'a Path, cmdline: &'a str, memory_mib: u32, vcpus: u32 },
    Restore { snapshot: &'a Path, memory: RestoreMemory, working_set: Option<&'a Path>, record: bool },
}

/// How a restored VM's memory is brought in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreMemory {
    /// A private copy-on-write mapping of the snapshot's memory file.
    #[value(name = "map-private")]
    MapPrivate,
    /// userfaultfd, prefetching the template's recorded working set.
    Uffd,
}

impl RestoreMemory {
    fn config_name(self) -> &'static str {
        match self {
            RestoreMemory::MapPrivate => "map_private",
            RestoreMemory::Uffd => "uffd",
        }
    }
}

/// The `sandboxd vmm` configuration of a VM with root disk `rootfs`: the
/// host files it needs are bound into its jail, and every path is the one
/// the VMM sees there. [`VmProcess::start`] adds the jail's root, uid and
/// cgroup.
pub fn vmm_config(rootfs: &Path, source: &VmSource<'_>) -> serde_json::Value {
    let mut binds = vec![bind(rootfs, ROOTFS_BIND)];
    let source = match source {
        VmSource::Boot { kernel, cmdline, memory_mib, vcpus } => {
            binds.push(bind(kernel, KERNEL_BIND));
            serde_json::json!({
                "boot": { "kernel": jail_root(KERNEL_BIND), "cmdline": cmdline, "memory_mib": memory_mib, "vcpus": (*vcpus).clamp(1, 32) },
            })
        }
        VmSource::Restore { snapshot, memory, working_set, record } => {
            binds.push(bind(snapshot, SNAPSHOT_BIND));
            let prefetch = working_set.filter(|_| *memory == RestoreMemory::Uffd).map(|set| match set.strip_prefix(snapshot) {
                Ok(inside) => jail_root(SNAPSHOT_BIND).join(inside),
                Err(_) => {
                    binds.push(bind(set, WORKING_SET_BIND));
                    jail_root(WORKING_SET_BIND)
                }
            });
            serde_json::json!({
                "restore": {
                    "snapshot_dir": jail_root(SNAPSHOT_BIND),
                    "memory": memory.config_name(),
                    "prefetch": prefetch,
                    "record_working_set": record,
                },
            })
        }
    };
    let mut config = serde_json::json!({
        "drive": { "base": jail_root(ROOTFS_BIND), "overlay": "/overlay.img" },
        "vsock": { "guest_cid": GUEST_CID, "uds": jail_root(VSOCK_SOCKET) },
        "serial_log": "/serial.log",
        "control_socket": jail_root(CONTROL_SOCKET),
        "jail": { "binds": binds },
    });
    config.as_object_mut().expect("an object").extend(source.as_object().expect("an object").clone());
    config
}

fn bind(source: &Path, name: &str) -> serde_json::Value {
    serde_json::json!({ "source": source, "name": name })
}

/// `/name` inside the jail.
fn jail_root(name: &str) -> PathBuf {
    Path::new("/").join(name)
}

/// A running VMM and its uid; for a VMM this daemon started, the uid's
/// lease (a re-adopted VMM holds the lease's lock itself) and, for one
/// that must not outlive the daemon, the write end of its lifeline pipe.
struct Running {
    child: VmmChild,
    uid: u32,
    _lease: Option<UidLease>,
    _lifeline: Option<OwnedFd>,
    /// The sockets linked into the directory since this VMM started.
    linked: HashSet<&'static str>,
    /// Whether its exit has been logged.
    exit_reported: bool,
}

/// A VMM process and the directory it works in.
pub struct VmProcess {
    dir: PathBuf,
    lifetime: Lifetime,
    running: Mutex<Option<Running>>,
}

impl VmProcess {
    /// A VM directory with no process yet; its VMMs will live as `lifetime` says.
    pub fn new(dir: PathBuf, lifetime: Lifetime) -> Self {
        Self { dir, lifetime, running: Mutex::new(None) }
    }

    /// The VM directory `dir` of an earlier run of the daemon, with the VMM
    /// that runs there re-attached: the very process that daemon started
    /// (same pid, start time and boot, watched through a pidfd), running as
    /// the VMM's uid. Without one (it exited, or the host rebooted), no VMM
    /// runs. Only `DIR` is read, which is the daemon's alone.
    pub fn reattach(dir: PathBuf) -> Result<Self, VmProcessError> {
        let vm = Self::new(dir, Lifetime::OutlivesDaemon);
        let file = vm.dir.join(IDENTITY_FILE);
        let Some(identity) = read_identity(&file)? else { return Ok(vm) };
        let Some(pidfd) = identity.process.open() else {
            vm_dir::unlink(&file)?;
            return Ok(vm);
        };
        let (pid, uid) = (identity.process.pid, identity.uid);
        let found = process_identity::real_uid(pid);
        if found != Some(uid) || !uid_slots::is_vmm_uid(uid) {
            return Err(VmProcessError::ForeignProcess { pid, file, uid, found });
        }
        let linked = [CONTROL_SOCKET, VSOCK_SOCKET].into_iter().filter(|name| vm_dir::is_socket(&vm.dir.join(name))).collect();
        let child = VmmChild::adopt(pid, pidfd);
        *vm.lock() = Some(Running { child, uid, _lease: None, _lifeline: None, linked, exit_reported: false });
        Ok(vm)
    }

    /// Lets the VMM run on without this daemon, which is stopping and will
    /// re-adopt it: nothing is killed and its identity file stays.
    pub fn release(&self) {
        drop(self.lock().take());
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host directory the VMM sees as `/`.
    pub fn jail_dir(&self) -> PathBuf {
        self.dir.join(JAIL)
    }

    /// What the VMM calls `host`, a path inside its jail directory.
    pub fn jail_path(&self, host: &Path) -> Result<PathBuf, VmProcessError> {
        let jail = self.jail_dir();
        host.strip_prefix(&jail)
            .map(|inside| Path::new("/").join(inside))
            .map_err(|_| VmProcessError::OutsideJail(host.to_path_buf(), jail.clone()))
    }

    /// Creates the empty directory `host` inside the jail for the running
    /// VMM to write into (a snapshot); returns what the VMM calls it.
    pub fn create_dir_for_vmm(&self, host: &Path) -> Result<PathBuf, VmProcessError> {
        let inside = self.jail_path(host)?;
        let uid = self.lock().as_ref().map(|running| running.uid).ok_or_else(|| VmProcessError::NotRunning(self.dir.clone()))?;
        vm_dir::recreate_dir(host, uid)?;
        Ok(inside)
    }

    /// The VMM's pid (in the daemon's PID namespace) while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(|running| running.child.pid())
    }

    /// Starts `launcher vmm` with `config` (see [`vmm_config`]), jailed in
    /// this directory, in `cgroup` when given; a VMM still running from
    /// before is stopped first.
    pub fn start(&self, launcher: &Path, config: &serde_json::Value, cgroup: Option<&Cgroup>) -> Result<(), VmProcessError> {
        if let Some(previous) = self.lock().take() {
            if let Err(error) = end(previous, &self.dir) {
                tracing::error!(%error, vmm = %self.dir.display(), "the previous VMM of this directory is stuck");
            }
        }
        vm_dir::prepare(&self.dir)?;
        // The links and the sockets of an earlier VMM here: a new VMM binds
        // its own, and only those may be linked.
        for socket in [CONTROL_SOCKET, VSOCK_SOCKET] {
            vm_dir::unlink(&self.dir.join(socket))?;
            vm_dir::unlink(&self.jail_dir().join(socket))?;
        }
        let mut config = config.clone();
        config["exit_with_stdin"] = (self.lifetime == Lifetime::WithDaemon).into();
        for bind in config["jail"]["binds"].as_array().into_iter().flatten() {
            let source = Path::new(bind["source"].as_str().unwrap_or_default());
            vm_dir::readable_by_others(source).map_err(VmProcessError::Unreadable)?;
        }
        let lease = uid_slots::lease()?;
        let jail = &mut config["jail"];
        jail["root"] = self.jail_dir().display().to_string().into();
        jail["uid"] = lease.uid().into();
        jail["gid"] = lease.uid().into();
        jail["cgroup_procs"] = serde_json::json!(cgroup.map(Cgroup::procs_files).unwrap_or_default());
        // The uid's lock, so the slot stays taken while the VMM lives.
        jail["keep_fds"] = serde_json::json!([3]);
        let config_path = self.dir.join("vmm.json");
        vm_dir::write_private(&config_path, config.to_string().as_bytes())?;
        let log = vm_dir::open_log(&self.dir.join("vmm.log"))?;
        vm_dir::chown_tree(&self.jail_dir(), lease.uid(), lease.uid())?;
        let spawn_error = |source| VmProcessError::Spawn { launcher: launcher.to_path_buf(), source };
        let (stdin, lifeline) = self.standard_input().map_err(spawn_error)?;
        let args = [OsStr::new("vmm"), OsStr::new("--config"), config_path.as_os_str()];
        let fds = [stdin.as_fd(), log.as_fd(), log.as_fd(), lease.lock()];
        let child = VmmChild::spawn(launcher, &args, fds).map_err(spawn_error)?;
        let uid = lease.uid();
        let identity = self.note_identity(child.pid(), uid);
        *self.lock() = Some(Running { child, uid, _lease: Some(lease), _lifeline: lifeline, linked: HashSet::new(), exit_reported: false });
        identity
    }

    /// The VMM's standard input: /dev/null for one that outlives the
    /// daemon, else the read end of a lifeline pipe (with its write end).
    fn standard_input(&self) -> std::io::Result<(OwnedFd, Option<OwnedFd>)> {
        match self.lifetime {
            Lifetime::OutlivesDaemon => Ok((std::fs::File::open("/dev/null")?.into(), None)),
            Lifetime::WithDaemon => {
                let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                Ok((read, Some(write)))
            }
        }
    }

    /// Writes who the new VMM is to `DIR/vmm.process` (for a VMM that
    /// outlives the daemon).
    fn note_identity(&self, pid: u32, uid: u32) -> Result<(), VmProcessError> {
        if self.lifetime == Lifetime::WithDaemon {
            return Ok(());
        }
        let file = self.dir.join(IDENTITY_FILE);
        let process = ProcessIdentity::of(pid as i32)
            .ok_or_else(|| VmProcessError::Identity { file: file.clone(), reason: format!("the VMM (pid {pid}) exited at once") })?;
        let text = serde_json::to_string(&VmmIdentity { process, uid }).expect("an identity serializes");
        Ok(vm_dir::write_private(&file, text.as_bytes())?)
    }

    /// The link to the VMM's socket `name`, made once the VMM has created
    /// it; None until then.
    fn socket(&self, name: &'static str) -> Result<Option<PathBuf>, VmProcessError> {
        let mut running = self.lock();
        let running = running.as_mut().ok_or_else(|| VmProcessError::NotRunning(self.dir.clone()))?;
        if running.linked.contains(name) {
            return Ok(Some(self.dir.join(name)));
        }
        let link = vm_dir::link_socket(&self.dir, name, running.uid)?;
        if link.is_some() {
            running.linked.insert(name);
        }
        Ok(link)
    }

    /// Waits for the agent's hello, giving up early when the VMM exits,
    /// and reporting every few seconds through `progress`.
    pub async fn wait_for_agent(&self, timeout: Duration, progress: &(dyn Fn(&str) + Sync)) -> Result<AgentClient<Channel>, String> {
        let started = Instant::now();
        let uds = self.wait_for_socket(VSOCK_SOCKET, timeout).await?;
        let left = timeout.saturating_sub(started.elapsed());
        let hello = agent_client::wait_for_hello(AgentAddress::Vsock { uds, port: AGENT_PORT }, left);
        tokio::pin!(hello);
        let mut reported = Instant::now();
        loop {
            tokio::select! {
                result = &mut hello => return result.map_err(|e| format!("{e}; {}", self.diagnostics())),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !self.is_alive() {
                        return Err(format!("the VMM exited; {}", self.diagnostics()));
                    }
                    if reported.elapsed() >= Duration::from_secs(5) {
                        reported = Instant::now();
                        progress(&format!("still waiting for the agent after {:.0} s", started.elapsed().as_secs_f64()));
                    }
                }
            }
        }
    }

    /// Waits until the VMM has created its socket `name` and returns its link.
    async fn wait_for_socket(&self, name: &'static str, timeout: Duration) -> Result<PathBuf, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(link) = self.socket(name).map_err(|e| format!("{e}; {}", self.diagnostics()))? {
                return Ok(link);
            }
            if !self.is_alive() {
                return Err(format!("the VMM exited before it opened {name}; {}", self.diagnostics()));
            }
            if Instant::now() >= deadline {
                return Err(format!("the VMM did not open {name} within {timeout:?}; {}", self.diagnostics()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends one control request and returns the reply. A VMM that does
    /// not answer in time is killed and reported with its threads' states.
    pub fn control(&self, request: serde_json::Value) -> Result<serde_json::Value, VmProcessError> {
        let timeout = if request["op"] == "snapshot" { SNAPSHOT_TIMEOUT } else { CONTROL_TIMEOUT };
        let op = request["op"].as_str().unwrap_or("?").to_string();
        match self.request(&request, timeout) {
            Err(Failure::TimedOut) => {
                let threads = self.kill_stuck();
                Err(VmProcessError::Stuck { op, waited: timeout, threads })
            }
            Err(Failure::Other(reason)) => Err(VmProcessError::Control { op, reason }),
            Ok(reply) => match reply["ok"].as_bool() {
                Some(true) => Ok(reply),
                _ => Err(VmProcessError::Refused { op, reason: reply["error"].as_str().unwrap_or("no reason given").to_string() }),
            },
        }
    }

    /// Sends `{"op": op}`.
    pub fn simple(&self, op: &str) -> Result<serde_json::Value, VmProcessError> {
        self.control(serde_json::json!({ "op": op }))
    }

    /// One request and its reply line, all within `timeout`.
    fn request(&self, request: &serde_json::Value, timeout: Duration) -> Result<serde_json::Value, Failure> {
        let deadline = Instant::now() + timeout;
        let path = self
            .socket(CONTROL_SOCKET)
            .map_err(|e| Failure::Other(e.to_string()))?
            .ok_or_else(|| Failure::Other("the VMM has not opened its control socket".into()))?;
        let mut stream = connect_within(&path, timeout)?;
        stream.set_write_timeout(Some(timeout)).map_err(Failure::io)?;
        writeln!(stream, "{request}").map_err(Failure::io)?;
        let mut reply = Vec::new();
        while !reply.ends_with(b"\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::TimedOut);
            }
            stream.set_read_timeout(Some(left)).map_err(Failure::io)?;
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => return Err(Failure::Other("the VMM closed the connection without a reply".into())),
                Ok(count) => reply.extend_from_slice(&chunk[..count]),
                Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(Failure::TimedOut)
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(Failure::io(error)),
            }
            if reply.len() > MAX_REPLY {
                return Err(Failure::Other(format!("the VMM's reply exceeds {MAX_REPLY} bytes")));
            }
        }
        serde_json::from_slice(&reply).map_err(|e| Failure::Other(format!("{e} in {:?}", String::from_utf8_lossy(&reply))))
    }

    /// Whether the VMM still runs; says why when it died (a seccomp
    /// violation kills it with SIGSYS).
    pub fn is_alive(&self) -> bool {
        let mut running = self.lock();
        let Some(process) = running.as_mut() else { return false };
        let status = match process.child.try_wait() {
            Ok(None) => return true,
            Ok(Some(status)) => status,
            Err(_) => return false,
        };
        if !std::mem::replace(&mut process.exit_reported, true) {
            if status.signal() == Some(libc::SIGSYS) {
                tracing::error!(vmm = %self.dir.display(), "the VMM was killed by its seccomp filter (SIGSYS)");
            } else {
                tracing::warn!(vmm = %self.dir.display(), %status, "the VMM exited");
            }
        }
        false
    }

    /// Kills a VMM that stopped answering; returns its threads' states
    /// from before the kill.
    fn kill_stuck(&self) -> String {
        let Some(running) = self.lock().take() else { return "none (the VMM had exited)".into() };
        let threads = running.child.thread_states();
        tracing::error!(vmm = %self.dir.display(), %threads, "killing a VMM that stopped answering");
        ::metrics::counter!(crate::metrics::VMMS_KILLED).increment(1);
        if let Err(error) = end(running, &self.dir) {
            tracing::error!(%error, vmm = %self.dir.display(), "the stuck VMM does not die");
        }
        threads
    }

    /// Ends the VMM process: records its userfaultfd figures, asks it to
    /// shut down, then makes sure, within seconds. The directory stays.
    pub fn stop(&self) -> Result<(), VmProcessError> {
        if self.is_alive() {
            if let Ok(stats) = self.request(&serde_json::json!({ "op": "stats" }), STOP_TIMEOUT) {
                record_uffd_stats(&stats);
            }
            if self.request(&serde_json::json!({ "op": "shutdown" }), STOP_TIMEOUT).is_ok() {
                if let Some(running) = self.lock().as_mut() {
                    let _ = running.child.wait_timeout(STOP_TIMEOUT);
                }
            }
        }
        match self.lock().take() {
            Some(running) => end(running, &self.dir),
            None => Ok(()),
        }
    }

    /// The last lines of the VMM's log and of the guest's serial console,
    /// and, while the VMM runs, its threads' states, for error messages.
    pub fn diagnostics(&self) -> String {
        let logs = format!(
            "VMM log: {}; last console lines: {}",
            vm_dir::tail(&self.dir.join("vmm.log"), 3),
            vm_dir::tail(&self.jail_dir().join("serial.log"), 5)
        );
        let mut running = self.lock();
        let Some(running) = running.as_mut() else { return logs };
        match running.child.try_wait() {
            Ok(None) => format!("{logs}; VMM threads: {}", running.child.thread_states()),
            _ => logs,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a control request got no reply.
enum Failure {
    TimedOut,
    Other(String),
}

impl Failure {
    fn io(error: std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Failure::TimedOut,
            _ => Failure::Other(error.to_string()),
        }
    }
}

/// Connects to a unix socket, waiting at most `timeout` (a VMM that stopped
/// accepting fills its backlog, and connect then blocks).
fn connect_within(path: &Path, timeout: Duration) -> Result<UnixStream, Failure> {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    let other = |e: nix::errno::Errno| Failure::io(e.into());
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(other)?;
    let limit = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros().into());
    setsockopt(&fd, sockopt::SendTimeout, &limit).map_err(other)?;
    let address = UnixAddr::new(path).map_err(other)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
        Err(nix::errno::Errno::EAGAIN) => Err(Failure::TimedOut),
        Err(errno) => Err(other(errno)),
        Ok(()) => Ok(UnixStream::from(fd)),
    }
}

/// Kills the VMM unless it has exited, and reaps it within KILL_TIMEOUT;
/// then its jail is root's again and its uid free. A VMM that does not die
/// (stuck in uninterruptible sleep) is reported with its threads' states
/// and left to a thread that reaps it whenever it dies, releasing its uid.
fn end(mut running: Running, dir: &Path) -> Result<(), VmProcessError> {
    if matches!(running.child.try_wait(), Ok(None)) {
        if let Err(error) = running.child.kill() {
            tracing::warn!(%error, vmm = %dir.display(), "cannot send SIGKILL to the VMM");
        }
    }
    match running.child.wait_timeout(KILL_TIMEOUT) {
        Ok(Some(_)) => {
            drop(running);
            vm_dir::unlink(&dir.join(IDENTITY_FILE))?;
            vm_dir::chown_tree(&dir.join(JAIL), 0, 0).map_err(VmProcessError::from)
        }
        Ok(None) | Err(_) => {
            let (pid, threads) = (running.child.pid(), running.child.thread_states());
            let vmm = dir.display().to_string();
            let reaper = std::thread::Builder::new().name(format!("reap-vmm-{pid}")).spawn(move || {
                let status = running.child.wait_forever();
                tracing::warn!(%vmm, ?status, "a VMM reported stuck has died; its uid is free");
            });
            if let Err(error) = reaper {
                tracing::error!(%error, "cannot start a thread to reap a stuck VMM; it stays a zombie");
            }
            Err(VmProcessError::Unkillable { pid, threads })
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(running) = self.lock().take() {
            if let Err(error) = end(running, &self.dir) {
                tracing::error!(%error, vmm = %self.dir.display(), "a dropped VMM is stuck");
            }
        }
    }
}

/// The identity file of an earlier run's VMM, if there is one.
fn read_identity(file: &Path) -> Result<Option<VmmIdentity>, VmProcessError> {
    let unreadable = |reason: String| VmProcessError::Identity { file: file.to_path_buf(), reason };
    let Some(text) = vm_dir::read_small(file, MAX_IDENTITY).map_err(|e| unreadable(e.to_string()))? else { return Ok(None) };
    serde_json::from_slice(&text).map(Some).map_err(|e| unreadable(e.to_string()))
}

fn record_uffd_stats(stats: &serde_json::Value) {
    let uffd = &stats["uffd"];
    if let Some(faults) = uffd["faults"].as_u64() {
        ::metrics::counter!(metrics::UFFD_FAULTS).increment(faults);
        ::metrics::counter!(metrics::UFFD_PAGES_PREFETCHED).increment(uffd["pages_prefetched"].as_u64().unwrap_or(0));
    }
}
