//! Typed save and restore of KVM state: the VM (irqchip, PIT, clock) and
//! each vCPU (CPUID, MSRs, registers, segment and control registers,
//! xsave/FPU, XCRs, LAPIC, events, MP state). Restore applies vCPU state
//! in the order KVM needs: CPUID first, then MP state, registers, sregs,
//! FPU state, XCRs, LAPIC, MSRs, and pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action}: {source}")]
    Kvm { action: &'static str, source: kvm_ioctls::Error },
    #[error("KVM restored {set} of {total} MSRs; the first refused has index {index:#x}")]
    Msrs { set: usize, total: usize, index: u32 },
}

fn kvm(action: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { action, source }
}

/// VM-wide state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut chip).map_err(kvm("read the irqchip"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        Ok(Self {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm("read the PIT"))?,
            clock: fd.get_clock().map_err(kvm("read the clock"))?,
        })
    }

    /// Applies the state to a VM that already has its irqchip and PIT.
    pub fn restore(&self, fd: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(kvm("restore the irqchip"))?;
        }
        fd.set_pit2(&self.pit).map_err(kvm("restore the PIT"))?;
        // Only the clock value is restored; the flags describe the old host.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        fd.set_clock(&clock).map_err(kvm("restore the clock"))
    }
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: Box<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads the state of a paused vCPU; `msr_indices` lists what to save.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm("read CPUID"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            msrs: read_msrs(fd, msr_indices)?,
            regs: fd.get_regs().map_err(kvm("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read the segment registers"))?,
            xsave: Box::new(fd.get_xsave().map_err(kvm("read the xsave area"))?),
            xcrs: fd.get_xcrs().ok(),
            lapic: fd.get_lapic().map_err(kvm("read the LAPIC"))?,
            events: fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?,
            mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
        })
    }

    /// Applies the state to a fresh vCPU.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::Kvm {
            action: "rebuild CPUID",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("restore CPUID"))?;
        fd.set_mp_state(self.mp_state).map_err(kvm("restore the MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("restore the registers"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("restore the segment registers"))?;
        // SAFETY: the xsave area came from KVM_GET_XSAVE, so its size matches
        // what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("restore the xsave area"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("restore the XCRs"))?;
        }
        fd.set_lapic(&self.lapic).map_err(kvm("restore the LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events).map_err(kvm("restore the vCPU events"))
    }
}

/// The MSRs KVM reports as saveable that this vCPU can actually read.
pub fn saveable_msrs(kvm_handle: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let mut indices: Vec<u32> = kvm_handle.get_msr_index_list().map_err(kvm("list the MSRs"))?.as_slice().to_vec();
    loop {
        let mut msrs = msr_list(&empty_entries(&indices))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        if read == indices.len() {
            return Ok(indices);
        }
        // KVM stops at the first MSR it cannot read: drop it and retry.
        indices.remove(read);
    }
}

/// An MSR list for KVM from its entries.
fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries)
        .map_err(|_| StateError::Kvm { action: "build the MSR list", source: kvm_ioctls::Error::new(libc::E2BIG) })
}

fn empty_entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect()
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut msrs = msr_list(&empty_entries(indices))?;
    let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
    Ok(msrs.as_slice()[..read].to_vec())
}

fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let msrs = msr_list(entries)?;
    let set = fd.set_msrs(&msrs).map_err(kvm("restore the MSRs"))?;
    if set != entries.len() {
        return Err(StateError::Msrs { set, total: entries.len(), index: entries[set].index });
    }
    Ok(())
}
