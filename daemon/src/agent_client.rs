//! Connects to a guest agent's gRPC server over a unix socket and waits
//! until it answers `Hello`.

use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use sandbox_proto::agent::{agent_client::AgentClient, HelloRequest};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// Largest message exchanged with an agent; the public API enforces smaller ones.
pub const MAX_AGENT_MESSAGE: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("agent at {path} did not answer Hello within {waited:?}: {last_error}")]
    NoHello { path: PathBuf, waited: Duration, last_error: String },
}

/// A lazily connecting channel to the agent listening at `socket`.
pub fn unix_channel(socket: PathBuf) -> Channel {
    // The URI is required by the endpoint but never resolved: the connector
    // below always dials the unix socket.
    Endpoint::from_static("http://agent.local")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
}

/// Wraps a channel in an agent client with the daemon's message limits.
pub fn client(channel: Channel) -> AgentClient<Channel> {
    AgentClient::new(channel)
        .max_decoding_message_size(MAX_AGENT_MESSAGE)
        .max_encoding_message_size(MAX_AGENT_MESSAGE)
}

/// Retries `Hello` until the agent answers or `timeout` passes.
pub async fn wait_for_hello(
    socket: PathBuf,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let mut agent = client(unix_channel(socket.clone()));
        let last_error = match agent.hello(HelloRequest {}).await {
            Ok(_) => return Ok(agent),
            Err(status) => status.message().to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(AgentClientError::NoHello { path: socket, waited: timeout, last_error });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
