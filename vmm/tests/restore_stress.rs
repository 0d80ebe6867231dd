//! Restore stress without a Linux guest: hundreds of guest memories served
//! by userfaultfd from a memory file, each with a live vsock device whose
//! own thread writes guest memory (receive buffers the handler must serve)
//! while the host streams data, the device is paused and resumed, and the
//! device and then the memory are dropped with the host still writing.
//! Every cycle must serve every fault and stop without a thread left asleep.

#[path = "support/virtq.rs"]
mod virtq;
#[path = "support/vsock_guest.rs"]
mod vsock_guest;

use std::{
    fs::File,
    io::Write,
    os::unix::fs::FileExt,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sandbox_vmm::{devices::virtio::vsock::packet::OP_RW, uffd::UffdMemory};
use vsock_guest::{host_connect, Guest};

/// Guest memory of each cycle.
const MEMORY_SIZE: u64 = 32 << 20;
/// Cycles per run; SANDBOXD_VMM_STRESS_CYCLES overrides.
const DEFAULT_CYCLES: u32 = 200;

fn cycles() -> u32 {
    std::env::var("SANDBOXD_VMM_STRESS_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_CYCLES)
}

/// A sparse memory file whose every 16th page holds data.
fn memory_file() -> File {
    let path = std::env::temp_dir().join(format!("sandboxd-restore-stress-{}.mem", std::process::id()));
    let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len(MEMORY_SIZE).unwrap();
    for page in (0..MEMORY_SIZE / 4096).step_by(16) {
        file.write_all_at(&[(page % 251) as u8 + 1; 4096], page * 4096).unwrap();
    }
    file
}

#[test]
fn hundreds_of_uffd_restores_with_a_vsock_device_writing_guest_memory() {
    let file = memory_file();
    let started = Instant::now();
    for cycle in 0..cycles() {
        let uffd = UffdMemory::new(&file, MEMORY_SIZE, false).unwrap();
        let mut guest = Guest::with_memory(&format!("stress-{cycle}"), uffd.memory().clone());
        let (mut stream, _) = host_connect(&mut guest, 1024);
        stream.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let byte = (cycle % 200) as u8 + 1;
        stream.write_all(&[byte; 3000]).unwrap();
        let (packet, payload) = guest.receive();
        let op = packet.op;
        assert_eq!(op, OP_RW, "cycle {cycle}: the host's data reached the guest");
        assert!(!payload.is_empty() && payload.iter().all(|&b| b == byte), "cycle {cycle}: the bytes are the host's");

        guest.driver.transport.set_paused(true);
        stream.write_all(b"sent while the device is paused").unwrap();
        guest.driver.transport.set_paused(false);
        // The host goes on writing while the device and then its memory go away.
        let writer = std::thread::spawn(move || while stream.write_all(&[7; 4096]).is_ok() {});
        drop(guest);
        assert_eq!(uffd.failure(), None, "cycle {cycle}: every fault was served");
        assert!(uffd.stats().faults.load(Ordering::Relaxed) > 0, "cycle {cycle}: the device's writes were served by faults");
        drop(uffd);
        writer.join().unwrap();
    }
    eprintln!("{} uffd restores with a live vsock device in {:.1?}", cycles(), started.elapsed());
}
