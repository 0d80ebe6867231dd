//! The VMM process: one microVM per process, booted from a kernel or
//! restored from a snapshot, driven over a unix control socket that speaks
//! one JSON object per line:
//!
//! ```text
//! {"op":"pause"} {"op":"resume"} {"op":"stats"} {"op":"snapshot","dir":"/path"} {"op":"shutdown"}
//! ```
//! Every request gets one reply line: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. The process exits when asked to, or when the
//! guest shuts down; vCPU threads and the control thread run under seccomp.

use std::{
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    builder::{MicroVmBuilder, MicroVmError},
    devices::virtio::{
        block::{Block, CowDisk},
        vsock::Vsock,
        VirtioDevice,
    },
    seccomp::{self, ThreadKind},
    snapshot::{self, RestoreMode, SnapshotError, SnapshotFiles},
    MicroVm, MicroVmConfig, VmExit,
};

/// What one VMM process runs.
#[derive(Debug, Deserialize, Serialize)]
pub struct VmmConfig {
    #[serde(flatten)]
    pub source: VmSource,
    /// File the serial console is appended to.
    pub serial_log: PathBuf,
    pub control_socket: PathBuf,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmSource {
    Boot {
        kernel: PathBuf,
        cmdline: String,
        memory_mib: u32,
        vcpus: u8,
        /// The root disk: a read-only base image with a copy-on-write overlay.
        #[serde(default)]
        drive: Option<DriveConfig>,
        /// Host ↔ guest stream sockets.
        #[serde(default)]
        vsock: Option<VsockConfig>,
    },
    /// Restores a snapshot of a VM without virtio devices (their transport
    /// state is not part of snapshots yet).
    Restore { snapshot_dir: PathBuf, memory: MemoryMode },
}

#[derive(Debug, Deserialize, Serialize)]
pub struct DriveConfig {
    pub base: PathBuf,
    pub overlay: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds: PathBuf,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    MapPrivate,
    Uffd,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    MicroVm(#[from] MicroVmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot open {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Pause,
    Resume,
    Stats,
    Snapshot { dir: PathBuf },
    Shutdown,
}

/// Runs the microVM until it exits or is shut down; returns how it ended.
pub fn run(config: VmmConfig) -> Result<VmExit, VmmError> {
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.serial_log)
        .map_err(io_error(config.serial_log.display().to_string()))?;
    let mut builder = match config.source {
        VmSource::Boot { kernel, cmdline, memory_mib, vcpus, drive, vsock } => {
            let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
            if let Some(drive) = drive {
                let disk = CowDisk::open(&drive.base, &drive.overlay).map_err(io_error(drive.base.display().to_string()))?;
                virtio.push(Box::new(Block::new(disk, drive.read_only, "rootfs")));
            }
            if let Some(vsock) = vsock {
                let device = Vsock::new(vsock.guest_cid, vsock.uds.clone()).map_err(|e| VmmError::Io {
                    what: vsock.uds.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                virtio.push(Box::new(device));
            }
            MicroVmBuilder::new(MicroVmConfig { kernel, cmdline, memory_mib, vcpus, console: Box::new(console), virtio })?
        }
        VmSource::Restore { snapshot_dir, memory } => {
            let files = SnapshotFiles::in_dir(&snapshot_dir);
            let state = Arc::new(snapshot::load_state(&files)?);
            let mode = match memory {
                MemoryMode::MapPrivate => RestoreMode::MapPrivate,
                MemoryMode::Uffd => RestoreMode::Uffd { prefetch: Vec::new(), record: false },
            };
            let restored = snapshot::restore_memory(&files, &state, mode)?;
            MicroVmBuilder::restore(state, restored, Box::new(console))?
        }
    };
    builder.confine_vcpus()?;
    let _ = std::fs::remove_file(&config.control_socket);
    let listener = UnixListener::bind(&config.control_socket).map_err(io_error(config.control_socket.display().to_string()))?;
    listener.set_nonblocking(true).map_err(io_error("the control socket"))?;
    let mut vm = builder.start()?;
    vm.resume();
    seccomp::apply(&seccomp::filter(ThreadKind::Control)?)?;
    serve(&mut vm, &listener)
}

/// How long the control loop waits for a request before it checks the guest.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest request line a client may send.
const MAX_REQUEST: usize = 64 * 1024;

/// Accepts control connections until shutdown or a guest exit.
fn serve(vm: &mut MicroVm, listener: &UnixListener) -> Result<VmExit, VmmError> {
    loop {
        if let Some(exit) = vm.wait_for_exit(POLL_INTERVAL) {
            return Ok(exit);
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        if let Some(exit) = serve_client(vm, stream) {
            return Ok(exit);
        }
    }
}

/// Answers one client's requests (one JSON object a line) while watching
/// the guest: returns the VM's exit when the guest ends or the client asks
/// for shutdown, and None when the client leaves or misbehaves.
fn serve_client(vm: &mut MicroVm, mut stream: UnixStream) -> Option<VmExit> {
    let _ = stream.set_nonblocking(false);
    let mut pending = Vec::new();
    loop {
        if let Some(exit) = vm.wait_for_exit(Duration::ZERO) {
            return Some(exit);
        }
        if !readable(&stream, POLL_INTERVAL) {
            continue;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(count) => pending.extend_from_slice(&chunk[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let (reply, exit) = match serde_json::from_slice::<Request>(&line[..end]) {
                Ok(Request::Shutdown) => (serde_json::json!({ "ok": true }), Some(vm.stop())),
                Ok(request) => (answer(vm, request), None),
                Err(error) => (serde_json::json!({ "ok": false, "error": format!("malformed request: {error}") }), None),
            };
            let replied = writeln!(stream, "{reply}").is_ok();
            if exit.is_some() || !replied {
                return exit;
            }
        }
        if pending.len() > MAX_REQUEST {
            return None;
        }
    }
}

/// Waits up to `timeout` for `stream` to have data (or to be closed).
fn readable(stream: &UnixStream, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for an fd that `stream` keeps open.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}

fn answer(vm: &mut MicroVm, request: Request) -> serde_json::Value {
    let result: Result<serde_json::Value, String> = match request {
        Request::Pause => vm.pause().map(|()| serde_json::json!({})).map_err(|e| e.to_string()),
        Request::Resume => {
            vm.resume();
            Ok(serde_json::json!({}))
        }
        Request::Stats => Ok(stats(vm)),
        Request::Snapshot { dir } => vm
            .pause()
            .map_err(|e| e.to_string())
            .and_then(|()| snapshot::create(vm, &SnapshotFiles::in_dir(&dir)).map_err(|e| e.to_string()))
            .map(|()| serde_json::json!({ "dir": dir })),
        Request::Shutdown => Ok(serde_json::json!({})),
    };
    match result {
        Ok(mut value) => {
            value["ok"] = true.into();
            value
        }
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    }
}

fn stats(vm: &MicroVm) -> serde_json::Value {
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(0);
    let vcpus: Vec<_> = vm
        .vcpus()
        .iter()
        .map(|vcpu| {
            let c = vcpu.counters();
            serde_json::json!({ "pio_exits": c.pio.load(Ordering::Relaxed), "mmio_exits": c.mmio.load(Ordering::Relaxed), "other_exits": c.other.load(Ordering::Relaxed) })
        })
        .collect();
    let uffd_faults = vm.uffd().map(|u| u.stats().faults.load(Ordering::Relaxed));
    serde_json::json!({ "rss_kib": rss_kib, "vcpus": vcpus, "uffd_faults": uffd_faults })
}
