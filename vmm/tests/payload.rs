//! The VMM on real KVM with ring-3 payloads: memory, port I/O and MMIO
//! exits, serial output, two vCPUs at once, exact pause and resume, and
//! clean reports of a triple fault and of a spinning guest.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use sandbox_vmm::{builder::MicroVmBuilder, MicroVm, VmExit};
use support::{start_payload, PortRecorder, RecorderDevice, SharedConsole};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(20);
/// An MMIO window above RAM for the recorder.
const MMIO_BASE: u64 = 0xd000_0000;

struct Harness {
    vm: MicroVm,
    ports: Arc<PortRecorder>,
    mmio: Arc<PortRecorder>,
    console: SharedConsole,
}

fn start(body: &str, vcpus: u8, before_start: impl FnOnce(&mut MicroVmBuilder)) -> Harness {
    let mmio = Arc::new(PortRecorder::default());
    let (vm, ports, console) = start_payload(body, 64, vcpus, |builder| {
        builder.add_mmio_device(MMIO_BASE, 0x1000, Arc::new(Mutex::new(RecorderDevice(mmio.clone())))).unwrap();
        before_start(builder);
    });
    Harness { vm, ports, mmio, console }
}

fn read_u64(vm: &MicroVm, address: u64) -> u64 {
    vm.memory().read_obj(GuestAddress(address)).unwrap()
}

#[test]
fn guest_and_host_see_each_others_memory_writes() {
    let body = r#"
        movabs $0x1122334455667788, %rax
        mov %rax, 0x400000
        mov 0x401000, %rax
        add $1, %rax
        out %eax, $0x10
    "#;
    let mut h = start(body, 1, |builder| builder.memory().write_obj(41u64, GuestAddress(0x401000)).unwrap());
    let writes = h.ports.wait_for_writes(1, WAIT);
    assert_eq!(writes, vec![(0, 42)], "the guest read the host's 41 and reported 42");
    assert_eq!(read_u64(&h.vm, 0x400000), 0x1122_3344_5566_7788, "the host sees the guest's write");
    assert_eq!(h.vm.stop(), VmExit::Stopped);
}

#[test]
fn port_io_and_mmio_exits_reach_the_right_device() {
    let body = r#"
        mov $0x13, %dx
        mov $0xab, %al
        out %al, %dx
        in $0x14, %eax
        out %eax, $0x18
        mov $0xd0000020, %edi
        movl $0xcafe, (%rdi)
        mov 0x20(%rdi), %eax
        out %eax, $0x1c
    "#;
    let mut h = start(body, 1, |_| {});
    h.ports.read_value.store(0x5151, std::sync::atomic::Ordering::SeqCst);
    h.mmio.read_value.store(0x7777, std::sync::atomic::Ordering::SeqCst);
    let writes = h.ports.wait_for_writes(3, WAIT);
    assert_eq!(writes[0], (3, 0xab), "an 8-bit OUT to port 0x13 lands at offset 3");
    assert_eq!(writes[1], (8, 0x5151), "an IN from the device returned its value");
    assert_eq!(writes[2], (0xc, 0x7777), "an MMIO read returned the MMIO device's value");
    assert_eq!(h.mmio.wait_for_writes(1, WAIT), vec![(0x20, 0xcafe)], "the MMIO write reached offset 0x20");
    assert!(h.vm.vcpus()[0].counters().mmio.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    h.vm.stop();
}

#[test]
fn serial_console_receives_what_the_guest_prints() {
    let body = r#"
        mov $0x3f8, %dx
        mov $'o', %al
        out %al, %dx
        mov $'k', %al
        out %al, %dx
        out %al, $0x10
    "#;
    let mut h = start(body, 1, |_| {});
    h.ports.wait_for_writes(1, WAIT);
    assert_eq!(h.console.text(), "ok");
    h.vm.stop();
}

#[test]
fn two_vcpus_run_at_once() {
    // Each vCPU increments its own counter at 0x600000 + 8 * id, forever.
    let body = r#"
        lea 0x600000(,%r15,8), %rdi
    1:  incq (%rdi)
        jmp 1b
    "#;
    // Both vCPU threads run under their seccomp allow-list.
    let mut h = start(body, 2, |builder| {
        builder.start_all_vcpus_at_entry();
        builder.confine_vcpus().unwrap();
    });
    let deadline = std::time::Instant::now() + WAIT;
    let both_running = || read_u64(&h.vm, 0x600000) > 1000 && read_u64(&h.vm, 0x600008) > 1000;
    while !both_running() {
        assert!(std::time::Instant::now() < deadline, "both counters must advance");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (a, b) = (read_u64(&h.vm, 0x600000), read_u64(&h.vm, 0x600008));
    std::thread::sleep(Duration::from_millis(20));
    assert!(read_u64(&h.vm, 0x600000) > a && read_u64(&h.vm, 0x600008) > b, "both advance while the other runs");
    h.vm.stop();
}

#[test]
fn pause_and_resume_keep_the_counter_exact() {
    let body = r#"
        xor %rbx, %rbx
    1:  inc %rbx
        mov %rbx, 0x500000
        jmp 1b
    "#;
    let mut h = start(body, 1, |builder| builder.confine_vcpus().unwrap());
    while read_u64(&h.vm, 0x500000) < 1000 {
        std::thread::sleep(Duration::from_millis(1));
    }
    h.vm.pause().unwrap();
    let paused_at = read_u64(&h.vm, 0x500000);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read_u64(&h.vm, 0x500000), paused_at, "nothing runs while paused");
    h.vm.resume();
    while read_u64(&h.vm, 0x500000) <= paused_at {
        std::thread::sleep(Duration::from_millis(1));
    }
    h.vm.pause().unwrap();
    let later = read_u64(&h.vm, 0x500000);
    assert!(later > paused_at, "the count continues from where it paused");
    h.vm.resume();
    assert_eq!(h.vm.stop(), VmExit::Stopped);
}

#[test]
fn triple_fault_is_reported_as_shutdown() {
    // ud2 at CPL 3 with no IDT: #UD, then #GP, then a double fault: triple fault.
    let mut h = start("ud2\n", 1, |_| {});
    assert_eq!(h.vm.wait_for_exit(WAIT), Some(VmExit::Shutdown));
}

#[test]
fn spinning_guest_is_stopped_from_the_host() {
    let mut h = start("1: jmp 1b\n", 1, |_| {});
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.vm.wait_for_exit(Duration::from_millis(10)), None, "a spinning guest never exits by itself");
    assert_eq!(h.vm.stop(), VmExit::Stopped);
}

#[test]
fn i8042_reset_shuts_the_vm_down() {
    let body = r#"
        mov $0xfe, %al
        out %al, $0x64
    1:  jmp 1b
    "#;
    let mut h = start(body, 1, |_| {});
    assert_eq!(h.vm.wait_for_exit(WAIT), Some(VmExit::Reset));
}

#[test]
fn pause_completes_an_in_flight_port_read() {
    // Each IN returns the number of reads the device has answered; a
    // paused vCPU must hold the answer to its last IN in %eax, never sit
    // before an IN the device already answered (a restore would repeat it).
    let body = r#"
    1:  in $0x20, %eax
        jmp 1b
    "#;
    let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let device = Arc::new(Mutex::new(CountingReads(reads.clone())));
    let mut h = start(body, 1, |builder| builder.add_pio_device(0x20, 4, device).unwrap());
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        h.vm.pause().unwrap();
        let regs = h.vm.vcpus()[0].run_on_vcpu(|fd| fd.get_regs().unwrap()).unwrap();
        assert_eq!(regs.rax as u32, reads.load(std::sync::atomic::Ordering::SeqCst), "the last IN completed before the vCPU parked");
        h.vm.resume();
    }
    h.vm.stop();
}

/// Answers each read with how many reads it has answered.
struct CountingReads(Arc<std::sync::atomic::AtomicU32>);

impl sandbox_vmm::devices::bus::BusDevice for CountingReads {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let answered = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let len = data.len().min(4);
        data[..len].copy_from_slice(&answered.to_le_bytes()[..len]);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
