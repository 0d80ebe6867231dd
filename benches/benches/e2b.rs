//! Create then the first command, end to end through the real daemon (jail
//! backend, warm pool): `Sandbox.create()` then `commands.run("true")`
//! through the official e2b Python SDK and sandboxd's E2B front door, next
//! to `Sandboxes.Create` then `Processes.Exec true` through the gRPC API,
//! in one run, with p50/p99 of each. Each sandbox is deleted (untimed) and
//! the pool given a moment to refill before the next.
//!
//! Needs the binaries (`cargo build -p sandboxd -p sandbox-agent`) and the
//! SDK's virtualenv from scripts/install-deps.sh (target/e2b-py-2.63.0).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use sandbox_proto::api::{CreateSandboxRequest, DeleteSandboxRequest};
use sandboxd_tests::{Daemon, DaemonOptions};

const RUNS: usize = 40;
/// Time the pool gets to refill between runs.
const PAUSE: Duration = Duration::from_millis(300);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let e2b_port = free_port();
    let options = DaemonOptions {
        api_keys: Some(format!("e2b_{}", "5a".repeat(20))),
        pool_size: 2,
        extra_args: vec!["--e2b-listen".into(), format!("127.0.0.1:{e2b_port}")],
        ..DaemonOptions::default()
    };
    let daemon = runtime.block_on(Daemon::start(options));
    let mut grpc = runtime.block_on(async {
        let mut clients = daemon.clients(Some(&format!("e2b_{}", "5a".repeat(20)))).await;
        let mut samples = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let id = clients.sandboxes.create(CreateSandboxRequest::default()).await.expect("Create").into_inner().id;
            clients.exec(&id, &["true"]).await.expect("Exec true");
            samples.push(started.elapsed());
            clients.sandboxes.delete(DeleteSandboxRequest { id }).await.expect("Delete");
            tokio::time::sleep(PAUSE).await;
        }
        samples
    });
    report("grpc create + first exec", &mut grpc);
    let mut sdk = python_sdk(e2b_port);
    report("e2b python sdk create + first commands.run", &mut sdk);
}

/// Runs benches/e2b/first_command.py with the SDK's virtualenv.
fn python_sdk(port: u16) -> Vec<Duration> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/e2b-py-2.63.0/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/install-deps.sh", python.display());
    let url = format!("http://127.0.0.1:{port}");
    let output = Command::new(python)
        .arg(root.join("benches/e2b/first_command.py"))
        .args([RUNS.to_string(), PAUSE.as_secs_f64().to_string()])
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", format!("e2b_{}", "5a".repeat(20)))
        .output()
        .expect("the SDK bench runs");
    assert!(output.status.success(), "the SDK bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let seconds: Vec<f64> = serde_json::from_slice(&output.stdout).expect("the SDK bench prints its samples as JSON");
    seconds.into_iter().map(Duration::from_secs_f64).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port()
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!("{name}: p50 {:.2} ms, p99 {:.2} ms ({} runs)", ms(at(0.5)), ms(at(0.99)), samples.len());
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
