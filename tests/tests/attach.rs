//! Processes that outlive their client, on the jail backend: an Exec keeps
//! running when its client disconnects, Processes.List shows it, and
//! Processes.Attach replays the output it missed from its buffer, then the
//! exit; an idempotency key makes a retried Exec attach instead of running
//! twice, and a retried Connect types into the same terminal;
//! kill_on_disconnect still kills; every exit carries its reason; another
//! tenant reaches none of it.

use std::time::Duration;

use sandbox_proto::api::{
    connect_request::Input, exec_event::Event, AttachRequest, ConnectRequest, ConnectStart, ExecEvent, ExecRequest,
    ExitReason, Limits, ListProcessesRequest, ProcessInfo, PtySize,
};
use sandboxd_tests::{Clients, Daemon, DaemonOptions, Output};
use tonic::{Code, Streaming};

const COUNT_TO_50: &str = "for i in $(seq 1 50); do echo $i; sleep 0.1; done";
/// Longest any one stream here may take to reach its exit.
const STREAM_DEADLINE: Duration = Duration::from_secs(60);

fn sh(sandbox: &str, script: &str) -> ExecRequest {
    ExecRequest {
        sandbox_id: sandbox.to_string(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// What a stream delivered, and the handle its `started` event named.
struct Received {
    handle: String,
    resume_offset: u64,
    output: Output,
}

/// Absorbs one event, checking that output offsets follow each other
/// without a gap from where the stream said it resumes.
fn absorb(received: &mut Received, event: ExecEvent) {
    match &event.event {
        Some(Event::Started(started)) => {
            received.handle = started.handle.clone();
            received.resume_offset = started.resume_offset;
        }
        Some(Event::Stdout(data) | Event::Stderr(data)) => {
            let expected = received.resume_offset + (received.output.stdout.len() + received.output.stderr.len()) as u64;
            assert_eq!(event.offset, expected, "output arrives in order, without gaps or repeats");
            let _ = data;
        }
        Some(Event::Exit(_)) | None => {}
    }
    received.output.absorb(event);
}

/// Reads `events` to their end (the exit), within [`STREAM_DEADLINE`].
async fn receive_all(mut events: Streaming<ExecEvent>) -> Received {
    let mut received = Received { handle: String::new(), resume_offset: 0, output: Output::default() };
    tokio::time::timeout(STREAM_DEADLINE, async {
        while let Some(event) = events.message().await.expect("the stream ends cleanly") {
            absorb(&mut received, event);
        }
    })
    .await
    .expect("the stream reached its exit within the deadline");
    received
}

async fn list(api: &mut Clients, sandbox: &str) -> Vec<ProcessInfo> {
    api.processes
        .list(ListProcessesRequest { sandbox_id: sandbox.to_string() })
        .await
        .expect("Processes.List")
        .into_inner()
        .processes
}

/// Polls Processes.List until process `handle` has exited, then returns it.
async fn wait_for_exit(api: &mut Clients, sandbox: &str, handle: &str) -> ProcessInfo {
    let deadline = tokio::time::Instant::now() + STREAM_DEADLINE;
    loop {
        let processes = list(api, sandbox).await;
        let info = processes.into_iter().find(|p| p.handle == handle).expect("the process is listed");
        if info.exit.is_some() {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "process {handle} did not exit within {STREAM_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reason(output: &Output) -> ExitReason {
    let exit = output.exit.expect("an exit event");
    ExitReason::try_from(exit.reason).expect("a known exit reason")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disconnected_exec_keeps_running_and_attach_replays_what_it_missed() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let mut events = api.processes.exec(sh(&id, COUNT_TO_50)).await.expect("Exec").into_inner();
    let mut first = Received { handle: String::new(), resume_offset: 0, output: Output::default() };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(event)) = events.message().await {
            absorb(&mut first, event);
        }
    })
    .await;
    drop(events);
    assert!(first.handle.starts_with('p'), "the started event names the process: {:?}", first.handle);
    assert!(first.output.exit.is_none(), "the count takes 5 s; the client left after 1 s");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let listed = list(&mut api, &id).await;
    let info = listed.iter().find(|p| p.handle == first.handle).expect("Processes.List shows the process");
    assert_eq!(info.argv, ["sh", "-c", COUNT_TO_50]);
    assert_eq!(Some(info.pid), first.output.pid);
    assert!(info.started_at_unix_ms > 0 && !info.argv_truncated && !info.pty);

    let request = AttachRequest { sandbox_id: id.clone(), handle: first.handle.clone(), from_offset: 0 };
    let replay = receive_all(api.processes.attach(request).await.expect("Attach").into_inner()).await;
    let expected: String = (1..=50).map(|i| format!("{i}\n")).collect();
    assert_eq!(replay.output.stdout_text(), expected, "1..50, each exactly once");
    assert!(expected.starts_with(&first.output.stdout_text()), "the first client saw a prefix of it");
    assert_eq!((replay.handle.as_str(), replay.resume_offset), (first.handle.as_str(), 0));
    assert_eq!(replay.output.code(), Some(0), "it ran to its end after the disconnect: {:?}", replay.output.exit);
    assert_eq!(reason(&replay.output), ExitReason::Exited);

    let done = wait_for_exit(&mut api, &id, &first.handle).await;
    assert_eq!(done.exit, replay.output.exit, "List shows the same exit");
    assert_eq!(done.output_bytes, expected.len() as u64);
    assert!(done.exited_at_unix_ms >= done.started_at_unix_ms);
    // Attaching after the exit, from the middle, gives the rest and the exit.
    let middle = expected.find("26\n").expect("26 was printed") as u64;
    let request = AttachRequest { sandbox_id: id.clone(), handle: first.handle.clone(), from_offset: middle };
    let rest = receive_all(api.processes.attach(request).await.expect("Attach after the exit").into_inner()).await;
    assert_eq!(rest.output.stdout_text(), expected[middle as usize..]);
    assert_eq!(rest.output.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_exec_with_the_same_idempotency_key_runs_once() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let request = ExecRequest { idempotency_key: "job-1".into(), ..sh(&id, "echo ran >> /tmp/runs; sleep 1; echo done") };
    let (mut a, mut b) = (Clients::new_from(&api), Clients::new_from(&api));
    let (first, concurrent) = tokio::join!(a.processes.exec(request.clone()), b.processes.exec(request.clone()));
    let first = receive_all(first.expect("Exec").into_inner()).await;
    let concurrent = receive_all(concurrent.expect("a concurrent retry").into_inner()).await;
    let later = receive_all(api.processes.exec(request.clone()).await.expect("a later retry").into_inner()).await;
    for retry in [&concurrent, &later] {
        assert_eq!(retry.handle, first.handle, "a retry attaches to the same process");
        assert_eq!(retry.output.stdout_text(), "done\n");
        assert_eq!(retry.output.code(), Some(0));
    }
    assert_eq!(api.sh(&id, "cat /tmp/runs").await, "ran\n", "the command ran once");
    let keyed: Vec<_> = list(&mut api, &id).await.into_iter().filter(|p| p.idempotency_key == "job-1").collect();
    assert_eq!(keyed.len(), 1, "one process holds the key: {keyed:?}");

    let other = ExecRequest { idempotency_key: "job-1".into(), ..sh(&id, "echo something else") };
    let refused = api.processes.exec(other).await.expect_err("the key belongs to another command");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let fresh = ExecRequest { idempotency_key: "job-2".into(), ..request };
    let again = receive_all(api.processes.exec(fresh).await.expect("Exec with a new key").into_inner()).await;
    assert_ne!(again.handle, first.handle);
    assert_eq!(api.sh(&id, "cat /tmp/runs").await, "ran\nran\n", "a new key runs it again");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_on_disconnect_kills_the_process_group_when_the_client_leaves() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let request = ExecRequest { kill_on_disconnect: true, ..sh(&id, "echo started; sleep 1000; echo never") };
    let mut events = api.processes.exec(request).await.expect("Exec").into_inner();
    let mut received = Received { handle: String::new(), resume_offset: 0, output: Output::default() };
    tokio::time::timeout(STREAM_DEADLINE, async {
        while !received.output.stdout_text().contains("started") {
            let event = events.message().await.expect("the stream").expect("output before the end");
            absorb(&mut received, event);
        }
    })
    .await
    .expect("the process printed `started`");
    drop(events);
    let info = wait_for_exit(&mut api, &id, &received.handle).await;
    let exit = info.exit.expect("an exit");
    assert_eq!(exit.outcome, Some(sandbox_proto::api::exit_status::Outcome::Signal(libc::SIGKILL)));
    assert_eq!(exit.reason, ExitReason::Signaled as i32);
    let sleepers = api.sh(&id, "ps -eo args | grep -c '^sleep 1000$' || true").await;
    assert_eq!(sleepers.trim(), "0", "the whole process group was killed");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_exit_carries_its_reason() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let exited = api.exec_request(sh(&id, "exit 3")).await.expect("Exec");
    assert_eq!((exited.code(), reason(&exited)), (Some(3), ExitReason::Exited));
    let signaled = api.exec_request(sh(&id, "kill -TERM $$")).await.expect("Exec");
    assert_eq!((signaled.signal(), reason(&signaled)), (Some(libc::SIGTERM), ExitReason::Signaled));
    let timed_out = api.exec_request(ExecRequest { timeout_ms: 300, ..sh(&id, "sleep 100") }).await.expect("Exec");
    assert_eq!((timed_out.signal(), reason(&timed_out)), (Some(libc::SIGKILL), ExitReason::TimedOut));
    assert!(timed_out.exit.expect("an exit").timed_out, "the old flag stays set");

    let small = api.create(Some(Limits { memory_mib: 64, ..Default::default() })).await;
    let hog = ["python3", "-c", "blocks = []\nwhile True: blocks.append(bytearray(16 << 20))"];
    let oom = api.exec(&small, &hog).await.expect("the hog, not the agent, is the OOM killer's victim");
    assert_eq!((oom.signal(), reason(&oom)), (Some(libc::SIGKILL), ExitReason::OomKilled), "{oom:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_refuses_unknown_handles_offsets_past_the_end_and_other_tenants() {
    let daemon = Daemon::start(DaemonOptions { api_keys: Some("key-alice,key-bob".into()), ..Default::default() }).await;
    let mut alice = daemon.clients(Some("key-alice")).await;
    let mut bob = daemon.clients(Some("key-bob")).await;
    let id = alice.create(None).await;
    let done = receive_all(alice.processes.exec(sh(&id, "echo hello")).await.expect("Exec").into_inner()).await;
    let attach = |handle: &str, from_offset| AttachRequest { sandbox_id: id.clone(), handle: handle.into(), from_offset };

    let unknown = alice.processes.attach(attach("p999", 0)).await.expect_err("no such process");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let past = alice.processes.attach(attach(&done.handle, 7)).await.expect_err("6 bytes were written");
    assert_eq!(past.code(), Code::OutOfRange, "{past:?}");
    let end = receive_all(alice.processes.attach(attach(&done.handle, 6)).await.expect("Attach at the end").into_inner()).await;
    assert_eq!((end.output.stdout_text().as_str(), end.output.code()), ("", Some(0)), "nothing more, then the exit");

    let foreign = bob.processes.attach(attach(&done.handle, 0)).await.expect_err("Alice's sandbox");
    assert_eq!(foreign.code(), Code::NotFound, "{foreign:?}");
    let foreign = bob.processes.list(ListProcessesRequest { sandbox_id: id.clone() }).await.expect_err("Alice's sandbox");
    assert_eq!(foreign.code(), Code::NotFound, "{foreign:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attached_client_loses_nothing_and_a_late_one_gets_the_last_mebibyte() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    // About 6.9 MB, far more than the 1 MiB buffer: a reading client still gets every byte.
    let attached = receive_all(api.processes.exec(sh(&id, "seq 1 1000000")).await.expect("Exec").into_inner()).await;
    let expected: String = (1..=1_000_000).map(|i| format!("{i}\n")).collect();
    assert!(attached.output.stdout_text() == expected, "the attached client received all {} bytes", expected.len());

    let mut events = api.processes.exec(sh(&id, "seq 1 1000000")).await.expect("Exec").into_inner();
    let handle = match events.message().await.expect("the stream").and_then(|event| event.event) {
        Some(Event::Started(started)) => started.handle,
        other => panic!("the first event is `started`: {other:?}"),
    };
    drop(events);
    let info = wait_for_exit(&mut api, &id, &handle).await;
    assert_eq!(info.output_bytes, expected.len() as u64, "the process ran to its end unattached");
    let request = AttachRequest { sandbox_id: id.clone(), handle, from_offset: 0 };
    let late = receive_all(api.processes.attach(request).await.expect("Attach").into_inner()).await;
    assert_eq!(late.resume_offset, info.output_oldest_offset, "an offset older than the buffer starts at its oldest byte");
    let kept = expected.len() as u64 - late.resume_offset;
    assert!(kept > 0 && kept <= 1 << 20, "at most 1 MiB is kept: {kept}");
    assert!(late.output.stdout_text() == expected[late.resume_offset as usize..], "the tail, contiguous");
    assert_eq!(late.output.code(), Some(0));
}

/// A Connect stream: its input (dropping it ends the client's side) and its events.
type Session = (tokio::sync::mpsc::Sender<ConnectRequest>, Streaming<ExecEvent>);

/// Opens a Connect stream on a terminal running `sh` under `key`, types `typed`.
async fn connect_shell(api: &mut Clients, sandbox: &str, key: &str, typed: &str) -> Session {
    let (input, rx) = tokio::sync::mpsc::channel(8);
    let process = ExecRequest { idempotency_key: key.into(), ..sh(sandbox, "exec sh") };
    let start = ConnectStart { process: Some(process), pty: Some(PtySize { rows: 24, cols: 80 }) };
    input.send(ConnectRequest { input: Some(Input::Start(start)) }).await.expect("queue start");
    input.send(ConnectRequest { input: Some(Input::Stdin(typed.as_bytes().to_vec().into())) }).await.expect("queue stdin");
    let events = api.processes.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("Connect").into_inner();
    (input, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_outlives_its_connect_stream_and_a_retry_types_into_it() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let (input, mut first) = connect_shell(&mut api, &id, "term-1", "echo one-$((40+2))\n").await;
    let mut seen = Received { handle: String::new(), resume_offset: 0, output: Output::default() };
    tokio::time::timeout(STREAM_DEADLINE, async {
        while !seen.output.stdout_text().contains("one-42") {
            absorb(&mut seen, first.message().await.expect("the stream").expect("output before the end"));
        }
    })
    .await
    .expect("the shell answered");
    drop((input, first));

    let (_input, again) = connect_shell(&mut api, &id, "term-1", "echo two-$((40+3)); exit 7\n").await;
    let retry = receive_all(again).await;
    assert_eq!(retry.handle, seen.handle, "the retry reached the same terminal");
    let text = retry.output.stdout_text();
    assert!(text.contains("one-42") && text.contains("two-43"), "the replay, then what the retry typed: {text:?}");
    assert_eq!((retry.output.code(), reason(&retry.output)), (Some(7), ExitReason::Exited));
}
