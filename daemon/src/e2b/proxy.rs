//! Requests for a sandbox port other than envd's: HTTP/1.1 to the
//! service the sandbox runs on that port, carried over the agent's
//! ForwardPort stream (the agent dials 127.0.0.1:PORT inside the sandbox).
//! The host never dials an address or path the guest controls, and the
//! service never sees the caller's credentials.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    body::Body,
    http::{uri::PathAndQuery, Request, Uri},
    response::{IntoResponse, Response},
};
use hyper_util::rt::TokioIo;
use sandbox_proto::agent::{agent_client::AgentClient, PortData};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{E2bError, Shared, Target};

/// Bytes buffered in each direction of a forwarded connection.
const BUFFER: usize = 64 * 1024;
/// Headers that carry the caller's credentials or routing, never forwarded.
const PRIVATE_HEADERS: &[&str] = &["x-access-token", "e2b-traffic-access-token", "x-api-key", "e2b-sandbox-id", "e2b-sandbox-port"];

pub async fn forward(shared: &Arc<Shared>, target: Target, peer: SocketAddr, request: Request<Body>) -> Response {
    let started = Instant::now();
    let caller = match shared.sandbox_caller(request.headers(), peer, &target, "E2B.Port") {
        Ok(caller) => caller,
        Err(error) => {
            super::drain(request.into_body()).await;
            return error.into_response();
        }
    };
    let result = async {
        let handle = shared.manager.agent(&caller, &target.sandbox).await.map_err(E2bError::on_data_plane)?;
        let tunnel = open(handle.agent, target.port).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
            .await
            .map_err(|e| E2bError::PortClosed(format!("the service on port {} did not take the connection: {e}", target.port)))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(private_removed(request))
            .await
            .map_err(|e| E2bError::PortClosed(format!("the service on port {} did not answer: {e}", target.port)))?;
        Ok::<_, E2bError>(response.map(Body::new))
    }
    .await;
    let outcome = match &result {
        Ok(response) => response.status().as_u16().to_string(),
        Err(error) => error.status().as_u16().to_string(),
    };
    shared.record(&caller, &target.sandbox, "E2B.Port", started, &outcome);
    result.unwrap_or_else(|error| port_error(&target, error))
}

/// E2B's proxy error for a sandbox port: 502 with `sandboxId`.
fn port_error(target: &Target, error: E2bError) -> Response {
    let status = error.status();
    let body = serde_json::json!({ "sandboxId": target.sandbox, "port": target.port, "code": status.as_u16(), "message": error.to_string() });
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The request as the service gets it: origin-form target, no credentials.
fn private_removed(mut request: Request<Body>) -> Request<Body> {
    for name in PRIVATE_HEADERS {
        request.headers_mut().remove(*name);
    }
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    request
}

/// A byte stream to `port` in the sandbox, through the agent.
async fn open(mut agent: AgentClient<Channel>, port: u16) -> Result<DuplexStream, E2bError> {
    let (to_agent, outbound) = mpsc::channel(8);
    let _ = to_agent.send(PortData { port: port.into(), data: Default::default() }).await;
    let mut inbound = agent.forward_port(ReceiverStream::new(outbound)).await.map_err(|status| match status.code() {
        tonic::Code::Unavailable => E2bError::PortClosed(status.message().to_string()),
        _ => E2bError::Agent(status),
    })?.into_inner();
    let (ours, theirs) = tokio::io::duplex(BUFFER);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; BUFFER];
        while let Ok(n) = from_client.read(&mut buf).await {
            if n == 0 || to_agent.send(PortData { port: 0, data: buf[..n].to_vec().into() }).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if to_client.write_all(&message.data).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    Ok(ours)
}
