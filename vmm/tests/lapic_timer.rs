//! The LAPIC timer in TSC-deadline mode survives a save and restore of
//! vCPU state: an armed deadline reads back the same on the restored vCPU,
//! and a deadline that expired while the vCPU was parked (reads as 0) is
//! saved as "now", so the restored guest still gets its tick.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use sandbox_vmm::snapshot::VcpuState;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const APIC_LVT_TIMER: usize = 0x320;
const LVT_TSC_DEADLINE_VECTOR_0XEC: u32 = (0b10 << 17) | 0xec;

fn vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().expect("create a VM");
    vm.create_irq_chip().expect("create the in-kernel irqchip");
    let vcpu = vm.create_vcpu(0).expect("create a vCPU");
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap()).unwrap();
    (vm, vcpu)
}

/// Puts the LAPIC timer in TSC-deadline mode, unmasked.
fn arm_tsc_deadline_mode(vcpu: &VcpuFd) {
    let mut lapic = vcpu.get_lapic().unwrap();
    for (i, byte) in LVT_TSC_DEADLINE_VECTOR_0XEC.to_le_bytes().iter().enumerate() {
        lapic.regs[APIC_LVT_TIMER + i] = *byte as libc::c_char;
    }
    vcpu.set_lapic(&lapic).unwrap();
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

fn write_msr(vcpu: &VcpuFd, index: u32, data: u64) {
    let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]).unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 1);
}

fn saveable(kvm: &Kvm) -> Vec<u32> {
    kvm.get_msr_index_list().unwrap().as_slice().to_vec()
}

/// The saved MSR list with the indices this vCPU can read.
fn save(kvm: &Kvm, vcpu: &VcpuFd) -> VcpuState {
    let indices = sandbox_vmm::snapshot::state::saveable_msrs(kvm, vcpu).unwrap();
    assert!(indices.contains(&MSR_IA32_TSC_DEADLINE) || !saveable(kvm).contains(&MSR_IA32_TSC_DEADLINE));
    VcpuState::save(vcpu, &indices).unwrap()
}

fn deadline_msr_supported(kvm: &Kvm) -> bool {
    let supported = saveable(kvm).contains(&MSR_IA32_TSC_DEADLINE);
    if !supported {
        eprintln!("skipped: this host's KVM does not report MSR_IA32_TSC_DEADLINE as saveable");
    }
    supported
}

#[test]
fn an_armed_tsc_deadline_survives_save_and_restore() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    if !deadline_msr_supported(&kvm) {
        return;
    }
    let (_vm, source) = vcpu(&kvm);
    arm_tsc_deadline_mode(&source);
    let deadline = read_msr(&source, MSR_IA32_TSC) + (1 << 40);
    write_msr(&source, MSR_IA32_TSC_DEADLINE, deadline);
    assert_eq!(read_msr(&source, MSR_IA32_TSC_DEADLINE), deadline, "KVM took the deadline");
    let state = save(&kvm, &source);

    let (_vm2, restored) = vcpu(&kvm);
    state.restore(&restored).unwrap();
    assert_eq!(read_msr(&restored, MSR_IA32_TSC_DEADLINE), deadline, "the restored vCPU has the same deadline armed");
}

#[test]
fn an_expired_tsc_deadline_is_saved_as_now() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    if !deadline_msr_supported(&kvm) {
        return;
    }
    let (_vm, source) = vcpu(&kvm);
    arm_tsc_deadline_mode(&source);
    assert_eq!(read_msr(&source, MSR_IA32_TSC_DEADLINE), 0, "no deadline armed yet");
    let state = save(&kvm, &source);
    let saved = |index| state.msrs.iter().find(|msr| msr.index == index).map(|msr| msr.data);
    let (tsc, deadline) = (saved(MSR_IA32_TSC).unwrap(), saved(MSR_IA32_TSC_DEADLINE).unwrap());
    assert!(deadline != 0 && deadline == tsc, "deadline {deadline:#x} is the saved TSC {tsc:#x}");
}
