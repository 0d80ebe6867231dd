//! Code contexts and RunCode as every front door (gRPC, E2B) uses them:
//! the sandbox's agent runs the kernels; this module checks the requests,
//! merges the sandbox's environment, and takes whatever the agent sends
//! back as hostile input: sizes bounded, MIME types checked, JSON checked,
//! and a deadline of its own so that a stream the agent never ends still
//! ends.

use std::{pin::Pin, time::Duration};

use sandbox_proto::{
    agent::agent_client::AgentClient,
    api::{
        run_code_event::Event, CodeContext, CodeError as KernelError, CodeResult, ContextLanguage, CreateContextRequest,
        DeleteContextRequest, ListContextsRequest, RestartContextRequest, RunCodeEnd, RunCodeEvent, RunCodeRequest,
        RunCodeResponse,
    },
};
use tokio_stream::{Stream, StreamExt};
use tonic::{transport::Channel, Code, Status};

use crate::{
    api::{agent_status, check_env, require_sandbox_id},
    auth::Caller,
    manager::{SandboxError, SandboxManager},
};

/// Largest code of one call.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Output the agent may send for one call: its own cap (16 MiB) and room
/// for what the events carry beside it. More ends the call.
const MAX_CALL_OUTPUT: usize = 17 * 1024 * 1024;
/// A context's cell deadline when the request names none (the agent's too).
const DEFAULT_CONTEXT_DEADLINE: Duration = Duration::from_secs(300);
/// How long past the call's deadline the agent has to end the stream (it
/// interrupts, waits 5 s, may restart the kernel).
const DEADLINE_GRACE: Duration = Duration::from_secs(120);
/// Bounds on what the agent reports.
const MAX_MIME_TYPES: usize = 32;
const MAX_MIME_TYPE_LEN: usize = 127;
const MAX_ERROR_NAME: usize = 256;
const MAX_ERROR_VALUE: usize = 64 * 1024;
const MAX_TRACEBACK: usize = 1024 * 1024;
const MAX_RESULT_JSON: usize = 1024 * 1024;
const MAX_CONTEXT_ID: usize = 64;
const MAX_CONTEXTS_LISTED: usize = 64;
const MAX_PATH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    /// The agent's answer, relabelled when it is about the connection.
    #[error("{}", .0.message())]
    Agent(Status),
}

impl From<CodeError> for Status {
    fn from(error: CodeError) -> Self {
        match error {
            CodeError::Sandbox(error) => error.into(),
            CodeError::Invalid(message) => Status::invalid_argument(message),
            CodeError::TooLarge(message) => Status::resource_exhausted(message),
            CodeError::Agent(status) => status,
        }
    }
}

/// A RunCode call's events, ending with `end` (or an error).
pub type CodeEvents = Pin<Box<dyn Stream<Item = Result<RunCodeEvent, Status>> + Send>>;

impl SandboxManager {
    /// Starts a RunCode call (in a fresh process, or as a context's cell)
    /// and streams its events as the agent sends them.
    pub async fn run_code(&self, caller: &Caller, mut request: RunCodeRequest) -> Result<CodeEvents, CodeError> {
        let sandbox = request.sandbox_id.clone();
        let mut agent = self.code_agent(caller, &sandbox, |env| request.env = merged(env, &mut request.env)).await?;
        check_run(&request)?;
        let deadline = call_deadline(&request);
        let events = agent.run_code_stream(request).await.map_err(|status| agent_error(&sandbox, status))?;
        Ok(checked_events(sandbox, events.into_inner(), deadline))
    }

    /// RunCode gathered into one answer.
    pub async fn run_code_collected(&self, caller: &Caller, mut request: RunCodeRequest) -> Result<RunCodeResponse, CodeError> {
        let sandbox = request.sandbox_id.clone();
        let mut agent = self.code_agent(caller, &sandbox, |env| request.env = merged(env, &mut request.env)).await?;
        check_run(&request)?;
        let deadline = call_deadline(&request);
        let call = agent.run_code(request);
        let answered = match deadline {
            Some(deadline) => tokio::time::timeout(deadline, call).await.map_err(|_| overdue(&sandbox))?,
            None => call.await,
        };
        let mut response = answered.map_err(|status| agent_error(&sandbox, status))?.into_inner();
        response.results = response.results.into_iter().map(checked_result).collect();
        response.error = response.error.map(checked_error);
        response.result_json = checked_json(response.result_json);
        Ok(response)
    }

    /// Starts a kernel in the sandbox; answers when it is ready.
    pub async fn create_context(&self, caller: &Caller, mut request: CreateContextRequest) -> Result<CodeContext, CodeError> {
        let sandbox = request.sandbox_id.clone();
        let mut agent = self.code_agent(caller, &sandbox, |env| request.env = merged(env, &mut request.env)).await?;
        if ContextLanguage::try_from(request.language).unwrap_or_default() == ContextLanguage::Unspecified {
            return Err(CodeError::Invalid(
                "language is not set or unknown: use CONTEXT_LANGUAGE_PYTHON, CONTEXT_LANGUAGE_JAVASCRIPT or CONTEXT_LANGUAGE_BASH".into(),
            ));
        }
        check_cwd(&request.cwd)?;
        check_env("env", &request.env).map_err(|status| CodeError::Invalid(status.message().into()))?;
        let context = agent.create_context(request).await.map_err(|status| agent_error(&sandbox, status))?;
        checked_context(context.into_inner())
    }

    pub async fn list_contexts(&self, caller: &Caller, sandbox: &str) -> Result<Vec<CodeContext>, CodeError> {
        let mut agent = self.code_agent(caller, sandbox, |_| {}).await?;
        let request = ListContextsRequest { sandbox_id: sandbox.into() };
        let listed = agent.list_contexts(request).await.map_err(|status| agent_error(sandbox, status))?.into_inner();
        listed.contexts.into_iter().take(MAX_CONTEXTS_LISTED).map(checked_context).collect()
    }

    /// Kills the context's kernel and starts a fresh one.
    pub async fn restart_context(&self, caller: &Caller, sandbox: &str, context: &str) -> Result<CodeContext, CodeError> {
        check_context_id(context)?;
        let mut agent = self.code_agent(caller, sandbox, |_| {}).await?;
        let request = RestartContextRequest { sandbox_id: sandbox.into(), context_id: context.into() };
        let context = agent.restart_context(request).await.map_err(|status| agent_error(sandbox, status))?;
        checked_context(context.into_inner())
    }

    pub async fn delete_context(&self, caller: &Caller, sandbox: &str, context: &str) -> Result<(), CodeError> {
        check_context_id(context)?;
        let mut agent = self.code_agent(caller, sandbox, |_| {}).await?;
        let request = DeleteContextRequest { sandbox_id: sandbox.into(), context_id: context.into() };
        agent.delete_context(request).await.map_err(|status| agent_error(sandbox, status))?;
        Ok(())
    }

    /// The agent of `caller`'s sandbox; `with_env` sees the sandbox's environment.
    async fn code_agent(
        &self,
        caller: &Caller,
        sandbox: &str,
        with_env: impl FnOnce(&crate::manager::AgentHandle),
    ) -> Result<AgentClient<Channel>, CodeError> {
        require_sandbox_id(sandbox).map_err(|status| CodeError::Invalid(status.message().into()))?;
        let handle = self.agent(caller, sandbox).await?;
        with_env(&handle);
        Ok(handle.agent)
    }
}

fn merged(handle: &crate::manager::AgentHandle, env: &mut std::collections::HashMap<String, String>) -> std::collections::HashMap<String, String> {
    handle.merged_env(std::mem::take(env))
}

fn agent_error(sandbox: &str, status: Status) -> CodeError {
    CodeError::Agent(agent_status(sandbox, status))
}

fn overdue(sandbox: &str) -> CodeError {
    CodeError::Agent(Status::deadline_exceeded(format!(
        "the agent of sandbox '{sandbox}' did not end the run within {DEADLINE_GRACE:?} of its deadline; the sandbox may be overloaded: retry, or delete it"
    )))
}

fn check_run(request: &RunCodeRequest) -> Result<(), CodeError> {
    check_env("env", &request.env).map_err(|status| CodeError::Invalid(status.message().into()))?;
    if request.code.len() > MAX_CODE_BYTES {
        return Err(CodeError::TooLarge(format!(
            "code is {} bytes, over the limit of {MAX_CODE_BYTES} bytes: upload large programs with Files.Upload and run them with Exec",
            request.code.len()
        )));
    }
    if !request.context_id.is_empty() {
        check_context_id(&request.context_id)?;
    }
    Ok(())
}

fn check_context_id(id: &str) -> Result<(), CodeError> {
    if id.is_empty() || id.len() > MAX_CONTEXT_ID || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(CodeError::Invalid(format!(
            "context_id {id:?} is not a context id: pass the id CreateContext returned (letters, digits, - and _, at most {MAX_CONTEXT_ID})"
        )));
    }
    Ok(())
}

fn check_cwd(cwd: &str) -> Result<(), CodeError> {
    if cwd.contains('\0') || cwd.len() > MAX_PATH || !(cwd.is_empty() || cwd.starts_with('/')) {
        return Err(CodeError::Invalid(format!(
            "cwd {cwd:?} is not an absolute path: use one such as /home/user/project, or leave it empty for /home/user"
        )));
    }
    Ok(())
}

/// How long the agent has to end a call: its deadline and a grace; none
/// for a run without a context and without a timeout.
fn call_deadline(request: &RunCodeRequest) -> Option<Duration> {
    let deadline = match (request.timeout_ms, request.context_id.is_empty()) {
        (0, true) => return None,
        (0, false) => DEFAULT_CONTEXT_DEADLINE,
        (ms, _) => Duration::from_millis(ms),
    };
    Some(deadline + DEADLINE_GRACE)
}

/// The agent's events, checked and bounded; ends with an error if the
/// agent sends too much, misses the deadline, or stops without `end`.
fn checked_events(sandbox: String, mut events: tonic::Streaming<RunCodeEvent>, deadline: Option<Duration>) -> CodeEvents {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let give_up = deadline.map(|deadline| tokio::time::Instant::now() + deadline);
        let mut sent = 0usize;
        let outcome = loop {
            let overdue_at = async {
                match give_up {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // A client that leaves ends the agent's stream too, so the
            // agent interrupts the cell.
            let next = tokio::select! {
                next = events.next() => next,
                () = overdue_at => break Err(overdue(&sandbox).into()),
                () = sender.closed() => return,
            };
            let event = match next {
                Some(Ok(event)) => checked_event(event),
                Some(Err(status)) => break Err(agent_status(&sandbox, status)),
                None => break Err(Status::unavailable(format!(
                    "the agent of sandbox '{sandbox}' ended the run without its end; the kernel may have been killed, e.g. by the memory limit: run it again"
                ))),
            };
            sent += event_size(&event);
            if sent > MAX_CALL_OUTPUT {
                break Err(Status::resource_exhausted(format!(
                    "the agent of sandbox '{sandbox}' sent more than {} MiB for one run, past its own limit: the run was cut off",
                    MAX_CALL_OUTPUT >> 20
                )));
            }
            let last = matches!(event.event, Some(Event::End(_)));
            if sender.send(Ok(event)).await.is_err() || last {
                return;
            }
        };
        let _ = sender.send(outcome).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

fn event_size(event: &RunCodeEvent) -> usize {
    match &event.event {
        Some(Event::Stdout(data) | Event::Stderr(data)) => data.len(),
        Some(Event::Result(result)) => result.data.iter().map(|(k, v)| k.len() + v.len()).sum(),
        Some(Event::Error(error)) => error.name.len() + error.value.len() + error.traceback.len(),
        Some(Event::End(end)) => end.result_json.len(),
        Some(Event::ExecutionCount(_)) | None => 0,
    }
}

fn checked_event(event: RunCodeEvent) -> RunCodeEvent {
    let event = match event.event {
        Some(Event::Result(result)) => Event::Result(checked_result(result)),
        Some(Event::Error(error)) => Event::Error(checked_error(error)),
        Some(Event::End(end)) => Event::End(RunCodeEnd { result_json: checked_json(end.result_json), ..end }),
        Some(other) => other,
        None => Event::Stderr(bytes_note("an event the daemon does not know")),
    };
    RunCodeEvent { event: Some(event) }
}

fn bytes_note(what: &str) -> prost::bytes::Bytes {
    format!("\nsandboxd: the agent sent {what}; it was dropped\n").into()
}

/// Keeps at most [`MAX_MIME_TYPES`] entries whose keys look like MIME types.
fn checked_result(result: CodeResult) -> CodeResult {
    let data = result.data.into_iter().filter(|(mime, _)| is_mime_type(mime)).take(MAX_MIME_TYPES).collect();
    CodeResult { data, ..result }
}

/// `type/subtype` of token characters (RFC 6838), at most 127 bytes.
fn is_mime_type(text: &str) -> bool {
    let token = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b));
    text.len() <= MAX_MIME_TYPE_LEN && text.split_once('/').is_some_and(|(kind, sub)| token(kind) && token(sub))
}

fn checked_error(error: KernelError) -> KernelError {
    KernelError {
        name: cut(error.name, MAX_ERROR_NAME),
        value: cut(error.value, MAX_ERROR_VALUE),
        traceback: cut(error.traceback, MAX_TRACEBACK),
    }
}

/// JSON text that parses and is not too long; anything else is emptied.
fn checked_json(text: String) -> String {
    if text.len() > MAX_RESULT_JSON || serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
        return String::new();
    }
    text
}

fn checked_context(context: CodeContext) -> Result<CodeContext, CodeError> {
    if check_context_id(&context.id).is_err() {
        return Err(CodeError::Agent(Status::new(Code::Internal, "the agent answered with a malformed context id")));
    }
    Ok(CodeContext { cwd: cut(context.cwd, MAX_PATH), user: cut(context.user, 16), ..context })
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_are_checked() {
        assert!(is_mime_type("image/png"));
        assert!(is_mime_type("application/vnd.sandbox.return+json"));
        for bad in ["", "png", "image/", "/png", "text/plain; charset=utf-8", "a/b/c", "text/\nplain"] {
            assert!(!is_mime_type(bad), "{bad:?}");
        }
        assert!(!is_mime_type(&format!("a/{}", "b".repeat(200))));
    }

    #[test]
    fn results_keep_only_mime_keys_and_errors_are_cut() {
        let data = [("text/plain", "42"), ("../../etc", "x")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let result = checked_result(CodeResult { data, is_main_result: true });
        assert_eq!(result.data.keys().collect::<Vec<_>>(), ["text/plain"]);
        let error = checked_error(KernelError { name: "é".repeat(200), value: String::new(), traceback: String::new() });
        assert!(error.name.len() <= MAX_ERROR_NAME && error.name.chars().all(|c| c == 'é'));
    }

    #[test]
    fn result_json_must_parse() {
        assert_eq!(checked_json("{\"a\": 1}".into()), "{\"a\": 1}");
        assert_eq!(checked_json("{not json".into()), "");
    }

    #[test]
    fn context_ids_are_checked() {
        assert!(check_context_id("0f3a9c2b1d4e5f60").is_ok());
        for bad in ["", "../x", "a b", &"x".repeat(65)] {
            assert!(check_context_id(bad).is_err(), "{bad:?}");
        }
    }
}
