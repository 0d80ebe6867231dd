//! Restore speed with ring-3 payloads on real KVM, each pair side by side:
//! snapshot → first guest instruction after restore, MAP_PRIVATE against
//! userfaultfd, for a 256 MiB VM; and the time until a 32 MiB working set is
//! resident and used, recorded-working-set prefetch against fault by fault.
//! The first pair also prints p50/p99 over every restore it timed.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;
mod vmm_process;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};
use sandbox_vmm::{
    builder::MicroVmBuilder,
    snapshot::{self, MicroVmState, RestoreMode, SnapshotFiles},
    MicroVm,
};
use support::{start_payload, PortRecorder, RecorderDevice, SharedConsole, TEST_PORT, TEST_PORT_LEN};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(30);
const GO_FLAG: u64 = 0x40_1000;

/// For the working-set bench: writes 32 MiB at 16 MiB, reports on port 0x10, waits for the go flag,
/// then reads one word of every page of those 32 MiB and reports on 0x11.
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
    xor %rax, %rax
3:  add (%rdi), %rax
    add $4096, %rdi
    cmp $0x3000000, %rdi
    jb 3b
    out %al, $0x11
4:  jmp 4b
"#;

/// Writes 64 MiB at 16 MiB, reports on port 0x10, then counts at 0x500000.
const COUNTER_BODY: &str = r#"
    mov $0x1000000, %rdi
1:  mov %rdi, (%rdi)
    add $8, %rdi
    cmp $0x5000000, %rdi
    jb 1b
    out %al, $0x10
    xor %rbx, %rbx
2:  inc %rbx
    mov %rbx, 0x500000
    jmp 2b
"#;
const COUNTER: u64 = 0x50_0000;

fn snapshot_payload(dir: &Path, body: &str) -> SnapshotFiles {
    let (mut vm, ports, _) = start_payload(body, 256, 1, |_| {});
    ports.wait_for_writes(1, WAIT);
    std::thread::sleep(Duration::from_millis(10));
    vm.pause().unwrap();
    let files = SnapshotFiles::in_dir(dir);
    snapshot::create(&vm, &files).unwrap();
    vm.stop();
    files
}

/// Restores a VM; returns it and the recorder of its ports.
fn restore(files: &SnapshotFiles, state: &Arc<MicroVmState>, mode: RestoreMode) -> (MicroVm, Arc<PortRecorder>) {
    let memory = snapshot::restore_memory(files, state, mode).unwrap();
    let mut builder = MicroVmBuilder::restore(Arc::clone(state), memory, Box::new(SharedConsole::default()), Vec::new()).unwrap();
    let ports = Arc::new(PortRecorder::default());
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(ports.clone())))).unwrap();
    (builder.start().unwrap(), ports)
}

fn uffd(prefetch: Vec<u64>, record: bool) -> RestoreMode {
    RestoreMode::Uffd { prefetch, record }
}

/// Restores, lets the guest touch its working set, and returns the time
/// from the start of the restore until the guest reported it was done.
fn restore_and_touch(files: &SnapshotFiles, state: &Arc<MicroVmState>, mode: RestoreMode) -> (Duration, MicroVm) {
    let started = Instant::now();
    let (vm, ports) = restore(files, state, mode);
    vm.memory().write_obj(1u64, GuestAddress(GO_FLAG)).unwrap();
    vm.resume();
    ports.wait_for_writes(1, WAIT);
    (started.elapsed(), vm)
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxd-restore-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn first_instruction(c: &mut Criterion) {
    let dir = temp_dir();
    let files = snapshot_payload(&dir, COUNTER_BODY);
    let state = Arc::new(snapshot::load_state(&files).unwrap());
    let mut group = c.benchmark_group("restore_to_first_instruction_256mib");
    let mut all_samples = Vec::new();
    for (label, private) in [("map_private", true), ("uffd", false)] {
        let mut samples = Vec::new();
        group.bench_function(label, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let mode = if private { RestoreMode::MapPrivate } else { uffd(Vec::new(), false) };
                    let started = Instant::now();
                    let (mut vm, _) = restore(&files, &state, mode);
                    let counter = |vm: &MicroVm| vm.memory().read_obj::<u64>(GuestAddress(COUNTER)).unwrap();
                    let paused_at = counter(&vm);
                    vm.resume();
                    while counter(&vm) == paused_at {
                        std::hint::spin_loop();
                    }
                    let spent = started.elapsed();
                    samples.push(spent);
                    total += spent;
                    vm.stop();
                }
                total
            })
        });
        all_samples.push((label, samples));
    }
    group.finish();
    for (label, mut samples) in all_samples {
        let (p50, p99) = vmm_process::percentiles(&mut samples);
        println!("restore_to_first_instruction_256mib/{label}: p50 {p50:.3?}  p99 {p99:.3?}  over {} restores", samples.len());
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn working_set(c: &mut Criterion) {
    let dir = temp_dir();
    let files = snapshot_payload(&dir, BODY);
    let state = Arc::new(snapshot::load_state(&files).unwrap());
    let (_, mut recording) = restore_and_touch(&files, &state, uffd(Vec::new(), true));
    let recorded = recording.uffd().unwrap().recorded_working_set();
    recording.stop();
    println!("recorded working set: {} pages", recorded.len());
    let mut group = c.benchmark_group("working_set_32mib_resident");
    group.sample_size(10);
    for (label, prefetch) in [("prefetch", recorded.clone()), ("fault_by_fault", Vec::new())] {
        group.bench_function(label, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let (spent, mut vm) = restore_and_touch(&files, &state, uffd(prefetch.clone(), false));
                    total += spent;
                    vm.stop();
                }
                total
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, first_instruction, working_set);
criterion_main!(benches);
