//! Connects to a guest agent's gRPC server, over a unix socket (jail) or
//! over the VMM's vsock unix socket with a `CONNECT <port>` handshake
//! (microVM), and waits until it answers `Hello`.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper_util::rt::TokioIo;
use sandbox_proto::agent::{agent_client::AgentClient, HelloRequest, RefreshRequest};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// Largest message exchanged with an agent; the public API enforces smaller ones.
pub const MAX_AGENT_MESSAGE: usize = 32 * 1024 * 1024;

/// Where an agent listens.
#[derive(Clone, Debug)]
pub enum AgentAddress {
    /// A unix socket served by the agent itself.
    Unix(PathBuf),
    /// A guest vsock port, reached through the VMM's host-side unix socket.
    Vsock { uds: PathBuf, port: u32 },
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Unix(path) => write!(f, "{}", path.display()),
            AgentAddress::Vsock { uds, port } => write!(f, "vsock port {port} via {}", uds.display()),
        }
    }
}

impl AgentAddress {
    /// Opens one byte stream to the agent.
    async fn dial(&self) -> std::io::Result<UnixStream> {
        match self {
            AgentAddress::Unix(path) => UnixStream::connect(path).await,
            AgentAddress::Vsock { uds, port } => {
                let mut stream = UnixStream::connect(uds).await?;
                stream.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                let reply = read_line_unbuffered(&mut stream).await?;
                if !reply.starts_with("OK ") {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!("the VMM refused CONNECT {port}: {:?}", reply.trim()),
                    ));
                }
                Ok(stream)
            }
        }
    }
}

/// Reads the handshake reply byte by byte, so that none of the agent's
/// first HTTP/2 bytes, which may follow at once, are consumed.
async fn read_line_unbuffered(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(32);
    while line.len() < 128 {
        match stream.read_u8().await? {
            b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            byte => line.push(byte),
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the VMM's handshake reply is too long"))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("the agent at {address} did not answer Hello within {waited:?}: {last_error}")]
    NoHello { address: AgentAddress, waited: Duration, last_error: String },
    #[error("the agent refused the clock and entropy refresh: {0}")]
    RefreshRefused(String),
    #[error("the agent did not take the clock and entropy refresh within {REFRESH_TIMEOUT:?}")]
    RefreshTimeout,
}

/// How long a guest's agent has to take the clock and entropy refresh.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// Gives a guest the wall-clock time and fresh entropy before it is handed
/// out, so that guests cloned from one snapshot never share RNG state.
pub async fn refresh(mut agent: AgentClient<Channel>) -> Result<(), AgentClientError> {
    let request = RefreshRequest {
        wall_clock_unix_ns: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        entropy: crate::ids::random_bytes::<64>().to_vec().into(),
    };
    match tokio::time::timeout(REFRESH_TIMEOUT, agent.refresh(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(AgentClientError::RefreshRefused(status.message().to_string())),
        Err(_) => Err(AgentClientError::RefreshTimeout),
    }
}

/// A lazily connecting channel to the agent at `address`.
pub fn channel(address: AgentAddress) -> Channel {
    // The URI is required by the endpoint but never resolved: the connector
    // below always dials the unix socket.
    Endpoint::from_static("http://agent.local")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(service_fn(move |_| {
            let address = address.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(address.dial().await?)) }
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
    address: AgentAddress,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let mut agent = client(channel(address.clone()));
        // A guest that accepts the connection but never answers must not
        // hold the caller past its deadline.
        let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
        let last_error = match tokio::time::timeout(left, agent.hello(HelloRequest {})).await {
            Ok(Ok(_)) => return Ok(agent),
            Ok(Err(status)) => status.message().to_string(),
            Err(_) => "the connection opened but Hello got no answer".to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(AgentClientError::NoHello { address, waited: timeout, last_error });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
