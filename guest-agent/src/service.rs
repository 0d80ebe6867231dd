//! The `sandbox.agent.v1.Agent` gRPC service. Exec and Connect processes
//! live in the [`ProcessTable`], so they outlive the stream that started
//! them unless it asked otherwise; ListProcesses, Attach, SendInput,
//! Signal and Resize reach them by handle.

use std::{pin::Pin, sync::Arc};

use sandbox_proto::{
    agent::{agent_server::Agent, HelloRequest, HelloResponse, RefreshRequest, RefreshResponse},
    agent::PortData,
    api::{
        connect_request::Input as ConnectInput, AttachRequest, ConnectRequest, DownloadRequest, ExecEvent,
        ExecRequest, FileChunk, FileInfo, ListProcessesRequest, ListProcessesResponse, ListRequest, ListResponse,
        MakeDirRequest, MoveRequest, PtySize, RemoveRequest, RemoveResponse, ResizeRequest, ResizeResponse,
        RunCodeRequest, RunCodeResponse, SendInputRequest, SendInputResponse, SignalRequest, SignalResponse,
        StatRequest, UploadRequest, WatchEvent, WatchRequest,
        CodeContext, CreateContextRequest, DeleteContextRequest, DeleteContextResponse, ListContextsRequest,
        ListContextsResponse, RestartContextRequest, RunCodeEvent,
    },
};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    contexts::Contexts,
    files::{self, checked_path},
    ports,
    process::{self, ProcessSpec, SpawnOptions},
    processes::{self, Labels, Process, ProcessTable, Started},
    reaper::Reaper,
    refresh, runcode, watch,
};

type EventStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

pub struct AgentService {
    reaper: Reaper,
    table: ProcessTable,
    contexts: Arc<Contexts>,
}

impl AgentService {
    pub fn new(reaper: Reaper) -> Self {
        Self { contexts: Arc::new(Contexts::new(reaper.clone())), reaper, table: ProcessTable::default() }
    }

    /// Starts a RunCode call: in a fresh process, or as a context's cell.
    async fn start_code(&self, request: RunCodeRequest) -> Result<tokio::sync::mpsc::Receiver<Result<RunCodeEvent, Status>>, Status> {
        let (events, receiver) = tokio::sync::mpsc::channel(64);
        if request.context_id.is_empty() {
            runcode::start(&self.reaper, request, events)?;
        } else {
            Arc::clone(&self.contexts).run(request, events).await?;
        }
        Ok(receiver)
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type ExecStream = EventStream;
    type ConnectStream = EventStream;
    type AttachStream = EventStream;
    type DownloadStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;
    type ForwardPortStream = Pin<Box<dyn Stream<Item = Result<PortData, Status>> + Send>>;
    type RunCodeStreamStream = Pin<Box<dyn Stream<Item = Result<RunCodeEvent, Status>> + Send>>;

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
        let pty = request.pty.take().map(terminal_size);
        let open_stdin = request.open_stdin || pty.is_some();
        let kill_on_disconnect = request.kill_on_disconnect;
        let labels = labels_of(&mut request);
        let spec = ProcessSpec::from_request(request)?;
        let options = SpawnOptions { pty, fd3: None };
        let started = self.table.start(&key, &spec.argv, labels, || process::spawn(&self.reaper, &spec, options))?;
        let events = match started {
            Started::New(process, input, running) => {
                tracing::info!(program = %spec.argv[0], handle = %process.handle, pty = pty.is_some(), "exec");
                if open_stdin {
                    process.open_input(input);
                    process.write_input(stdin, false).await?;
                } else {
                    process::feed_stdin(input, stdin);
                }
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
        let labels = labels_of(&mut request);
        let spec = ProcessSpec::from_request(request)?;
        let pty = start.pty.map(terminal_size);
        let options = SpawnOptions { pty, fd3: None };
        let events = match self.table.start(&key, &spec.argv, labels, || process::spawn(&self.reaper, &spec, options))? {
            Started::New(process, input, running) => {
                tracing::info!(program = %spec.argv[0], handle = %process.handle, pty = pty.is_some(), "connect");
                process.open_input(input);
                let reader = process.reader_from_start();
                // A pipe's stdin ends with the stream that started it; a terminal stays open.
                let close_at_end = pty.is_none();
                tokio::spawn(forward_input(inbound, Arc::clone(&process), close_at_end));
                tokio::spawn(process::supervise_into(running, spec.timeout, process));
                processes::stream(reader, kill_on_disconnect)
            }
            Started::Existing(process) => {
                tracing::info!(handle = %process.handle, "connect retried under its idempotency key: attaching");
                let reader = process.reader_from_start();
                tokio::spawn(forward_input(inbound, process, false));
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

    async fn send_input(&self, request: Request<SendInputRequest>) -> Result<Response<SendInputResponse>, Status> {
        let request = request.into_inner();
        let process = self.table.find(&request.handle)?;
        process.write_input(request.data, request.close).await?;
        Ok(Response::new(SendInputResponse {}))
    }

    async fn signal(&self, request: Request<SignalRequest>) -> Result<Response<SignalResponse>, Status> {
        let request = request.into_inner();
        if !(1..=64).contains(&request.signal) {
            return Err(Status::invalid_argument(format!(
                "signal {} is not a signal number: use one such as 15 (SIGTERM) or 9 (SIGKILL)",
                request.signal
            )));
        }
        self.table.find(&request.handle)?.signal_running(request.signal)?;
        Ok(Response::new(SignalResponse {}))
    }

    async fn resize(&self, request: Request<ResizeRequest>) -> Result<Response<ResizeResponse>, Status> {
        let request = request.into_inner();
        let (rows, cols) = terminal_size(request.size.unwrap_or_default());
        self.table.find(&request.handle)?.resize(rows, cols)?;
        Ok(Response::new(ResizeResponse {}))
    }

    async fn run_code(&self, request: Request<RunCodeRequest>) -> Result<Response<RunCodeResponse>, Status> {
        let events = self.start_code(request.into_inner()).await?;
        Ok(Response::new(runcode::collect(events).await?))
    }

    async fn run_code_stream(&self, request: Request<RunCodeRequest>) -> Result<Response<Self::RunCodeStreamStream>, Status> {
        let events = self.start_code(request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn create_context(&self, request: Request<CreateContextRequest>) -> Result<Response<CodeContext>, Status> {
        Ok(Response::new(self.contexts.create(request.into_inner()).await?))
    }

    async fn list_contexts(&self, _: Request<ListContextsRequest>) -> Result<Response<ListContextsResponse>, Status> {
        Ok(Response::new(ListContextsResponse { contexts: self.contexts.list() }))
    }

    async fn restart_context(&self, request: Request<RestartContextRequest>) -> Result<Response<CodeContext>, Status> {
        Ok(Response::new(self.contexts.restart(&request.get_ref().context_id).await?))
    }

    async fn delete_context(&self, request: Request<DeleteContextRequest>) -> Result<Response<DeleteContextResponse>, Status> {
        self.contexts.delete(&request.get_ref().context_id)?;
        Ok(Response::new(DeleteContextResponse {}))
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

    async fn r#move(&self, request: Request<MoveRequest>) -> Result<Response<FileInfo>, Status> {
        let request = request.into_inner();
        let (source, destination) = (checked_path(&request.source)?, checked_path(&request.destination)?);
        Ok(Response::new(files::rename(&source, &destination).await?))
    }

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let events = watch::start(checked_path(&request.path)?, request.recursive).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn forward_port(&self, request: Request<Streaming<PortData>>) -> Result<Response<Self::ForwardPortStream>, Status> {
        let chunks = ports::forward(request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn make_dir(&self, request: Request<MakeDirRequest>) -> Result<Response<FileInfo>, Status> {
        let request = request.into_inner();
        Ok(Response::new(files::make_dir(&checked_path(&request.path)?, request.parents, request.mode).await?))
    }
}

fn clamp(value: u32, default: u16) -> u16 {
    if value == 0 { default } else { value.min(u32::from(u16::MAX)) as u16 }
}

/// Rows and columns of a terminal, with 24x80 for what is left at 0.
fn terminal_size(size: PtySize) -> (u16, u16) {
    (clamp(size.rows, 24), clamp(size.cols, 80))
}

/// What Processes.List shows of a request besides its argv.
fn labels_of(request: &mut ExecRequest) -> Labels {
    Labels { tag: std::mem::take(&mut request.tag), env: request.env.clone(), cwd: request.cwd.clone() }
}

/// Applies a Connect stream's stdin, resizes and signals to the process.
/// Stdin goes through the process's input queue, so a process that does
/// not read its input never holds up a signal or a resize for long. With
/// `close_at_end`, the end of the stream closes stdin.
async fn forward_input(mut inbound: Streaming<ConnectRequest>, process: Arc<Process>, close_at_end: bool) {
    while let Ok(Some(message)) = inbound.message().await {
        match message.input {
            Some(ConnectInput::Stdin(data)) => {
                let _ = process.write_input(data, false).await;
            }
            Some(ConnectInput::Resize(size)) => {
                let (rows, cols) = terminal_size(size);
                let _ = process.resize(rows, cols);
            }
            Some(ConnectInput::Signal(signal)) => process.signal(signal),
            Some(ConnectInput::CloseStdin(true)) => {
                let _ = process.write_input(bytes::Bytes::new(), true).await;
            }
            Some(ConnectInput::CloseStdin(false) | ConnectInput::Start(_)) | None => {}
        }
    }
    if close_at_end {
        let _ = process.write_input(bytes::Bytes::new(), true).await;
    }
}
