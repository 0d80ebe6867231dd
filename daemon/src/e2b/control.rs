//! E2B's control plane: sandboxes created, listed, looked up, connected
//! to, paused, resumed, timed and killed, as the REST API of E2B's SDKs
//! expects (routes of both generations, exact success codes, JSON error
//! bodies), each call one [`SandboxManager`](crate::manager::SandboxManager)
//! call made as the caller its `X-API-KEY` names.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use sandbox_proto::api::{self, CreateSandboxRequest, Limits, SandboxState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{E2bError, Peer, Shared, ENVD_VERSION};
use crate::{auth::Caller, manager::SandboxError};

/// E2B's default template names, served by our default template unless a
/// template of that name was configured.
const DEFAULT_ALIASES: &[&str] = &["base", "code-interpreter-v1", "code-interpreter", "default"];
/// Most sandboxes one page of a list holds.
const MAX_PAGE: usize = 1000;
/// Shown as the (deprecated) client id E2B's responses carry.
const CLIENT_ID: &str = "sandboxd";

type Shared_ = Arc<Shared>;

pub fn router(shared: Shared_) -> Router {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/health", get(|| async { StatusCode::OK }))
        .fallback(|| async { E2bError::BadRequest("no such route: sandboxd serves E2B's sandbox API (see the README)".into()) })
        .with_state(shared)
}

/// Runs one call as the caller its key names, audits it, and answers
/// with `success` and the JSON of its result (or the error).
async fn call<F, Fut>(
    shared: &Shared,
    headers: &HeaderMap,
    peer: Peer,
    sandbox: &str,
    operation: &'static str,
    body: F,
) -> Response
where
    F: FnOnce(Caller) -> Fut,
    Fut: std::future::Future<Output = Result<Response, E2bError>>,
{
    let started = Instant::now();
    let caller = match shared.api_caller(headers, peer.0, operation) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let result = body(caller.clone()).await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(error) => error.status().as_u16().to_string(),
    };
    shared.record(&caller, sandbox, operation, started, &outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID", alias = "templateId")]
    template_id: String,
    timeout: Option<u32>,
    metadata: Option<HashMap<String, String>>,
    env_vars: Option<HashMap<String, String>>,
}

async fn create(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let shared_ref = &shared;
    let mut response = call(&shared, &headers, peer, "", "E2B.Create", |caller| async move {
        let request: NewSandbox = json_body(&body)?;
        check_env(request.env_vars.as_ref())?;
        let template = template_name(shared_ref, &request.template_id);
        let create = CreateSandboxRequest {
            template,
            limits: Some(Limits { timeout_seconds: request.timeout.unwrap_or(0), ..Limits::default() }),
            env: request.env_vars.unwrap_or_default(),
            metadata: request.metadata.unwrap_or_default(),
        };
        let sandbox = shared_ref.manager.create(&caller, create).await?;
        Ok((StatusCode::CREATED, Json(sandbox_json(shared_ref, &caller, &sandbox, &request.template_id))).into_response())
    })
    .await;
    // A failed create made no sandbox, but what failed it (a quota, an
    // unknown template, bad input) fails a retry too.
    if !response.status().is_success() && response.status() != StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert("should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// Our template for an E2B template id.
fn template_name(shared: &Shared, requested: &str) -> String {
    if shared.manager.has_template(requested) {
        requested.to_string()
    } else if requested.is_empty() || DEFAULT_ALIASES.contains(&requested) {
        "default".to_string()
    } else {
        requested.to_string()
    }
}

fn check_env(env: Option<&HashMap<String, String>>) -> Result<(), E2bError> {
    let Some(env) = env else { return Ok(()) };
    crate::api::check_env("envVars", env).map_err(|status| E2bError::BadRequest(status.message().to_string()))
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| E2bError::BadRequest(format!("the body is not the JSON this route takes: {e}")))
}

/// E2B's `Sandbox` (create, connect, resume).
fn sandbox_json(shared: &Shared, caller: &Caller, sandbox: &api::Sandbox, alias: &str) -> Value {
    json!({
        "templateID": sandbox.template,
        "sandboxID": sandbox.id,
        "clientID": CLIENT_ID,
        "alias": if alias.is_empty() { sandbox.template.as_str() } else { alias },
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": shared.keys.sandbox_token("envd", &caller.key_id, &sandbox.id),
        "trafficAccessToken": shared.keys.sandbox_token("traffic", &caller.key_id, &sandbox.id),
        "domain": shared.domain,
    })
}

/// E2B's `SandboxDetail` and `ListedSandbox`.
fn detail_json(shared: &Shared, caller: &Caller, sandbox: &api::Sandbox) -> Value {
    let limits = sandbox.limits.unwrap_or_default();
    json!({
        "templateID": sandbox.template,
        "alias": sandbox.template,
        "sandboxID": sandbox.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(sandbox.created_at_unix_ms),
        "endAt": rfc3339(sandbox.expires_at_unix_ms),
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": shared.keys.sandbox_token("envd", &caller.key_id, &sandbox.id),
        "cpuCount": limits.vcpus,
        "memoryMB": limits.memory_mib,
        "diskSizeMB": limits.disk_mib,
        "state": state_name(sandbox),
        "metadata": sandbox.metadata,
        "domain": shared.domain,
    })
}

fn state_name(sandbox: &api::Sandbox) -> &'static str {
    if sandbox.state == SandboxState::Paused as i32 { "paused" } else { "running" }
}

fn rfc3339(unix_ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// A sandbox as E2B sees it: a stopped one (its guest died) is gone.
async fn visible(shared: &Shared, caller: &Caller, id: &str) -> Result<api::Sandbox, E2bError> {
    let sandbox = shared.manager.get(caller, id).await?;
    if sandbox.state == SandboxState::Stopped as i32 {
        return Err(SandboxError::Stopped { id: id.to_string(), detail: sandbox.stopped_reason }.into());
    }
    Ok(sandbox)
}

async fn detail(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, &id.clone(), "E2B.Get", |caller| async move {
        let sandbox = visible(shared_ref, &caller, &id).await?;
        Ok(Json(detail_json(shared_ref, &caller, &sandbox)).into_response())
    })
    .await
}

async fn kill(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let manager = &shared.manager;
    call(&shared, &headers, peer, &id.clone(), "E2B.Kill", |caller| async move {
        manager.delete(&caller, &id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TimeoutBody {
    timeout: Option<u32>,
}

async fn set_timeout(
    State(shared): State<Shared_>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let manager = &shared.manager;
    call(&shared, &headers, peer, &id.clone(), "E2B.SetTimeout", |caller| async move {
        let body: TimeoutBody = json_body(&body)?;
        let timeout = body.timeout.ok_or_else(|| E2bError::BadRequest("the body needs `timeout` in seconds".into()))?;
        manager.set_timeout(&caller, &id, Duration::from_secs(timeout.into())).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// Connect: 200 for a running sandbox, 201 once a paused one is resumed;
/// a `timeout` in the body moves its end.
async fn connect(
    State(shared): State<Shared_>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, &id.clone(), "E2B.Connect", |caller| async move {
        let body: TimeoutBody = json_body(&body)?;
        let mut sandbox = visible(shared_ref, &caller, &id).await?;
        let mut status = StatusCode::OK;
        if sandbox.state == SandboxState::Paused as i32 {
            sandbox = shared_ref.manager.resume(&caller, &id).await?;
            status = StatusCode::CREATED;
        }
        answer_sandbox(shared_ref, &caller, sandbox, body.timeout, status).await
    })
    .await
}

/// Moves the sandbox's end when a timeout was given, then answers with
/// E2B's `Sandbox` under `status`.
async fn answer_sandbox(
    shared: &Shared,
    caller: &Caller,
    mut sandbox: api::Sandbox,
    timeout: Option<u32>,
    status: StatusCode,
) -> Result<Response, E2bError> {
    if let Some(timeout) = timeout {
        sandbox = shared.manager.set_timeout(caller, &sandbox.id, Duration::from_secs(timeout.into())).await?;
    }
    Ok((status, Json(sandbox_json(shared, caller, &sandbox, ""))).into_response())
}

async fn pause(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, &id.clone(), "E2B.Pause", |caller| async move {
        if visible(shared_ref, &caller, &id).await?.state == SandboxState::Paused as i32 {
            return Err(E2bError::Conflict(format!("sandbox '{id}' is already paused")));
        }
        shared_ref.manager.pause(&caller, &id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn resume(
    State(shared): State<Shared_>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, &id.clone(), "E2B.Resume", |caller| async move {
        let body: TimeoutBody = json_body(&body)?;
        let sandbox = shared_ref.manager.resume(&caller, &id).await.map_err(|error| match error {
            SandboxError::NotPaused(_) => E2bError::Conflict(format!("sandbox '{id}' is already running")),
            other => other.into(),
        })?;
        answer_sandbox(shared_ref, &caller, sandbox, body.timeout, StatusCode::CREATED).await
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    /// "asc" (the default, oldest first) or "desc".
    order: Option<String>,
    template: Option<String>,
}

/// `GET /v2/sandboxes`: the caller's sandboxes, oldest first (or newest,
/// `order=desc`), filtered by metadata (`k=v&...`, URL-encoded), state and
/// template, a page at a time; the `X-Next-Token` header names the next page.
async fn list(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Query(query): Query<ListQuery>, headers: HeaderMap) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, "", "E2B.List", |caller| async move {
        let wanted_metadata: Vec<(String, String)> = match &query.metadata {
            Some(text) => serde_urlencoded::from_str(text).map_err(|e| E2bError::BadRequest(format!("metadata filter {text:?}: {e}")))?,
            None => Vec::new(),
        };
        let states: Vec<&str> = query.state.as_deref().map_or(vec!["running", "paused"], |s| s.split(',').map(str::trim).collect());
        let mut sandboxes: Vec<api::Sandbox> = shared_ref
            .manager
            .list(&caller)
            .await
            .into_iter()
            .filter(|sandbox| sandbox.state != SandboxState::Stopped as i32)
            .filter(|sandbox| states.contains(&state_name(sandbox)))
            .filter(|sandbox| wanted_metadata.iter().all(|(k, v)| sandbox.metadata.get(k) == Some(v)))
            .filter(|sandbox| query.template.as_ref().is_none_or(|template| template_name(shared_ref, template) == sandbox.template))
            .collect();
        if query.order.as_deref() == Some("desc") {
            sandboxes.reverse();
        }
        if let Some(token) = &query.next_token {
            let position = sandboxes.iter().position(|sandbox| &sandbox.id == token).ok_or_else(|| {
                E2bError::BadRequest(format!("nextToken {token:?} names no sandbox of this listing: start again without it"))
            })?;
            sandboxes.drain(..position);
        }
        let limit = query.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
        let next = sandboxes.get(limit).map(|sandbox| sandbox.id.clone());
        sandboxes.truncate(limit);
        let page: Vec<Value> = sandboxes.iter().map(|sandbox| detail_json(shared_ref, &caller, sandbox)).collect();
        let mut response = Json(page).into_response();
        if let Some(next) = next.and_then(|next| HeaderValue::from_str(&next).ok()) {
            response.headers_mut().insert("x-next-token", next);
        }
        Ok(response)
    })
    .await
}

/// `GET /sandboxes` (the SDKs before the v2 list): the running ones.
async fn list_v1(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Query(query): Query<ListQuery>, headers: HeaderMap) -> Response {
    let query = ListQuery { state: Some(query.state.unwrap_or_else(|| "running".into())), ..query };
    list(State(shared), Extension(peer), Query(query), headers).await
}

/// `GET /sandboxes/{id}/metrics`: one sample, now. CPU is the average use
/// since the sandbox was made (its cgroup's CPU time over its lifetime and
/// CPUs); disk used is what its writable disk takes on the host.
async fn metrics(State(shared): State<Shared_>, Extension(peer): Extension<Peer>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let shared_ref = &shared;
    call(&shared, &headers, peer, &id.clone(), "E2B.Metrics", |caller| async move {
        let sandbox = visible(shared_ref, &caller, &id).await?;
        let usage = shared_ref.manager.usage(&caller, &id).await?;
        let limits = sandbox.limits.unwrap_or_default();
        let cpus = f64::from(limits.vcpus.max(1));
        let cpu_used_pct = usage.cpu_nanos.map_or(0.0, |nanos| {
            (nanos as f64 / 1e9 / usage.lived.as_secs_f64().max(1e-3) / cpus * 100.0).min(100.0)
        });
        let now = SystemTime::now();
        Ok(Json(json!([{
            "timestamp": humantime::format_rfc3339_seconds(now).to_string(),
            "timestampUnix": now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            "cpuCount": limits.vcpus,
            "cpuUsedPct": (cpu_used_pct * 100.0).round() / 100.0,
            "memUsed": usage.memory_bytes,
            "memTotal": u64::from(limits.memory_mib) << 20,
            "memCache": 0,
            "diskUsed": usage.disk_bytes.unwrap_or(0),
            "diskTotal": u64::from(limits.disk_mib) << 20,
        }]))
        .into_response())
    })
    .await
}
