//! Snapshot and restore on real KVM with a ring-3 payload that writes a
//! pattern over 64 MiB and then counts forever: after restore, in both
//! memory modes, the count continues from where it was and the pattern is
//! intact; clones diverge without touching each other or the memory file;
//! the uffd handler serves only the pages the guest touches; a corrupted
//! snapshot is refused.

mod support;

use std::{
    os::unix::fs::FileExt,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use sandbox_vmm::{
    builder::MicroVmBuilder,
    snapshot::{self, FormatError, RestoreMode, SnapshotError, SnapshotFiles},
    MicroVm, VmExit,
};
use support::{start_payload, RecorderDevice, SharedConsole, TEST_PORT, TEST_PORT_LEN};
use vm_memory::{Bytes, GuestAddress};

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
