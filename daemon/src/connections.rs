//! Admission of API connections: at most `max_connections` open at once
//! (TCP and unix socket together), a deadline for a new connection's HTTP/2
//! preface, and accept errors (such as running out of file descriptors)
//! that back off instead of spinning. When full, the oldest connection
//! still waiting for its preface is closed to make room, so sockets that
//! never speak cannot lock real clients out. Established connections are
//! kept alive by HTTP/2 pings (see the server's settings), which also end
//! those whose peer stopped answering.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, oneshot},
    time::Sleep,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// The HTTP/2 client preface and the header of the SETTINGS frame after it.
const PREFACE_BYTES: usize = 24 + 9;
/// Pause after an accept failed for lack of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on the API's connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// How long a new connection has to send its HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// Counts the open connections of every listener.
pub struct Gate {
    limits: ConnectionLimits,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    open: usize,
    next_serial: u64,
    /// Connections still waiting for their preface, oldest first; dropping
    /// a sender closes its connection.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Gate {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self { limits, state: Mutex::new(GateState::default()) })
    }

    /// Closes every connection that has not sent its preface (at shutdown,
    /// so that none holds the graceful stop up).
    pub fn close_waiting(&self) {
        self.lock().waiting.clear();
    }

    /// Admits one more connection; when full, closes the oldest one still
    /// waiting for its preface. `None`: full of established connections.
    fn admit(self: &Arc<Self>) -> Option<(Ticket, oneshot::Receiver<()>)> {
        let mut state = self.lock();
        let max = self.limits.max_connections;
        if state.open >= max {
            // Closed connections count until their tasks drop them; past
            // this ceiling the closing cannot keep up, so refuse instead.
            let ceiling = max + max / 4 + 1;
            let oldest = state.waiting.keys().next().copied();
            match oldest {
                Some(serial) if state.open < ceiling => drop(state.waiting.remove(&serial)),
                _ => return None,
            }
        }
        state.open += 1;
        let serial = state.next_serial;
        state.next_serial += 1;
        let (close, closed) = oneshot::channel();
        state.waiting.insert(serial, close);
        Some((Ticket { gate: Arc::clone(self), serial }, closed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One admitted connection's place; freed when dropped.
struct Ticket {
    gate: Arc<Gate>,
    serial: u64,
}

impl Ticket {
    fn established(&self) {
        self.gate.lock().waiting.remove(&self.serial);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.open = state.open.saturating_sub(1);
        state.waiting.remove(&self.serial);
    }
}

/// A stream of admitted connections from `accept`, for tonic's
/// `serve_with_incoming`. It ends when the server drops it.
pub fn incoming<S, F, Fut>(gate: Arc<Gate>, mut accept: F) -> ReceiverStream<io::Result<Guarded<S>>>
where
    S: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<S>> + Send,
{
    let (admitted, stream) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = accept() => accepted,
                () = admitted.closed() => return,
            };
            match accepted {
                Ok(connection) => {
                    let Some((ticket, closed)) = gate.admit() else {
                        tracing::debug!("refusing an API connection: every slot holds an established connection");
                        continue;
                    };
                    let guarded = Guarded::new(connection, ticket, closed, gate.limits.handshake_timeout);
                    if admitted.send(Ok(guarded)).await.is_err() {
                        return;
                    }
                }
                Err(error) if out_of_resources(&error) => {
                    tracing::warn!(%error, "cannot accept an API connection; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(error) => tracing::debug!(%error, "an API connection failed while it was accepted"),
            }
        }
    });
    ReceiverStream::new(stream)
}

fn out_of_resources(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// A connection that is closed if its preface does not arrive in time, or
/// when the gate needs its place before then.
pub struct Guarded<S> {
    inner: S,
    ticket: Ticket,
    waiting: Option<Waiting>,
}

/// A connection's state until its preface arrived.
struct Waiting {
    received: usize,
    deadline: Pin<Box<Sleep>>,
    closed: oneshot::Receiver<()>,
}

impl<S> Guarded<S> {
    fn new(inner: S, ticket: Ticket, closed: oneshot::Receiver<()>, timeout: Duration) -> Self {
        let waiting = Waiting { received: 0, deadline: Box::pin(tokio::time::sleep(timeout)), closed };
        Self { inner, ticket, waiting: Some(waiting) }
    }
}

impl Waiting {
    /// Why the connection must close now, if it must.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface within the handshake timeout"));
        }
        if Pin::new(&mut self.closed).poll(cx).is_ready() {
            return Some(io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room for a newer connection"));
        }
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.waiting.as_mut().and_then(|waiting| waiting.poll_closed(cx)) {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(waiting)) = (&result, this.waiting.as_mut()) {
            waiting.received += buf.filled().len() - before;
            if waiting.received >= PREFACE_BYTES {
                this.waiting = None;
                this.ticket.established();
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize) -> Arc<Gate> {
        Gate::new(ConnectionLimits { max_connections: max, handshake_timeout: Duration::from_secs(10) })
    }

    #[tokio::test]
    async fn a_full_gate_closes_the_oldest_silent_connection() {
        let gate = gate(2);
        let (first, mut first_closed) = gate.admit().unwrap();
        let (second, _second_closed) = gate.admit().unwrap();
        second.established();
        let (_third, _) = gate.admit().expect("room is made by closing the silent one");
        let told = first_closed.try_recv();
        assert_eq!(told, Err(oneshot::error::TryRecvError::Closed), "the oldest silent connection is told to close");
        drop(first);
        let (_fourth, _) = gate.admit().expect("the third is still silent and can be closed");
        assert_eq!(gate.lock().open, 3, "the closed ones stop counting once dropped");
    }

    #[tokio::test]
    async fn established_connections_are_never_closed_for_room() {
        let gate = gate(1);
        let (only, _) = gate.admit().unwrap();
        only.established();
        assert!(gate.admit().is_none());
        drop(only);
        assert!(gate.admit().is_some());
    }

    #[tokio::test]
    async fn a_silent_connection_times_out() {
        let (client, server) = tokio::io::duplex(64);
        let gate = Gate::new(ConnectionLimits { max_connections: 4, handshake_timeout: Duration::from_millis(50) });
        let (ticket, closed) = gate.admit().unwrap();
        let mut guarded = Guarded::new(server, ticket, closed, gate.limits.handshake_timeout);
        let mut buf = [0u8; 8];
        let error = tokio::io::AsyncReadExt::read(&mut guarded, &mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(client);
    }
}
