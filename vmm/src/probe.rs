//! Decides whether this host can run Linux microVMs: /dev/kvm must open,
//! and guest ring 0 must run in hardware, not emulated (as on PVM hosts).

use std::path::Path;

use kvm_ioctls::Kvm;

/// The verdict, with a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSupport {
    pub microvms: bool,
    pub reason: String,
}

/// Checks the host. Cheap: no VM is created.
pub fn probe_host() -> HostSupport {
    if let Err(error) = Kvm::new() {
        return HostSupport { microvms: false, reason: format!("/dev/kvm cannot be opened ({error})") };
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return HostSupport {
            microvms: false,
            reason: "/dev/kvm is PVM, which emulates guest ring 0 (about 1.3 M instructions/s), too slow to boot a Linux guest".into(),
        };
    }
    HostSupport { microvms: true, reason: "/dev/kvm with hardware virtualization".into() }
}
