//! Memory density of paused, pooled microVMs restored from one snapshot:
//! the private memory each clone costs (its process-private pages, the part
//! not shared through the page cache), and the host memory each costs in
//! all (the drop in MemAvailable, which also counts KVM's kernel memory),
//! MAP_PRIVATE against userfaultfd, side by side, and how many such VMs one
//! machine would hold by that measure. The payload is a 128 MiB ring-3 VM
//! that wrote 32 MiB and keeps counting. Other work on the machine makes
//! the MemAvailable figure noisy.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::{sync::Arc, time::Duration};

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

    let host_kib = meminfo_kib("MemTotal:");
    for (label, uffd) in [("map_private", false), ("uffd", true)] {
        let (private_before, shared_before) = memory_kib();
        let available_before = meminfo_kib("MemAvailable:");
        let mut clones = pooled_clones(&files, uffd);
        let (private_after, shared_after) = memory_kib();
        let host_each = available_before.saturating_sub(meminfo_kib("MemAvailable:")) / CLONES as u64;
        let private_each = private_after.saturating_sub(private_before) / CLONES as u64;
        let shared = shared_after.saturating_sub(shared_before);
        let fit = host_kib.checked_div(host_each).unwrap_or(0);
        println!(
            "pooled 128 MiB VM ({label}), {CLONES} clones: private {private_each} KiB each, shared {shared} KiB in all, \
             host memory {host_each} KiB each; about {fit} fit in this machine's {} GiB",
            host_kib / (1024 * 1024)
        );
        for clone in &mut clones {
            clone.stop();
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
