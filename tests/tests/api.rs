//! The public API end to end on the jail backend: lifecycle, exec, stdin,
//! timeouts, PTY sessions, file transfer, run-code, delete and TTL expiry,
//! and the daemon's secure defaults (private state, a generated admin key,
//! audited refusals).

use std::time::Duration;

use sandbox_proto::api::{
    connect_request::Input, exec_event::Event, upload_request::Part, ConnectRequest, ConnectStart,
    DownloadRequest, ExecRequest, FileType, GetSandboxRequest, Language, Limits, ListRequest,
    ListSandboxesRequest, MakeDirRequest, PtySize, RemoveRequest, RunCodeRequest, StatRequest,
    UploadHeader, UploadRequest, DeleteSandboxRequest,
};
use sandboxd_tests::{Daemon, DaemonOptions};
use sha2::{Digest, Sha256};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn exec_streams_stdout_stderr_and_exit_code_separately() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let output = api.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"]).await.unwrap();
    assert_eq!(output.stdout_text(), "out\n");
    assert_eq!(output.stderr_text(), "err\n");
    assert_eq!(output.code(), Some(3));
    assert!(output.pid.is_some(), "a started event comes first");

    let echoed = api
        .exec_request(ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["cat".into()],
            stdin: b"hello through stdin".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(echoed.stdout_text(), "hello through stdin");
    assert_eq!(echoed.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_env_is_merged_under_the_request_env() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let request = sandbox_proto::api::CreateSandboxRequest {
        env: [("FROM_SANDBOX".to_string(), "a".to_string()), ("OVERRIDDEN".to_string(), "b".to_string())].into(),
        metadata: [("owner".to_string(), "tests".to_string())].into(),
        ..Default::default()
    };
    let sandbox = api.sandboxes.create(request).await.unwrap().into_inner();
    assert_eq!(sandbox.metadata["owner"], "tests");
    assert_eq!(sandbox.backend, "jail");
    let output = api
        .exec_request(ExecRequest {
            sandbox_id: sandbox.id.clone(),
            argv: vec!["sh".into(), "-c".into(), "echo $FROM_SANDBOX $OVERRIDDEN".into()],
            env: [("OVERRIDDEN".to_string(), "c".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(output.stdout_text(), "a c\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_process_and_reports_it() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let output = api
        .exec_request(ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["sleep".into(), "100".into()],
            timeout_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap();
    let exit = output.exit.expect("an exit event");
    assert!(exit.timed_out, "the exit is flagged as a timeout: {exit:?}");
    assert_eq!(output.signal(), Some(libc::SIGKILL));
    let leftover = api.sh(&id, "ps -eo comm | grep -c '^sleep$' || true").await;
    assert_eq!(leftover.trim(), "0", "the timed-out process group is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_session_runs_tty_and_follows_resizes() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let (input, rx) = tokio::sync::mpsc::channel(8);
    let start = ConnectStart {
        process: Some(ExecRequest { sandbox_id: id.clone(), argv: vec!["sh".into()], ..Default::default() }),
        pty: Some(PtySize { rows: 24, cols: 80 }),
    };
    input.send(ConnectRequest { input: Some(Input::Start(start)) }).await.unwrap();
    let mut events = api
        .processes
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let send = |bytes: &str| ConnectRequest { input: Some(Input::Stdin(bytes.as_bytes().to_vec().into())) };
    // The terminal echoes what is typed, so the marker is computed by the shell.
    input.send(send("tty; echo TTY-$((40 + 2))\n")).await.unwrap();
    let screen = read_until(&mut events, "TTY-42").await;
    assert!(screen.contains("/dev/pts/"), "tty names a pseudo-terminal: {screen:?}");
    input.send(ConnectRequest { input: Some(Input::Resize(PtySize { rows: 40, cols: 120 })) }).await.unwrap();
    input.send(send("stty size; exit 7\n")).await.unwrap();
    let screen = read_until(&mut events, "40 120").await;
    assert!(screen.contains("40 120"));
    let mut exit = None;
    while let Some(event) = events.message().await.unwrap() {
        if let Some(Event::Exit(status)) = event.event {
            exit = Some(status);
        }
    }
    let exit = exit.expect("the session ends with an exit event");
    assert_eq!(exit.outcome, Some(sandbox_proto::api::exit_status::Outcome::Code(7)));
}

async fn read_until(events: &mut tonic::Streaming<sandbox_proto::api::ExecEvent>, marker: &str) -> String {
    let mut screen = String::new();
    let wait = tokio::time::timeout(Duration::from_secs(30), async {
        while !screen.contains(marker) {
            match events.message().await.unwrap().and_then(|e| e.event) {
                Some(Event::Stdout(data)) => screen.push_str(&String::from_utf8_lossy(&data)),
                Some(Event::Exit(exit)) => panic!("session ended early with {exit:?}; screen: {screen:?}"),
                Some(_) => {}
                None => panic!("stream ended; screen: {screen:?}"),
            }
        }
    });
    wait.await.unwrap_or_else(|_| panic!("{marker:?} never appeared; screen: {screen:?}"));
    screen
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_and_download_200_mib_keep_their_sha256() {
    const SIZE: usize = 200 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(Some(Limits { memory_mib: 1024, ..Default::default() })).await;
    let path = "/home/user/big.bin";

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = UploadHeader { sandbox_id: id.clone(), path: path.into(), mode: 0o600 };
    let producer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        tx.send(UploadRequest { part: Some(Part::Header(header)) }).await.unwrap();
        let mut state = 0x1234_5678_u32;
        for _ in 0..SIZE / CHUNK {
            let chunk: Vec<u8> = (0..CHUNK)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as u8
                })
                .collect();
            hasher.update(&chunk);
            tx.send(UploadRequest { part: Some(Part::Data(chunk.into())) }).await.unwrap();
        }
        hasher.finalize()
    });
    let info = api.files.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let sent = producer.await.unwrap();
    assert_eq!(info.size, SIZE as u64);
    assert_eq!(info.mode & 0o777, 0o600);

    let mut chunks = api.files.download(DownloadRequest { sandbox_id: id.clone(), path: path.into() }).await.unwrap().into_inner();
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    while let Some(chunk) = chunks.message().await.unwrap() {
        received += chunk.data.len();
        hasher.update(&chunk.data);
    }
    assert_eq!(received, SIZE);
    assert_eq!(hasher.finalize(), sent, "downloaded bytes equal uploaded bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn stat_list_mkdir_and_remove() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let dir = api
        .files
        .make_dir(MakeDirRequest { sandbox_id: id.clone(), path: "/home/user/project/src".into(), parents: true, mode: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dir.r#type, FileType::Directory as i32);
    api.sh(&id, "echo hi > /home/user/project/src/main.py && echo x > /home/user/project/README").await;

    let stat = api.files.stat(StatRequest { sandbox_id: id.clone(), path: "/home/user/project/README".into() }).await.unwrap().into_inner();
    assert_eq!((stat.r#type, stat.size, stat.name.as_str()), (FileType::File as i32, 2, "README"));

    let shallow = api.files.list(ListRequest { sandbox_id: id.clone(), path: "/home/user/project".into(), depth: 1 }).await.unwrap().into_inner();
    let names: Vec<_> = shallow.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["/home/user/project/README", "/home/user/project/src"]);
    let deep = api.files.list(ListRequest { sandbox_id: id.clone(), path: "/home/user/project".into(), depth: 2 }).await.unwrap().into_inner();
    assert!(deep.entries.iter().any(|e| e.path == "/home/user/project/src/main.py"));

    let refused = api.files.remove(RemoveRequest { sandbox_id: id.clone(), path: "/home/user/project".into(), recursive: false }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("recursive"), "{}", refused.message());
    api.files.remove(RemoveRequest { sandbox_id: id.clone(), path: "/home/user/project".into(), recursive: true }).await.unwrap();
    let gone = api.files.stat(StatRequest { sandbox_id: id.clone(), path: "/home/user/project".into() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_code_returns_output_and_a_structured_value() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let python = api
        .processes
        .run_code(RunCodeRequest {
            sandbox_id: id.clone(),
            language: Language::Python as i32,
            code: "import sys\nprint('from python')\nprint('warn', file=sys.stderr)\n__return__({'answer': 6 * 7, 'items': [1, 'two']})\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&python.stdout), "from python\n");
    assert_eq!(String::from_utf8_lossy(&python.stderr), "warn\n");
    let value: Vec<&str> = python.result_json.split_whitespace().collect();
    assert_eq!(value.concat(), r#"{"answer":42,"items":[1,"two"]}"#);

    let sh = api
        .processes
        .run_code(RunCodeRequest {
            sandbox_id: id.clone(),
            language: Language::Sh as i32,
            code: "echo from sh\n__return__ '[1, 2, 3]'\nexit 4\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "from sh\n");
    assert_eq!(sh.result_json.replace(' ', ""), "[1,2,3]");
    assert_eq!(sh.exit.unwrap().outcome, Some(sandbox_proto::api::exit_status::Outcome::Code(4)));
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_get_list_pause_resume_delete() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let got = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.id, id);
    let listed = api.sandboxes.list(ListSandboxesRequest {}).await.unwrap().into_inner();
    assert!(listed.sandboxes.iter().any(|s| s.id == id));

    api.sh(&id, "echo 0 > /tmp/ticks; (while true; do echo $(( $(cat /tmp/ticks) + 1 )) > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; sleep 0.05; done) >/dev/null 2>&1 &").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.sandboxes.pause(sandbox_proto::api::PauseSandboxRequest { id: id.clone() }).await.unwrap();
    let refused = api.exec(&id, &["true"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("Resume"));
    assert_eq!(freezer_states(&id), ["frozen"], "the kernel froze every cgroup of the paused sandbox");
    api.sandboxes.resume(sandbox_proto::api::ResumeSandboxRequest { id: id.clone() }).await.unwrap();
    assert!(freezer_states(&id).iter().all(|state| state == "thawed"));
    let resumed_at: u64 = api.sh(&id, "cat /tmp/ticks").await.trim().parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.sh(&id, "cat /tmp/ticks").await.trim().parse::<u64>().unwrap() <= resumed_at {
        assert!(tokio::time::Instant::now() < deadline, "a resumed sandbox continues");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    api.sandboxes.delete(DeleteSandboxRequest { id: id.clone() }).await.unwrap();
    let gone = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(!daemon.state_dir.join("jails").join(&id).exists(), "delete frees the sandbox's state");
    let audit = daemon.audit_log();
    assert!(audit.lines().any(|l| l.contains(&id) && l.contains("\"Sandboxes.Delete\"") && l.contains("\"ok\"")), "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_past_their_ttl_are_deleted() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(Some(Limits { timeout_seconds: 1, ..Default::default() })).await;
    let sandbox = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(sandbox.expires_at_unix_ms - sandbox.created_at_unix_ms, 1000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await {
            Err(status) if status.code() == Code::NotFound => break,
            _ if tokio::time::Instant::now() > deadline => panic!("sandbox {id} outlived its TTL"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // The audit line follows the sandbox's teardown, which may still be running.
    let audited = || daemon.audit_log().lines().any(|l| l.contains(&id) && l.contains("\"Sandboxes.Expire\""));
    while !audited() {
        assert!(tokio::time::Instant::now() < deadline, "no Expire record for {id} in the audit log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_reach_a_process_that_ignores_its_stdin() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let (input, rx) = tokio::sync::mpsc::channel(8);
    let start = ConnectStart {
        process: Some(ExecRequest { sandbox_id: id.clone(), argv: vec!["sleep".into(), "100".into()], ..Default::default() }),
        pty: None,
    };
    input.send(ConnectRequest { input: Some(Input::Start(start)) }).await.unwrap();
    // More stdin than a pipe holds, which `sleep` never reads.
    input.send(ConnectRequest { input: Some(Input::Stdin(vec![b'x'; 1 << 20].into())) }).await.unwrap();
    input.send(ConnectRequest { input: Some(Input::Signal(libc::SIGTERM)) }).await.unwrap();
    let mut events = api.processes.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let exit = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.message().await.unwrap() {
            if let Some(Event::Exit(exit)) = event.event {
                return exit;
            }
        }
        panic!("the stream ended without an exit");
    })
    .await
    .expect("SIGTERM arrived despite the unread stdin");
    assert_eq!(exit.outcome, Some(sandbox_proto::api::exit_status::Outcome::Signal(libc::SIGTERM)));
}

#[tokio::test(flavor = "multi_thread")]
async fn python_future_imports_and_directory_modes_work() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let reply = api
        .processes
        .run_code(RunCodeRequest {
            sandbox_id: id.clone(),
            language: Language::Python as i32,
            code: "from __future__ import annotations\nimport sys\n__return__(sys.argv[0].endswith('.py'))\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.result_json, "true", "stderr: {}", String::from_utf8_lossy(&reply.stderr));
    let missing = api.exec(&id, &["no-such-program"]).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let dir = api
        .files
        .make_dir(MakeDirRequest { sandbox_id: id.clone(), path: "/tmp/shared".into(), parents: false, mode: 0o777 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dir.mode & 0o777, 0o777, "the mode asked for, not narrowed by the umask");
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn state_is_private_and_refused_calls_are_audited() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let state = &daemon.state_dir;
    assert_eq!(mode(state), 0o700, "STATE_DIR");
    for file in ["audit.log", "sandboxd.sock", "api-key", "key-id-secret"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    let admin_key = daemon.admin_key.clone().expect("a daemon without SANDBOXD_API_KEYS generates an admin key");
    assert_eq!(admin_key.len(), 64);

    let mut admin = daemon.clients(None).await;
    let id = admin.create(None).await;
    let mut anonymous = sandboxd_tests::Clients::new(daemon.channel().await, None);
    let missing = anonymous.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    let mut wrong = sandboxd_tests::Clients::new(daemon.channel().await, Some("not-the-key"));
    let refused = wrong.files.list(ListRequest { sandbox_id: id.clone(), path: "/tmp".into(), depth: 1 }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    admin.files.list(ListRequest { sandbox_id: id.clone(), path: "/tmp".into(), depth: 1 }).await.unwrap();
    admin.sandboxes.list(ListSandboxesRequest {}).await.unwrap();

    let audit = daemon.audit_log();
    let find = |operation: &str, outcome: &str| {
        audit.lines().find(|line| field(line, "operation") == Some(operation) && field(line, "outcome") == Some(outcome))
    };
    let no_key = find("Sandboxes.Get", "Unauthenticated").expect("a call without a key is audited");
    assert_eq!(field(no_key, "key_id"), Some("-"));
    assert!(field(no_key, "peer").is_some_and(|peer| peer.starts_with("127.0.0.1:")), "the caller's address: {no_key}");
    let bad_key = find("Files.List", "Unauthenticated").expect("a call with a wrong key is audited");
    let tried = field(bad_key, "key_id").unwrap_or_default();
    let admin_id = find("Files.List", "ok").and_then(|line| field(line, "key_id")).expect("the admin's Files.List");
    assert!(tried.starts_with("key-") && tried != admin_id, "the wrong key is named by its own id: {bad_key}");
    assert!(find("Sandboxes.List", "ok").is_some(), "Sandboxes.List and Files.List are told apart");
    assert!(!audit.contains(&admin_key) && !audit.contains("not-the-key"), "keys never reach the audit log");
}

/// The value of a string field in one audit line (compact JSON).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{name}\":\""))? + name.len() + 4;
    line[start..].split('"').next()
}

/// The freezer state ("frozen" or "thawed") of each cgroup of sandbox
/// `id` that has a freezer, deduplicated (cgroup v1 or v2 layout).
fn freezer_states(id: &str) -> Vec<String> {
    let mut states = Vec::new();
    for root in ["/sys/fs/cgroup/freezer/sandboxd", "/sys/fs/cgroup/sandboxd"] {
        for dir in dirs_named(std::path::Path::new(root), id, 3) {
            collect_freezer_states(&dir, &mut states);
        }
    }
    states.sort();
    states.dedup();
    states
}

/// Directories called `name` under `root`, at most `depth` levels down.
fn dirs_named(root: &std::path::Path, name: &str, depth: usize) -> Vec<std::path::PathBuf> {
    let Ok(children) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found = Vec::new();
    for child in children.flatten().map(|c| c.path()).filter(|p| p.is_dir()) {
        if child.file_name().is_some_and(|n| n == name) {
            found.push(child);
        } else if depth > 1 {
            found.extend(dirs_named(&child, name, depth - 1));
        }
    }
    found
}

fn collect_freezer_states(dir: &std::path::Path, states: &mut Vec<String>) {
    let v1 = std::fs::read_to_string(dir.join("freezer.state")).ok().map(|s| s.trim().to_lowercase());
    let v2 = std::fs::read_to_string(dir.join("cgroup.events")).ok().and_then(|events| {
        events.lines().find_map(|l| l.strip_prefix("frozen ")).map(|f| if f.trim() == "1" { "frozen" } else { "thawed" }.to_string())
    });
    states.extend(v1.or(v2));
    let Ok(children) = std::fs::read_dir(dir) else { return };
    for child in children.flatten().filter(|c| c.path().is_dir()) {
        collect_freezer_states(&child.path(), states);
    }
}
