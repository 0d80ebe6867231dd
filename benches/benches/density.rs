//! Memory density of paused, pooled microVMs restored from one snapshot, in
//! two parts, each MAP_PRIVATE against userfaultfd side by side, each with
//! how many such VMs one machine would hold by that measure. The payload is
//! a 128 MiB ring-3 VM that wrote 32 MiB and keeps counting.
//!
//! 1. Clones in this process: the private memory each clone costs (its
//!    process-private pages, the part not shared through the page cache).
//!    The host memory a clone costs in all is measured in part 2.
//! 2. One `sandboxd vmm` process per clone, as the pool really runs them:
//!    16 processes restore the snapshot, run ~20 ms and are paused over their
//!    control sockets; then each process's private memory
//!    (Private_Clean + Private_Dirty) and Pss from /proc/PID/smaps_rollup,
//!    the growth of kernel stacks, page tables and unreclaimable slab (KVM),
//!    and the MemAvailable drop over all 16 (against a baseline interpolated
//!    between before and after, as MemAvailable drifts on shared machines).
//!    This is the real cost of one pooled VMM process: guest pages plus heap,
//!    thread stacks and KVM; Pss + kernel growth is the steadier host figure.
//!    Needs `cargo build --release -p sandboxd` first.
//!
//! Other work on the machine makes the MemAvailable figures noisy.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;
mod vmm_process;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sandbox_vmm::{
    builder::MicroVmBuilder,
    snapshot::{self, RestoreMode, SnapshotFiles},
    MicroVm,
};
use support::{start_payload, SharedConsole};

const CLONES: usize = 16;
const BODY: &str = r#"
    mov $0x1000000, %rdi
1:  mov %rdi, (%rdi)
    add $8, %rdi
    cmp $0x3000000, %rdi
    jb 1b
    out %al, $0x10
    xor %rbx, %rbx
2:  inc %rbx
    mov %rbx, 0x500000
    jmp 2b
"#;

/// Private and shared KiB of this process (from smaps_rollup).
fn memory_kib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("Private_Clean:") + field("Private_Dirty:"), field("Shared_Clean:") + field("Shared_Dirty:"))
}

/// A /proc/meminfo field, in KiB.
fn meminfo_kib(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn pooled_clones(files: &SnapshotFiles, uffd: bool) -> Vec<MicroVm> {
    let state = Arc::new(snapshot::load_state(files).unwrap());
    (0..CLONES)
        .map(|_| {
            let mode = if uffd { RestoreMode::Uffd { prefetch: Vec::new(), record: false } } else { RestoreMode::MapPrivate };
            let memory = snapshot::restore_memory(files, &state, mode).unwrap();
            let vm = MicroVmBuilder::restore(Arc::clone(&state), memory, Box::new(SharedConsole::default()), Vec::new()).unwrap().start().unwrap();
            // Run briefly, then sit paused in the pool.
            vm.resume();
            std::thread::sleep(Duration::from_millis(20));
            vm.pause().unwrap();
            vm
        })
        .collect()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("sandboxd-density-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut vm, ports, _) = start_payload(BODY, 128, 1, |_| {});
    ports.wait_for_writes(1, Duration::from_secs(30));
    vm.pause().unwrap();
    let files = SnapshotFiles::in_dir(&dir);
    snapshot::create(&vm, &files).unwrap();
    vm.stop();
    drop(vm);

    for (label, uffd) in [("map_private", false), ("uffd", true)] {
        let (private_before, shared_before) = memory_kib();
        let mut clones = pooled_clones(&files, uffd);
        let (private_after, shared_after) = memory_kib();
        let private_each = private_after.saturating_sub(private_before) / CLONES as u64;
        let shared = shared_after.saturating_sub(shared_before);
        println!("pooled 128 MiB VM ({label}), {CLONES} clones in one process: private {private_each} KiB each, shared {shared} KiB in all");
        for clone in &mut clones {
            clone.stop();
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    process_density();
    vmm_process::remove_payload_dirs();
}

/// Like BODY, but reports the 32 MiB as written on the serial port, which a
/// VMM process logs (so the snapshot is taken after the writes).
const PROCESS_BODY: &str = r#"
    mov $0x1000000, %rdi
1:  mov %rdi, (%rdi)
    add $8, %rdi
    cmp $0x3000000, %rdi
    jb 1b
    mov $0x3f8, %dx
    mov $'w', %al
    out %al, %dx
    xor %rbx, %rbx
2:  inc %rbx
    mov %rbx, 0x500000
    jmp 2b
"#;

/// MemAvailable, and the kernel memory a VMM process can add (thread
/// stacks, page tables, unreclaimable slab such as KVM's), in KiB, and when.
struct HostMemory {
    at: Instant,
    available: u64,
    kernel: u64,
}

fn host_memory() -> HostMemory {
    // Let deferred frees (RCU, exiting processes) land before reading.
    std::thread::sleep(Duration::from_millis(200));
    let kib = vmm_process::kib_fields(
        "/proc/meminfo",
        &["MemAvailable", "KernelStack", "PageTables", "SecPageTables", "SUnreclaim"],
    );
    HostMemory { at: Instant::now(), available: kib[0], kernel: kib[1..].iter().sum() }
}

/// Part 2: one paused `sandboxd vmm` process per clone.
fn process_density() {
    let dir = vmm_process::temp_dir("density-process");
    let snapshot = vmm_process::snapshot_payload(&dir, PROCESS_BODY, 128, Duration::from_millis(10));
    let host_kib = meminfo_kib("MemTotal:");
    for memory in ["map_private", "uffd"] {
        let before = host_memory();
        let mut processes: Vec<vmm_process::VmmProcess> = (0..CLONES)
            .map(|i| {
                let name = format!("{memory}-{i}");
                let source = serde_json::json!({ "restore": { "snapshot_dir": snapshot, "memory": memory } });
                let serial = dir.join(format!("{name}.serial"));
                let mut vmm = vmm_process::VmmLaunch::new(&dir, &name, source, &serial).spawn();
                vmm.connect();
                std::thread::sleep(Duration::from_millis(20));
                vmm.request("pause");
                vmm
            })
            .collect();
        let pooled = host_memory();
        let fields = ["Rss", "Pss", "Private_Clean", "Private_Dirty"];
        let (mut rss, mut pss, mut private) = (Vec::new(), Vec::new(), Vec::new());
        for vmm in &processes {
            let kib = vmm_process::kib_fields(&format!("/proc/{}/smaps_rollup", vmm.pid()), &fields);
            rss.push(kib[0]);
            pss.push(kib[1]);
            private.push(kib[2] + kib[3]);
        }
        for vmm in processes.drain(..) {
            vmm.shutdown();
        }
        let after = host_memory();
        // MemAvailable drifts on this shared machine: take the baseline at
        // the pooled moment as the line between before and after.
        let span = after.at.duration_since(before.at).as_secs_f64();
        let share = pooled.at.duration_since(before.at).as_secs_f64() / span;
        let baseline = before.available as f64 + (after.available as f64 - before.available as f64) * share;
        let host_each = ((baseline - pooled.available as f64) / CLONES as f64).max(0.0) as u64;
        let raw_drop_each = before.available.saturating_sub(pooled.available) / CLONES as u64;
        let kernel_each = pooled.kernel.saturating_sub(before.kernel) / CLONES as u64;
        let mean = |values: &[u64]| values.iter().sum::<u64>() / values.len() as u64;
        // The robust per-process figure: its proportional share of the pages
        // it maps, plus the kernel memory each process added.
        let attributed_each = mean(&pss) + kernel_each;
        let fit = |each: u64| host_kib.checked_div(each).map_or("n/a (no measurable cost)".to_owned(), |n| n.to_string());
        println!(
            "pooled 128 MiB VM ({memory}), {CLONES} paused `sandboxd vmm` processes, per process:\n\
             \x20 private {} KiB (min {} max {}), Pss {} KiB, Rss {} KiB (smaps_rollup)\n\
             \x20 kernel (stacks, page tables, unreclaimable slab incl. KVM) {kernel_each} KiB\n\
             \x20 host memory: Pss + kernel {attributed_each} KiB, about {} fit in this machine's {} GiB;\n\
             \x20 MemAvailable drop {host_each} KiB against a drift-corrected baseline (raw {raw_drop_each} KiB; \
             noisy here), about {} fit",
            mean(&private),
            private.iter().min().expect("one process at least"),
            private.iter().max().expect("one process at least"),
            mean(&pss),
            mean(&rss),
            fit(attributed_each),
            host_kib / (1024 * 1024),
            fit(host_each),
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
