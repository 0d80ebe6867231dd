//! The sandboxd virtual machine monitor: one KVM microVM per process, built
//! on the rust-vmm crates (kvm-ioctls, vm-memory, linux-loader,
//! vm-superio).

pub mod boot;
pub mod builder;
pub mod devices;
pub mod jailer;
pub mod probe;
pub mod process;
pub mod seccomp;
pub mod snapshot;
pub mod uffd;
pub mod vstate;

pub use builder::{MicroVm, MicroVmConfig, MicroVmError};
pub use vstate::vcpu::VmExit;
