//! The VMM process: one microVM per process, booted from a kernel or
//! restored from a snapshot, driven over a unix control socket that speaks
//! one JSON object per line:
//!
//! ```text
//! {"op":"pause"} {"op":"resume"} {"op":"stats"} {"op":"snapshot","dir":"/path"}
//! {"op":"working_set","path":"/path"} {"op":"shutdown"}
//! ```
//! Every request gets one reply line: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. The process exits when asked to, or when the
//! guest shuts down; vCPU threads and the control thread run under seccomp.
//! With a `jail` section the process first confines itself
//! ([`crate::jailer`]); every other path of the configuration and of the
//! control requests is then a path inside the jail's directory.

use std::{
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    builder::{MicroVmBuilder, MicroVmError},
    devices::virtio::{
        block::{self, Block, CowDisk},
        vsock::Vsock,
        VirtioDevice,
    },
    jailer::{self, JailConfig, JailError},
    seccomp::{self, ThreadKind},
    snapshot::{self, RestoreMode, SnapshotError, SnapshotFiles},
    MicroVm, MicroVmConfig, VmExit,
};

/// What one VMM process runs.
#[derive(Debug, Deserialize, Serialize)]
pub struct VmmConfig {
    #[serde(flatten)]
    pub source: VmSource,
    /// The root disk: a read-only base image with a copy-on-write overlay.
    #[serde(default)]
    pub drive: Option<DriveConfig>,
    /// Host ↔ guest stream sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// File the serial console is appended to.
    pub serial_log: PathBuf,
    pub control_socket: PathBuf,
    /// For a restored VM: leave its vCPUs stopped until a `resume` request
    /// (a warm-pool member). A booted VM always starts running.
    #[serde(default)]
    pub start_paused: bool,
    /// Standard input is the read end of a pipe whose other end the
    /// starting process holds: when it closes (that process died), the VMM
    /// stops the VM and exits instead of running on unattended.
    #[serde(default)]
    pub exit_with_stdin: bool,
    /// Confine the process before it opens anything (see [`crate::jailer`]).
    #[serde(default)]
    pub jail: Option<JailConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmSource {
    Boot {
        kernel: PathBuf,
        cmdline: String,
        memory_mib: u32,
        vcpus: u8,
    },
    /// Restores a snapshot. The VM must be given the devices the snapshot
    /// was taken with; a drive's overlay that does not exist yet starts as
    /// a copy of the snapshot's.
    Restore {
        snapshot_dir: PathBuf,
        memory: MemoryMode,
        /// A recorded working set (little-endian u64 offsets into the memory
        /// file, in fault order) to copy in before the guest runs; uffd only.
        #[serde(default)]
        prefetch: Option<PathBuf>,
        /// Record the order of the guest's page faults (uffd only), for the
        /// `working_set` request.
        #[serde(default)]
        record_working_set: bool,
    },
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
    #[error("cannot jail the VMM: {0}")]
    Jail(#[from] JailError),
    #[error("cannot open {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
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
    WorkingSet { path: PathBuf },
    Shutdown,
}

/// Runs the microVM until it exits or is shut down; returns how it ended.
pub fn run(config: VmmConfig) -> Result<VmExit, VmmError> {
    if let Some(jail) = &config.jail {
        check_userfaultfd_access(&config.source)?;
        jailer::enter(jail)?;
    }
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.serial_log)
        .map_err(io_error(config.serial_log.display().to_string()))?;
    let snapshot_dir = match &config.source {
        VmSource::Restore { snapshot_dir, .. } => Some(snapshot_dir.as_path()),
        VmSource::Boot { .. } => None,
    };
    let virtio = virtio_devices(config.drive.as_ref(), config.vsock.as_ref(), snapshot_dir)?;
    let mut builder = match config.source {
        VmSource::Boot { kernel, cmdline, memory_mib, vcpus } => {
            MicroVmBuilder::new(MicroVmConfig { kernel, cmdline, memory_mib, vcpus, console: Box::new(console), virtio })?
        }
        VmSource::Restore { snapshot_dir, memory, prefetch, record_working_set } => {
            let files = SnapshotFiles::in_dir(&snapshot_dir);
            let state = Arc::new(snapshot::load_state(&files)?);
            let mode = match memory {
                MemoryMode::MapPrivate if prefetch.is_some() || record_working_set => {
                    return Err(VmmError::Config("prefetch and record_working_set need \"memory\": \"uffd\"".into()))
                }
                MemoryMode::MapPrivate => RestoreMode::MapPrivate,
                MemoryMode::Uffd => {
                    let prefetch = prefetch.as_deref().map(read_working_set).transpose()?.unwrap_or_default();
                    RestoreMode::Uffd { prefetch, record: record_working_set }
                }
            };
            let restored = snapshot::restore_memory(&files, &state, mode)?;
            MicroVmBuilder::restore(state, restored, Box::new(console), virtio)?
        }
    };
    builder.confine_vcpus()?;
    let _ = std::fs::remove_file(&config.control_socket);
    let listener = UnixListener::bind(&config.control_socket).map_err(io_error(config.control_socket.display().to_string()))?;
    listener.set_nonblocking(true).map_err(io_error("the control socket"))?;
    let mut vm = builder.start()?;
    if !config.start_paused {
        vm.resume();
    }
    seccomp::apply(&seccomp::filter(ThreadKind::Control)?)?;
    serve(&mut vm, &listener, Lifeline(config.exit_with_stdin))
}

/// A jailed VMM is unprivileged: a restore through userfaultfd (whose
/// faults come from KVM, in the kernel) needs `/dev/userfaultfd` (Linux
/// 6.1+, which the jail gives it) or `vm.unprivileged_userfaultfd = 1`.
fn check_userfaultfd_access(source: &VmSource) -> Result<(), VmmError> {
    if !matches!(source, VmSource::Restore { memory: MemoryMode::Uffd, .. }) || Path::new("/dev/userfaultfd").exists() {
        return Ok(());
    }
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if sysctl.trim() != "1" {
        return Err(VmmError::Config(
            "a jailed VMM restoring through userfaultfd needs /dev/userfaultfd (Linux 6.1+) or vm.unprivileged_userfaultfd=1: \
             set the sysctl, or restore with map-private memory"
                .into(),
        ));
    }
    Ok(())
}

/// The pipe on standard input that ties the VMM to the process that
/// started it (when the configuration asks for it).
#[derive(Clone, Copy)]
struct Lifeline(bool);

impl Lifeline {
    /// Whether the other end has gone (the pipe reports hang-up or end of file).
    fn cut(self) -> bool {
        self.0 && readable(libc::STDIN_FILENO, Duration::ZERO)
    }
}

/// Builds the virtio devices of the configuration, in slot order: the root
/// disk, then vsock. A restored VM's disk overlay, when missing, starts as a
/// copy of the snapshot's.
fn virtio_devices(
    drive: Option<&DriveConfig>,
    vsock: Option<&VsockConfig>,
    snapshot_dir: Option<&Path>,
) -> Result<Vec<Box<dyn VirtioDevice>>, VmmError> {
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(drive) = drive {
        if let Some(dir) = snapshot_dir.filter(|_| !drive.overlay.exists()) {
            let saved = block::snapshot_overlay(dir, virtio.len());
            block::copy_overlay(&saved, &drive.overlay).map_err(io_error(saved.display().to_string()))?;
        }
        let disk = CowDisk::open(&drive.base, &drive.overlay).map_err(io_error(drive.base.display().to_string()))?;
        virtio.push(Box::new(Block::new(disk, drive.read_only, "rootfs")));
    }
    if let Some(vsock) = vsock {
        let device = Vsock::new(vsock.guest_cid, vsock.uds.clone())
            .map_err(|e| VmmError::Io { what: vsock.uds.display().to_string(), source: std::io::Error::other(e.to_string()) })?;
        virtio.push(Box::new(device));
    }
    Ok(virtio)
}

/// Reads a working-set file: little-endian u64 offsets into the memory file.
pub fn read_working_set(path: &Path) -> Result<Vec<u64>, VmmError> {
    let bytes = std::fs::read(path).map_err(io_error(path.display().to_string()))?;
    Ok(bytes.chunks_exact(8).map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes"))).collect())
}

/// Writes the working set the guest faulted in since restore to `path`.
fn write_working_set(vm: &MicroVm, path: &Path) -> Result<serde_json::Value, String> {
    let uffd = vm.uffd().ok_or("the VM was not restored with \"memory\": \"uffd\" and record_working_set")?;
    let offsets = uffd.recorded_working_set();
    let bytes: Vec<u8> = offsets.iter().flat_map(|offset| offset.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(serde_json::json!({ "pages": offsets.len() }))
}

/// How long the control loop waits for a request before it checks the guest.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest request line a client may send.
const MAX_REQUEST: usize = 64 * 1024;

/// Accepts control connections until shutdown or a guest exit.
fn serve(vm: &mut MicroVm, listener: &UnixListener, lifeline: Lifeline) -> Result<VmExit, VmmError> {
    loop {
        if let Some(exit) = vm.wait_for_exit(POLL_INTERVAL) {
            return Ok(exit);
        }
        if lifeline.cut() {
            return Ok(vm.stop());
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        if let Some(exit) = serve_client(vm, stream, lifeline) {
            return Ok(exit);
        }
    }
}

/// Answers one client's requests (one JSON object a line) while watching
/// the guest: returns the VM's exit when the guest ends or the client asks
/// for shutdown, and None when the client leaves or misbehaves.
fn serve_client(vm: &mut MicroVm, mut stream: UnixStream, lifeline: Lifeline) -> Option<VmExit> {
    let _ = stream.set_nonblocking(false);
    let mut pending = Vec::new();
    loop {
        if let Some(exit) = vm.wait_for_exit(Duration::ZERO) {
            return Some(exit);
        }
        if lifeline.cut() {
            return Some(vm.stop());
        }
        if !readable(stream.as_raw_fd(), POLL_INTERVAL) {
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

/// Waits up to `timeout` for `fd` to have data, end of file or a hang-up.
fn readable(fd: libc::c_int, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for an fd the caller keeps open.
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
        Request::WorkingSet { path } => write_working_set(vm, &path),
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
    // A jailed VMM has no /proc: its RSS is then null.
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()));
    let vcpus: Vec<_> = vm
        .vcpus()
        .iter()
        .map(|vcpu| {
            let c = vcpu.counters();
            serde_json::json!({ "pio_exits": c.pio.load(Ordering::Relaxed), "mmio_exits": c.mmio.load(Ordering::Relaxed), "other_exits": c.other.load(Ordering::Relaxed) })
        })
        .collect();
    let uffd = vm.uffd().map(|uffd| {
        let s = uffd.stats();
        serde_json::json!({
            "faults": s.faults.load(Ordering::Relaxed),
            "pages_copied": s.pages_copied.load(Ordering::Relaxed),
            "pages_zeroed": s.pages_zeroed.load(Ordering::Relaxed),
            "pages_prefetched": s.pages_prefetched.load(Ordering::Relaxed),
            "failure": uffd.failure(),
        })
    });
    serde_json::json!({ "rss_kib": rss_kib, "vcpus": vcpus, "uffd": uffd })
}
