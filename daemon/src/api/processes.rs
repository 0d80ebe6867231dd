//! `sandbox.v1.Processes`: exec, interactive sessions and attach, each
//! forwarded to the sandbox's agent; run-code and code contexts, served by
//! the manager's [`code`](crate::code) calls.

use std::time::Instant;

use sandbox_proto::api::{
    connect_request::Input, processes_server::Processes, ConnectRequest, ExecEvent, ExecRequest, ResizeRequest,
    ResizeResponse, RunCodeRequest, RunCodeResponse, SendInputRequest, SendInputResponse, SignalRequest,
    SignalResponse,
    CodeContext, CreateContextRequest, DeleteContextRequest, DeleteContextResponse, ListContextsRequest,
    ListContextsResponse, RestartContextRequest,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{
    agent_status, check_process, forwarded_stream, require_sandbox_id, require_size, ApiContext, ReplyStream,
    MAX_CHUNK_BYTES, MAX_STDIN_BYTES,
};
use crate::{auth, code::CodeEvents};

pub struct ProcessesService(pub ApiContext);

#[tonic::async_trait]
impl Processes for ProcessesService {
    type ExecStream = ReplyStream<ExecEvent>;
    type ConnectStream = ReplyStream<ExecEvent>;

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        let reply = self
            .0
            .forward(
                request,
                "Processes.Exec",
                |r| &r.sandbox_id,
                |handle, r| {
                    check_process(r)?;
                    require_size("stdin", r.stdin.len(), MAX_STDIN_BYTES, "upload large input with Files.Upload and read it from the file")?;
                    r.env = handle.merged_env(std::mem::take(&mut r.env));
                    Ok(())
                },
                |mut agent, r| async move { agent.exec(r).await },
            )
            .await?;
        Ok(Response::new(forwarded_stream(id, reply.into_inner())))
    }

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<Self::ConnectStream>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let mut start = match first.and_then(|m| m.input) {
            Some(Input::Start(start)) => start,
            _ => {
                let status = Status::failed_precondition(
                    "the first Connect message must be `start` (with process.sandbox_id and argv); send stdin, resize and signals after it",
                );
                return self.0.observe(&caller, "", "Processes.Connect", started, Err(status));
            }
        };
        let id = start.process.as_ref().map(|p| p.sandbox_id.clone()).unwrap_or_default();
        let result = async {
            require_sandbox_id(&id)?;
            check_process(start.process.as_ref().unwrap_or(&Default::default()))?;
            let handle = self.0.manager.agent(&caller, &id).await?;
            if let Some(process) = start.process.as_mut() {
                process.env = handle.merged_env(std::mem::take(&mut process.env));
            }
            let first = ConnectRequest { input: Some(Input::Start(start)) };
            // A client error ends the forwarded input; the process then sees end of stdin.
            let rest = inbound.map_while(Result::ok);
            let outbound = tokio_stream::once(first).chain(rest);
            let mut agent = handle.agent;
            let events = agent.connect(outbound).await.map_err(|status| agent_status(&id, status))?;
            Ok(forwarded_stream(id.clone(), events.into_inner()))
        }
        .await;
        self.0.observe(&caller, &id, "Processes.Connect", started, result).map(Response::new)
    }

    async fn run_code(&self, request: Request<RunCodeRequest>) -> Result<Response<RunCodeResponse>, Status> {
        self.0
            .serve(request, "Processes.RunCode", |r| &r.sandbox_id, |manager, caller, r| async move {
                Ok(manager.run_code_collected(&caller, r).await?)
            })
            .await
    }

    type RunCodeStreamStream = CodeEvents;

    async fn run_code_stream(&self, request: Request<RunCodeRequest>) -> Result<Response<CodeEvents>, Status> {
        self.0
            .serve(request, "Processes.RunCodeStream", |r| &r.sandbox_id, |manager, caller, r| async move {
                Ok(manager.run_code(&caller, r).await?)
            })
            .await
    }

    async fn create_context(&self, request: Request<CreateContextRequest>) -> Result<Response<CodeContext>, Status> {
        self.0
            .serve(request, "Processes.CreateContext", |r| &r.sandbox_id, |manager, caller, r| async move {
                Ok(manager.create_context(&caller, r).await?)
            })
            .await
    }

    async fn list_contexts(&self, request: Request<ListContextsRequest>) -> Result<Response<ListContextsResponse>, Status> {
        self.0
            .serve(request, "Processes.ListContexts", |r| &r.sandbox_id, |manager, caller, r| async move {
                Ok(ListContextsResponse { contexts: manager.list_contexts(&caller, &r.sandbox_id).await? })
            })
            .await
    }

    async fn restart_context(&self, request: Request<RestartContextRequest>) -> Result<Response<CodeContext>, Status> {
        self.0
            .serve(request, "Processes.RestartContext", |r| &r.sandbox_id, |manager, caller, r| async move {
                Ok(manager.restart_context(&caller, &r.sandbox_id, &r.context_id).await?)
            })
            .await
    }

    async fn delete_context(&self, request: Request<DeleteContextRequest>) -> Result<Response<DeleteContextResponse>, Status> {
        self.0
            .serve(request, "Processes.DeleteContext", |r| &r.sandbox_id, |manager, caller, r| async move {
                manager.delete_context(&caller, &r.sandbox_id, &r.context_id).await?;
                Ok(DeleteContextResponse {})
            })
            .await
    }

    // Processes.List and Processes.Attach: owner-checked by `forward` (the
    // same manager lookup as Exec), then forwarded to the agent's table.
    type AttachStream = ReplyStream<ExecEvent>;

    async fn list(
        &self,
        request: Request<sandbox_proto::api::ListProcessesRequest>,
    ) -> Result<Response<sandbox_proto::api::ListProcessesResponse>, Status> {
        self.0
            .forward(request, "Processes.List", |r| &r.sandbox_id, |_, _| Ok(()), |mut agent, r| async move {
                agent.list_processes(r).await
            })
            .await
    }

    async fn attach(&self, request: Request<sandbox_proto::api::AttachRequest>) -> Result<Response<Self::AttachStream>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        let reply = self
            .0
            .forward(request, "Processes.Attach", |r| &r.sandbox_id, |_, _| Ok(()), |mut agent, r| async move {
                agent.attach(r).await
            })
            .await?;
        Ok(Response::new(forwarded_stream(id, reply.into_inner())))
    }

    async fn send_input(&self, request: Request<SendInputRequest>) -> Result<Response<SendInputResponse>, Status> {
        self.0
            .forward(
                request,
                "Processes.SendInput",
                |r| &r.sandbox_id,
                |_, r| require_size("data", r.data.len(), MAX_CHUNK_BYTES, "send large input in several calls"),
                |mut agent, r| async move { agent.send_input(r).await },
            )
            .await
    }

    async fn signal(&self, request: Request<SignalRequest>) -> Result<Response<SignalResponse>, Status> {
        self.0
            .forward(request, "Processes.Signal", |r| &r.sandbox_id, |_, _| Ok(()), |mut agent, r| async move {
                agent.signal(r).await
            })
            .await
    }

    async fn resize(&self, request: Request<ResizeRequest>) -> Result<Response<ResizeResponse>, Status> {
        self.0
            .forward(request, "Processes.Resize", |r| &r.sandbox_id, |_, _| Ok(()), |mut agent, r| async move {
                agent.resize(r).await
            })
            .await
    }
}
