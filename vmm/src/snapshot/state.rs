//! Typed save and restore of KVM state: the VM (irqchip, PIT, clock) and
//! each vCPU (CPUID, MSRs, registers, segment and control registers,
//! xsave/FPU, XCRs, LAPIC, events, MP state). Restore applies vCPU state
//! in the order KVM needs: CPUID first, then MP state, registers, sregs,
//! FPU state, XCRs, LAPIC, MSRs, and pending events last.
//!
//! The LAPIC timer in TSC-deadline mode needs care on both sides: KVM drops
//! a deadline written before the LAPIC is in that mode, and judges a
//! restored deadline against the guest's TSC, so the deadline MSR is written
//! after the LAPIC and after every other MSR (the TSC among them). A timer
//! that expired while the vCPU was parked reads as deadline 0 with its
//! interrupt still inside KVM, not in the saved LAPIC; such a snapshot would
//! leave an idle guest waiting for a tick that never comes, so it is saved
//! with the deadline at the current TSC instead (the tick fires at once
//! after restore; a spare tick is harmless).

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
        let lapic = fd.get_lapic().map_err(kvm("read the LAPIC"))?;
        let mut msrs = read_msrs(fd, msr_indices)?;
        if tsc_deadline_timer_armed(&lapic) {
            rearm_expired_deadline(&mut msrs);
        }
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: fd.get_regs().map_err(kvm("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read the segment registers"))?,
            xsave: Box::new(fd.get_xsave().map_err(kvm("read the xsave area"))?),
            xcrs: fd.get_xcrs().ok(),
            lapic,
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
        let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
            self.msrs.iter().cloned().partition(|msr| msr.index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &others)?;
        write_msrs(fd, &deadline)?;
        fd.set_vcpu_events(&self.events).map_err(kvm("restore the vCPU events"))
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The LAPIC's LVT timer register, as an offset into its register page.
const APIC_LVT_TIMER: usize = 0x320;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_LVT_TIMER_MODE: u32 = 0b11 << 17;
const APIC_LVT_TIMER_TSC_DEADLINE: u32 = 0b10 << 17;

/// Whether the LAPIC timer runs in TSC-deadline mode and is not masked.
fn tsc_deadline_timer_armed(lapic: &kvm_lapic_state) -> bool {
    let lvt = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[APIC_LVT_TIMER + i] as u8));
    lvt & APIC_LVT_MASKED == 0 && lvt & APIC_LVT_TIMER_MODE == APIC_LVT_TIMER_TSC_DEADLINE
}

/// Sets a zero (expired) TSC deadline to the vCPU's current TSC, so the
/// tick whose interrupt KVM still held fires right after restore.
fn rearm_expired_deadline(msrs: &mut [kvm_msr_entry]) {
    let Some(tsc) = msrs.iter().find(|msr| msr.index == MSR_IA32_TSC).map(|msr| msr.data) else { return };
    if let Some(deadline) = msrs.iter_mut().find(|msr| msr.index == MSR_IA32_TSC_DEADLINE && msr.data == 0) {
        deadline.data = tsc;
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
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = msr_list(entries)?;
    let set = fd.set_msrs(&msrs).map_err(kvm("restore the MSRs"))?;
    if set != entries.len() {
        return Err(StateError::Msrs { set, total: entries.len(), index: entries[set].index });
    }
    Ok(())
}
