//! The E2B-compatible front door (`sandboxd serve --e2b-listen ADDR`): one
//! HTTP/1.1 and h2c listener that serves E2B's control plane (REST with
//! `X-API-KEY`) and its data plane. A data-plane request names its sandbox
//! and port by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers (what
//! `E2B_SANDBOX_URL` makes the SDKs send) or by a Host of
//! `{port}-{id}.{domain}` (wildcard DNS). Port 49983 is envd's API, which
//! this module serves over the sandbox's agent; any other port is a TCP
//! service inside the sandbox, reached through the agent's channel.
//!
//! This is translation only: every call goes through the same
//! [`SandboxManager`] as the gRPC API, which owns lifecycle, ownership and
//! quotas; keys are checked by [`ApiKeys`], and data-plane calls prove
//! themselves with the per-sandbox tokens it derives.

mod control;
mod connect;
mod envd;
mod files;
mod proxy;
mod watchers;
mod wire;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    body::Body,
    http::{header, HeaderMap, Request, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt;

use crate::{
    audit::{AuditLog, Entry},
    auth::{ApiKeys, Caller},
    manager::{SandboxError, SandboxManager},
    metrics,
};

/// The port E2B's SDKs address envd on.
pub const ENVD_PORT: u16 = 49983;
/// The envd version advertised: the lowest whose features are all served
/// here (octet-stream and gzip uploads came with 0.5.7; file metadata
/// (0.6.2) is not served).
pub const ENVD_VERSION: &str = "0.5.7";
/// Connections served at once.
const MAX_CONNECTIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum E2bError {
    #[error("missing X-API-KEY header: send a sandboxd API key (E2B_API_KEY for the SDKs)")]
    MissingKey,
    #[error("unknown API key: use a key of the daemon's SANDBOXD_API_KEYS or, without it, the one in STATE_DIR/api-key")]
    UnknownKey,
    #[error(
        "sandbox '{0}' needs its access token: send the envdAccessToken of the create response as X-Access-Token \
         (or a trafficAccessToken as E2B-Traffic-Access-Token for ports other than {ENVD_PORT})"
    )]
    MissingToken(String),
    #[error("the access token is not sandbox '{0}''s: use the token its create or connect response returned")]
    BadToken(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("{}", .0.message())]
    Agent(tonic::Status),
    /// A data-plane request for a sandbox that is not there (any more):
    /// E2B's proxy answers 502 and the SDKs read "was not found".
    #[error("The sandbox was not found: {0}")]
    SandboxGone(String),
    #[error("The sandbox is running but port is not open: {0}")]
    PortClosed(String),
    #[error("{0}")]
    Internal(String),
}

impl E2bError {
    pub fn status(&self) -> StatusCode {
        match self {
            E2bError::MissingKey | E2bError::UnknownKey | E2bError::MissingToken(_) | E2bError::BadToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            E2bError::BadRequest(_) => StatusCode::BAD_REQUEST,
            E2bError::Conflict(_) => StatusCode::CONFLICT,
            E2bError::Sandbox(error) => sandbox_status(error),
            E2bError::Agent(status) => agent_status(status),
            E2bError::PortClosed(_) | E2bError::SandboxGone(_) => StatusCode::BAD_GATEWAY,
            E2bError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn sandbox_status(error: &SandboxError) -> StatusCode {
    use crate::{admission::AdmissionError, backend::BackendError};
    match error {
        SandboxError::NotFound(_) | SandboxError::Stopped { .. } => StatusCode::NOT_FOUND,
        SandboxError::UnknownTemplate { .. } | SandboxError::InvalidLimits(_) => StatusCode::BAD_REQUEST,
        SandboxError::Paused(_) | SandboxError::NotPaused(_) => StatusCode::CONFLICT,
        SandboxError::Admission(AdmissionError::HostFacts(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        SandboxError::Admission(_) => StatusCode::TOO_MANY_REQUESTS,
        SandboxError::Backend(BackendError::Template(_)) | SandboxError::Registry(_) => StatusCode::INTERNAL_SERVER_ERROR,
        SandboxError::Backend(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn agent_status(status: &tonic::Status) -> StatusCode {
    use tonic::Code;
    match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl E2bError {
    /// The error of a data-plane request: a sandbox that is gone or
    /// stopped reads as E2B's proxy says it.
    pub fn on_data_plane(error: SandboxError) -> Self {
        match error {
            SandboxError::NotFound(_) | SandboxError::Stopped { .. } => E2bError::SandboxGone(error.to_string()),
            other => other.into(),
        }
    }
}

impl IntoResponse for E2bError {
    /// E2B's error body: `{"code": <status>, "message": ...}`.
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "code": status.as_u16(), "message": self.to_string() });
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

/// What every handler shares.
pub struct Shared {
    pub manager: Arc<SandboxManager>,
    pub audit: AuditLog,
    pub keys: ApiKeys,
    /// The domain sandboxes are addressed under (`{port}-{id}.{domain}`).
    pub domain: String,
    pub watchers: watchers::Watchers,
}

/// The address a request came from.
#[derive(Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The sandbox and port a data-plane request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub sandbox: String,
    pub port: u16,
}

impl Shared {
    /// Audits and counts one call.
    pub fn record(&self, caller: &Caller, sandbox: &str, operation: &'static str, started: Instant, outcome: &str) {
        self.audit.record(Entry { key_id: &caller.key_id, peer: &caller.peer, sandbox, operation, outcome });
        ::metrics::counter!(metrics::RPC_TOTAL, "method" => operation, "code" => outcome.to_string()).increment(1);
        ::metrics::histogram!(metrics::RPC_SECONDS, "method" => operation).record(started.elapsed().as_secs_f64());
    }

    /// The caller of a control-plane request, by its `X-API-KEY`.
    pub fn api_caller(&self, headers: &HeaderMap, peer: SocketAddr, operation: &'static str) -> Result<Caller, E2bError> {
        let peer = peer.to_string();
        let Some(key) = headers.get("x-api-key") else {
            self.audit.record(Entry { key_id: "-", peer: &peer, sandbox: "", operation, outcome: "Unauthenticated" });
            return Err(E2bError::MissingKey);
        };
        match self.keys.authenticate_key(key.as_bytes()) {
            Ok(key_id) => Ok(Caller { key_id, peer }),
            Err(tried) => {
                self.audit.record(Entry { key_id: &tried, peer: &peer, sandbox: "", operation, outcome: "Unauthenticated" });
                Err(E2bError::UnknownKey)
            }
        }
    }

    /// The caller of a data-plane request: the owner of the sandbox, when
    /// the request carries the sandbox's token for this kind of port (or
    /// the owner's API key).
    pub fn sandbox_caller(&self, headers: &HeaderMap, peer: SocketAddr, target: &Target, operation: &'static str) -> Result<Caller, E2bError> {
        let tokens: &[(&str, &str)] = if target.port == ENVD_PORT {
            &[("x-access-token", "envd")]
        } else {
            &[("e2b-traffic-access-token", "traffic"), ("x-access-token", "envd")]
        };
        let presented = tokens.iter().find_map(|(name, purpose)| Some((headers.get(*name)?, *purpose)));
        let Some((token, purpose)) = presented else {
            if headers.contains_key("x-api-key") {
                return self.api_caller(headers, peer, operation);
            }
            return Err(E2bError::MissingToken(target.sandbox.clone()));
        };
        let owner = self
            .manager
            .owner_of(&target.sandbox)
            .ok_or_else(|| E2bError::SandboxGone(SandboxError::NotFound(target.sandbox.clone()).to_string()))?;
        if !self.keys.check_sandbox_token(token.as_bytes(), purpose, &owner, &target.sandbox) {
            let peer = peer.to_string();
            self.audit.record(Entry { key_id: "-", peer: &peer, sandbox: &target.sandbox, operation, outcome: "Unauthenticated" });
            return Err(E2bError::BadToken(target.sandbox.clone()));
        }
        Ok(Caller { key_id: owner, peer: peer.to_string() })
    }
}

/// The front door: its routers over the shared state.
#[derive(Clone)]
pub struct Front {
    shared: Arc<Shared>,
    control: Router,
    envd: Router,
}

impl Front {
    pub fn new(manager: Arc<SandboxManager>, audit: AuditLog, keys: ApiKeys, domain: String) -> Self {
        let shared = Arc::new(Shared { manager, audit, keys, domain, watchers: watchers::Watchers::default() });
        Self { control: control::router(Arc::clone(&shared)), envd: envd::router(Arc::clone(&shared)), shared }
    }

    /// Routes one request to the control plane, envd or a sandbox's port.
    async fn dispatch(&self, mut request: Request<Body>, peer: SocketAddr) -> Response {
        request.extensions_mut().insert(Peer(peer));
        let target = match target_of(&request, &self.shared.domain) {
            Ok(target) => target,
            Err(error) => return error.into_response(),
        };
        let routed = match target {
            None => self.control.clone().oneshot(request).await,
            Some(target) if target.port == ENVD_PORT => {
                request.extensions_mut().insert(target);
                self.envd.clone().oneshot(request).await
            }
            Some(target) => Ok(proxy::forward(&self.shared, target, peer, request).await),
        };
        routed.unwrap_or_else(|never: Infallible| match never {})
    }
}

/// Reads and drops what is left of a refused request's body (at most
/// [`connect::MAX_MESSAGE`] bytes, within a few seconds), so that the
/// connection stays usable for the client's next request; a body larger or
/// slower than that closes it.
pub async fn drain(body: Body) {
    let limited = http_body_util::Limited::new(body, connect::MAX_MESSAGE);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), http_body_util::BodyExt::collect(limited)).await;
}

/// The sandbox and port a request is for, if it is for one: by the E2B
/// headers, else by a Host of `{port}-{id}.{domain}`.
fn target_of(request: &Request<Body>, domain: &str) -> Result<Option<Target>, E2bError> {
    let headers = request.headers();
    if let Some(id) = headers.get("e2b-sandbox-id") {
        let sandbox = id.to_str().map_err(|_| E2bError::BadRequest("E2b-Sandbox-Id is not text".into()))?.trim().to_string();
        let port = match headers.get("e2b-sandbox-port") {
            None => ENVD_PORT,
            Some(port) => port.to_str().ok().and_then(|p| p.trim().parse().ok()).ok_or_else(|| {
                E2bError::BadRequest("E2b-Sandbox-Port is not a port number (1-65535)".into())
            })?,
        };
        return Ok(Some(Target { sandbox, port }));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| request.uri().authority().map(|authority| authority.as_str()));
    Ok(host.and_then(|host| target_in_host(host, domain)))
}

/// Parses `{port}-{id}.{domain}` (the port after the domain, if any, is
/// ignored on both).
fn target_in_host(host: &str, domain: &str) -> Option<Target> {
    let without_port = |name: &str| {
        match name.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => name,
        }
        .to_ascii_lowercase()
    };
    let (label, rest) = host.split_once('.')?;
    if without_port(rest) != without_port(domain) {
        return None;
    }
    let (port, sandbox) = label.split_once('-')?;
    let port = port.parse().ok().filter(|port| *port != 0)?;
    Some(Target { sandbox: sandbox.to_ascii_lowercase(), port })
}

/// Serves the front door on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, front: Front, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "the E2B listener cannot accept; retrying shortly");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let front = front.clone();
                async move { Ok::<_, Infallible>(front.dispatch(request.map(Body::new), peer).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_port_and_sandbox_under_the_domain() {
        let target = |port, sandbox: &str| Some(Target { sandbox: sandbox.into(), port });
        assert_eq!(target_in_host("49983-sb-12ab.localhost:3000", "localhost:3000"), target(49983, "sb-12ab"));
        assert_eq!(target_in_host("8080-sb-12ab.sandbox.example.com", "sandbox.example.com"), target(8080, "sb-12ab"));
        assert_eq!(target_in_host("8080-sb-12ab.other.com", "example.com"), None);
        assert_eq!(target_in_host("api.example.com", "example.com"), None);
        assert_eq!(target_in_host("127.0.0.1:3000", "localhost"), None);
        assert_eq!(target_in_host("0-sb.localhost", "localhost"), None);
    }
}
