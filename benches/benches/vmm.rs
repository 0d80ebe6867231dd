//! VMM speed with ring-3 payloads on real KVM: time from creating a VM to
//! its first payload instruction, and the round trip of one port I/O exit.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};
use sandbox_vmm::{builder::MicroVmBuilder, devices::bus::BusDevice, MicroVmConfig};
use support::{build_payload, PortRecorder, RecorderDevice, SharedConsole, TEST_PORT, TEST_PORT_LEN};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(30);

fn config(kernel: std::path::PathBuf) -> MicroVmConfig {
    MicroVmConfig { kernel, cmdline: String::new(), memory_mib: 64, vcpus: 1, console: Box::new(SharedConsole::default()), virtio: Vec::new() }
}

/// Counts port writes without keeping them.
struct Counter(Arc<AtomicU64>);

impl BusDevice for Counter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

fn create_to_first_instruction(c: &mut Criterion) {
    // The payload's first ring-3 instruction reports on port 0x10.
    let payload = build_payload("out %al, $0x10\n");
    c.bench_function("vm_create_to_first_payload_instruction", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                let mut builder = MicroVmBuilder::new(config(payload.clone())).unwrap();
                let ports = Arc::new(PortRecorder::default());
                builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(ports.clone())))).unwrap();
                let mut vm = builder.start().unwrap();
                ports.wait_for_writes(1, WAIT);
                total += started.elapsed();
                vm.stop();
            }
            total
        })
    });
}

fn pio_round_trip(c: &mut Criterion) {
    // After the host sets the go flag, the payload makes exits forever.
    let body = r#"
    1:  cmpq $0, 0x401000
        je 1b
    2:  out %al, $0x12
        jmp 2b
    "#;
    let payload = build_payload(body);
    let mut builder = MicroVmBuilder::new(config(payload)).unwrap();
    let exits = Arc::new(AtomicU64::new(0));
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(Counter(exits.clone())))).unwrap();
    let mut vm = builder.start().unwrap();
    vm.memory().write_obj(1u64, GuestAddress(0x401000)).unwrap();
    c.bench_function("pio_exit_round_trip", |b| {
        b.iter_custom(|iterations| {
            let start = exits.load(Ordering::Acquire);
            let started = Instant::now();
            while exits.load(Ordering::Acquire) < start + iterations {
                std::hint::spin_loop();
            }
            started.elapsed()
        })
    });
    vm.stop();
}

criterion_group!(benches, create_to_first_instruction, pio_round_trip);
criterion_main!(benches);
