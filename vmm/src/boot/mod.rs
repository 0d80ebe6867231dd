//! Loads a Linux kernel (ELF `vmlinux` or `bzImage`) with linux-loader and
//! prepares what the 64-bit boot protocol expects: the zero page with the
//! e820 map and command line, identity-mapped page tables, a GDT, and each
//! vCPU's registers, CPUID, MSRs, FPU and LAPIC.

mod cpuid;
mod layout;
mod regs;

use std::{fs::File, path::Path};

use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::{
    cmdline::Cmdline,
    configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams},
    loader::{
        bootparam::{boot_params, setup_header},
        elf::Elf,
        load_cmdline, BzImage, KernelLoader,
    },
};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

pub use layout::*;

use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the kernel {path}: {source}")]
    OpenKernel { path: String, source: std::io::Error },
    #[error("{path} is neither an ELF vmlinux nor a bzImage the loader accepts: {reason}")]
    LoadKernel { path: String, reason: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(String),
    #[error("cannot configure vCPU {id}: {action}: {source}")]
    Vcpu { id: u8, action: &'static str, source: kvm_ioctls::Error },
}

/// Where the loaded kernel starts executing, and its bzImage header.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    setup_header: Option<setup_header>,
}

/// Loads the kernel at `path`: an ELF (vmlinux, or a test payload) first,
/// else a bzImage.
pub fn load_kernel(memory: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || File::open(path).map_err(|source| BootError::OpenKernel { path: path.display().to_string(), source });
    let high = Some(GuestAddress(HIMEM_START));
    let elf = Elf::load(memory, None, &mut open()?, high);
    let result = match elf {
        Ok(result) => result,
        Err(elf_error) => BzImage::load(memory, None, &mut open()?, high).map_err(|bz_error| BootError::LoadKernel {
            path: path.display().to_string(),
            reason: format!("as ELF: {elf_error}; as bzImage: {bz_error}"),
        })?,
    };
    // A bzImage's 64-bit entry point is 0x200 past where it was loaded.
    let entry = match result.setup_header {
        Some(_) => result.kernel_load.unchecked_add(0x200),
        None => result.kernel_load,
    };
    Ok(LoadedKernel { entry, setup_header: result.setup_header })
}

/// Writes the command line, the zero page (with the e820 map), the page
/// tables and the GDT.
pub fn write_boot_data(memory: &GuestMemory, kernel: &LoadedKernel, cmdline: &str) -> Result<(), BootError> {
    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &line).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    add_e820_map(memory, &mut params);
    let boot = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&boot, memory).map_err(|e| BootError::Memory(e.to_string()))?;
    regs::write_page_tables(memory).map_err(|e| BootError::Memory(e.to_string()))?;
    regs::write_gdt(memory).map_err(|e| BootError::Memory(e.to_string()))
}

fn add_e820_map(memory: &GuestMemory, params: &mut boot_params) {
    const E820_RAM: u32 = 1;
    let mut entries = vec![(0, EBDA_START)];
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push((start, end - start));
        }
    }
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&entries) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = E820_RAM;
    }
    params.e820_entries = entries.len().min(params.e820_table.len()) as u8;
}

/// Puts a vCPU in 64-bit mode at the kernel entry, as the boot protocol wants.
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, vcpu_count: u8, entry: GuestAddress) -> Result<(), BootError> {
    let fail = |action| move |source| BootError::Vcpu { id, action, source };
    let cpuid = cpuid::for_vcpu(kvm, id, vcpu_count).map_err(fail("read the supported CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("set CPUID"))?;
    regs::set_msrs(vcpu).map_err(fail("set the boot MSRs"))?;
    regs::set_regs(vcpu, entry).map_err(fail("set the registers"))?;
    regs::set_sregs(vcpu).map_err(fail("set the segment registers"))?;
    regs::set_fpu(vcpu).map_err(fail("set the FPU"))?;
    regs::set_lapic(vcpu).map_err(fail("set the local APIC"))
}
