//! The daemon as an admission controller, through the public API: the cap
//! on sandboxes holds under concurrent Creates, one key cannot take the
//! room of another, limits beyond the host are refused, a dead sandbox is
//! reported STOPPED and frees its slot at once, and a flood of idle TCP
//! connections neither exhausts the daemon's file descriptors nor keeps
//! real clients out.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sandbox_proto::api::{CreateSandboxRequest, GetSandboxRequest, Limits, ListSandboxesRequest, SandboxState};
use sandboxd_tests::{Clients, Daemon, DaemonOptions};
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// Small limits, so that many sandboxes fit any host's budgets.
fn small() -> Limits {
    Limits { memory_mib: 64, max_processes: 32, ..Default::default() }
}

fn options(keys: Option<&str>, extra: &[&str]) -> DaemonOptions {
    DaemonOptions {
        api_keys: keys.map(str::to_string),
        extra_args: extra.iter().map(|arg| arg.to_string()).collect(),
        ..Default::default()
    }
}

fn assert_status(status: &tonic::Status, code: Code, hint: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(hint), "message {:?} should mention {hint:?}", status.message());
}

async fn try_create(api: &mut Clients, limits: Limits) -> Result<String, tonic::Status> {
    let request = CreateSandboxRequest { limits: Some(limits), ..Default::default() };
    api.sandboxes.create(request).await.map(|reply| reply.into_inner().id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_creates_get_exactly_the_cap() {
    let daemon = Daemon::start(options(None, &["--max-sandboxes", "64", "--key-max-sandboxes", "100"])).await;
    let api = daemon.clients(None).await;
    let started = Instant::now();
    let creates: Vec<_> = (0..100)
        .map(|_| {
            let mut api = Clients::new_from(&api);
            tokio::spawn(async move { try_create(&mut api, small()).await })
        })
        .collect();
    let mut created = Vec::new();
    for create in creates {
        match create.await.expect("the Create task") {
            Ok(id) => created.push(id),
            Err(status) => assert_status(&status, Code::ResourceExhausted, "--max-sandboxes 64"),
        }
    }
    eprintln!("100 concurrent Creates took {:?}", started.elapsed());
    assert_eq!(created.len(), 64, "exactly the cap is admitted");
    let mut api = Clients::new_from(&api);
    let listed = api.sandboxes.list(ListSandboxesRequest {}).await.unwrap().into_inner().sandboxes;
    assert_eq!(listed.len(), 64);
    let refused = try_create(&mut api, small()).await.unwrap_err();
    assert_status(&refused, Code::ResourceExhausted, "delete sandboxes");
    api.sandboxes.delete(sandbox_proto::api::DeleteSandboxRequest { id: created[0].clone() }).await.unwrap();
    let again = try_create(&mut api, small()).await.expect("a deleted sandbox frees its slot");
    assert_eq!(api.sh(&again, "echo admitted").await, "admitted\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_key_cannot_take_another_keys_room() {
    let daemon = Daemon::start(options(
        Some("key-alice,key-bob"),
        &["--max-sandboxes", "6", "--key-max-sandboxes", "3", "--key-max-memory-mib", "600"],
    ))
    .await;
    let mut alice = daemon.clients(Some("key-alice")).await;
    let mut bob = daemon.clients(Some("key-bob")).await;
    let mut alices = Vec::new();
    for _ in 0..3 {
        alices.push(try_create(&mut alice, small()).await.unwrap());
    }
    let refused = try_create(&mut alice, small()).await.unwrap_err();
    assert_status(&refused, Code::ResourceExhausted, "--key-max-sandboxes 3");

    let bobs = try_create(&mut bob, small()).await.expect("another key still creates");
    assert_eq!(bob.sh(&bobs, "echo bob").await, "bob\n");
    let too_much = try_create(&mut bob, Limits { memory_mib: 600, ..small() }).await.unwrap_err();
    assert_status(&too_much, Code::ResourceExhausted, "--key-max-memory-mib");

    alice.sandboxes.delete(sandbox_proto::api::DeleteSandboxRequest { id: alices.remove(0) }).await.unwrap();
    let replaced = try_create(&mut alice, small()).await.expect("a deleted sandbox gives its key's room back");
    assert_eq!(alice.sh(&replaced, "echo alice").await, "alice\n");
}

/// This host's MemTotal in MiB.
fn host_memory_mib() -> u32 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    (kib / 1024) as u32
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_beyond_the_host_are_refused() {
    let budget = ["--host-memory-budget-mib", "1024", "--max-memory-mib", "1024", "--key-max-memory-mib", "2048"];
    let daemon = Daemon::start(options(None, &budget)).await;
    let mut api = daemon.clients(None).await;
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let all_memory = try_create(&mut api, Limits { memory_mib: host_memory_mib(), ..small() }).await.unwrap_err();
    assert_status(&all_memory, Code::InvalidArgument, "this host has");
    let all_pids = try_create(&mut api, Limits { max_processes: pid_max, ..small() }).await.unwrap_err();
    assert_status(&all_pids, Code::InvalidArgument, "pid_max");
    let huge_disk = try_create(&mut api, Limits { disk_mib: u32::MAX, ..small() }).await.unwrap_err();
    assert_status(&huge_disk, Code::InvalidArgument, "disk_mib");

    let half = Limits { memory_mib: 512, ..small() };
    let first = try_create(&mut api, half).await.unwrap();
    let _second = try_create(&mut api, half).await.unwrap();
    let over = try_create(&mut api, half).await.unwrap_err();
    assert_status(&over, Code::ResourceExhausted, "--host-memory-budget-mib");
    assert_eq!(api.sh(&first, "echo within").await, "within\n");
}

/// SIGKILLs every process whose cgroup path names the sandbox `id`.
fn kill_sandbox_processes(id: &str) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if cgroup.lines().any(|line| line.split('/').any(|part| part == id)) {
            // SAFETY: kill(2) has no memory effects; a pid gone meanwhile gives ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_sandbox_is_stopped_and_frees_its_slot() {
    let daemon = Daemon::start(options(None, &["--max-sandboxes", "2", "--key-max-sandboxes", "3"])).await;
    let mut api = daemon.clients(None).await;
    let doomed = try_create(&mut api, small()).await.unwrap();
    let neighbour = try_create(&mut api, small()).await.unwrap();
    assert_status(&try_create(&mut api, small()).await.unwrap_err(), Code::ResourceExhausted, "--max-sandboxes 2");

    assert!(kill_sandbox_processes(&doomed) > 0, "the sandbox's processes are found by their cgroup");
    let deadline = Instant::now() + Duration::from_secs(15);
    let stopped = loop {
        let sandbox = api.sandboxes.get(GetSandboxRequest { id: doomed.clone() }).await.unwrap().into_inner();
        if sandbox.state == SandboxState::Stopped as i32 {
            break sandbox;
        }
        assert!(Instant::now() < deadline, "{doomed} still reads {:?} after its processes were killed", sandbox.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("stopped_reason: {:?}", stopped.stopped_reason);
    assert!(!stopped.stopped_reason.is_empty(), "the reason is reported");
    let exec = api.exec(&doomed, &["true"]).await.unwrap_err();
    assert_status(&exec, Code::FailedPrecondition, "has stopped");

    let replacement = try_create(&mut api, small()).await.expect("the stopped sandbox's slot is free at once");
    assert_eq!(api.sh(&replacement, "echo replaced").await, "replaced\n");
    assert_eq!(api.sh(&neighbour, "echo untouched").await, "untouched\n");
    let listed = api.sandboxes.list(ListSandboxesRequest {}).await.unwrap().into_inner().sandboxes;
    let state_of = |id: &str| listed.iter().find(|s| s.id == id).map(|s| s.state);
    assert_eq!(state_of(&doomed), Some(SandboxState::Stopped as i32), "a stopped sandbox is listed until deleted");
    api.sandboxes.delete(sandbox_proto::api::DeleteSandboxRequest { id: doomed }).await.unwrap();
}

/// Opens and holds `count` TCP connections to `addr` that never send a
/// byte, from `count / PER_HOLDER` python3 processes (one process's
/// open-files limit may be below the total). Returns the holders, once
/// every connection is open, and how many opened; a holder closes its
/// connections and exits when its stdin closes.
fn hold_idle_connections(addr: SocketAddr, count: usize) -> (Vec<Child>, usize) {
    const PER_HOLDER: usize = 5000;
    const HOLDER: &str = r#"
import socket, sys
held = []
for _ in range(int(sys.argv[3])):
    try:
        held.append(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10))
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()
"#;
    let mut holders = Vec::new();
    let mut opened = 0;
    for _ in 0..count.div_ceil(PER_HOLDER) {
        let mut holder = Command::new("python3")
            .args(["-c", HOLDER, &addr.ip().to_string(), &addr.port().to_string(), &PER_HOLDER.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3 (scripts/install-deps.sh installs it)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("a piped stdout")).read_line(&mut line).expect("the holder's count");
        opened += line.trim().parse::<usize>().unwrap_or(0);
        holders.push(holder);
    }
    (holders, opened)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    fields.get(11..13).map_or(0, |times| times.iter().filter_map(|t| t.parse::<u64>().ok()).sum())
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_idle_connections_keep_nobody_out() {
    const IDLE: usize = 20_000;
    const MAX_CONNECTIONS: usize = 512;
    let daemon = Daemon::start(options(Some("key-alice,key-bob"), &["--max-connections", &MAX_CONNECTIONS.to_string()])).await;
    let mut alice = daemon.clients(Some("key-alice")).await;
    let alices = try_create(&mut alice, small()).await.unwrap();

    let addr: SocketAddr = daemon.endpoint.trim_start_matches("http://").parse().unwrap();
    let flood_started = Instant::now();
    let (holders, opened) = tokio::task::spawn_blocking(move || hold_idle_connections(addr, IDLE)).await.unwrap();
    eprintln!("{opened} idle connections opened in {:?}", flood_started.elapsed());
    assert_eq!(opened, IDLE, "every connection was accepted (and then closed when room was needed)");

    let fds = open_fds(daemon.pid());
    eprintln!("the daemon holds {fds} file descriptors with {IDLE} idle connections open against it");
    assert!(fds < MAX_CONNECTIONS + 256, "idle connections are bounded: the daemon holds {fds} descriptors");
    let before = cpu_ticks(daemon.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("daemon CPU while the idle connections stay open: {} ticks in 2 s", cpu_ticks(daemon.pid()) - before);

    let channel = daemon.channel().await;
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);
    let mut bob = Clients::new(channel, Some("key-bob"));
    let bobs = try_create(&mut bob, small()).await.expect("a new client of another key gets in");
    assert_eq!(bob.sh(&bobs, "echo bob").await, "bob\n");
    assert_eq!(alice.sh(&alices, "echo alice").await, "alice\n", "an established client keeps its connection");
    for mut holder in holders {
        drop(holder.stdin.take());
        let _ = holder.wait();
    }
}
