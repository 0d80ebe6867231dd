//! The VMM as a child process, the way the daemon runs it: a guest exit is
//! noticed while a control client is connected, and a vCPU thread that
//! makes a syscall outside its seccomp filter kills the VMM with SIGSYS
//! (what the daemon sees as the child's exit status). Each test re-runs
//! this test binary as the VMM child.

mod support;

use std::{
    os::unix::{net::UnixStream, process::ExitStatusExt},
    path::Path,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sandbox_vmm::{builder::MicroVmBuilder, devices::bus::BusDevice, MicroVmConfig};

/// Set in the child: what it should run.
const CHILD_ROLE: &str = "SANDBOXD_VMM_TEST_CHILD";
const WAIT: Duration = Duration::from_secs(30);

/// Re-runs test `name` of this binary as a child with `role`.
fn spawn_child(name: &str, role: &str) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .spawn()
        .expect("start the VMM child")
}

fn wait_with_deadline(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VMM child did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_exit_is_noticed_while_a_control_client_is_connected() {
    if let Ok(config) = std::env::var(CHILD_ROLE) {
        let config = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
        let exit = sandbox_vmm::process::run(config).expect("the VMM runs");
        assert_eq!(exit, sandbox_vmm::VmExit::Shutdown);
        return;
    }
    // The guest counts down for a moment (enough for the client to
    // connect), then triple-faults.
    let countdown = r#"
        movabs $3000000000, %rcx
    1:  dec %rcx
        jnz 1b
        ud2
    "#;
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-child-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let config = serde_json::json!({
        "boot": { "kernel": support::build_payload(countdown), "cmdline": "", "memory_mib": 64, "vcpus": 1 },
        "serial_log": dir.join("serial.log"),
        "control_socket": socket,
    });
    let config_path = dir.join("vmm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut child = spawn_child("guest_exit_is_noticed_while_a_control_client_is_connected", &config_path.display().to_string());
    let idle_client = connect(&socket);
    let status = wait_with_deadline(&mut child);
    assert!(status.success(), "the VMM reported the guest's shutdown and exited: {status}");
    drop(idle_client);
    std::fs::remove_dir_all(dir).unwrap();
}

fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return stream;
        }
        assert!(Instant::now() < deadline, "the VMM never opened its control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A device whose emulation makes a syscall no vCPU thread may make.
struct OpensInetSocket;

impl BusDevice for OpensInetSocket {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        // SAFETY: a raw syscall with constant arguments; the filter kills
        // the process before it returns.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
}

#[test]
fn a_vcpu_syscall_outside_the_filter_kills_the_vmm_with_sigsys() {
    if std::env::var(CHILD_ROLE).is_ok() {
        let config = MicroVmConfig {
            kernel: support::build_payload("out %al, $0x10\n1: jmp 1b\n"),
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            console: Box::new(support::SharedConsole::default()),
            virtio: Vec::new(),
        };
        let mut builder = MicroVmBuilder::new(config).unwrap();
        builder.add_pio_device(support::TEST_PORT, 1, Arc::new(Mutex::new(OpensInetSocket))).unwrap();
        builder.confine_vcpus().unwrap();
        let mut vm = builder.start().unwrap();
        let exit = vm.wait_for_exit(WAIT);
        panic!("the VMM outlived a forbidden syscall on its vCPU thread: {exit:?}");
    }
    let mut child = spawn_child("a_vcpu_syscall_outside_the_filter_kills_the_vmm_with_sigsys", "seccomp");
    let status = wait_with_deadline(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "the daemon sees the VMM killed by SIGSYS: {status}");
}
