//! One `sandboxd vmm` process as the daemon sees it: its directory (VMM
//! configuration, control and vsock sockets, serial log, disk overlay), the
//! child process, and the JSON-lines control requests it answers. A
//! suspended microVM keeps its directory while no process runs; waking it
//! starts a new process there. Each VMM holds the read end of a pipe on its
//! standard input and exits when the daemon's end closes, so VMMs never
//! outlive the daemon; what a VMM prints goes to `vmm.log` in its directory.

use std::{
    io::{BufRead, BufReader, Write},
    os::{
        fd::OwnedFd,
        unix::{net::UnixStream, process::ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::super::cgroup::Cgroup;
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
/// How long a VMM that is being stopped gets to answer before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot start the VMM process {launcher}: {source}")]
    Spawn { launcher: PathBuf, source: std::io::Error },
    #[error("cannot put the VMM into its cgroup ({0}); it was stopped rather than run without limits")]
    Cgroup(String),
    #[error("the VMM did not answer {op}: {reason}")]
    Control { op: String, reason: String },
    #[error("the VMM refused {op}: {reason}")]
    Refused { op: String, reason: String },
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

/// The `sandboxd vmm` configuration of a VM in `dir` with root disk `rootfs`.
pub fn vmm_config(dir: &Path, rootfs: &Path, source: &VmSource<'_>) -> serde_json::Value {
    let source = match source {
        VmSource::Boot { kernel, cmdline, memory_mib, vcpus } => serde_json::json!({
            "boot": { "kernel": kernel, "cmdline": cmdline, "memory_mib": memory_mib, "vcpus": (*vcpus).clamp(1, 32) },
        }),
        VmSource::Restore { snapshot, memory, working_set, record } => serde_json::json!({
            "restore": {
                "snapshot_dir": snapshot,
                "memory": memory.config_name(),
                "prefetch": working_set.filter(|_| *memory == RestoreMemory::Uffd),
                "record_working_set": record,
            },
        }),
    };
    let mut config = serde_json::json!({
        "exit_with_stdin": true,
        "drive": { "base": rootfs, "overlay": dir.join("overlay.img") },
        "vsock": { "guest_cid": GUEST_CID, "uds": dir.join("vsock.sock") },
        "serial_log": dir.join("serial.log"),
        "control_socket": dir.join("control.sock"),
    });
    config.as_object_mut().expect("an object").extend(source.as_object().expect("an object").clone());
    config
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> VmProcessError + '_ {
    move |source| VmProcessError::Write { path: path.to_path_buf(), source }
}

/// A running VMM and the write end of its lifeline pipe.
struct Running {
    child: Child,
    _lifeline: OwnedFd,
}

impl Running {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VMM process and the directory it works in.
pub struct VmProcess {
    dir: PathBuf,
    running: Mutex<Option<Running>>,
}

impl VmProcess {
    /// A VM directory with no process yet.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, running: Mutex::new(None) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn agent_address(&self) -> AgentAddress {
        AgentAddress::Vsock { uds: self.dir.join("vsock.sock"), port: AGENT_PORT }
    }

    /// Starts `launcher vmm` with `config`, in `cgroup` when given; a VMM
    /// still running from before is killed first.
    pub fn start(&self, launcher: &Path, config: &serde_json::Value, cgroup: Option<&Cgroup>) -> Result<(), VmProcessError> {
        if let Some(previous) = self.lock().take() {
            previous.kill();
        }
        let path = self.dir.join("vmm.json");
        std::fs::write(&path, config.to_string()).map_err(write_error(&path))?;
        let log_path = self.dir.join("vmm.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(write_error(&log_path))?;
        let spawn_error = |source| VmProcessError::Spawn { launcher: launcher.to_path_buf(), source };
        let (lifeline_read, lifeline) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| spawn_error(std::io::Error::from(errno)))?;
        let child = Command::new(launcher)
            .arg("vmm")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::from(lifeline_read))
            .stdout(log.try_clone().map_err(write_error(&log_path))?)
            .stderr(log)
            .spawn()
            .map_err(spawn_error)?;
        let running = Running { child, _lifeline: lifeline };
        for procs in cgroup.map(Cgroup::procs_files).unwrap_or_default() {
            if let Err(error) = std::fs::write(&procs, running.child.id().to_string()) {
                running.kill();
                return Err(VmProcessError::Cgroup(format!("{}: {error}", procs.display())));
            }
        }
        *self.lock() = Some(running);
        Ok(())
    }

    /// Waits for the agent's hello, giving up early when the VMM exits,
    /// and reporting every few seconds through `progress`.
    pub async fn wait_for_agent(&self, timeout: Duration, progress: &(dyn Fn(&str) + Sync)) -> Result<AgentClient<Channel>, String> {
        let started = Instant::now();
        let hello = agent_client::wait_for_hello(self.agent_address(), timeout);
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

    /// Sends one control request and returns the reply.
    pub fn control(&self, request: serde_json::Value) -> Result<serde_json::Value, VmProcessError> {
        let timeout = if request["op"] == "snapshot" { SNAPSHOT_TIMEOUT } else { CONTROL_TIMEOUT };
        self.control_within(request, timeout)
    }

    fn control_within(&self, request: serde_json::Value, timeout: Duration) -> Result<serde_json::Value, VmProcessError> {
        let op = request["op"].as_str().unwrap_or("?").to_string();
        let failed = |reason: String| VmProcessError::Control { op: op.clone(), reason };
        let stream = UnixStream::connect(self.dir.join("control.sock")).map_err(|e| failed(e.to_string()))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| failed(e.to_string()))?;
        writeln!(&stream, "{request}").map_err(|e| failed(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(|e| failed(e.to_string()))?;
        let reply: serde_json::Value = serde_json::from_str(&line).map_err(|e| failed(format!("{e} in {line:?}")))?;
        match reply["ok"].as_bool() {
            Some(true) => Ok(reply),
            _ => Err(VmProcessError::Refused { op, reason: reply["error"].as_str().unwrap_or("no reason given").to_string() }),
        }
    }

    /// Sends `{"op": op}`.
    pub fn simple(&self, op: &str) -> Result<serde_json::Value, VmProcessError> {
        self.control(serde_json::json!({ "op": op }))
    }

    /// Whether the VMM still runs; says why when it died (a seccomp
    /// violation kills it with SIGSYS).
    pub fn is_alive(&self) -> bool {
        let mut running = self.lock();
        let Some(process) = running.as_mut() else { return false };
        match process.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) if status.signal() == Some(libc::SIGSYS) => {
                tracing::error!(vmm = %self.dir.display(), "the VMM was killed by its seccomp filter (SIGSYS)");
                false
            }
            Ok(Some(status)) => {
                tracing::warn!(vmm = %self.dir.display(), %status, "the VMM exited");
                false
            }
            Err(_) => false,
        }
    }

    /// Ends the VMM process: records its userfaultfd figures, asks it to
    /// shut down, then makes sure. The directory stays.
    pub fn stop(&self) {
        if self.is_alive() {
            if let Ok(stats) = self.control_within(serde_json::json!({ "op": "stats" }), STOP_TIMEOUT) {
                record_uffd_stats(&stats);
            }
            let _ = self.control_within(serde_json::json!({ "op": "shutdown" }), STOP_TIMEOUT);
        }
        if let Some(running) = self.lock().take() {
            running.kill();
        }
    }

    /// The last lines of the VMM's log and of the guest's serial console,
    /// for error messages.
    pub fn diagnostics(&self) -> String {
        format!("VMM log: {}; last console lines: {}", tail(&self.dir.join("vmm.log"), 3), tail(&self.dir.join("serial.log"), 5))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The last `lines` lines of a text file, joined with " | ".
fn tail(path: &Path, lines: usize) -> String {
    super::super::last_lines(&std::fs::read_to_string(path).unwrap_or_default(), lines)
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(running) = self.lock().take() {
            running.kill();
        }
    }
}

fn record_uffd_stats(stats: &serde_json::Value) {
    let uffd = &stats["uffd"];
    if let Some(faults) = uffd["faults"].as_u64() {
        ::metrics::counter!(metrics::UFFD_FAULTS).increment(faults);
        ::metrics::counter!(metrics::UFFD_PAGES_PREFETCHED).increment(uffd["pages_prefetched"].as_u64().unwrap_or(0));
    }
}
