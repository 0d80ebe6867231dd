//! envd's API for one sandbox (port 49983), served by the daemon over the
//! sandbox's agent: `process.Process` and `filesystem.Filesystem` in the
//! Connect protocol with the JSON codec, and the plain `/files`,
//! `/health` and `/envs` routes. Processes are the agent's process table
//! (they outlive a client's disconnect; E2B's pid or tag is resolved to
//! the table's handle), files and watches are the agent's: the same
//! calls the gRPC API makes, owner-checked by the same manager.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use base64::Engine;
use futures_util::StreamExt;
use sandbox_proto::{
    agent::agent_client::AgentClient,
    api::{
        exec_event::Event, exit_status::Outcome, watch_event, AttachRequest, ExecEvent, ExecRequest, ExitReason,
        ExitStatus, ListProcessesRequest, ListRequest, MakeDirRequest, MoveRequest, ProcessInfo, PtySize,
        RemoveRequest, ResizeRequest, SendInputRequest, SignalRequest, StatRequest, WatchEventType, WatchRequest,
    },
};
use serde_json::{json, Value};
use tonic::{transport::Channel, Code};

use super::{
    connect::{self, RpcError, StreamWriter},
    files, wire, E2bError, Peer, Shared, Target,
};
use crate::{auth::Caller, manager::AgentHandle};

type Agent = AgentClient<Channel>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{service}/{method}", post(connect_rpc))
        // Uploads stream to the agent a chunk at a time; the sandbox's disk bounds them.
        .route("/files", get(files::download).post(files::upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/health", get(health))
        .route("/envs", get(envs))
        .with_state(shared)
}

/// One data-plane call: its sandbox, the owner it runs as, and the
/// sandbox user it acts for.
pub struct Call {
    pub shared: Arc<Shared>,
    pub caller: Caller,
    pub sandbox: String,
    /// "user" or "root".
    pub user: String,
    pub handle: AgentHandle,
}

impl Call {
    /// Authenticates the request for its sandbox and finds the agent.
    pub async fn begin(
        shared: &Arc<Shared>,
        target: &Target,
        peer: Peer,
        headers: &HeaderMap,
        username: Option<&str>,
        operation: &'static str,
    ) -> Result<Self, E2bError> {
        let caller = shared.sandbox_caller(headers, peer.0, target, operation)?;
        let user = match username {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => basic_user(headers)?.unwrap_or_else(|| "user".to_string()),
        };
        if user != "user" && user != "root" {
            return Err(E2bError::BadRequest(format!("user {user:?} does not exist in the sandbox: use \"user\" or \"root\"")));
        }
        let handle = shared.manager.agent(&caller, &target.sandbox).await.map_err(E2bError::on_data_plane)?;
        Ok(Self { shared: Arc::clone(shared), caller, sandbox: target.sandbox.clone(), user, handle })
    }

    pub fn agent(&self) -> Agent {
        self.handle.agent.clone()
    }

    pub fn record(&self, operation: &'static str, started: Instant, outcome: &str) {
        self.shared.record(&self.caller, &self.sandbox, operation, started, outcome);
    }

    pub fn home(&self) -> &'static str {
        if self.user == "root" { "/root" } else { "/home/user" }
    }

    /// `path` as envd reads it: relative to the user's home, `~` expanded.
    pub fn resolve(&self, path: &str) -> String {
        let home = self.home();
        match path {
            "" | "~" => home.to_string(),
            _ if path.starts_with('/') => path.to_string(),
            _ => match path.strip_prefix("~/") {
                Some(rest) => format!("{home}/{rest}"),
                None => format!("{home}/{path}"),
            },
        }
    }
}

/// The user named by `Authorization: Basic base64("name:")`, if any.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, E2bError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let bad = || E2bError::BadRequest("Authorization must be `Basic base64(\"user:\")`".into());
    let text = value.to_str().map_err(|_| bad())?;
    let Some(encoded) = text.strip_prefix("Basic ") else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    Ok(Some(decoded.split(':').next().unwrap_or_default().to_string()))
}

fn operation_of(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("process", "Start") => "envd.Process.Start",
        ("process", "Connect") => "envd.Process.Connect",
        ("process", "List") => "envd.Process.List",
        ("process", "SendInput") => "envd.Process.SendInput",
        ("process", "StreamInput") => "envd.Process.StreamInput",
        ("process", "SendSignal") => "envd.Process.SendSignal",
        ("process", "CloseStdin") => "envd.Process.CloseStdin",
        ("process", "Update") => "envd.Process.Update",
        ("filesystem", "Stat") => "envd.Filesystem.Stat",
        ("filesystem", "ListDir") => "envd.Filesystem.ListDir",
        ("filesystem", "MakeDir") => "envd.Filesystem.MakeDir",
        ("filesystem", "Move") => "envd.Filesystem.Move",
        ("filesystem", "Remove") => "envd.Filesystem.Remove",
        ("filesystem", "WatchDir") => "envd.Filesystem.WatchDir",
        ("filesystem", "CreateWatcher") => "envd.Filesystem.CreateWatcher",
        ("filesystem", "GetWatcherEvents") => "envd.Filesystem.GetWatcherEvents",
        ("filesystem", "RemoveWatcher") => "envd.Filesystem.RemoveWatcher",
        _ => "envd.Unknown",
    }
}

/// Runs one Connect call: authenticates, runs `body`, audits, and turns
/// a failure into the error form its kind of call (unary or stream) takes.
async fn rpc<F, Fut>(
    shared: Arc<Shared>,
    target: Target,
    peer: Peer,
    headers: HeaderMap,
    operation: &'static str,
    request_body: Body,
    handler: F,
) -> Response
where
    F: FnOnce(Call, Body) -> Fut,
    Fut: std::future::Future<Output = Result<Response, RpcError>>,
{
    let started = Instant::now();
    let streaming = connect::is_streaming(&headers);
    let fail = |error: RpcError| if streaming { connect::stream_error(error) } else { connect::unary_error(&error) };
    let call = match Call::begin(&shared, &target, peer, &headers, None, operation).await {
        Ok(call) => call,
        // A gone sandbox is answered as E2B's proxy does, outside Connect.
        Err(error @ E2bError::SandboxGone(_)) => {
            super::drain(request_body).await;
            return error.into_response();
        }
        Err(error) => {
            super::drain(request_body).await;
            let code = match error.status() {
                StatusCode::UNAUTHORIZED => Code::Unauthenticated,
                StatusCode::NOT_FOUND => Code::NotFound,
                StatusCode::CONFLICT | StatusCode::BAD_REQUEST => Code::FailedPrecondition,
                _ => Code::Unavailable,
            };
            return fail(RpcError::new(code, error.to_string()));
        }
    };
    let (shared, caller, sandbox) = (Arc::clone(&call.shared), call.caller.clone(), call.sandbox.clone());
    let result = handler(call, request_body).await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(error) => format!("{:?}", error.code),
    };
    shared.record(&caller, &sandbox, operation, started, &outcome);
    result.unwrap_or_else(fail)
}

/// `POST /{package}.{Service}/{Method}`: one Connect call of envd's
/// process or filesystem service.
async fn connect_rpc(
    State(shared): State<Arc<Shared>>,
    Extension(target): Extension<Target>,
    Extension(peer): Extension<Peer>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let package = match service.as_str() {
        "process.Process" => "process",
        "filesystem.Filesystem" => "filesystem",
        other => {
            let error = RpcError::new(Code::Unimplemented, format!("{other} is not an envd service: use process.Process or filesystem.Filesystem"));
            return connect::unary_error(&error);
        }
    };
    let operation = operation_of(package, &method);
    let headers_for_call = headers.clone();
    rpc(shared, target, peer, headers, operation, body, |call, body| async move {
        let headers = headers_for_call;
        if package == "process" {
            process_method(call, &headers, &method, body).await
        } else {
            filesystem_method(call, &headers, &method, body).await
        }
    })
    .await
}

async fn process_method(call: Call, headers: &HeaderMap, method: &str, body: Body) -> Result<Response, RpcError> {
    match method {
        "Start" => start(call, headers, connect::stream_request(body).await?).await,
        "Connect" => attach(call, headers, connect::stream_request::<wire::ProcessRequest>(body).await?.process).await,
        "StreamInput" => stream_input(call, body).await,
        "List" => Ok(connect::unary(list(&call).await)),
        "SendInput" => {
            let request: wire::SendInputRequest = connect::unary_request(&connect::read_body(body).await?)?;
            Ok(connect::unary(send_input(&call, &request.process, request.input.into_bytes(), false).await))
        }
        "CloseStdin" => {
            let request: wire::ProcessRequest = connect::unary_request(&connect::read_body(body).await?)?;
            Ok(connect::unary(send_input(&call, &request.process, Vec::new(), true).await))
        }
        "SendSignal" => {
            let request: wire::SendSignalRequest = connect::unary_request(&connect::read_body(body).await?)?;
            Ok(connect::unary(signal(&call, &request).await))
        }
        "Update" => {
            let request: wire::UpdateRequest = connect::unary_request(&connect::read_body(body).await?)?;
            Ok(connect::unary(update(&call, &request).await))
        }
        other => Err(RpcError::new(Code::Unimplemented, format!("process.Process/{other} is not a method of envd's process service"))),
    }
}

async fn filesystem_method(call: Call, headers: &HeaderMap, method: &str, body: Body) -> Result<Response, RpcError> {
    if method == "WatchDir" {
        let request: wire::FsRequest = connect::stream_request(body).await?;
        return watch_dir(call, headers, request).await;
    }
    let request: wire::FsRequest = connect::unary_request(&connect::read_body(body).await?)?;
    Ok(connect::unary(filesystem(&call, method, request).await))
}

/// Start: runs the process in the agent's table and streams its events.
async fn start(call: Call, headers: &HeaderMap, request: wire::StartRequest) -> Result<Response, RpcError> {
    let wire::StartRequest { process, pty, tag, stdin } = request;
    let mut argv = vec![process.cmd];
    argv.extend(process.args);
    let pty = pty.map(|pty| PtySize { rows: pty.size.rows, cols: pty.size.cols });
    let exec = ExecRequest {
        sandbox_id: call.sandbox.clone(),
        argv,
        env: call.handle.merged_env(process.envs),
        cwd: process.cwd.map(|cwd| call.resolve(&cwd)).unwrap_or_default(),
        timeout_ms: connect::timeout(headers).map_or(0, |timeout| timeout.as_millis() as u64),
        user: call.user.clone(),
        tag: tag.unwrap_or_default(),
        // Before envd 0.3.0 stdin was always open; unset keeps that.
        open_stdin: stdin.unwrap_or(true),
        pty,
        ..ExecRequest::default()
    };
    crate::api::check_process(&exec)?;
    let events = call.agent().exec(exec).await?.into_inner();
    let (writer, response) = connect::stream_response();
    tokio::spawn(relay_process(events, writer, pty.is_some(), connect::keepalive_interval(headers)));
    Ok(response)
}

/// Connect: reattaches to a process's output from now on.
async fn attach(call: Call, headers: &HeaderMap, selector: wire::Selector) -> Result<Response, RpcError> {
    let process = find_process(&call, &selector).await?;
    let request = AttachRequest { sandbox_id: call.sandbox.clone(), handle: process.handle, from_offset: process.output_bytes };
    let events = call.agent().attach(request).await?.into_inner();
    let (writer, response) = connect::stream_response();
    tokio::spawn(relay_process(events, writer, process.pty, connect::keepalive_interval(headers)));
    Ok(response)
}

/// What one agent message becomes on an envd stream.
enum Relayed {
    Send(Value),
    Skip,
    /// The last message, then the stream ends cleanly.
    Last(Value),
    /// The stream ends with this error.
    Fail(RpcError),
}

/// Relays an agent stream to an envd stream: each message as `translate`
/// says, `idle` after every `keepalive` of silence, and `at_end` (None: a
/// clean end) when the agent's stream ends by itself.
async fn relay<T>(
    mut events: tonic::Streaming<T>,
    writer: StreamWriter,
    keepalive: std::time::Duration,
    idle: Value,
    at_end: Option<RpcError>,
    mut translate: impl FnMut(T) -> Relayed,
) {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(keepalive, events.message()) => next,
            () = writer.closed() => return,
        };
        let message = match next {
            Err(_) => idle.clone(),
            Ok(Err(status)) => return writer.finish(Some(status.into())).await,
            Ok(Ok(None)) => return writer.finish(at_end).await,
            Ok(Ok(Some(message))) => match translate(message) {
                Relayed::Send(message) => message,
                Relayed::Skip => continue,
                Relayed::Last(message) => {
                    writer.send(&message).await;
                    return writer.finish(None).await;
                }
                Relayed::Fail(error) => return writer.finish(Some(error)).await,
            },
        };
        if !writer.send(&message).await {
            return;
        }
    }
}

/// Turns the agent's events into envd's: `start`, `data`, then `end`
/// (or a deadline_exceeded error when the timeout killed it), with a
/// `keepalive` after every `keepalive` of silence.
async fn relay_process(events: tonic::Streaming<ExecEvent>, writer: StreamWriter, pty: bool, keepalive: std::time::Duration) {
    let idle = json!({ "event": { "keepalive": {} } });
    let cut = RpcError::new(Code::Unavailable, "the process's stream ended before its exit: reconnect by pid");
    relay(events, writer, keepalive, idle, Some(cut), |event| match event.event {
        Some(Event::Started(started)) => Relayed::Send(json!({ "event": { "start": { "pid": started.pid } } })),
        Some(Event::Stdout(data)) => {
            let kind = if pty { "pty" } else { "stdout" };
            Relayed::Send(json!({ "event": { "data": { kind: wire::encode_bytes(&data) } } }))
        }
        Some(Event::Stderr(data)) => Relayed::Send(json!({ "event": { "data": { "stderr": wire::encode_bytes(&data) } } })),
        Some(Event::Exit(exit)) if exit.reason == ExitReason::TimedOut as i32 || exit.timed_out => Relayed::Fail(RpcError::new(
            Code::DeadlineExceeded,
            "the command's timeout passed and it was killed: pass a longer timeout (0 for none)",
        )),
        Some(Event::Exit(exit)) => Relayed::Last(json!({ "event": { "end": end_event(&exit) } })),
        None => Relayed::Skip,
    })
    .await
}

/// envd's `EndEvent`: exit_code = 1, exited = 2, status = 3, error = 4.
fn end_event(exit: &ExitStatus) -> Value {
    match exit.outcome {
        Some(Outcome::Code(0)) => json!({ "exited": true, "status": "exit status 0" }),
        Some(Outcome::Code(code)) => {
            let status = format!("exit status {code}");
            json!({ "exitCode": code, "exited": true, "status": status, "error": status })
        }
        Some(Outcome::Signal(signal)) => {
            let status = format!("signal: {}", signal_name(signal));
            json!({ "exitCode": -1, "status": status, "error": status })
        }
        None => json!({ "exitCode": -1, "status": "unknown", "error": "the agent reported no exit status" }),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGPIPE => "broken pipe".into(),
        other => format!("signal {other}"),
    }
}

async fn processes(call: &Call) -> Result<Vec<ProcessInfo>, RpcError> {
    let request = ListProcessesRequest { sandbox_id: call.sandbox.clone() };
    Ok(call.agent().list_processes(request).await?.into_inner().processes)
}

/// The process a selector names: by pid (a running one first), or tag.
async fn find_process(call: &Call, selector: &wire::Selector) -> Result<ProcessInfo, RpcError> {
    let mut all = processes(call).await?;
    all.sort_by_key(|process| process.exit.is_none());
    let found = match (selector.pid, &selector.tag) {
        (Some(pid), _) => all.into_iter().rev().find(|process| process.pid == pid),
        (None, Some(tag)) => all.into_iter().rev().find(|process| &process.tag == tag),
        (None, None) => return Err(RpcError::invalid("the process selector is empty: set pid or tag")),
    };
    found.ok_or_else(|| {
        let named = selector.pid.map_or_else(|| format!("tag {:?}", selector.tag.clone().unwrap_or_default()), |pid| format!("pid {pid}"));
        RpcError::new(Code::NotFound, format!("process with {named} not found: see process.Process/List"))
    })
}

/// List: the running processes, as `ProcessInfo` (config = 1, pid = 2, tag = 3).
async fn list(call: &Call) -> Result<Value, RpcError> {
    let running: Vec<Value> = processes(call)
        .await?
        .into_iter()
        .filter(|process| process.exit.is_none())
        .map(|process| {
            let mut argv = process.argv.into_iter();
            let mut config = json!({ "cmd": argv.next().unwrap_or_default(), "args": argv.collect::<Vec<_>>(), "envs": process.env });
            if !process.cwd.is_empty() {
                config["cwd"] = json!(process.cwd);
            }
            let mut info = json!({ "config": config, "pid": process.pid });
            if !process.tag.is_empty() {
                info["tag"] = json!(process.tag);
            }
            info
        })
        .collect();
    Ok(json!({ "processes": running }))
}

async fn send_input(call: &Call, selector: &wire::Selector, data: Vec<u8>, close: bool) -> Result<Value, RpcError> {
    let process = find_process(call, selector).await?;
    crate::api::require_size("input", data.len(), crate::api::MAX_CHUNK_BYTES, "send large input in several calls")?;
    let request = SendInputRequest { sandbox_id: call.sandbox.clone(), handle: process.handle, data: data.into(), close };
    call.agent().send_input(request).await?;
    Ok(json!({}))
}

async fn signal(call: &Call, request: &wire::SendSignalRequest) -> Result<Value, RpcError> {
    let process = find_process(call, &request.process).await?;
    let signal = if request.signal == 0 { libc::SIGKILL } else { request.signal };
    let sent = call.agent().signal(SignalRequest { sandbox_id: call.sandbox.clone(), handle: process.handle, signal }).await;
    match sent {
        Ok(_) => Ok(json!({})),
        // envd forgets a process once it ends: to E2B it is not found.
        Err(status) if status.code() == Code::FailedPrecondition => Err(RpcError::new(Code::NotFound, status.message())),
        Err(status) => Err(status.into()),
    }
}

async fn update(call: &Call, request: &wire::UpdateRequest) -> Result<Value, RpcError> {
    let process = find_process(call, &request.process).await?;
    if let Some(pty) = &request.pty {
        let size = PtySize { rows: pty.size.rows, cols: pty.size.cols };
        call.agent().resize(ResizeRequest { sandbox_id: call.sandbox.clone(), handle: process.handle, size: Some(size) }).await?;
    }
    Ok(json!({}))
}

/// StreamInput: a client stream of `start` (the process) then `data`
/// messages, each written to the process's stdin as it arrives.
async fn stream_input(call: Call, body: Body) -> Result<Response, RpcError> {
    let mut chunks = body.into_data_stream();
    let mut buffer = bytes::BytesMut::new();
    let mut handle: Option<String> = None;
    loop {
        while let Some(message) = connect::next_envelope(&mut buffer)? {
            let request: wire::StreamInputRequest = connect::unary_request(&message)?;
            if let Some(start) = request.start {
                handle = Some(find_process(&call, &start.process).await?.handle);
            } else if let Some(data) = request.data {
                let handle = handle.clone().ok_or_else(|| RpcError::invalid("the first StreamInput message must be `start`"))?;
                let request = SendInputRequest { sandbox_id: call.sandbox.clone(), handle, data: data.input.into_bytes().into(), close: false };
                call.agent().send_input(request).await?;
            }
        }
        match chunks.next().await {
            Some(Ok(chunk)) => {
                if buffer.len() + chunk.len() > connect::MAX_MESSAGE + 5 {
                    return Err(RpcError::new(Code::ResourceExhausted, "a StreamInput message is over the size limit"));
                }
                buffer.extend_from_slice(&chunk);
            }
            Some(Err(error)) => return Err(RpcError::new(Code::Cancelled, format!("the input stream broke: {error}"))),
            None => break,
        }
    }
    let (writer, response) = connect::stream_response();
    tokio::spawn(async move {
        writer.send(&json!({})).await;
        writer.finish(None).await;
    });
    Ok(response)
}

/// The unary filesystem methods.
async fn filesystem(call: &Call, method: &str, request: wire::FsRequest) -> Result<Value, RpcError> {
    let sandbox_id = call.sandbox.clone();
    let mut agent = call.agent();
    let path = call.resolve(&request.path);
    match method {
        "Stat" => {
            let info = agent.stat(StatRequest { sandbox_id, path }).await?.into_inner();
            Ok(json!({ "entry": wire::entry_info(&info) }))
        }
        "ListDir" => {
            let depth = request.depth.max(1);
            let entries = agent.list(ListRequest { sandbox_id, path, depth }).await?.into_inner().entries;
            Ok(json!({ "entries": entries.iter().map(wire::entry_info).collect::<Vec<_>>() }))
        }
        "MakeDir" => {
            match agent.stat(StatRequest { sandbox_id: sandbox_id.clone(), path: path.clone() }).await {
                Ok(_) => return Err(RpcError::new(Code::AlreadyExists, format!("{path} already exists"))),
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(status.into()),
            }
            let info = agent.make_dir(MakeDirRequest { sandbox_id, path, parents: true, mode: 0o755 }).await?.into_inner();
            Ok(json!({ "entry": wire::entry_info(&info) }))
        }
        "Move" => {
            let (source, destination) = (call.resolve(&request.source), call.resolve(&request.destination));
            let info = agent.r#move(MoveRequest { sandbox_id, source, destination }).await?.into_inner();
            Ok(json!({ "entry": wire::entry_info(&info) }))
        }
        "Remove" => {
            agent.remove(RemoveRequest { sandbox_id, path, recursive: true }).await?;
            Ok(json!({}))
        }
        "CreateWatcher" => {
            let events = agent.watch(WatchRequest { sandbox_id, path, recursive: request.recursive }).await?.into_inner();
            let id = call.shared.watchers.create(&call.caller.key_id, &call.sandbox, events).await?;
            Ok(json!({ "watcherId": id }))
        }
        "GetWatcherEvents" => {
            let events = call.shared.watchers.take(&call.caller.key_id, &call.sandbox, &request.watcher_id)?;
            Ok(json!({ "events": events }))
        }
        "RemoveWatcher" => {
            call.shared.watchers.remove(&call.caller.key_id, &call.sandbox, &request.watcher_id)?;
            Ok(json!({}))
        }
        other => Err(RpcError::new(Code::Unimplemented, format!("filesystem.Filesystem/{other} is not a method of envd's filesystem service"))),
    }
}

/// envd's `FilesystemEvent` (name = 1, type = 2) for one change.
pub fn filesystem_event(change: &sandbox_proto::api::FileChange) -> Value {
    let kind = match WatchEventType::try_from(change.r#type) {
        Ok(WatchEventType::Create) => "EVENT_TYPE_CREATE",
        Ok(WatchEventType::Write) => "EVENT_TYPE_WRITE",
        Ok(WatchEventType::Remove) => "EVENT_TYPE_REMOVE",
        Ok(WatchEventType::Rename) => "EVENT_TYPE_RENAME",
        Ok(WatchEventType::Chmod) => "EVENT_TYPE_CHMOD",
        _ => "EVENT_TYPE_UNSPECIFIED",
    };
    json!({ "name": change.name, "type": kind })
}

/// WatchDir: `start`, then one `filesystem` event per change.
async fn watch_dir(call: Call, headers: &HeaderMap, request: wire::FsRequest) -> Result<Response, RpcError> {
    let path = call.resolve(&request.path);
    let events = call.agent().watch(WatchRequest { sandbox_id: call.sandbox.clone(), path, recursive: request.recursive }).await?.into_inner();
    let (writer, response) = connect::stream_response();
    let keepalive = connect::keepalive_interval(headers);
    tokio::spawn(relay(events, writer, keepalive, json!({ "keepalive": {} }), None, |event| match event.event {
        Some(watch_event::Event::Started(_)) => Relayed::Send(json!({ "start": {} })),
        Some(watch_event::Event::Change(change)) => Relayed::Send(json!({ "filesystem": filesystem_event(&change) })),
        None => Relayed::Skip,
    }));
    Ok(response)
}

/// `GET /health`: 204 while the sandbox's agent answers.
async fn health(State(shared): State<Arc<Shared>>, Extension(target): Extension<Target>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    match Call::begin(&shared, &target, peer, &headers, None, "envd.Health").await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /envs`: the sandbox-wide environment.
async fn envs(State(shared): State<Arc<Shared>>, Extension(target): Extension<Target>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    match Call::begin(&shared, &target, peer, &headers, None, "envd.Envs").await {
        Ok(call) => Json(call.handle.env.clone()).into_response(),
        Err(error) => error.into_response(),
    }
}
