//! The KVM VM: memory slots, the in-kernel irqchip and PIT, and irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;

/// Where KVM keeps the TSS of real-mode emulation (three pages below 4 GiB).
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}; load the kvm module and run as a user who may open it")]
    OpenKvm(kvm_ioctls::Error),
    #[error("cannot {action}: {source}")]
    Kvm { action: &'static str, source: kvm_ioctls::Error },
}

fn kvm_error(action: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { action, source }
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
}

impl Vm {
    /// Creates the VM, registers `memory`, and adds the irqchip and PIT.
    pub fn new(memory: GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_error("create the VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region maps `memory_size` bytes at `userspace_addr`
            // and stays mapped as long as `memory`, which the Vm owns.
            unsafe { fd.set_user_memory_region(slot_region) }.map_err(kvm_error("register guest memory"))?;
        }
        fd.set_tss_address(TSS_ADDRESS).map_err(kvm_error("set the TSS address"))?;
        fd.create_irq_chip().map_err(kvm_error("create the irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_error("create the PIT"))?;
        Ok(Self { kvm, fd, memory })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Makes a write to `event` raise the guest interrupt `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(event, gsi).map_err(kvm_error("register an irqfd"))
    }
}
