//! Byte streams from the daemon to TCP services inside the sandbox: the
//! agent connects to 127.0.0.1:PORT in the sandbox's own network and
//! copies bytes both ways until either side ends. This is how a service
//! the sandbox runs is reached from outside (the daemon's E2B data
//! plane); the sandbox network itself stays closed.

use std::net::Ipv4Addr;

use bytes::Bytes;
use sandbox_proto::agent::PortData;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tonic::{Status, Streaming};

use crate::slots::Slots;

/// Largest piece of data sent back in one message.
const CHUNK: usize = 64 * 1024;
/// Forwarded connections open at once.
const MAX_OPEN: usize = 256;

static OPEN: Slots = Slots::new(MAX_OPEN, "forwarded connections");

/// Connects to the port the first message names and relays the rest.
pub async fn forward(mut inbound: Streaming<PortData>) -> Result<mpsc::Receiver<Result<PortData, Status>>, Status> {
    let slot = OPEN.take()?;
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("ForwardPort needs a first message naming the port"))?;
    let port = u16::try_from(first.port)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {} is not a TCP port (1-65535)", first.port)))?;
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.map_err(|error| match error.kind() {
        std::io::ErrorKind::ConnectionRefused => Status::unavailable(format!(
            "port {port} is not open in the sandbox: nothing listens on 127.0.0.1:{port} (start the service, and bind it to 0.0.0.0 or 127.0.0.1)"
        )),
        _ => Status::internal(format!("cannot connect to port {port} in the sandbox: {error}")),
    })?;
    let _ = stream.set_nodelay(true);
    let (mut from_service, mut to_service) = stream.into_split();
    tokio::spawn(async move {
        let mut data = first.data;
        loop {
            if !data.is_empty() && to_service.write_all(&data).await.is_err() {
                break;
            }
            match inbound.message().await {
                Ok(Some(message)) => data = message.data,
                Ok(None) | Err(_) => break,
            }
        }
        let _ = to_service.shutdown().await;
    });
    let (replies, stream) = mpsc::channel(8);
    tokio::spawn(async move {
        let _slot = slot;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let read = tokio::select! {
                read = from_service.read(&mut buf) => read,
                () = replies.closed() => return,
            };
            let n = match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if replies.send(Ok(PortData { port: 0, data: Bytes::copy_from_slice(&buf[..n]) })).await.is_err() {
                return;
            }
        }
    });
    Ok(stream)
}
