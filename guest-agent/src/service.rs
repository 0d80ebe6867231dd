//! The `sandbox.agent.v1.Agent` gRPC service. Exec and Connect processes
//! live in the [`ProcessTable`], so they outlive the stream that started
//! them unless it asked otherwise; ListProcesses and Attach reach them.

use std::{pin::Pin, sync::Arc};

use sandbox_proto::{
    agent::{agent_server::Agent, HelloRequest, HelloResponse, RefreshRequest, RefreshResponse},
    api::{
        connect_request::Input as ConnectInput, AttachRequest, ConnectRequest, DownloadRequest, ExecEvent,
        ExecRequest, FileChunk, FileInfo, ListProcessesRequest, ListProcessesResponse, ListRequest, ListResponse,
        MakeDirRequest, RemoveRequest, RemoveResponse, RunCodeRequest, RunCodeResponse, StatRequest, UploadRequest,
    },
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    files::{self, checked_path},
    process::{self, Input, ProcessSpec, SpawnOptions},
    processes::{self, Process, ProcessTable, Started},
    reaper::Reaper,
    refresh, runcode,
};

type EventStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

pub struct AgentService {
    reaper: Reaper,
    table: ProcessTable,
}

impl AgentService {
    pub fn new(reaper: Reaper) -> Self {
        Self { reaper, table: ProcessTable::default() }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type ExecStream = EventStream;
    type ConnectStream = EventStream;
    type AttachStream = EventStream;
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
        let stdin = std::mem::take(&mut request.stdin);
        let key = std::mem::take(&mut request.idempotency_key);
        let kill_on_disconnect = request.kill_on_disconnect;
        let spec = ProcessSpec::from_request(request)?;
        let started = self.table.start(&key, &spec.argv, || process::spawn(&self.reaper, &spec, SpawnOptions::default()))?;
        let events = match started {
            Started::New(process, input, running) => {
                tracing::info!(program = %spec.argv[0], handle = %process.handle, "exec");
                process::feed_stdin(input, stdin);
                let reader = process.reader_from_start();
                tokio::spawn(process::supervise_into(running, spec.timeout, process));
                processes::stream(reader, kill_on_disconnect)
            }
            Started::Existing(process) => {
                tracing::info!(handle = %process.handle, "exec retried under its idempotency key: attaching");
                processes::stream(process.reader_from_start(), false)
            }
        };
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<EventStream>, Status> {
        let mut inbound = request.into_inner();
        let start = match inbound.message().await?.and_then(|m| m.input) {
            Some(ConnectInput::Start(start)) => start,
            _ => return Err(Status::failed_precondition("the first Connect message must be `start`")),
        };
        let mut request = start.process.ok_or_else(|| Status::invalid_argument("start.process is missing: set argv"))?;
        let key = std::mem::take(&mut request.idempotency_key);
        let kill_on_disconnect = request.kill_on_disconnect;
        let spec = ProcessSpec::from_request(request)?;
        let pty = start.pty.map(|size| (clamp(size.rows, 24), clamp(size.cols, 80)));
        let options = SpawnOptions { pty, fd3: None };
        let events = match self.table.start(&key, &spec.argv, || process::spawn(&self.reaper, &spec, options))? {
            Started::New(process, input, running) => {
                tracing::info!(program = %spec.argv[0], handle = %process.handle, pty = pty.is_some(), "connect");
                let reader = process.reader_from_start();
                tokio::spawn(forward_input(inbound, Some(input), Arc::clone(&process)));
                tokio::spawn(process::supervise_into(running, spec.timeout, process));
                processes::stream(reader, kill_on_disconnect)
            }
            Started::Existing(process) => {
                tracing::info!(handle = %process.handle, "connect retried under its idempotency key: attaching");
                // A pipe's stdin ended with the first stream; a terminal stays open.
                let input = process.pty.clone().map(Input::Pty);
                let reader = process.reader_from_start();
                tokio::spawn(forward_input(inbound, input, process));
                processes::stream(reader, false)
            }
        };
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn list_processes(
        &self,
        _: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        Ok(Response::new(ListProcessesResponse { processes: self.table.list() }))
    }

    async fn attach(&self, request: Request<AttachRequest>) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let process = self.table.find(&request.handle)?;
        let reader = process.reader(request.from_offset)?;
        tracing::info!(handle = %process.handle, from = request.from_offset, "attach");
        Ok(Response::new(Box::pin(ReceiverStream::new(processes::stream(reader, false)))))
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
/// its input never holds up a signal, a resize or close_stdin. Without an
/// `input` (its stdin is closed), stdin messages are dropped.
async fn forward_input(mut inbound: Streaming<ConnectRequest>, input: Option<Input>, process: Arc<Process>) {
    let (stdin, pending) = mpsc::unbounded_channel();
    if let Some(input) = input {
        tokio::spawn(write_stdin(input, pending));
    }
    while let Ok(Some(message)) = inbound.message().await {
        match message.input {
            Some(ConnectInput::Stdin(data)) => {
                let _ = stdin.send(StdinOp::Data(data));
            }
            Some(ConnectInput::Resize(size)) => {
                if let Some(master) = &process.pty {
                    let _ = master.resize(clamp(size.rows, 24), clamp(size.cols, 80));
                }
            }
            Some(ConnectInput::Signal(signal)) => process.signal(signal),
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
