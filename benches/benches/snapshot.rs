//! Snapshot cost with a ring-3 payload on real KVM: a 256 MiB guest that
//! touched 32 MiB, snapshotted from each memory backing the VMM uses (a
//! freshly booted VM's memfd, a MAP_PRIVATE clone and a uffd clone of a
//! template, each clone rewriting 8 MiB of those 32 MiB first) into a
//! directory on ext4 (/var/tmp) and one on tmpfs (/dev/shm). Every sample
//! boots or restores a new VM, so none inherits pages an earlier one faulted
//! in. Prints, per case, the p50 and worst time of `snapshot::create`, the
//! process's peak RSS growth while it ran (VmHWM after, reset to VmRSS just
//! before through /proc/self/clear_refs) and the memory file's allocated
//! size. A plain harness: `SNAPSHOT_BENCH_SAMPLES` sets the samples per case
//! (default 10).

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sandbox_vmm::{
    builder::MicroVmBuilder,
    snapshot::{self, MicroVmState, RestoreMode, SnapshotFiles},
    MicroVm,
};
use support::{start_payload, PortRecorder, RecorderDevice, SharedConsole, TEST_PORT, TEST_PORT_LEN};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(60);
const GUEST_MIB: u32 = 256;
const GO_FLAG: u64 = 0x40_1000;

/// Writes 32 MiB at 16 MiB and reports on port 0x10; once the host sets the
/// go flag, rewrites the first 8 MiB of them and reports on port 0x11.
const BODY: &str = r#"
    mov $0x1000000, %rdi
1:  mov %rdi, (%rdi)
    add $8, %rdi
    cmp $0x3000000, %rdi
    jb 1b
    out %al, $0x10
2:  cmpq $0, 0x401000
    je 2b
    mov $0x1000000, %rdi
3:  mov %rdi, %rax
    not %rax
    mov %rax, (%rdi)
    add $8, %rdi
    cmp $0x1800000, %rdi
    jb 3b
    out %al, $0x11
4:  jmp 4b
"#;

/// Where guest memory comes from.
#[derive(Clone, Copy)]
enum Backing {
    FreshMemfd,
    MapPrivateClone,
    UffdClone,
}

impl Backing {
    fn label(self) -> &'static str {
        match self {
            Backing::FreshMemfd => "fresh_memfd",
            Backing::MapPrivateClone => "map_private_clone",
            Backing::UffdClone => "uffd_clone",
        }
    }
}

/// One timed snapshot.
struct Sample {
    time: Duration,
    rss_before_kib: u64,
    rss_growth_kib: u64,
    file_kib: u64,
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|line| line.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB")
}

/// Snapshots the paused `vm` into `dir`, measuring time and peak RSS growth.
fn timed_snapshot(vm: &MicroVm, dir: &Path) -> Sample {
    std::fs::create_dir_all(dir).expect("create the snapshot dir");
    let files = SnapshotFiles::in_dir(dir);
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS (clear_refs 5)");
    let rss_before_kib = status_kib("VmRSS:");
    let started = Instant::now();
    snapshot::create(vm, &files).expect("snapshot the paused VM");
    let time = started.elapsed();
    let rss_growth_kib = status_kib("VmHWM:").saturating_sub(rss_before_kib);
    let file_kib = std::fs::metadata(&files.memory).expect("stat the memory file").blocks() / 2;
    std::fs::remove_dir_all(dir).expect("remove the snapshot dir");
    Sample { time, rss_before_kib, rss_growth_kib, file_kib }
}

/// Boots the payload and waits until it has written its 32 MiB.
fn boot() -> MicroVm {
    let (vm, ports, _) = start_payload(BODY, GUEST_MIB, 1, |_| {});
    assert_eq!(ports.wait_for_writes(1, WAIT).len(), 1, "the payload wrote its 32 MiB");
    vm
}

/// Restores a clone of `template`, lets it rewrite 8 MiB and pauses it.
fn paused_clone(template: &SnapshotFiles, state: &Arc<MicroVmState>, mode: RestoreMode) -> MicroVm {
    let memory = snapshot::restore_memory(template, state, mode).expect("restore the template's memory");
    let mut builder = MicroVmBuilder::restore(Arc::clone(state), memory, Box::new(SharedConsole::default()), Vec::new()).expect("restore the template");
    let ports = Arc::new(PortRecorder::default());
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(ports.clone())))).expect("add the test ports");
    let vm = builder.start().expect("start the clone");
    vm.memory().write_obj(1u64, GuestAddress(GO_FLAG)).expect("set the go flag");
    vm.resume();
    assert_eq!(ports.wait_for_writes(1, WAIT).len(), 1, "the clone rewrote 8 MiB");
    vm.pause().expect("pause the clone");
    vm
}

fn sample(backing: Backing, template: &SnapshotFiles, state: &Arc<MicroVmState>, dir: &Path) -> Sample {
    let mut vm = match backing {
        Backing::FreshMemfd => {
            let vm = boot();
            vm.pause().expect("pause the VM");
            vm
        }
        Backing::MapPrivateClone => paused_clone(template, state, RestoreMode::MapPrivate),
        Backing::UffdClone => paused_clone(template, state, RestoreMode::Uffd { prefetch: Vec::new(), record: false }),
    };
    let measured = timed_snapshot(&vm, dir);
    vm.stop();
    measured
}

fn p50<T: Copy + Ord>(values: &mut [T]) -> T {
    values.sort_unstable();
    values[values.len() / 2]
}

fn report(case: &str, samples: &[Sample]) {
    let mut times: Vec<Duration> = samples.iter().map(|s| s.time).collect();
    let mut growth: Vec<u64> = samples.iter().map(|s| s.rss_growth_kib).collect();
    let mut before: Vec<u64> = samples.iter().map(|s| s.rss_before_kib).collect();
    let mut file: Vec<u64> = samples.iter().map(|s| s.file_kib).collect();
    let worst = times.iter().max().copied().unwrap_or_default();
    println!(
        "snapshot_256mib_touched_32mib/{case}: time p50 {:.1?} max {worst:.1?}; peak RSS growth p50 {:.1} MiB (RSS before {:.1} MiB); memory file {:.1} MiB allocated; {} samples",
        p50(&mut times),
        p50(&mut growth) as f64 / 1024.0,
        p50(&mut before) as f64 / 1024.0,
        p50(&mut file) as f64 / 1024.0,
        samples.len()
    );
}

/// A template snapshot of the booted payload, for the clones.
fn template(dir: &Path) -> (SnapshotFiles, Arc<MicroVmState>) {
    std::fs::create_dir_all(dir).expect("create the template dir");
    let mut vm = boot();
    vm.pause().expect("pause the template VM");
    let files = SnapshotFiles::in_dir(dir);
    snapshot::create(&vm, &files).expect("snapshot the template");
    vm.stop();
    let state = Arc::new(snapshot::load_state(&files).expect("load the template state"));
    (files, state)
}

fn main() {
    let samples: usize = std::env::var("SNAPSHOT_BENCH_SAMPLES").ok().and_then(|n| n.parse().ok()).unwrap_or(10);
    let places = [("ext4", PathBuf::from("/var/tmp")), ("tmpfs", PathBuf::from("/dev/shm"))];
    for (fs, place) in places {
        let root = place.join(format!("sandboxd-snapshot-bench-{}", std::process::id()));
        let (template, state) = template(&root.join("template"));
        for backing in [Backing::FreshMemfd, Backing::MapPrivateClone, Backing::UffdClone] {
            let measured: Vec<Sample> = (0..samples).map(|_| sample(backing, &template, &state, &root.join("sample"))).collect();
            report(&format!("{}/{fs}", backing.label()), &measured);
        }
        std::fs::remove_dir_all(&root).expect("remove the bench dir");
    }
}
