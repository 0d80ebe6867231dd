//! The sandbox.v1 calls both front doors share, on the jail backend: a
//! process started with `open_stdin` (or a terminal) takes input by handle
//! (Processes.SendInput, then `close`), signals (Processes.Signal) and
//! resizes (Processes.Resize); Files.Move renames; Files.Watch streams
//! `started`, then changes made afterwards; Sandboxes.SetTimeout moves
//! the sandbox's end. Another key reaches none of it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sandbox_proto::api::{
    exec_event::Event, watch_event, ExecEvent, ExecRequest, ExitReason, MoveRequest, PtySize, ResizeRequest,
    SendInputRequest, SetTimeoutRequest, SignalRequest, WatchEventType, WatchRequest,
};
use sandboxd_tests::{Clients, Daemon, DaemonOptions, Output};
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(60);

/// Starts `script` in the table and returns its handle and its events.
async fn start(clients: &mut Clients, request: ExecRequest) -> (String, Streaming<ExecEvent>) {
    let mut events = clients.processes.exec(request).await.expect("Exec").into_inner();
    match events.message().await.expect("a first event").and_then(|event| event.event) {
        Some(Event::Started(started)) => (started.handle, events),
        other => panic!("the first event is `started`, not {other:?}"),
    }
}

async fn rest(mut events: Streaming<ExecEvent>) -> Output {
    let mut output = Output::default();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.message().await.expect("the stream ends cleanly") {
            output.absorb(event);
        }
    })
    .await
    .expect("the process ends within the deadline");
    output
}

fn sh(sandbox: &str, script: &str) -> ExecRequest {
    ExecRequest { sandbox_id: sandbox.into(), argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn input_signals_and_resizes_reach_a_process_by_handle() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut clients = daemon.clients(None).await;
    let id = clients.create(None).await;

    let (handle, events) = start(&mut clients, ExecRequest { open_stdin: true, ..sh(&id, "tr a-z A-Z") }).await;
    for (data, close) in [("hello ", false), ("world\n", true)] {
        let input = SendInputRequest { sandbox_id: id.clone(), handle: handle.clone(), data: data.as_bytes().to_vec().into(), close };
        clients.processes.send_input(input).await.expect("SendInput");
    }
    let output = rest(events).await;
    assert_eq!((output.stdout_text().as_str(), output.code()), ("HELLO WORLD\n", Some(0)));
    let late = SendInputRequest { sandbox_id: id.clone(), handle: handle.clone(), data: b"x".to_vec().into(), close: false };
    assert_eq!(clients.processes.send_input(late).await.unwrap_err().code(), Code::FailedPrecondition, "stdin is closed");

    let (handle, events) = start(&mut clients, sh(&id, "sleep 60")).await;
    let signal = SignalRequest { sandbox_id: id.clone(), handle: handle.clone(), signal: 15 };
    clients.processes.signal(signal.clone()).await.expect("Signal");
    let output = rest(events).await;
    assert_eq!((output.signal(), output.exit.map(|exit| exit.reason)), (Some(15), Some(ExitReason::Signaled as i32)));
    assert_eq!(clients.processes.signal(signal).await.unwrap_err().code(), Code::FailedPrecondition, "it has exited");

    let terminal = ExecRequest { pty: Some(PtySize { rows: 24, cols: 80 }), ..sh(&id, "read line; stty size") };
    let (handle, events) = start(&mut clients, terminal).await;
    let size = Some(PtySize { rows: 42, cols: 123 });
    clients.processes.resize(ResizeRequest { sandbox_id: id.clone(), handle: handle.clone(), size }).await.expect("Resize");
    let enter = SendInputRequest { sandbox_id: id.clone(), handle, data: b"\n".to_vec().into(), close: false };
    clients.processes.send_input(enter).await.expect("SendInput to a terminal");
    assert!(rest(events).await.stdout_text().contains("42 123"), "stty sees the new size");

    let mut other = Clients::new(daemon.channel().await, Some("not-a-key"));
    let refused = other.processes.signal(SignalRequest { sandbox_id: id.clone(), handle: "p1".into(), signal: 9 }).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn files_move_and_watch_and_the_timeout_moves() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut clients = daemon.clients(None).await;
    let id = clients.create(None).await;

    clients.sh(&id, "mkdir -p /home/user/w/sub && echo one > /home/user/a").await;
    let watch = WatchRequest { sandbox_id: id.clone(), path: "/home/user/w".into(), recursive: true };
    let mut changes = clients.files.watch(watch).await.expect("Watch").into_inner();
    let first = changes.message().await.expect("a first event").and_then(|event| event.event);
    assert!(matches!(first, Some(watch_event::Event::Started(_))), "{first:?}");

    let moved = MoveRequest { sandbox_id: id.clone(), source: "/home/user/a".into(), destination: "/home/user/w/sub/b".into() };
    let info = clients.files.r#move(moved).await.expect("Move").into_inner();
    assert_eq!((info.path.as_str(), info.size, info.owner.as_str()), ("/home/user/w/sub/b", 4, "user"));
    assert_eq!(clients.sh(&id, "cat /home/user/w/sub/b; test -e /home/user/a || echo gone").await, "one\ngone\n");

    let seen = tokio::time::timeout(DEADLINE, async {
        loop {
            let event = changes.message().await.expect("the watch goes on").expect("an event");
            if let Some(watch_event::Event::Change(change)) = event.event {
                if change.name == "sub/b" {
                    return change.r#type;
                }
            }
        }
    })
    .await
    .expect("the move is seen in the watched subdirectory");
    assert_eq!(seen, WatchEventType::Create as i32);

    let before = clients.sandboxes.get(sandbox_proto::api::GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let after = clients.sandboxes.set_timeout(SetTimeoutRequest { id: id.clone(), timeout_seconds: 3600 }).await.expect("SetTimeout").into_inner();
    assert!(after.expires_at_unix_ms >= now_ms + 3_590_000 && after.expires_at_unix_ms > before.expires_at_unix_ms);
    let too_long = SetTimeoutRequest { id: id.clone(), timeout_seconds: 10 * 86_400 };
    assert_eq!(clients.sandboxes.set_timeout(too_long).await.unwrap_err().code(), Code::InvalidArgument);
}
