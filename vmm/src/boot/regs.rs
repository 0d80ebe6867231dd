//! Register state for entering a 64-bit kernel: page tables, GDT and
//! segments, control registers, boot MSRs, FPU and LAPIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestMemory;

/// Flat 64-bit code, flat data, and a TSS.
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Identity-maps the first 1 GiB with 2 MiB pages.
pub fn write_page_tables(memory: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    memory.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    memory.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for index in 0..512u64 {
        memory.write_obj((index << 21) | 0x83, GuestAddress(PDE_START + index * 8))?;
    }
    Ok(())
}

pub fn write_gdt(memory: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    for (index, entry) in GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(GDT_START + index as u64 * 8))?;
    }
    Ok(())
}

/// The KVM view of the GDT descriptor at `selector`.
fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

pub fn set_sregs(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(CODE_SELECTOR);
    let data = segment(DATA_SELECTOR);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(TSS_SELECTOR);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
}

pub fn set_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), kvm_ioctls::Error> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_fpu(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })
}

/// MSRs a kernel expects zeroed or set at boot.
pub fn set_msrs(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries: Vec<kvm_msr_entry> = [
        (0x174, 0), // IA32_SYSENTER_CS
        (0x175, 0), // IA32_SYSENTER_ESP
        (0x176, 0), // IA32_SYSENTER_EIP
        (0xc000_0081, 0), // STAR
        (0xc000_0082, 0), // LSTAR
        (0xc000_0083, 0), // CSTAR
        (0xc000_0084, 0), // SYSCALL_MASK
        (0xc000_0102, 0), // KERNEL_GS_BASE
        (0x10, 0), // TSC
        (0x1a0, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    // KVM stops at the first MSR it refuses and returns how many it set.
    match vcpu.set_msrs(&msrs)? {
        set if set == entries.len() => Ok(()),
        _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
    }
}

/// Routes LINT0 as ExtINT (the PIC) and LINT1 as NMI.
pub fn set_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, byte) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *byte as _;
        }
    }
    vcpu.set_lapic(&lapic)
}
