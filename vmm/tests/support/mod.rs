//! Ring-3 guest payloads for tests and benches: a tiny ELF, assembled at
//! test time with GNU `as` and `ld`, that the VMM loads like a kernel. Its
//! first instructions (at CPL 0) switch to its own user-accessible page
//! tables and GDT and `iretq` into CPL 3 with IOPL 3; from there it runs
//! natively and talks to the VMM through port I/O and MMIO.
//!
//! The body runs with `%r15` = the vCPU's APIC id, on a stack of its own.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use sandbox_vmm::devices::bus::BusDevice;

/// Ports 0x10..0x20 belong to the [`PortRecorder`].
pub const TEST_PORT: u64 = 0x10;
pub const TEST_PORT_LEN: u64 = 0x10;

const PROLOGUE: &str = r#"
    .code64
    .section .text
    .globl _start
_start:
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %rbx, %r15
    mov %rbx, %rax
    shl $13, %rax
    lea user_stack_top(%rip), %rcx
    sub %rax, %rcx
    mov %rcx, %rsp
    lea pml4(%rip), %rax
    mov %rax, %cr3
    lgdt gdt_pointer(%rip)
    pushq $0x23
    pushq %rcx
    pushq $0x3002
    pushq $0x1b
    lea user_entry(%rip), %rax
    pushq %rax
    iretq
user_entry:
"#;

const EPILOGUE: &str = r#"
park:
    jmp park

    .section .data
    .balign 8
gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00affb000000ffff
    .quad 0x00cff3000000ffff
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd + 7
    .quad pd + 0x1000 + 7
    .quad pd + 0x2000 + 7
    .quad pd + 0x3000 + 7
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr

    .section .bss
    .balign 4096
user_stack:
    .skip 65536
user_stack_top:
"#;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Assembles `body` into a payload ELF linked at 2 MiB; returns its path.
pub fn build_payload(body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sandboxd-payload-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create the payload dir");
    let source = dir.join("payload.S");
    std::fs::write(&source, format!("{PROLOGUE}{body}{EPILOGUE}")).expect("write the payload source");
    run(Command::new("as").arg("--64").arg("-o").arg(dir.join("payload.o")).arg(&source));
    let elf = dir.join("payload.elf");
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-nostdlib", "-static", "-Ttext=0x200000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(dir.join("payload.o")));
    elf
}

fn run(command: &mut Command) {
    let output = command.output().expect("GNU binutils (as, ld) must be installed");
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// Records every port write the payload makes, and answers reads with a
/// value the test chose.
#[derive(Default)]
pub struct PortRecorder {
    writes: Mutex<Vec<(u64, u64)>>,
    changed: Condvar,
    pub read_value: AtomicU64,
}

impl PortRecorder {
    /// Waits until `count` writes were recorded; returns them all.
    pub fn wait_for_writes(&self, count: usize, timeout: Duration) -> Vec<(u64, u64)> {
        let writes = self.writes.lock().unwrap();
        let (writes, _) = self.changed.wait_timeout_while(writes, timeout, |w| w.len() < count).unwrap();
        writes.clone()
    }
}

/// A bus device that forwards to a shared recorder.
pub struct RecorderDevice(pub Arc<PortRecorder>);

impl BusDevice for RecorderDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let value = self.0.read_value.load(Ordering::SeqCst).to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&value[..len]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        self.0.writes.lock().unwrap().push((offset, u64::from_le_bytes(bytes)));
        self.0.changed.notify_all();
    }
}

/// A console sink the test can read.
#[derive(Clone, Default)]
pub struct SharedConsole(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedConsole {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Whether this host has /dev/kvm.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// Boots `body` as a payload VM of `memory_mib` with a [`PortRecorder`] on
/// the test ports; `adjust` may add devices or options before it starts.
pub fn start_payload(
    body: &str,
    memory_mib: u32,
    vcpus: u8,
    adjust: impl FnOnce(&mut sandbox_vmm::builder::MicroVmBuilder),
) -> (sandbox_vmm::MicroVm, Arc<PortRecorder>, SharedConsole) {
    let console = SharedConsole::default();
    let config = sandbox_vmm::MicroVmConfig {
        kernel: build_payload(body),
        cmdline: String::new(),
        memory_mib,
        vcpus,
        console: Box::new(console.clone()),
        virtio: Vec::new(),
    };
    let mut builder = sandbox_vmm::builder::MicroVmBuilder::new(config).expect("build the payload VM");
    let ports = Arc::new(PortRecorder::default());
    builder.add_pio_device(TEST_PORT, TEST_PORT_LEN, Arc::new(Mutex::new(RecorderDevice(ports.clone())))).unwrap();
    adjust(&mut builder);
    (builder.start().expect("start the vCPUs"), ports, console)
}
