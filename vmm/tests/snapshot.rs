//! Snapshot and restore on real KVM with a ring-3 payload that writes a
//! pattern over 64 MiB and then counts forever: after restore, in both
//! memory modes, the count continues from where it was and the pattern is
//! intact; clones diverge without touching each other or the memory file;
//! the uffd handler serves only the pages the guest touches; a corrupted
//! snapshot is refused. A snapshot of each memory backing (a fresh VM's
//! memfd, a MAP_PRIVATE clone, a uffd clone) writes the pages that hold
//! data and nothing else, faults in none of the untouched memory, and
//! restores to the exact bytes; so does a `sandboxd vmm` process (this
//! binary re-run as a child) under its seccomp filter.

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileExt, MetadataExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use sandbox_vmm::{
    builder::MicroVmBuilder,
    snapshot::{self, FormatError, RestoreMode, SnapshotError, SnapshotFiles},
    MicroVm, VmExit,
};
use support::{start_payload, RecorderDevice, SharedConsole, TEST_PORT, TEST_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

const WAIT: Duration = Duration::from_secs(30);
const PATTERN_START: u64 = 0x100_0000;
const PATTERN_LEN: u64 = 64 << 20;
const COUNTER: u64 = 0x50_0000;
const MAGIC: u64 = 0x5a5a_0000_0000_0000;

/// Fills [16 MiB, 80 MiB) with address ^ MAGIC, sets the serial console's
/// scratch register to 0x5a, reports on port 0x10, then counts at 0x500000
/// forever.
const BODY: &str = r#"
    mov $0x1000000, %rdi
    mov $0x5000000, %rsi
    movabs $0x5a5a000000000000, %rdx
1:  mov %rdi, %rax
    xor %rdx, %rax
    mov %rax, (%rdi)
    add $8, %rdi
    cmp %rsi, %rdi
    jb 1b
    mov $0x3ff, %dx
    mov $0x5a, %al
    out %al, %dx
    out %al, $0x10
    xor %rbx, %rbx
2:  inc %rbx
    mov %rbx, 0x500000
    jmp 2b
"#;

fn counter(vm: &MicroVm) -> u64 {
    vm.memory().read_obj(GuestAddress(COUNTER)).unwrap()
}

fn wait_for_counter_above(vm: &MicroVm, floor: u64) -> u64 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = counter(vm);
        if now > floor {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "the counter stayed at {now}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pattern_intact(vm: &MicroVm) -> bool {
    (PATTERN_START..PATTERN_START + PATTERN_LEN).step_by(8).all(|address| {
        vm.memory().read_obj::<u64>(GuestAddress(address)).unwrap() == address ^ MAGIC
    })
}

/// Boots the payload, lets it write the pattern and count, pauses it and
/// snapshots it. Returns the snapshot and the count at the pause.
fn snapshot_running_payload(dir: &std::path::Path) -> (SnapshotFiles, u64) {
    let (mut vm, ports, _) = start_payload(BODY, 128, 1, |_| {});
    assert_eq!(ports.wait_for_writes(1, WAIT).len(), 1, "the pattern is written");
    wait_for_counter_above(&vm, 1000);
    vm.pause().unwrap();
    let paused_at = counter(&vm);
    let files = SnapshotFiles::in_dir(dir);
    snapshot::create(&vm, &files).expect("snapshot a paused VM");
    assert_eq!(vm.stop(), VmExit::Stopped);
    (files, paused_at)
}

fn restore(files: &SnapshotFiles, mode: RestoreMode) -> MicroVm {
    let state = Arc::new(snapshot::load_state(files).unwrap());
    let memory = snapshot::restore_memory(files, &state, mode).unwrap();
    let mut builder = MicroVmBuilder::restore(state, memory, Box::new(SharedConsole::default()), Vec::new()).unwrap();
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(Arc::default())))).unwrap();
    builder.start().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxd-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn restore_continues_exactly_in_both_memory_modes() {
    let dir = temp_dir("modes");
    let (files, paused_at) = snapshot_running_payload(&dir);
    for mode in [RestoreMode::MapPrivate, RestoreMode::Uffd { prefetch: Vec::new(), record: false }] {
        let mut vm = restore(&files, mode);
        assert_eq!(counter(&vm), paused_at, "the restored counter is where it was paused");
        assert_eq!(vm.serial_state().registers[8], 0x5a, "the serial console's scratch register came back");
        vm.resume();
        wait_for_counter_above(&vm, paused_at);
        vm.pause().unwrap();
        if let Some(uffd) = vm.uffd() {
            let copied = uffd.stats().pages_copied.load(Ordering::Relaxed);
            let faults = uffd.stats().faults.load(Ordering::Relaxed);
            assert!(faults > 0, "the handler served the guest's faults");
            assert!(copied < 64, "only touched pages were copied, not the 16384 pattern pages: {copied}");
            assert_eq!(uffd.failure(), None);
        }
        assert!(pattern_intact(&vm), "the 64 MiB pattern survived the round trip");
        assert_eq!(vm.stop(), VmExit::Stopped);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Hundreds of uffd restores without prefetch: each runs the payload while
/// another thread writes pages the guest never touched (as a device thread
/// would), pauses, sometimes snapshots, resumes and stops. Every fault is
/// served and every stop completes.
#[test]
fn hundreds_of_uffd_restores_run_pause_snapshot_and_stop() {
    let dir = temp_dir("stress");
    let (files, paused_at) = snapshot_running_payload(&dir);
    let cycles: u64 = std::env::var("SANDBOXD_VMM_STRESS_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let started = std::time::Instant::now();
    for cycle in 0..cycles {
        let mut vm = restore(&files, RestoreMode::Uffd { prefetch: Vec::new(), record: false });
        vm.resume();
        let memory = vm.memory().clone();
        let device = std::thread::spawn(move || {
            for page in 0..64u64 {
                let address = GuestAddress(PATTERN_START + PATTERN_LEN + (cycle % 16) * (1 << 20) + page * 4096);
                memory.write_obj(cycle ^ page, address).unwrap();
            }
        });
        wait_for_counter_above(&vm, paused_at);
        device.join().unwrap();
        vm.pause().unwrap();
        if cycle % 20 == 0 {
            let again = dir.join(format!("again-{cycle}"));
            std::fs::create_dir_all(&again).unwrap();
            snapshot::create(&vm, &SnapshotFiles::in_dir(&again)).expect("snapshot a restored VM");
            std::fs::remove_dir_all(&again).unwrap();
        }
        vm.resume();
        assert_eq!(vm.uffd().and_then(|uffd| uffd.failure()), None, "cycle {cycle}: every fault was served");
        assert_eq!(vm.stop(), VmExit::Stopped, "cycle {cycle}");
    }
    eprintln!("{cycles} uffd restores of the running payload in {:.1?}", started.elapsed());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn clones_diverge_without_touching_each_other_or_the_file() {
    let dir = temp_dir("clones");
    let (files, _) = snapshot_running_payload(&dir);
    let mut a = restore(&files, RestoreMode::MapPrivate);
    let mut b = restore(&files, RestoreMode::Uffd { prefetch: Vec::new(), record: false });
    let probe = GuestAddress(PATTERN_START + 0x1000);
    a.memory().write_obj(0xaaaa_u64, probe).unwrap();
    b.memory().write_obj(0xbbbb_u64, probe).unwrap();
    a.resume();
    b.resume();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a.memory().read_obj::<u64>(probe).unwrap(), 0xaaaa);
    assert_eq!(b.memory().read_obj::<u64>(probe).unwrap(), 0xbbbb);
    let mut on_disk = [0u8; 8];
    std::fs::File::open(&files.memory).unwrap().read_exact_at(&mut on_disk, probe.0).unwrap();
    assert_eq!(u64::from_le_bytes(on_disk), probe.0 ^ MAGIC, "the memory file is untouched");
    a.stop();
    b.stop();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn uffd_prefetch_of_a_recorded_working_set_leaves_nothing_to_fault() {
    let dir = temp_dir("prefetch");
    let (files, paused_at) = snapshot_running_payload(&dir);
    let mut recording = restore(&files, RestoreMode::Uffd { prefetch: Vec::new(), record: true });
    recording.resume();
    wait_for_counter_above(&recording, paused_at + 1000);
    recording.pause().unwrap();
    let working_set = recording.uffd().unwrap().recorded_working_set();
    recording.stop();
    assert!(!working_set.is_empty(), "the guest's first touches were recorded");

    let mut replayed = restore(&files, RestoreMode::Uffd { prefetch: working_set.clone(), record: false });
    let stats = replayed.uffd().unwrap().stats();
    assert_eq!(stats.pages_prefetched.load(Ordering::Relaxed), working_set.len() as u64);
    replayed.resume();
    wait_for_counter_above(&replayed, paused_at + 1000);
    assert_eq!(replayed.uffd().unwrap().stats().faults.load(Ordering::Relaxed), 0, "every page the guest needed was prefetched");
    replayed.stop();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupted_or_foreign_snapshots_are_refused() {
    let dir = temp_dir("corrupt");
    let (files, _) = snapshot_running_payload(&dir);
    let mut bytes = std::fs::read(&files.state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&files.state, &bytes).unwrap();
    assert!(matches!(snapshot::load_state(&files), Err(SnapshotError::Format(FormatError::Checksum))));
    bytes[middle] ^= 1;
    bytes[8] = 9;
    std::fs::write(&files.state, &bytes).unwrap();
    let refused = snapshot::load_state(&files).err().expect("another major version is refused");
    assert!(refused.to_string().contains("rebuild the template"), "{refused}");
    std::fs::remove_dir_all(dir).unwrap();
}

const SPARSE_GUEST_MIB: u32 = 128;
const PAGE: u64 = 4096;
const GO_FLAG: u64 = 0x40_1000;
/// Pages the payload's image, stack, boot data and go flag may add to the
/// pages a sparse test counts.
const BASELINE_PAGES: u64 = 32;
/// Pages a freshly booted [`SPARSE_BODY`] filled with data.
const BOOT_DATA_PAGES: u64 = 1024;
/// Pages its clone holds with data: it wiped 256 of them and filled 512 more.
const CLONE_DATA_PAGES: u64 = BOOT_DATA_PAGES - 256 + 512;

/// Boot: one word in every other page of [16 MiB, 24 MiB) (1024 pages of
/// data) and a zero word in each page of [32 MiB, 36 MiB) (pages that exist
/// but hold nothing); reports on port 0x10. Once the host sets the go flag
/// (a clone): one word in every other page of [40 MiB, 44 MiB) (512 more)
/// and a zero word in each page of [16 MiB, 18 MiB) (wiping 256 of the
/// first ones); reports on port 0x11; then spins.
const SPARSE_BODY: &str = r#"
    mov $0x1000000, %rdi
1:  mov %rdi, (%rdi)
    add $0x2000, %rdi
    cmp $0x1800000, %rdi
    jb 1b
    mov $0x2000000, %rdi
2:  movq $0, (%rdi)
    add $0x1000, %rdi
    cmp $0x2400000, %rdi
    jb 2b
    out %al, $0x10
3:  cmpq $0, 0x401000
    je 3b
    mov $0x2800000, %rdi
4:  mov %rdi, (%rdi)
    add $0x2000, %rdi
    cmp $0x2c00000, %rdi
    jb 4b
    mov $0x1000000, %rdi
5:  movq $0, (%rdi)
    add $0x1000, %rdi
    cmp $0x1200000, %rdi
    jb 5b
    out %al, $0x11
6:  jmp 6b
"#;

/// Where the sparse tests write snapshots: the temp dir (ext4 here) and
/// tmpfs, whose holes and data extents differ.
fn snapshot_places(name: &str) -> Vec<PathBuf> {
    let mut places = vec![temp_dir(name)];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = shm.join(format!("sandboxd-snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        places.push(dir);
    }
    places
}

/// Boots [`SPARSE_BODY`] and pauses it once it filled its first pages.
fn paused_sparse_boot() -> MicroVm {
    let (vm, ports, _) = start_payload(SPARSE_BODY, SPARSE_GUEST_MIB, 1, |_| {});
    assert_eq!(ports.wait_for_writes(1, WAIT).len(), 1, "the payload filled its pages");
    vm.pause().unwrap();
    vm
}

/// Restores a clone of the sparse template in `mode`, lets it run its
/// second phase and pauses it.
fn paused_sparse_clone(template: &SnapshotFiles, mode: RestoreMode) -> MicroVm {
    let state = Arc::new(snapshot::load_state(template).unwrap());
    let memory = snapshot::restore_memory(template, &state, mode).unwrap();
    let mut builder = MicroVmBuilder::restore(state, memory, Box::new(SharedConsole::default()), Vec::new()).unwrap();
    let ports = Arc::new(support::PortRecorder::default());
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(ports.clone())))).unwrap();
    let vm = builder.start().unwrap();
    vm.memory().write_obj(1u64, GuestAddress(GO_FLAG)).unwrap();
    vm.resume();
    assert_eq!(ports.wait_for_writes(1, WAIT).len(), 1, "the clone ran its second phase");
    vm.pause().unwrap();
    vm
}

/// The resident size of the mapping that starts at `address`, from
/// /proc/self/smaps: per mapping, so VMs of tests running beside this one
/// do not count.
fn mapping_rss_kib(address: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{address:x}-");
    let mut lines = smaps.lines().skip_while(|line| !line.starts_with(&start));
    assert!(lines.next().is_some(), "no mapping at {address:#x} in /proc/self/smaps");
    let rss = lines.find(|line| line.starts_with("Rss:")).expect("an Rss line");
    rss.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB")
}

/// What guest memory holds in the host: resident pages of its mapping,
/// pages allocated in its memfd (a fresh VM), faults its uffd handler
/// served (a uffd clone).
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_kib: u64,
    memfd_blocks: Option<u64>,
    uffd_faults: Option<u64>,
}

fn footprint(vm: &MicroVm) -> Footprint {
    let region = vm.memory().iter().next().expect("one RAM region");
    Footprint {
        rss_kib: mapping_rss_kib(region.as_ptr() as u64),
        memfd_blocks: region.file_offset().filter(|_| region.flags() & libc::MAP_SHARED != 0).map(|f| f.file().metadata().unwrap().blocks()),
        uffd_faults: vm.uffd().map(|uffd| uffd.stats().faults.load(Ordering::Relaxed)),
    }
}

/// Whether two guest memories hold the same bytes, compared 1 MiB at a time.
fn same_bytes(a: &vm_memory::GuestMemoryMmap, b: &vm_memory::GuestMemoryMmap) -> bool {
    const CHUNK: usize = 1 << 20;
    let (mut left, mut right) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    (0..u64::from(SPARSE_GUEST_MIB) << 20).step_by(CHUNK).all(|address| {
        a.read_slice(&mut left, GuestAddress(address)).unwrap();
        b.read_slice(&mut right, GuestAddress(address)).unwrap();
        left == right
    })
}

/// Snapshots the paused `vm` into `dir` and checks that it wrote about
/// `data_pages` pages, faulted in none of the untouched memory, and restores
/// (in both modes) to the very bytes of `vm`.
fn snapshot_is_sparse_and_exact(vm: &MicroVm, dir: &Path, data_pages: u64) -> SnapshotFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files = SnapshotFiles::in_dir(dir);
    let before = footprint(vm);
    snapshot::create(vm, &files).expect("snapshot a paused VM");
    let after = footprint(vm);
    assert!(after.rss_kib <= before.rss_kib + 1024, "snapshotting grew the guest mapping: {before:?} -> {after:?}");
    assert_eq!(after.memfd_blocks, before.memfd_blocks, "snapshotting allocated pages in the memfd");
    assert_eq!(after.uffd_faults, before.uffd_faults, "snapshotting faulted pages in through userfaultfd");
    let written = std::fs::metadata(&files.memory).unwrap().blocks() * 512 / PAGE;
    assert!(
        (data_pages..=data_pages + BASELINE_PAGES).contains(&written),
        "the memory file holds {written} pages, the guest {data_pages} (+ up to {BASELINE_PAGES} of its image)"
    );
    let state = snapshot::load_state(&files).unwrap();
    for mode in [RestoreMode::MapPrivate, RestoreMode::Uffd { prefetch: Vec::new(), record: false }] {
        let restored = snapshot::restore_memory(&files, &state, mode).unwrap();
        assert!(same_bytes(vm.memory(), restored.memory()), "the restored memory differs from the snapshotted VM's");
    }
    files
}

#[test]
fn a_fresh_vm_snapshot_writes_only_its_data_pages() {
    for dir in snapshot_places("fresh-sparse") {
        let mut vm = paused_sparse_boot();
        snapshot_is_sparse_and_exact(&vm, &dir, BOOT_DATA_PAGES);
        vm.stop();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_map_private_clone_snapshot_writes_its_own_and_its_template_pages() {
    clone_snapshot_is_sparse_and_exact("private-sparse", || RestoreMode::MapPrivate);
}

#[test]
fn a_uffd_clone_snapshot_writes_served_and_unserved_pages_without_faulting() {
    clone_snapshot_is_sparse_and_exact("uffd-sparse", || RestoreMode::Uffd { prefetch: Vec::new(), record: false });
}

fn clone_snapshot_is_sparse_and_exact(name: &str, mode: fn() -> RestoreMode) {
    for dir in snapshot_places(name) {
        let mut template_vm = paused_sparse_boot();
        let template = snapshot_is_sparse_and_exact(&template_vm, &dir.join("template"), BOOT_DATA_PAGES);
        template_vm.stop();
        let mut clone = paused_sparse_clone(&template, mode());
        snapshot_is_sparse_and_exact(&clone, &dir.join("clone"), CLONE_DATA_PAGES);
        clone.stop();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Where guest memory above the payload's image, stack and go flag starts.
const ABOVE_IMAGE: usize = 8 << 20;

/// Set in a child run of this binary: the VMM configuration it runs.
const VMM_CHILD_CONFIG: &str = "SANDBOXD_SNAPSHOT_TEST_VMM";

#[test]
fn a_vmm_process_snapshots_its_clones_under_its_seccomp_filter() {
    if let Ok(config) = std::env::var(VMM_CHILD_CONFIG) {
        let config = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
        sandbox_vmm::process::run(config).expect("the VMM runs");
        return;
    }
    let dir = temp_dir("vmm-process");
    let mut template_vm = paused_sparse_boot();
    let template = snapshot_is_sparse_and_exact(&template_vm, &dir.join("template"), BOOT_DATA_PAGES);
    template_vm.stop();
    for memory in ["map_private", "uffd"] {
        let clone_dir = dir.join(memory);
        std::fs::create_dir_all(clone_dir.join("snapshot")).unwrap();
        let socket = clone_dir.join("control.sock");
        let config = serde_json::json!({
            "restore": { "snapshot_dir": dir.join("template"), "memory": memory },
            "serial_log": clone_dir.join("serial.log"),
            "control_socket": socket,
        });
        let config_path = clone_dir.join("vmm.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let mut child = spawn_vmm_child(&config_path);
        let mut control = connect_with_deadline(&socket);
        let reply = control.request(&serde_json::json!({ "op": "snapshot", "dir": clone_dir.join("snapshot") }));
        assert_eq!(reply["ok"], true, "the {memory} clone was snapshotted: {reply}");
        control.request(&serde_json::json!({ "op": "shutdown" }));
        assert!(exit_with_deadline(&mut child).success(), "the {memory} VMM exited cleanly");
        // The clone only spun on its go flag: above its image (whose page
        // tables' accessed bits may change), its memory is the template's.
        let written_path = clone_dir.join("snapshot").join("memory");
        let (written, original) = (std::fs::read(&written_path).unwrap(), std::fs::read(&template.memory).unwrap());
        assert_eq!(written.len(), original.len());
        assert!(written[ABOVE_IMAGE..] == original[ABOVE_IMAGE..], "the {memory} clone's memory file differs from its template's");
        let pages = std::fs::metadata(&written_path).unwrap().blocks() * 512 / PAGE;
        assert!((BOOT_DATA_PAGES..=BOOT_DATA_PAGES + BASELINE_PAGES).contains(&pages), "the {memory} clone's memory file holds {pages} pages");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn spawn_vmm_child(config: &Path) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "a_vmm_process_snapshots_its_clones_under_its_seccomp_filter", "--nocapture", "--test-threads=1"])
        .env(VMM_CHILD_CONFIG, config)
        .spawn()
        .expect("start the VMM child")
}

fn exit_with_deadline(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VMM child did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VMM's control connection: one JSON request, one reply line.
struct Control(BufReader<UnixStream>);

impl Control {
    fn request(&mut self, request: &serde_json::Value) -> serde_json::Value {
        writeln!(self.0.get_mut(), "{request}").expect("send a control request");
        let mut line = String::new();
        self.0.read_line(&mut line).expect("read a control reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("a JSON reply to {request}, not {line:?}: {e}"))
    }
}

fn connect_with_deadline(socket: &Path) -> Control {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            return Control(BufReader::new(stream));
        }
        assert!(std::time::Instant::now() < deadline, "the VMM's control socket {} did not appear within {WAIT:?}", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
