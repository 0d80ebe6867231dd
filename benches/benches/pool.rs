//! What a warm pool buys, measured on real `sandboxd vmm` processes (one
//! microVM per process) restoring one snapshot of a 128 MiB ring-3 payload
//! that writes a byte to the serial port (0x3f8) every 2^16 iterations of a
//! counter. Side by side in one criterion group, for MAP_PRIVATE and for
//! userfaultfd memory:
//!
//! - `cold_*`: spawn a fresh `sandboxd vmm` that restores the snapshot and
//!   runs it; timed from the spawn to the guest's first serial byte.
//! - `warm_*`: a `sandboxd vmm` already restored with `start_paused: true`
//!   and sitting paused (set up outside the timed section); timed from
//!   sending `{"op":"resume"}` to the guest's first serial byte.
//!
//! The serial log is a FIFO, so the first byte is seen the moment the guest
//! writes it. Every VMM is shut down after its iteration. Criterion reports
//! means; p50/p99 over all iterations (warm-up included) follow at the end.
//!
//! Build the binary first: `cargo build --release -p sandboxd`, then
//! `cargo bench -p sandboxd-benches --bench pool`.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;
mod vmm_process;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use serde_json::json;
use vmm_process::{percentiles, snapshot_payload, temp_dir, unique_name, SerialFifo, VmmLaunch};

const MEMORY_MIB: u32 = 128;

/// Writes 'x' to the serial port every 2^16 iterations of a counter (a few
/// tens of microseconds apart), forever.
const BODY: &str = r#"
    xor %rbx, %rbx
1:  inc %rbx
    test $0xffff, %ebx
    jnz 1b
    mov $0x3f8, %dx
    mov $'x', %al
    out %al, %dx
    jmp 1b
"#;

fn restore_source(snapshot: &Path, memory: &str, start_paused: bool) -> serde_json::Value {
    json!({ "restore": { "snapshot_dir": snapshot, "memory": memory }, "start_paused": start_paused })
}

/// A fresh VMM process restores and runs the snapshot: spawn → first serial byte.
fn cold(dir: &Path, snapshot: &Path, memory: &str) -> Duration {
    let name = unique_name("cold");
    let serial_path = dir.join(format!("{name}.serial"));
    let mut serial = SerialFifo::create(&serial_path);
    let launch = VmmLaunch::new(dir, &name, restore_source(snapshot, memory, false), &serial_path);
    let started = Instant::now();
    let mut vmm = launch.spawn();
    let first = serial.first_byte();
    let spent = first - started;
    vmm.connect();
    vmm.shutdown();
    spent
}

/// A paused, restored VMM process is resumed: resume request → first serial byte.
fn warm(dir: &Path, snapshot: &Path, memory: &str) -> Duration {
    let name = unique_name("warm");
    let serial_path = dir.join(format!("{name}.serial"));
    let mut serial = SerialFifo::create(&serial_path);
    let mut vmm = VmmLaunch::new(dir, &name, restore_source(snapshot, memory, true), &serial_path).spawn();
    vmm.connect();
    assert!(!serial.has_output(), "VMM {name} started paused but its guest already printed");
    let started = Instant::now();
    vmm.send("resume");
    let first = serial.first_byte();
    let spent = first - started;
    vmm.reply("resume");
    vmm.shutdown();
    spent
}

fn pool(c: &mut Criterion) {
    let dir = temp_dir("pool");
    let snapshot = snapshot_payload(&dir, BODY, MEMORY_MIB, Duration::from_millis(10));
    let mut all: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut group = c.benchmark_group("first_serial_byte_128mib");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for memory in ["map_private", "uffd"] {
        for (kind, run) in [("cold", cold as fn(&Path, &Path, &str) -> Duration), ("warm", warm)] {
            let label = format!("{kind}_{memory}");
            let mut samples = Vec::new();
            group.bench_function(&label, |b| {
                b.iter_custom(|iterations| {
                    (0..iterations)
                        .map(|_| {
                            let spent = run(&dir, &snapshot, memory);
                            samples.push(spent);
                            spent
                        })
                        .sum()
                })
            });
            all.push((label, samples));
        }
    }
    group.finish();
    println!("first serial byte, 128 MiB payload VM, one `sandboxd vmm` process each:");
    for (label, mut samples) in all {
        let count = samples.len();
        let (p50, p99) = percentiles(&mut samples);
        println!("  {label:<18} p50 {p50:>12.3?}  p99 {p99:>12.3?}  over {count} runs");
    }
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, pool);
criterion_main!(benches);
