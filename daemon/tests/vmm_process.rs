//! One VMM process per microVM: `sandboxd vmm` boots a ring-3 payload on
//! real KVM, answers pause, resume, stats and snapshot on its control
//! socket, shuts down on request, and a fresh `sandboxd vmm` process
//! restores the snapshot (through userfaultfd) and keeps the guest running.
//! A VM with a disk and vsock is restored with its devices: each clone gets
//! its own copy of the snapshot's disk overlay, a recorded working set is
//! replayed as prefetch, and a restore without the snapshot's devices is
//! refused.
//!
//! Started the way the daemon starts them ([`VmProcess`]), VMMs are
//! jailed: each runs as its own unprivileged uid, in namespaces of its own,
//! with its directory as its root, and cannot open a host path outside it.
//! A VMM that stops answering is killed and reported with its threads'
//! states, and one that does not die on SIGKILL (frozen by the cgroup v1
//! freezer) does not hold the caller: it is reported and reaped later.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use sandboxd::backend::{
    cgroup::{self, Cgroup, CgroupFlavor, Limits},
    microvm::{
        uid_slots::{FIRST_UID, SLOTS},
        vm_dir,
        vmm_process::{vmm_config, Lifetime, RestoreMemory, VmProcess, VmProcessError, VmSource},
    },
};

/// Prints 'x' on the serial console every 2^20 iterations of a counter.
const BODY: &str = r#"
    xor %rbx, %rbx
1:  inc %rbx
    test $0xfffff, %ebx
    jnz 1b
    mov $0x3f8, %dx
    mov $'x', %al
    out %al, %dx
    jmp 1b
"#;

struct Vmm {
    child: Child,
    control: BufReader<UnixStream>,
    serial: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, name: &str, source: serde_json::Value) -> Vmm {
        let mut config = source;
        let serial = dir.join(format!("{name}.serial"));
        let socket = dir.join(format!("{name}.sock"));
        config["serial_log"] = serial.display().to_string().into();
        config["control_socket"] = socket.display().to_string().into();
        let config_path = dir.join(format!("{name}.json"));
        std::fs::write(&config_path, config.to_string()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandboxd")).arg("vmm").arg("--config").arg(&config_path).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            assert!(Instant::now() < deadline, "the VMM never opened its control socket");
            std::thread::sleep(Duration::from_millis(10));
        };
        Vmm { child, control: BufReader::new(stream), serial }
    }

    fn request(&mut self, request: serde_json::Value) -> serde_json::Value {
        writeln!(self.control.get_mut(), "{request}").unwrap();
        let mut line = String::new();
        self.control.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn serial_output(&self) -> usize {
        std::fs::read(&self.serial).map(|bytes| bytes.len()).unwrap_or(0)
    }

    fn wait_for_more_output(&self, than: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.serial_output();
            if now > than {
                return now;
            }
            assert!(Instant::now() < deadline, "the guest stopped printing at {now} bytes");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn vmm_process_is_controlled_snapshotted_and_restored_in_a_fresh_process() {
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = support::build_payload(BODY);
    let boot = serde_json::json!({ "boot": { "kernel": kernel, "cmdline": "", "memory_mib": 64, "vcpus": 1 } });
    let mut original = Vmm::start(&dir, "original", boot);
    original.wait_for_more_output(0);

    let stats = original.request(serde_json::json!({ "op": "stats" }));
    assert_eq!(stats["ok"], true, "{stats}");
    assert!(stats["rss_kib"].as_u64().unwrap() > 0);
    assert!(stats["vcpus"][0]["pio_exits"].as_u64().unwrap() > 0, "serial writes are port I/O exits: {stats}");

    assert_eq!(original.request(serde_json::json!({ "op": "pause" }))["ok"], true);
    let paused_at = original.serial_output();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(original.serial_output(), paused_at, "a paused guest prints nothing");
    assert_eq!(original.request(serde_json::json!({ "op": "resume" }))["ok"], true);
    original.wait_for_more_output(paused_at);

    let snapshot_dir = dir.join("snapshot");
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let reply = original.request(serde_json::json!({ "op": "snapshot", "dir": snapshot_dir }));
    assert_eq!(reply["ok"], true, "{reply}");
    let malformed = original.request(serde_json::json!({ "op": "fly" }));
    assert_eq!(malformed["ok"], false);
    assert!(malformed["error"].as_str().unwrap().contains("malformed request"));
    assert_eq!(original.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    assert!(original.child.wait().unwrap().success(), "the VMM exits cleanly on shutdown");

    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "uffd" } });
    let mut clone = Vmm::start(&dir, "clone", restore);
    clone.wait_for_more_output(0);
    let stats = clone.request(serde_json::json!({ "op": "stats" }));
    assert!(stats["uffd"]["faults"].as_u64().unwrap() > 0, "the restored guest's memory came through userfaultfd: {stats}");

    // Snapshotting over the snapshot the clone runs from leaves the clone
    // running (its memory file is replaced, not rewritten in place).
    let reply = clone.request(serde_json::json!({ "op": "snapshot", "dir": snapshot_dir }));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(clone.request(serde_json::json!({ "op": "resume" }))["ok"], true);
    clone.wait_for_more_output(clone.serial_output());
    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "map_private" } });
    let mut again = Vmm::start(&dir, "again", restore);
    again.wait_for_more_output(0);
    for vmm in [&mut clone, &mut again] {
        assert_eq!(vmm.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
        assert!(vmm.child.wait().unwrap().success());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn devices(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::json!({
        "drive": { "base": dir.join("base.img"), "overlay": dir.join(format!("{name}.overlay")) },
        "vsock": { "guest_cid": 3, "uds": dir.join(format!("{name}.vsock")) },
    })
}

fn with_devices(mut source: serde_json::Value, devices: serde_json::Value) -> serde_json::Value {
    for (key, value) in devices.as_object().unwrap() {
        source[key] = value.clone();
    }
    source
}

#[test]
fn vm_with_devices_is_restored_with_them_and_replays_its_working_set() {
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-devices-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("base.img"), vec![7u8; 1 << 20]).unwrap();
    let kernel = support::build_payload(BODY);
    let boot = serde_json::json!({ "boot": { "kernel": kernel, "cmdline": "", "memory_mib": 64, "vcpus": 1 } });
    let mut original = Vmm::start(&dir, "original", with_devices(boot, devices(&dir, "original")));
    original.wait_for_more_output(0);
    let snapshot_dir = dir.join("snapshot");
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let reply = original.request(serde_json::json!({ "op": "snapshot", "dir": snapshot_dir }));
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(snapshot_dir.join("disk0.overlay").is_file(), "the disk's overlay is saved with the snapshot");
    assert_eq!(original.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    original.child.wait().unwrap();

    // A clone that records the pages it touches.
    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "uffd", "record_working_set": true } });
    let mut recorder = Vmm::start(&dir, "recorder", with_devices(restore, devices(&dir, "recorder")));
    recorder.wait_for_more_output(0);
    assert!(dir.join("recorder.overlay").is_file(), "the clone's overlay was created from the snapshot's");
    let working_set = dir.join("working-set");
    let reply = recorder.request(serde_json::json!({ "op": "working_set", "path": working_set }));
    assert!(reply["pages"].as_u64().unwrap() > 0, "{reply}");
    assert_eq!(recorder.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    recorder.child.wait().unwrap();

    // A clone that prefetches it, paused until told to run.
    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "uffd", "prefetch": working_set } });
    let mut config = with_devices(restore, devices(&dir, "prefetched"));
    config["start_paused"] = true.into();
    let mut prefetched = Vmm::start(&dir, "prefetched", config);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(prefetched.serial_output(), 0, "a clone started paused runs nothing");
    assert_eq!(prefetched.request(serde_json::json!({ "op": "resume" }))["ok"], true);
    prefetched.wait_for_more_output(0);
    let stats = prefetched.request(serde_json::json!({ "op": "stats" }));
    assert!(stats["uffd"]["pages_prefetched"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["uffd"]["failure"], serde_json::Value::Null, "{stats}");
    assert_eq!(prefetched.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    prefetched.child.wait().unwrap();

    // Without the snapshot's devices the restore is refused, with the reason.
    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "map_private" } });
    let config = dir.join("bare.json");
    let mut bare = restore;
    bare["serial_log"] = dir.join("bare.serial").display().to_string().into();
    bare["control_socket"] = dir.join("bare.sock").display().to_string().into();
    std::fs::write(&config, bare.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sandboxd")).arg("vmm").arg("--config").arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the snapshot has 2 virtio devices but the VM was given 0"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn vmm_exits_when_the_process_that_started_it_is_gone() {
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-lifeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = support::build_payload(BODY);
    let config = serde_json::json!({
        "boot": { "kernel": kernel, "cmdline": "", "memory_mib": 32, "vcpus": 1 },
        "serial_log": dir.join("serial"),
        "control_socket": dir.join("control.sock"),
        "exit_with_stdin": true,
    });
    let config_path = dir.join("vmm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .arg("vmm")
        .arg("--config")
        .arg(&config_path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(dir.join("serial")).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(child.try_wait().unwrap().is_none(), "the VMM runs while its lifeline is held");
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the VMM outlived its lifeline");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "it stopped the VM and exited cleanly: {status}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn launcher() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sandboxd"))
}

/// A field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).unwrap_or_default().trim().to_string()
}

/// The seccomp mode of each VMM thread (2: filtered), once the control
/// thread has installed its filter (just after the guest starts).
fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let modes: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|task| {
                let task = task.unwrap().path();
                let name = std::fs::read_to_string(task.join("comm")).unwrap().trim().to_string();
                let status = std::fs::read_to_string(task.join("status")).unwrap();
                let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap_or_default().trim().to_string();
                (name, mode)
            })
            .filter(|(name, _)| name == "sandboxd" || name.starts_with("vcpu") || name == "vsock")
            .collect();
        if modes.iter().all(|(_, mode)| mode == "2") || Instant::now() > deadline {
            assert_eq!(modes.len(), 3, "the control, vcpu0 and vsock threads: {modes:?}");
            return modes;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Starts the jailed VMM and waits until its guest prints.
fn start_and_wait_for_console(vm: &VmProcess, config: &serde_json::Value, cgroup: Option<&Cgroup>) {
    let serial = vm.jail_dir().join("serial.log");
    let printed = || std::fs::metadata(&serial).map_or(0, |m| m.len());
    let before = printed();
    vm.start(launcher(), config, cgroup).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while printed() <= before {
        assert!(vm.is_alive(), "the VMM exited: {}", vm.diagnostics());
        assert!(Instant::now() < deadline, "the guest never printed: {}", vm.diagnostics());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_exit(vm: &VmProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.is_alive() {
        assert!(Instant::now() < deadline, "the VMM still runs: {}", vm.diagnostics());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn jailed_test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-jail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("base.img"), vec![0u8; 1 << 20]).unwrap();
    dir
}

#[test]
fn jailed_vmms_run_as_their_own_uids_in_their_own_namespaces_and_see_only_their_directory() {
    let dir = jailed_test_dir("identity");
    let (kernel, base) = (support::build_payload(BODY), dir.join("base.img"));
    let boot = VmSource::Boot { kernel: &kernel, cmdline: "", memory_mib: 32, vcpus: 1 };
    let (first, second) = (VmProcess::new(dir.join("first"), Lifetime::WithDaemon), VmProcess::new(dir.join("second"), Lifetime::WithDaemon));
    // A descriptor the daemon leaks (not close-on-exec) must not reach a VMM.
    let leaked = dir.join("leaked");
    std::fs::write(&leaked, "a host file").unwrap();
    let leaked_c = std::ffi::CString::new(leaked.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open(2) of a NUL-terminated path; closed below.
    let leaked_fd = unsafe { libc::open(leaked_c.as_ptr(), libc::O_RDONLY) };
    assert!(leaked_fd >= 0);
    for vm in [&first, &second] {
        start_and_wait_for_console(vm, &vmm_config(&base, &boot), None);
    }
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(leaked_fd) };
    let pids = [first.pid().unwrap(), second.pid().unwrap()];
    for pid in pids {
        let targets: Vec<PathBuf> =
            std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().map(|fd| std::fs::read_link(fd.unwrap().path()).unwrap()).collect();
        assert!(!targets.contains(&leaked), "an inherited descriptor reached the VMM: {targets:?}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        for variable in environ.split(|&b| b == 0).filter(|v| !v.is_empty()) {
            let name = String::from_utf8_lossy(variable.split(|&b| b == b'=').next().unwrap_or_default()).into_owned();
            assert!(["RUST_LOG", "RUST_BACKTRACE"].contains(&name.as_str()), "the VMM got the daemon's {name}");
        }
    }

    // Its own unprivileged identity: uid and gid, distinct per VMM, no
    // groups, no capabilities, no way to gain privileges.
    let uids: Vec<String> = pids.iter().map(|&pid| status_field(pid, "Uid")).collect();
    assert_ne!(uids[0], uids[1], "two VMMs share a uid");
    for (&pid, uid) in pids.iter().zip(&uids) {
        let ids: Vec<u32> = uid.split_whitespace().map(|id| id.parse().unwrap()).collect();
        assert!(ids.iter().all(|&id| id == ids[0] && (FIRST_UID..FIRST_UID + SLOTS).contains(&id)), "real, effective, saved and fs uid: {uid}");
        assert_eq!(status_field(pid, "Gid"), uid.as_str(), "its gid is its uid");
        assert_eq!(status_field(pid, "Groups"), "");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "NSpid").split_whitespace().nth(1), Some("1"), "PID 1 of its own PID namespace");
    }

    // And its threads keep their seccomp filters.
    for (name, seccomp) in thread_seccomp_modes(pids[0]) {
        assert_eq!(seccomp, "2", "thread {name} runs without its seccomp filter");
    }

    // Namespaces of its own, shared with neither the daemon nor another VMM.
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        let [mine, first_ns, second_ns] = ["self".to_string(), pids[0].to_string(), pids[1].to_string()].map(|pid| namespace(&pid, kind));
        assert_ne!(first_ns, mine, "{kind}");
        assert_ne!(first_ns, second_ns, "{kind}");
    }

    // Its root is its jail directory, holding its own files and the
    // read-only binds, and nothing of the host.
    let root = std::fs::metadata(format!("/proc/{}/root/", pids[0])).unwrap();
    let jail = std::fs::metadata(first.jail_dir()).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail.dev(), jail.ino()), "/proc/PID/root is the jail directory");
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{}/root/", pids[0]))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["control.sock", "dev", "kernel", "overlay.bitmap", "overlay.img", "rootfs", "serial.log", "vsock.sock"]);
    let devices: Vec<String> =
        std::fs::read_dir(format!("/proc/{}/root/dev", pids[0])).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(devices.contains(&"kvm".to_string()) && devices.len() <= 2, "only kvm and userfaultfd: {devices:?}");

    // A control request that points at a host directory outside the jail
    // fails, and nothing lands there.
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let error = first.control(serde_json::json!({ "op": "snapshot", "dir": outside })).unwrap_err();
    assert!(matches!(error, VmProcessError::Refused { .. }), "{error}");
    assert!(error.to_string().contains("No such file or directory"), "{error}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "the VMM wrote outside its jail");
    assert!(first.jail_path(&outside).is_err(), "the daemon refuses to name a host path to a VMM");

    // Inside its jail it snapshots; a VMM restoring that snapshot (bound in
    // read-only, memory mapped privately) runs it.
    let written = first.jail_dir().join("snapshot.out");
    let inside = first.create_dir_for_vmm(&written).unwrap();
    first.control(serde_json::json!({ "op": "snapshot", "dir": inside })).unwrap();
    for vm in [&first, &second] {
        vm.stop().unwrap();
        let owner = std::fs::metadata(vm.jail_dir()).unwrap();
        assert_eq!((owner.uid(), owner.gid()), (0, 0), "a stopped VMM's directory is root's again");
    }
    let published = dir.join("published");
    std::fs::rename(&written, &published).unwrap();
    vm_dir::publish(&published).unwrap();
    // One restores in the directory the snapshot's VMM used (as a woken
    // sandbox does), where that VMM's sockets are stale.
    for (clone, memory) in [(&first, RestoreMemory::MapPrivate), (&second, RestoreMemory::Uffd)] {
        let restore = VmSource::Restore { snapshot: &published, memory, working_set: None, record: false };
        start_and_wait_for_console(clone, &vmm_config(&base, &restore), None);
        let stats = clone.simple("stats").unwrap();
        if memory == RestoreMemory::Uffd {
            assert!(stats["uffd"]["faults"].as_u64().unwrap() > 0, "an unprivileged VMM serves faults through /dev/userfaultfd: {stats}");
        }
        clone.stop().unwrap();
    }

    // A configuration naming a host file the jail does not bind is not found.
    let unbound = serde_json::json!({
        "boot": { "kernel": kernel, "cmdline": "", "memory_mib": 32, "vcpus": 1 },
        "serial_log": "/serial.log",
        "control_socket": "/control.sock",
    });
    let refused = VmProcess::new(dir.join("unbound"), Lifetime::WithDaemon);
    refused.start(launcher(), &unbound, None).unwrap();
    wait_for_exit(&refused);
    let log = std::fs::read_to_string(dir.join("unbound").join("vmm.log")).unwrap();
    assert!(log.contains(&kernel.display().to_string()) && log.contains("No such file or directory"), "{log}");
    drop((first, second, refused));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_vmm_that_stops_answering_is_killed_and_one_that_does_not_die_is_reported_without_holding_the_caller() {
    let flavor = cgroup::detect().unwrap();
    if flavor != CgroupFlavor::V1 {
        eprintln!("skipped: only the cgroup v1 freezer keeps a SIGKILLed process alive; this host has v2");
        return;
    }
    let dir = jailed_test_dir("stuck");
    let (kernel, base) = (support::build_payload(BODY), dir.join("base.img"));
    let limits = Limits { memory_bytes: 256 << 20, cpu_millis: 1000, max_pids: 64 };
    let group = Cgroup::create(flavor, &format!("vmm-stuck-test-{}", std::process::id()), &limits).unwrap();
    let vm = VmProcess::new(dir.join("vm"), Lifetime::WithDaemon);
    let boot = VmSource::Boot { kernel: &kernel, cmdline: "", memory_mib: 32, vcpus: 1 };
    start_and_wait_for_console(&vm, &vmm_config(&base, &boot), Some(&group));
    let pid = vm.pid().unwrap();
    group.freeze().unwrap();

    // A request the frozen VMM cannot answer ends at its deadline, with the
    // threads' states; the VMM was killed but, frozen, has not died.
    let error = vm.simple("stats").unwrap_err();
    let VmProcessError::Stuck { threads, .. } = &error else { panic!("{error}") };
    assert!(threads.contains("vcpu0") && threads.contains("wchan="), "{threads}");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "a frozen VMM outlives SIGKILL");
    assert!(!vm.is_alive(), "the daemon let go of it");

    // Once thawed it dies, and the thread left behind reaps it.
    group.thaw().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the killed VMM was never reaped");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.stop().unwrap();
    group.remove().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Field `index` (1-based, as in proc(5)) of /proc/PID/stat.
fn stat_field(pid: u32, index: usize) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_command = &stat[stat.rfind(')').unwrap() + 1..];
    after_command.split_whitespace().nth(index - 3).unwrap().to_string()
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|_| stat_field(pid, 3) != "Z")
}

#[test]
fn a_sandbox_vmm_outlives_the_daemon_and_is_reattached_only_as_the_very_process_it_was() {
    let dir = jailed_test_dir("reattach");
    let (kernel, base) = (support::build_payload(BODY), dir.join("base.img"));
    let boot = VmSource::Boot { kernel: &kernel, cmdline: "", memory_mib: 32, vcpus: 1 };
    let vm_dir = dir.join("vm");
    let vm = VmProcess::new(vm_dir.clone(), Lifetime::OutlivesDaemon);
    start_and_wait_for_console(&vm, &vmm_config(&base, &boot), None);
    let pid = vm.pid().unwrap();
    vm.simple("stats").unwrap();
    assert_eq!(stat_field(pid, 6), pid.to_string(), "the VMM leads a session of its own");
    let identity: serde_json::Value = serde_json::from_slice(&std::fs::read(vm_dir.join("vmm.process")).unwrap()).unwrap();

    // The daemon lets go of it (as at a stop with --on-stop keep, or a
    // kill -9): nothing ties the VMM to it, and its guest runs on.
    vm.release();
    drop(vm);
    let serial = vm_dir.join("jail").join("serial.log");
    let printed = std::fs::metadata(&serial).unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&serial).unwrap().len() <= printed {
        assert!(is_running(pid), "the released VMM died");
        assert!(Instant::now() < deadline, "the released VMM's guest stopped printing");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A restarted daemon finds the very process again and controls it.
    let again = VmProcess::reattach(vm_dir.clone()).unwrap();
    assert_eq!(again.pid(), Some(pid));
    assert!(again.is_alive());
    again.simple("pause").unwrap();
    again.simple("resume").unwrap();
    let owner = std::fs::metadata(again.jail_dir()).unwrap();
    again.stop().unwrap();
    assert!(!is_running(pid), "the re-attached VMM was ended");
    assert!(!vm_dir.join("vmm.process").exists(), "an ended VMM's identity file is removed");
    let after = std::fs::metadata(again.jail_dir()).unwrap();
    assert_eq!((owner.uid(), after.uid()), (identity["uid"].as_u64().unwrap() as u32, 0), "its jail is root's again");
    drop(again);
    assert!(VmProcess::reattach(vm_dir.clone()).unwrap().pid().is_none(), "no VMM runs once it is gone");

    // An identity naming another process is never taken for the VMM:
    // under the VMM's pid and start time, but another boot...
    let mut stale = identity.clone();
    stale["process"]["boot_id"] = "another boot".into();
    std::fs::write(vm_dir.join("vmm.process"), stale.to_string()).unwrap();
    assert!(VmProcess::reattach(vm_dir.clone()).unwrap().pid().is_none(), "a VMM of another boot is not re-attached");
    assert!(!vm_dir.join("vmm.process").exists(), "a stale identity file is removed");
    // ... or a live process (this one) that is not of the VMM's uid.
    let me = std::process::id();
    let mut foreign = identity;
    foreign["process"]["pid"] = me.into();
    foreign["process"]["started"] = stat_field(me, 22).parse::<u64>().unwrap().into();
    std::fs::write(vm_dir.join("vmm.process"), foreign.to_string()).unwrap();
    let error = VmProcess::reattach(vm_dir.clone()).err().expect("a process of another uid is refused");
    assert!(matches!(error, VmProcessError::ForeignProcess { .. }), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}
