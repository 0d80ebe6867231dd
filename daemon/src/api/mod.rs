//! The public gRPC services: thin adapters from `sandbox.v1` to the
//! [`SandboxManager`](crate::manager::SandboxManager). Each call is
//! authenticated by the interceptor, audited and counted here.

pub mod files;
pub mod processes;
pub mod sandboxes;

use std::{collections::HashMap, sync::Arc, time::Instant};

use sandbox_proto::api::ExecRequest;
use tonic::{Code, Status};

use crate::{
    admission::AdmissionError,
    audit::{AuditLog, Entry},
    auth::Caller,
    backend::BackendError,
    manager::{SandboxError, SandboxManager},
    metrics,
};

/// Largest upload chunk, stdin or code accepted in one message.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest `stdin` of an Exec request.
pub const MAX_STDIN_BYTES: usize = 4 * 1024 * 1024;

/// What every service holds.
#[derive(Clone)]
pub struct ApiContext {
    pub manager: Arc<SandboxManager>,
    pub audit: AuditLog,
}

impl ApiContext {
    /// Audits and counts the outcome of one call and passes it through.
    pub fn observe<T>(
        &self,
        caller: &Caller,
        sandbox: &str,
        operation: &'static str,
        started: Instant,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.audit.record(Entry { key_id: &caller.key_id, peer: &caller.peer, sandbox, operation, outcome: &outcome });
        ::metrics::counter!(metrics::RPC_TOTAL, "method" => operation, "code" => outcome).increment(1);
        ::metrics::histogram!(metrics::RPC_SECONDS, "method" => operation).record(started.elapsed().as_secs_f64());
        result
    }
}

impl From<SandboxError> for Status {
    fn from(error: SandboxError) -> Self {
        let code = match &error {
            SandboxError::NotFound(_) | SandboxError::UnknownTemplate { .. } => Code::NotFound,
            SandboxError::Paused(_) | SandboxError::NotPaused(_) | SandboxError::Stopped { .. } => Code::FailedPrecondition,
            SandboxError::InvalidLimits(_) => Code::InvalidArgument,
            SandboxError::Admission(AdmissionError::HostFacts(_)) => Code::Internal,
            SandboxError::Admission(_) => Code::ResourceExhausted,
            SandboxError::Backend(BackendError::Template(_)) => Code::FailedPrecondition,
            SandboxError::Backend(_) => Code::Unavailable,
            SandboxError::Registry(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

/// Rejects an empty sandbox id before any lookup.
pub fn require_sandbox_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument("sandbox_id is empty: pass the id returned by Sandboxes.Create"))
    } else {
        Ok(())
    }
}

/// Rejects what the kernel cannot take in an exec: NUL bytes in argv or
/// the environment, `=` in a variable's name, and a relative `cwd`.
pub fn check_process(request: &ExecRequest) -> Result<(), Status> {
    if request.argv.is_empty() {
        return Err(Status::invalid_argument("argv is empty: name the program to run, e.g. [\"sh\", \"-c\", \"echo hi\"]"));
    }
    if let Some(index) = request.argv.iter().position(|arg| arg.contains('\0')) {
        return Err(Status::invalid_argument(format!("argv[{index}] contains a NUL byte, which no program argument can hold: remove it")));
    }
    if request.cwd.contains('\0') || !(request.cwd.is_empty() || request.cwd.starts_with('/')) {
        return Err(Status::invalid_argument(format!(
            "cwd {:?} is not an absolute path: use one such as /home/user/project, or leave it empty for /home/user",
            request.cwd
        )));
    }
    check_env("env", &request.env)
}

/// Rejects environment variables the kernel cannot pass: NUL anywhere,
/// an empty name or `=` in the name.
pub fn check_env(field: &str, env: &HashMap<String, String>) -> Result<(), Status> {
    match env.iter().find(|(name, value)| name.is_empty() || name.contains(['=', '\0']) || value.contains('\0')) {
        Some((name, _)) => Err(Status::invalid_argument(format!(
            "{field} variable {name:?} cannot be passed to a process: names must be non-empty without `=` or NUL, values without NUL"
        ))),
        None => Ok(()),
    }
}

/// Rejects a payload larger than `limit`, naming the field and the fix.
pub fn require_size(field: &str, len: usize, limit: usize, fix: &str) -> Result<(), Status> {
    if len > limit {
        Err(Status::resource_exhausted(format!(
            "{field} is {len} bytes, over the limit of {limit} bytes: {fix}"
        )))
    } else {
        Ok(())
    }
}

/// Explains an agent failure that is about the connection, not the request.
pub fn agent_status(sandbox: &str, status: Status) -> Status {
    match status.code() {
        Code::Unavailable | Code::Unknown if status.message().contains("transport") || status.message().contains("connect") => {
            Status::unavailable(format!(
                "the agent of sandbox '{sandbox}' is not answering ({}); it may have been killed, e.g. by its memory limit: delete the sandbox and create a new one",
                status.message()
            ))
        }
        _ => status,
    }
}

/// A boxed stream of replies, as tonic's server-streaming methods return.
pub type ReplyStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl ApiContext {
    /// Authenticates, finds the sandbox's agent and forwards one call to it.
    /// `prepare` may adjust the request with the sandbox's agent handle (for
    /// example to merge its environment) before `call` sends it.
    pub async fn forward<Req, Reply, Call, Fut>(
        &self,
        request: tonic::Request<Req>,
        operation: &'static str,
        sandbox_id: impl Fn(&Req) -> &str,
        prepare: impl FnOnce(&crate::manager::AgentHandle, &mut Req) -> Result<(), Status>,
        call: Call,
    ) -> Result<tonic::Response<Reply>, Status>
    where
        Call: FnOnce(sandbox_proto::agent::agent_client::AgentClient<tonic::transport::Channel>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Reply>, Status>>,
    {
        let started = Instant::now();
        let caller = crate::auth::caller(&request)?;
        let mut message = request.into_inner();
        let id = sandbox_id(&message).to_string();
        let result = async {
            require_sandbox_id(&id)?;
            let handle = self.manager.agent(&caller, &id).await?;
            prepare(&handle, &mut message)?;
            call(handle.agent, message).await.map_err(|status| agent_status(&id, status))
        }
        .await;
        self.observe(&caller, &id, operation, started, result)
    }
}

impl ApiContext {
    /// Authenticates one call, runs it on the manager and audits it.
    pub async fn serve<Req, Reply, Call, Fut>(
        &self,
        request: tonic::Request<Req>,
        operation: &'static str,
        sandbox_id: impl Fn(&Req) -> &str,
        call: Call,
    ) -> Result<tonic::Response<Reply>, Status>
    where
        Call: FnOnce(Arc<SandboxManager>, Caller, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Reply, Status>>,
    {
        let started = Instant::now();
        let caller = crate::auth::caller(&request)?;
        let message = request.into_inner();
        let id = sandbox_id(&message).to_string();
        let result = call(Arc::clone(&self.manager), caller.clone(), message).await;
        self.observe(&caller, &id, operation, started, result).map(tonic::Response::new)
    }
}

/// Re-labels connection failures inside a forwarded reply stream.
pub fn forwarded_stream<T: Send + 'static>(
    sandbox: String,
    stream: tonic::Streaming<T>,
) -> ReplyStream<T> {
    use tokio_stream::StreamExt;
    Box::pin(stream.map(move |item| item.map_err(|status| agent_status(&sandbox, status))))
}
