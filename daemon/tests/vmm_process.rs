//! One VMM process per microVM: `sandboxd vmm` boots a ring-3 payload on
//! real KVM, answers pause, resume, stats and snapshot on its control
//! socket, shuts down on request, and a fresh `sandboxd vmm` process
//! restores the snapshot (through userfaultfd) and keeps the guest running.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

/// Prints 'x' on the serial console every 2^20 iterations of a counter.
const BODY: &str = r#"
    xor %rbx, %rbx
1:  inc %rbx
    test $0xfffff, %ebx
    jnz 1b
    mov $0x3f8, %dx
    mov $'x', %al
    out %al, %dx
    jmp 1b
"#;

struct Vmm {
    child: Child,
    control: BufReader<UnixStream>,
    serial: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, name: &str, source: serde_json::Value) -> Vmm {
        let mut config = source;
        let serial = dir.join(format!("{name}.serial"));
        let socket = dir.join(format!("{name}.sock"));
        config["serial_log"] = serial.display().to_string().into();
        config["control_socket"] = socket.display().to_string().into();
        let config_path = dir.join(format!("{name}.json"));
        std::fs::write(&config_path, config.to_string()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandboxd")).arg("vmm").arg("--config").arg(&config_path).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            assert!(Instant::now() < deadline, "the VMM never opened its control socket");
            std::thread::sleep(Duration::from_millis(10));
        };
        Vmm { child, control: BufReader::new(stream), serial }
    }

    fn request(&mut self, request: serde_json::Value) -> serde_json::Value {
        writeln!(self.control.get_mut(), "{request}").unwrap();
        let mut line = String::new();
        self.control.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn serial_output(&self) -> usize {
        std::fs::read(&self.serial).map(|bytes| bytes.len()).unwrap_or(0)
    }

    fn wait_for_more_output(&self, than: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.serial_output();
            if now > than {
                return now;
            }
            assert!(Instant::now() < deadline, "the guest stopped printing at {now} bytes");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn vmm_process_is_controlled_snapshotted_and_restored_in_a_fresh_process() {
    let dir = std::env::temp_dir().join(format!("sandboxd-vmm-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = support::build_payload(BODY);
    let boot = serde_json::json!({ "boot": { "kernel": kernel, "cmdline": "", "memory_mib": 64, "vcpus": 1 } });
    let mut original = Vmm::start(&dir, "original", boot);
    original.wait_for_more_output(0);

    let stats = original.request(serde_json::json!({ "op": "stats" }));
    assert_eq!(stats["ok"], true, "{stats}");
    assert!(stats["rss_kib"].as_u64().unwrap() > 0);
    assert!(stats["vcpus"][0]["pio_exits"].as_u64().unwrap() > 0, "serial writes are port I/O exits: {stats}");

    assert_eq!(original.request(serde_json::json!({ "op": "pause" }))["ok"], true);
    let paused_at = original.serial_output();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(original.serial_output(), paused_at, "a paused guest prints nothing");
    assert_eq!(original.request(serde_json::json!({ "op": "resume" }))["ok"], true);
    original.wait_for_more_output(paused_at);

    let snapshot_dir = dir.join("snapshot");
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let reply = original.request(serde_json::json!({ "op": "snapshot", "dir": snapshot_dir }));
    assert_eq!(reply["ok"], true, "{reply}");
    let malformed = original.request(serde_json::json!({ "op": "fly" }));
    assert_eq!(malformed["ok"], false);
    assert!(malformed["error"].as_str().unwrap().contains("malformed request"));
    assert_eq!(original.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    assert!(original.child.wait().unwrap().success(), "the VMM exits cleanly on shutdown");

    let restore = serde_json::json!({ "restore": { "snapshot_dir": snapshot_dir, "memory": "uffd" } });
    let mut clone = Vmm::start(&dir, "clone", restore);
    clone.wait_for_more_output(0);
    let stats = clone.request(serde_json::json!({ "op": "stats" }));
    assert!(stats["uffd"]["faults"].as_u64().unwrap() > 0, "the restored guest's memory came through userfaultfd: {stats}");
    assert_eq!(clone.request(serde_json::json!({ "op": "shutdown" }))["ok"], true);
    assert!(clone.child.wait().unwrap().success());
    std::fs::remove_dir_all(dir).unwrap();
}
