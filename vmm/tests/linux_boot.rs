//! Boots the project's own guest kernel (kernel-config/, ELF vmlinux) and
//! expects its early log on the serial console: the banner and our command
//! line. On PVM hosts guest ring 0 is emulated, so this takes tens of
//! seconds; the wait is generous and is not a timing assertion.
//!
//! The kernel comes from `kernel-config/build.sh` (its output directory in
//! SANDBOXD_KERNEL_DIR). Without it the test says how to build it and
//! passes, unless SANDBOXD_REQUIRE_KERNEL=1.

mod support;

use std::{path::PathBuf, time::Duration};

use sandbox_vmm::{builder::MicroVmBuilder, MicroVmConfig};
use support::SharedConsole;

const MARKER: &str = "sandboxd.boot_marker=3f1c";

fn kernel() -> Option<PathBuf> {
    let dir = std::env::var_os("SANDBOXD_KERNEL_DIR").map(PathBuf::from)?;
    let vmlinux = dir.join("vmlinux");
    vmlinux.is_file().then_some(vmlinux)
}

#[test]
fn guest_kernel_prints_its_banner_and_command_line() {
    let Some(vmlinux) = kernel() else {
        assert!(
            std::env::var("SANDBOXD_REQUIRE_KERNEL").as_deref() != Ok("1"),
            "SANDBOXD_REQUIRE_KERNEL=1 but SANDBOXD_KERNEL_DIR has no vmlinux"
        );
        eprintln!("skipped: build the guest kernel with `kernel-config/build.sh` and set SANDBOXD_KERNEL_DIR to its output");
        return;
    };
    let console = SharedConsole::default();
    let config = MicroVmConfig {
        kernel: vmlinux,
        cmdline: format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=k {MARKER}"),
        memory_mib: 256,
        vcpus: 1,
        console: Box::new(console.clone()),
        virtio: Vec::new(),
    };
    let mut vm = MicroVmBuilder::new(config).expect("build the VM").start().expect("start the VM");
    let started = std::time::Instant::now();
    let booted = |text: &str| text.contains("Linux version 6.12") && text.contains(MARKER);
    while !booted(&console.text()) && started.elapsed() < Duration::from_secs(180) {
        if vm.wait_for_exit(Duration::from_millis(200)).is_some() {
            break;
        }
    }
    eprintln!("guest kernel banner after {:?}", started.elapsed());
    vm.stop();
    let text = console.text();
    assert!(booted(&text), "no banner and command line on the console:\n{text}");
}
