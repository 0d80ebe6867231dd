//! The `sandbox.agent.v1.Agent` gRPC service.

use std::pin::Pin;

use sandbox_proto::{
    agent::{agent_server::Agent, HelloRequest, HelloResponse, RefreshRequest, RefreshResponse},
    api::{
        connect_request::Input as ConnectInput, ConnectRequest, DownloadRequest, ExecEvent, ExecRequest, FileChunk,
        FileInfo, ListRequest, ListResponse, MakeDirRequest, RemoveRequest, RemoveResponse, RunCodeRequest,
        RunCodeResponse, StatRequest, UploadRequest,
    },
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    files::{self, checked_path},
    process::{self, Input, ProcessSpec, SpawnOptions},
    reaper::Reaper,
    refresh, runcode,
};

type EventStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

pub struct AgentService {
    reaper: Reaper,
}

impl AgentService {
    pub fn new(reaper: Reaper) -> Self {
        Self { reaper }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type ExecStream = EventStream;
    type ConnectStream = EventStream;
    type DownloadStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;

    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        Ok(Response::new(HelloResponse { agent_version: env!("CARGO_PKG_VERSION").into(), pid: std::process::id() }))
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        refresh::apply(request.into_inner())?;
        Ok(Response::new(RefreshResponse {}))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<EventStream>, Status> {
        let mut request = request.into_inner();
        tracing::info!(program = %request.argv.first().map(String::as_str).unwrap_or(""), "exec");
        let stdin = std::mem::take(&mut request.stdin);
        let spec = ProcessSpec::from_request(request)?;
        let (input, running) = process::spawn(&self.reaper, &spec, SpawnOptions::default())?;
        process::feed_stdin(input, stdin);
        let (events, stream) = mpsc::channel(64);
        tokio::spawn(process::supervise(running, spec.timeout, events));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<EventStream>, Status> {
        let mut inbound = request.into_inner();
        let start = match inbound.message().await?.and_then(|m| m.input) {
            Some(ConnectInput::Start(start)) => start,
            _ => return Err(Status::failed_precondition("the first Connect message must be `start`")),
        };
        let request = start.process.ok_or_else(|| Status::invalid_argument("start.process is missing: set argv"))?;
        tracing::info!(program = %request.argv.first().map(String::as_str).unwrap_or(""), pty = start.pty.is_some(), "connect");
        let spec = ProcessSpec::from_request(request)?;
        let pty = start.pty.map(|size| (clamp(size.rows, 24), clamp(size.cols, 80)));
        let (input, running) = process::spawn(&self.reaper, &spec, SpawnOptions { pty, fd3: None })?;
        tokio::spawn(forward_input(inbound, input, running.pid, running.pty.clone()));
        let (events, stream) = mpsc::channel(64);
        tokio::spawn(process::supervise(running, spec.timeout, events));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn run_code(&self, request: Request<RunCodeRequest>) -> Result<Response<RunCodeResponse>, Status> {
        Ok(Response::new(runcode::run(&self.reaper, request.into_inner()).await?))
    }

    async fn upload(&self, request: Request<Streaming<UploadRequest>>) -> Result<Response<FileInfo>, Status> {
        Ok(Response::new(files::upload(request.into_inner()).await?))
    }

    async fn download(&self, request: Request<DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let path = checked_path(&request.get_ref().path)?;
        let chunks = files::download(&path).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<FileInfo>, Status> {
        let path = checked_path(&request.get_ref().path)?;
        Ok(Response::new(files::info(&path).await?))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let request = request.into_inner();
        let path = checked_path(&request.path)?;
        Ok(Response::new(ListResponse { entries: files::list(&path, request.depth).await? }))
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        let request = request.into_inner();
        files::remove(&checked_path(&request.path)?, request.recursive).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn make_dir(&self, request: Request<MakeDirRequest>) -> Result<Response<FileInfo>, Status> {
        let request = request.into_inner();
        Ok(Response::new(files::make_dir(&checked_path(&request.path)?, request.parents, request.mode).await?))
    }
}

fn clamp(value: u32, default: u16) -> u16 {
    if value == 0 { default } else { value.min(u32::from(u16::MAX)) as u16 }
}

/// Applies a Connect stream's stdin, resizes and signals to the process.
/// Stdin is written by a task of its own, so a process that does not read
/// its input never holds up a signal, a resize or close_stdin.
async fn forward_input(
    mut inbound: Streaming<ConnectRequest>,
    input: Input,
    pid: i32,
    pty: Option<std::sync::Arc<crate::pty::PtyMaster>>,
) {
    let (stdin, pending) = mpsc::unbounded_channel();
    tokio::spawn(write_stdin(input, pending));
    while let Ok(Some(message)) = inbound.message().await {
        match message.input {
            Some(ConnectInput::Stdin(data)) => {
                let _ = stdin.send(StdinOp::Data(data));
            }
            Some(ConnectInput::Resize(size)) => {
                if let Some(master) = &pty {
                    let _ = master.resize(clamp(size.rows, 24), clamp(size.cols, 80));
                }
            }
            Some(ConnectInput::Signal(signal)) => process::signal_group(pid, signal),
            Some(ConnectInput::CloseStdin(true)) => {
                let _ = stdin.send(StdinOp::Close);
            }
            Some(ConnectInput::CloseStdin(false) | ConnectInput::Start(_)) | None => {}
        }
    }
}

enum StdinOp {
    Data(bytes::Bytes),
    Close,
}

/// Writes queued stdin in order; on close, ends the input (^D on a terminal).
async fn write_stdin(mut input: Input, mut pending: mpsc::UnboundedReceiver<StdinOp>) {
    while let Some(op) = pending.recv().await {
        match op {
            StdinOp::Data(data) => {
                let _ = input.write(&data).await;
            }
            StdinOp::Close => {
                if matches!(input, Input::Pty(_)) {
                    let _ = input.write(b"\x04").await;
                }
                return;
            }
        }
    }
}
