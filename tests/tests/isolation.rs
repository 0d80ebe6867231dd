//! Isolation of jailed sandboxes: no network, no host processes, a
//! read-only system, pids and memory limits, and per-key ownership. After
//! each attack the daemon still serves and a neighbour is untouched.

use sandbox_proto::api::{GetSandboxRequest, Limits, StatRequest};
use sandboxd_tests::{Clients, Daemon, DaemonOptions};
use tonic::Code;

/// A neighbour sandbox with a file in it, to check after each attack.
async fn neighbour(api: &mut Clients) -> String {
    let id = api.create(None).await;
    api.sh(&id, "echo intact > /home/user/canary").await;
    id
}

async fn assert_neighbour_untouched(api: &mut Clients, id: &str) {
    assert_eq!(api.sh(id, "cat /home/user/canary").await, "intact\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_sees_only_loopback_and_its_own_processes() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let interfaces = api.sh(&id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").await;
    assert_eq!(interfaces.trim(), "lo", "only loopback exists");
    let pids = api.sh(&id, "ls /proc | grep -E '^[0-9]+$' | wc -l").await;
    assert!(pids.trim().parse::<u32>().unwrap() < 10, "only the sandbox's own processes are visible: {pids}");
    let init = api.sh(&id, "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(init.contains("sandbox-agent"), "the agent is PID 1: {init}");
    let reach = api.exec(&id, &["python3", "-c", "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"]).await.unwrap();
    assert_ne!(reach.code(), Some(0), "no route out of the sandbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_tmp_and_home_are_writable() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    for path in ["/usr/evil", "/etc/evil", "/evil", "/bin/evil"] {
        let output = api.exec(&id, &["sh", "-c", &format!("echo x > {path}")]).await.unwrap();
        assert_ne!(output.code(), Some(0), "writing {path} must fail");
        assert!(!std::path::Path::new(path).exists(), "{path} must not appear on the host");
    }
    api.sh(&id, "echo ok > /tmp/a && echo ok > /home/user/b && mkdir -p /home/user/dir").await;
    let refused = api.exec(&id, &["sh", "-c", "mount -t tmpfs none /mnt"]).await.unwrap();
    assert_ne!(refused.code(), Some(0), "mount is refused inside the sandbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_hits_the_pids_limit() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(Some(Limits { max_processes: 64, ..Default::default() })).await;
    let bomb = api
        .exec_request(sandbox_proto::api::ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["sh".into(), "-c".into(), "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived".into()],
            timeout_ms: 10_000,
            ..Default::default()
        })
        .await;
    // However the bomb's own shell ends, the bomb stays inside its pids cgroup.
    drop(bomb);
    assert_eq!(pids_file(&id, "pids.max").as_deref(), Some("64"));
    let current: u32 = pids_file(&id, "pids.current").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(current <= 64, "{current} processes exceed the limit");
    let events = pids_file(&id, "pids.events").unwrap_or_default();
    let refused: u64 = events.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(refused > 0, "the kernel refused forks at the limit: {events:?}");
    api.sandboxes.delete(sandbox_proto::api::DeleteSandboxRequest { id }).await.unwrap();
    assert_neighbour_untouched(&mut api, &bystander).await;
}

/// A file of the sandbox's pids cgroup (v1 or v2 layout).
fn pids_file(id: &str, name: &str) -> Option<String> {
    ["/sys/fs/cgroup/pids/sandboxd", "/sys/fs/cgroup/sandboxd"]
        .iter()
        .map(|root| std::path::Path::new(root).join(id).join(name))
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_is_oom_killed_inside_its_cgroup() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(Some(Limits { memory_mib: 64, ..Default::default() })).await;
    let hog = api
        .exec(&id, &["python3", "-c", "blocks = []\nwhile True: blocks.append(bytearray(16 << 20))"])
        .await;
    match hog {
        Ok(output) => assert_eq!(output.signal(), Some(libc::SIGKILL), "the hog is killed: {output:?}"),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "the agent itself was killed: {status:?}"),
    }
    assert_neighbour_untouched(&mut api, &bystander).await;
    let mut fresh = daemon.clients(None).await;
    let another = fresh.create(None).await;
    assert_eq!(fresh.sh(&another, "echo serving").await, "serving\n", "the daemon still serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_keys_sandbox_is_not_found() {
    let daemon = Daemon::start(DaemonOptions { api_keys: Some("key-alice,key-bob".into()), ..Default::default() }).await;
    let mut alice = daemon.clients(Some("key-alice")).await;
    let mut bob = daemon.clients(Some("key-bob")).await;
    let id = alice.create(None).await;
    for status in [
        bob.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err(),
        bob.exec(&id, &["true"]).await.unwrap_err(),
        bob.files.stat(StatRequest { sandbox_id: id.clone(), path: "/tmp".into() }).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let bob_list = bob.sandboxes.list(sandbox_proto::api::ListSandboxesRequest {}).await.unwrap().into_inner();
    assert!(bob_list.sandboxes.is_empty());
    assert_eq!(alice.sh(&id, "echo mine").await, "mine\n");

    let mut anonymous = daemon.clients(None).await;
    let status = anonymous.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = daemon.clients(Some("key-mallory")).await;
    let status = wrong.sandboxes.get(GetSandboxRequest { id }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let audit = daemon.audit_log();
    assert!(!audit.contains("key-alice") && !audit.contains("key-bob"), "keys never reach the audit log");
}
