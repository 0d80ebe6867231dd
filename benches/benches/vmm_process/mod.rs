//! Bench support for driving real `sandboxd vmm` processes (one microVM per
//! process): writing their JSON configs, spawning them, talking to their
//! control sockets, taking a snapshot of a ring-3 payload through a booted
//! VMM process, watching the serial console through a FIFO to see the exact
//! moment the guest writes its first byte, and reading a process's memory
//! from /proc. Used by the `pool` and `density` benches; every helper panics
//! with a message that says what went wrong.
//!
//! The benches need a release build of the binary next to them:
//! `cargo build --release -p sandboxd`.

#![allow(dead_code)]

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::OpenOptionsExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// How long any single step (start, first byte, reply) may take before the bench gives up.
pub const WAIT: Duration = Duration::from_secs(30);

/// The `sandboxd` binary of this build profile (target/release/sandboxd under `cargo bench`).
pub fn sandboxd() -> PathBuf {
    sandboxd_tests::binary("sandboxd")
}

/// A fresh, empty directory under the system temp dir for one bench run.
pub fn temp_dir(bench: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxd-{bench}-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Removes the payload build dirs (`support::build_payload`) this process
/// left in the temp dir.
pub fn remove_payload_dirs() {
    let prefix = format!("sandboxd-payload-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

/// A name no other VMM of this bench run has used.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_NAME.fetch_add(1, Ordering::Relaxed))
}

/// One prepared `sandboxd vmm` launch: its config file is written, the
/// process is not started yet (so a bench can time the spawn alone).
pub struct VmmLaunch {
    name: String,
    config: PathBuf,
    socket: PathBuf,
}

impl VmmLaunch {
    /// Writes `source` (a `boot` or `restore` object, plus any extra keys such
    /// as `start_paused`) with the serial log and control socket filled in.
    pub fn new(dir: &Path, name: &str, mut source: Value, serial_log: &Path) -> VmmLaunch {
        let socket = dir.join(format!("{name}.sock"));
        source["serial_log"] = serial_log.display().to_string().into();
        source["control_socket"] = socket.display().to_string().into();
        let config = dir.join(format!("{name}.json"));
        std::fs::write(&config, source.to_string()).unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        VmmLaunch { name: name.to_owned(), config, socket }
    }

    /// Starts the process; it logs warnings and errors only, to our stderr.
    pub fn spawn(self) -> VmmProcess {
        let binary = sandboxd();
        let child = Command::new(&binary)
            .arg("vmm")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} vmm: {e}", binary.display()));
        VmmProcess { child, name: self.name, config: self.config, socket: self.socket, control: None }
    }
}

/// A running `sandboxd vmm` process; killed on drop if it is still running.
pub struct VmmProcess {
    child: Child,
    name: String,
    config: PathBuf,
    socket: PathBuf,
    control: Option<BufReader<UnixStream>>,
}

impl VmmProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the control socket and for one answered request, so the
    /// VMM's control loop is serving this connection from now on.
    pub fn connect(&mut self) {
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                break stream;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("VMM {} exited with {status} before opening its control socket (its log is above)", self.name);
            }
            assert!(Instant::now() < deadline, "VMM {} never opened its control socket {}", self.name, self.socket.display());
            std::thread::sleep(Duration::from_millis(1));
        };
        stream.set_read_timeout(Some(WAIT)).expect("a read timeout on the control socket");
        self.control = Some(BufReader::new(stream));
        self.request("stats");
    }

    /// Sends one request line without waiting for its reply.
    pub fn send(&mut self, op: &str) {
        let control = self.control.as_mut().unwrap_or_else(|| panic!("VMM {}: connect() first", self.name));
        writeln!(control.get_mut(), "{}", json!({ "op": op }))
            .unwrap_or_else(|e| panic!("VMM {}: cannot send {op}: {e}", self.name));
    }

    /// Reads one reply line and checks that it says `"ok": true`.
    pub fn reply(&mut self, op: &str) -> Value {
        let control = self.control.as_mut().unwrap_or_else(|| panic!("VMM {}: connect() first", self.name));
        let mut line = String::new();
        control.read_line(&mut line).unwrap_or_else(|e| panic!("VMM {}: no reply to {op}: {e}", self.name));
        assert!(!line.is_empty(), "VMM {} closed its control socket instead of answering {op}", self.name);
        let reply: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("VMM {}: bad reply {line:?}: {e}", self.name));
        assert_eq!(reply["ok"], true, "VMM {} refused {op}: {reply}", self.name);
        reply
    }

    /// One request and its (successful) reply.
    pub fn request(&mut self, op: &str) -> Value {
        self.send(op);
        self.reply(op)
    }

    /// Asks for a snapshot into `dir` (which must exist).
    pub fn snapshot(&mut self, dir: &Path) {
        let control = self.control.as_mut().unwrap_or_else(|| panic!("VMM {}: connect() first", self.name));
        writeln!(control.get_mut(), "{}", json!({ "op": "snapshot", "dir": dir }))
            .unwrap_or_else(|e| panic!("VMM {}: cannot send snapshot: {e}", self.name));
        self.reply("snapshot");
    }

    /// Shuts the VMM down over its control socket and waits for a clean exit;
    /// removes its config file.
    pub fn shutdown(mut self) {
        if self.control.is_none() {
            self.connect();
        }
        self.request("shutdown");
        let status = self.child.wait().unwrap_or_else(|e| panic!("VMM {}: cannot wait: {e}", self.name));
        assert!(status.success(), "VMM {} exited with {status} after shutdown", self.name);
        let _ = std::fs::remove_file(&self.config);
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A FIFO standing in for a VMM's serial log. The read end is opened
/// non-blocking before the VMM starts (so its O_WRONLY open does not wait
/// for us); `first_byte` waits for the guest's first byte and then leaves a
/// thread draining the FIFO until the VMM closes it, so a chatty guest never
/// blocks on a full pipe.
pub struct SerialFifo {
    path: PathBuf,
    read_end: Option<File>,
}

impl SerialFifo {
    pub fn create(path: &Path) -> SerialFifo {
        let _ = std::fs::remove_file(path);
        let c_path = CString::new(path.as_os_str().as_bytes()).expect("a path without NUL bytes");
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
        let read_end = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open the FIFO {}: {e}", path.display()));
        SerialFifo { path: path.to_owned(), read_end: Some(read_end) }
    }

    /// Whether a byte is waiting right now (without consuming it).
    pub fn has_output(&self) -> bool {
        let file = self.read_end.as_ref().expect("has_output before first_byte");
        poll_in(file, Duration::ZERO)
    }

    /// Blocks until the guest's first serial byte arrives; returns the
    /// moment the FIFO became readable.
    pub fn first_byte(&mut self) -> Instant {
        let mut file = self.read_end.take().expect("first_byte is called once per FIFO");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no serial byte on {} within {WAIT:?}", self.path.display());
            if !poll_in(&file, left) {
                continue;
            }
            let seen = Instant::now();
            let mut buffer = [0u8; 4096];
            match file.read(&mut buffer) {
                Ok(0) => panic!("the VMM closed its serial log {} without writing to it", self.path.display()),
                Ok(_) => {
                    set_blocking(&file);
                    std::thread::spawn(move || while matches!(file.read(&mut buffer), Ok(n) if n > 0) {});
                    return seen;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
                Err(e) => panic!("cannot read the FIFO {}: {e}", self.path.display()),
            }
        }
    }
}

impl Drop for SerialFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits up to `timeout` for `file` to be readable (data or hang-up).
/// A FIFO that never had a writer does not report a hang-up, so this also
/// waits across the VMM's start.
fn poll_in(file: &File, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for an fd that `file` keeps open.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}

fn set_blocking(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd that `file` keeps open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
}

/// Boots `body` as a payload VM of `memory_mib` in a `sandboxd vmm`
/// process, waits for its first serial byte, lets it run `settle` more,
/// pauses it and snapshots it into `dir/snapshot` over the control socket,
/// and shuts it down. Returns the snapshot directory.
pub fn snapshot_payload(dir: &Path, body: &str, memory_mib: u32, settle: Duration) -> PathBuf {
    let kernel = crate::support::build_payload(body);
    let serial = dir.join("template.serial");
    let boot = json!({ "boot": { "kernel": kernel, "cmdline": "", "memory_mib": memory_mib, "vcpus": 1 } });
    let mut vmm = VmmLaunch::new(dir, "template", boot, &serial).spawn();
    vmm.connect();
    let deadline = Instant::now() + WAIT;
    while std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the template payload printed nothing on serial within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(settle);
    vmm.request("pause");
    let snapshot = dir.join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap_or_else(|e| panic!("cannot create {}: {e}", snapshot.display()));
    vmm.snapshot(&snapshot);
    vmm.shutdown();
    let _ = std::fs::remove_file(serial);
    if let Some(payload_dir) = kernel.parent() {
        let _ = std::fs::remove_dir_all(payload_dir);
    }
    snapshot
}

/// Named fields (in KiB) of a smaps_rollup or meminfo style file.
pub fn kib_fields(path: &str, names: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("{path} has no {name} field"))
        })
        .collect()
}

/// p50 and p99 (nearest rank) of `samples`.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99))
}
