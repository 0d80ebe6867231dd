//! One `sandboxd vmm` process as the daemon sees it: its directory (VMM
//! configuration, control and vsock sockets, serial log, disk overlay), the
//! child process, and the JSON-lines control requests it answers. A
//! suspended microVM keeps its directory while no process runs; waking it
//! starts a new process there.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{net::UnixStream, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use super::super::cgroup::Cgroup;
use crate::{agent_client::AgentAddress, metrics};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 1024;
/// The guest's vsock context id (each VM has its own device, so one id serves all).
pub const GUEST_CID: u64 = 3;
/// How long one control request may take (a snapshot writes guest memory).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot start the VMM process {launcher}: {source}")]
    Spawn { launcher: PathBuf, source: std::io::Error },
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
        "drive": { "base": rootfs, "overlay": dir.join("overlay.img") },
        "vsock": { "guest_cid": GUEST_CID, "uds": dir.join("vsock.sock") },
        "serial_log": dir.join("serial.log"),
        "control_socket": dir.join("control.sock"),
    });
    config.as_object_mut().expect("an object").extend(source.as_object().expect("an object").clone());
    config
}

/// A VMM process and the directory it works in.
pub struct VmProcess {
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl VmProcess {
    /// A VM directory with no process yet.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, child: Mutex::new(None) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn agent_address(&self) -> AgentAddress {
        AgentAddress::Vsock { uds: self.dir.join("vsock.sock"), port: AGENT_PORT }
    }

    /// Starts `launcher vmm` with `config`, in `cgroup` when given.
    pub fn start(&self, launcher: &Path, config: &serde_json::Value, cgroup: Option<&Cgroup>) -> Result<(), VmProcessError> {
        let path = self.dir.join("vmm.json");
        std::fs::write(&path, config.to_string()).map_err(|source| VmProcessError::Write { path: path.clone(), source })?;
        let child = Command::new(launcher)
            .arg("vmm")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| VmProcessError::Spawn { launcher: launcher.to_path_buf(), source })?;
        for procs in cgroup.map(Cgroup::procs_files).unwrap_or_default() {
            let _ = std::fs::write(procs, child.id().to_string());
        }
        *self.lock() = Some(child);
        Ok(())
    }

    /// Sends one control request and returns the reply.
    pub fn control(&self, request: serde_json::Value) -> Result<serde_json::Value, VmProcessError> {
        let op = request["op"].as_str().unwrap_or("?").to_string();
        let failed = |reason: String| VmProcessError::Control { op: op.clone(), reason };
        let stream = UnixStream::connect(self.dir.join("control.sock")).map_err(|e| failed(e.to_string()))?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(|e| failed(e.to_string()))?;
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
        let mut child = self.lock();
        let Some(process) = child.as_mut() else { return false };
        match process.try_wait() {
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
        if let Ok(stats) = self.simple("stats") {
            record_uffd_stats(&stats);
        }
        let _ = self.simple("shutdown");
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the guest's serial console, for error messages.
    pub fn console_tail(&self) -> String {
        let serial = std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default();
        let mut lines: Vec<_> = serial.lines().rev().take(5).collect();
        lines.reverse();
        lines.join(" | ")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
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
