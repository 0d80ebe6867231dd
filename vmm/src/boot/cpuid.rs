//! CPUID for each vCPU: what KVM supports, with the vCPU's APIC id, the
//! vCPU count and the hypervisor bit filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

const HYPERVISOR_BIT: u32 = 1 << 31;

pub fn for_vcpu(kvm: &Kvm, id: u8, vcpu_count: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(vcpu_count) << 16) | (u32::from(id) << 24);
                entry.ecx |= HYPERVISOR_BIT;
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    Ok(cpuid)
}
