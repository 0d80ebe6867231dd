//! The host side of vsock: connections between guest ports and host unix
//! streams, the packets waiting for guest receive buffers, and an event
//! loop thread that accepts host connections and forwards host data.

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::EventFd,
};

use super::{
    packet::*,
    EVENT_QUEUE, RX_QUEUE, TX_QUEUE,
};
use crate::{
    devices::virtio::{Interrupt, VirtioError},
    vstate::memory::GuestMemory,
};

/// Receive buffer the host advertises per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload read from a host stream into one packet.
const MAX_PAYLOAD: usize = 4096;
const LISTENER_TOKEN: u64 = u64::MAX;
const STOP_TOKEN: u64 = u64::MAX - 1;
/// First port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// (host port, guest port)
type Key = (u32, u32);

fn token(key: Key) -> u64 {
    (u64::from(key.0) << 32) | u64::from(key.1)
}

fn key_of(token: u64) -> Key {
    ((token >> 32) as u32, token as u32)
}

struct Connection {
    stream: UnixStream,
    /// A host-initiated connection waits for the guest's RESPONSE.
    established: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received from the guest and written to the host.
    fwd_cnt: u32,
    /// fwd_cnt when the guest last heard of it.
    last_reported_fwd_cnt: u32,
    /// Whether host input is wanted (not while the guest has no credit).
    reading: bool,
    /// Guest bytes the host stream has not taken yet: host streams are
    /// non-blocking, so a host that stops reading never stalls a vCPU.
    backlog: Vec<u8>,
    /// What epoll watches the stream for now (empty: not registered).
    watched: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, established: bool) -> Self {
        Self {
            stream,
            established,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_reported_fwd_cnt: 0,
            reading: true,
            backlog: Vec::new(),
            watched: EventSet::empty(),
        }
    }

    /// What the stream needs watching for: input while the guest has
    /// credit, room while guest bytes wait.
    fn interest(&self) -> EventSet {
        let mut interest = EventSet::empty();
        if self.reading {
            interest |= EventSet::IN;
        }
        if !self.backlog.is_empty() {
            interest |= EventSet::OUT;
        }
        interest
    }

    /// Bytes the guest can take right now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    connections: HashMap<Key, Connection>,
    pending_rx: VecDeque<(PacketHeader, Vec<u8>)>,
    pending_events: u32,
    /// A transport reset was sent and the guest has not yet handed back
    /// its event buffer (which it does once it has dropped its old
    /// connections); new host connections wait in `held_requests`, since
    /// the reset would also drop them.
    reset_unacknowledged: bool,
    held_requests: Vec<Key>,
    /// The VM is paused: host data waits in `pending_rx`, guest memory is
    /// left alone.
    paused: bool,
    next_host_port: u32,
    active: Option<(GuestMemory, Vec<Queue>, Arc<Interrupt>)>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VirtioError> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Arc::new(Epoll::new()?);
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            connections: HashMap::new(),
            pending_rx: VecDeque::new(),
            pending_events: 0,
            reset_unacknowledged: false,
            held_requests: Vec::new(),
            paused: false,
            next_host_port: FIRST_HOST_PORT,
            active: None,
        })
    }

    pub fn activate(&mut self, memory: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) {
        self.active = Some((memory, queues, interrupt));
        self.fill_rx();
    }

    pub fn queue_states(&self) -> Vec<QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |(_, queues, _)| queues.iter().map(Queue::state).collect())
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            self.fill_rx();
        }
    }

    pub fn deactivate(&mut self) {
        self.active = None;
        self.connections.clear();
        self.pending_rx.clear();
        self.held_requests.clear();
        self.pending_events = 0;
        self.reset_unacknowledged = false;
    }

    pub fn reset_connections(&mut self) {
        self.connections.clear();
        self.pending_rx.clear();
        self.held_requests.clear();
        self.pending_events += 1;
        self.reset_unacknowledged = true;
        self.deliver_events();
    }

    /// The guest made event buffers available: after a delivered reset,
    /// that means it has handled it, so held connections go ahead.
    pub fn event_buffers_returned(&mut self) {
        if self.reset_unacknowledged && self.pending_events == 0 {
            self.reset_unacknowledged = false;
            for key in std::mem::take(&mut self.held_requests) {
                if self.connections.contains_key(&key) {
                    self.send(key, OP_REQUEST, Vec::new());
                }
            }
        }
        self.deliver_events();
    }

    fn header(&self, key: Key, op: u16, len: u32) -> PacketHeader {
        let fwd_cnt = self.connections.get(&key).map_or(0, |c| c.fwd_cnt);
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn send(&mut self, key: Key, op: u16, payload: Vec<u8>) {
        let header = self.header(key, op, payload.len() as u32);
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.tx_cnt = connection.tx_cnt.wrapping_add(payload.len() as u32);
            connection.last_reported_fwd_cnt = connection.fwd_cnt;
        }
        self.pending_rx.push_back((header, payload));
    }

    fn close(&mut self, key: Key) {
        if let Some(connection) = self.connections.remove(&key) {
            if !connection.watched.is_empty() {
                let _ = self.epoll.ctl(ControlOperation::Delete, connection.stream.as_raw_fd(), EpollEvent::default());
            }
        }
    }

    /// Watches the stream of `key` for input, or stops doing so.
    fn watch(&mut self, key: Key, reading: bool) {
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.reading = reading;
            self.rewatch(key);
        }
    }

    /// Brings epoll in line with what the stream of `key` needs watching
    /// for. A stream that needs nothing leaves epoll altogether: a hung-up
    /// peer would otherwise keep reporting EPOLLHUP with nothing to read.
    fn rewatch(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else { return };
        let interest = connection.interest();
        if interest == connection.watched {
            return;
        }
        let operation = match (connection.watched.is_empty(), interest.is_empty()) {
            (true, _) => ControlOperation::Add,
            (false, true) => ControlOperation::Delete,
            (false, false) => ControlOperation::Modify,
        };
        let fd = connection.stream.as_raw_fd();
        if self.epoll.ctl(operation, fd, EpollEvent::new(interest, token(key))).is_ok() {
            connection.watched = interest;
        } else {
            self.close(key);
        }
    }

    fn add_stream(&mut self, key: Key, connection: Connection) {
        self.connections.insert(key, connection);
        self.rewatch(key);
    }

    /// Handles every packet the guest put on the tx queue.
    pub fn process_tx(&mut self) {
        let Some((memory, mut queues, interrupt)) = self.active.take() else { return };
        let mut used = false;
        while let Some(chain) = queues[TX_QUEUE].pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(&memory) {
                if let Ok(header) = reader.read_obj::<PacketHeader>() {
                    let len = (header.len as usize).min(reader.available_bytes());
                    let mut payload = vec![0u8; len];
                    if reader.read_exact(&mut payload).is_ok() {
                        self.handle_guest_packet(header, payload);
                    }
                }
            }
            used |= queues[TX_QUEUE].add_used(&memory, head, 0).is_ok();
        }
        if used {
            interrupt.signal_used_queue();
        }
        self.active = Some((memory, queues, interrupt));
    }

    fn handle_guest_packet(&mut self, header: PacketHeader, payload: Vec<u8>) {
        let key = (header.dst_port, header.src_port);
        if header.kind != TYPE_STREAM || header.dst_cid != HOST_CID {
            return;
        }
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.peer_buf_alloc = header.buf_alloc;
            connection.peer_fwd_cnt = header.fwd_cnt;
        }
        match header.op {
            OP_REQUEST => self.guest_connects(key, header),
            OP_RESPONSE => self.guest_accepted(key),
            OP_RW => self.guest_sent(key, &payload),
            OP_CREDIT_REQUEST => self.send(key, OP_CREDIT_UPDATE, Vec::new()),
            OP_SHUTDOWN if header.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH => self.reset(key),
            OP_RST => self.close(key),
            _ => {}
        }
        let credit = self.connections.get(&key).map(|c| c.peer_credit() > 0);
        if let Some(has_credit) = credit {
            self.watch(key, has_credit);
        }
    }

    /// The guest connects to host port `key.0`: dial `<uds_path>_<port>`.
    fn guest_connects(&mut self, key: Key, header: PacketHeader) {
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        match UnixStream::connect(&path) {
            Ok(stream) => {
                let mut connection = Connection::new(stream, true);
                connection.peer_buf_alloc = header.buf_alloc;
                connection.peer_fwd_cnt = header.fwd_cnt;
                self.add_stream(key, connection);
                self.send(key, OP_RESPONSE, Vec::new());
            }
            Err(_) => self.pending_rx.push_back((self.header(key, OP_RST, 0), Vec::new())),
        }
    }

    fn guest_accepted(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else {
            self.pending_rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
            return;
        };
        if !connection.established {
            connection.established = true;
            if writeln!(connection.stream, "OK {}", key.0).is_err() {
                self.reset(key);
            }
        }
    }

    fn guest_sent(&mut self, key: Key, payload: &[u8]) {
        let Some(connection) = self.connections.get_mut(&key) else {
            self.pending_rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
            return;
        };
        // The backlog is what the guest sent and the host has not taken:
        // the credit we gave bounds it, and a guest that exceeds it is cut off.
        if connection.backlog.len() + payload.len() > BUF_ALLOC as usize {
            self.reset(key);
            return;
        }
        connection.backlog.extend_from_slice(payload);
        self.flush(key);
    }

    /// Writes what the host stream takes of the backlog of `key` without
    /// blocking, and counts it as forwarded (the guest's credit grows).
    fn flush(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else { return };
        let Ok(written) = write_available(&connection.stream, &connection.backlog) else {
            self.reset(key);
            return;
        };
        connection.backlog.drain(..written);
        connection.fwd_cnt = connection.fwd_cnt.wrapping_add(written as u32);
        if connection.fwd_cnt.wrapping_sub(connection.last_reported_fwd_cnt) >= BUF_ALLOC / 2 {
            self.send(key, OP_CREDIT_UPDATE, Vec::new());
        }
        self.rewatch(key);
    }

    /// Ends the connection of `key` on both sides.
    fn reset(&mut self, key: Key) {
        self.send(key, OP_RST, Vec::new());
        self.close(key);
    }

    /// Copies pending packets into the guest's receive buffers.
    pub fn fill_rx(&mut self) {
        if self.paused {
            return;
        }
        let Some((memory, mut queues, interrupt)) = self.active.take() else { return };
        let mut used = false;
        while let Some((mut header, mut payload)) = self.pending_rx.pop_front() {
            let Some(chain) = queues[RX_QUEUE].pop_descriptor_chain(&memory) else {
                self.pending_rx.push_front((header, payload));
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&memory) else {
                used |= queues[RX_QUEUE].add_used(&memory, head, 0).is_ok();
                self.pending_rx.push_front((header, payload));
                continue;
            };
            // A buffer too small for the whole payload takes a part of it.
            let room = writer.available_bytes().saturating_sub(HEADER_LEN);
            if payload.len() > room && room > 0 {
                let rest = payload.split_off(room);
                let mut rest_header = header;
                rest_header.len = rest.len() as u32;
                self.pending_rx.push_front((rest_header, rest));
            }
            header.len = payload.len() as u32;
            let written = writer.write_obj(header).and_then(|()| writer.write_all(&payload)).map_or(0, |()| writer.bytes_written());
            used |= queues[RX_QUEUE].add_used(&memory, head, written as u32).is_ok();
        }
        if used {
            interrupt.signal_used_queue();
        }
        self.active = Some((memory, queues, interrupt));
        self.deliver_events();
    }

    fn deliver_events(&mut self) {
        if self.paused {
            return;
        }
        let Some((memory, mut queues, interrupt)) = self.active.take() else { return };
        let mut used = false;
        while self.pending_events > 0 {
            let Some(chain) = queues[EVENT_QUEUE].pop_descriptor_chain(&memory) else { break };
            let head = chain.head_index();
            let written = chain.writer(&memory).ok().and_then(|mut w| w.write_obj(EVENT_TRANSPORT_RESET).ok()).map_or(0, |()| 4);
            used |= queues[EVENT_QUEUE].add_used(&memory, head, written).is_ok();
            self.pending_events -= 1;
        }
        if used {
            interrupt.signal_used_queue();
        }
        self.active = Some((memory, queues, interrupt));
    }

    /// A host process connected: read its `CONNECT <port>` and ask the guest.
    fn accept_host(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let Some(port) = read_connect_line(&stream) else { continue };
            let key = (self.next_host_port, port);
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            self.add_stream(key, Connection::new(stream, false));
            self.watch(key, false);
            if self.reset_unacknowledged {
                self.held_requests.push(key);
            } else {
                self.send(key, OP_REQUEST, Vec::new());
            }
        }
    }

    /// Host data is ready on the connection of `key`.
    fn host_readable(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else { return };
        if !connection.established {
            return;
        }
        let limit = (connection.peer_credit() as usize).min(MAX_PAYLOAD);
        if limit == 0 {
            self.watch(key, false);
            return;
        }
        let mut data = vec![0u8; limit];
        // SAFETY: recv into a live buffer of `limit` bytes, without blocking.
        let read = unsafe { libc::recv(connection.stream.as_raw_fd(), data.as_mut_ptr().cast(), limit, libc::MSG_DONTWAIT) };
        match read {
            0 => {
                let header = PacketHeader { flags: SHUTDOWN_BOTH, ..self.header(key, OP_SHUTDOWN, 0) };
                self.pending_rx.push_back((header, Vec::new()));
                self.close(key);
            }
            n if n > 0 => {
                data.truncate(n as usize);
                self.send(key, OP_RW, data);
            }
            _ => {}
        }
    }
}

/// Reads `CONNECT <port>\n` from a new host stream (within one second),
/// then leaves the stream non-blocking.
fn read_connect_line(stream: &UnixStream) -> Option<u32> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = String::new();
    // One byte at a time, so nothing after the line is consumed.
    let mut reader = BufReader::with_capacity(1, stream);
    reader.read_line(&mut line).ok()?;
    stream.set_nonblocking(true).ok()?;
    line.trim().strip_prefix("CONNECT ")?.parse().ok()
}

/// Writes as much of `data` as `stream` takes now; the count written.
fn write_available(mut stream: &UnixStream, data: &[u8]) -> std::io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(written)
}

/// Runs the muxer's event loop until `stop` is written.
pub fn spawn_event_loop(muxer: Arc<Mutex<Muxer>>, stop: EventFd) -> Result<JoinHandle<()>, VirtioError> {
    let epoll_fd = {
        let guard = muxer.lock().unwrap_or_else(|p| p.into_inner());
        guard.epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
        Arc::clone(&guard.epoll)
    };
    let filter = crate::seccomp::filter(crate::seccomp::ThreadKind::Vsock).map_err(|e| VirtioError::Io(std::io::Error::other(e.to_string())))?;
    let thread = std::thread::Builder::new().name("vsock".into()).spawn(move || {
        if let Err(error) = crate::seccomp::apply(&filter) {
            // Never serve host streams unconfined; the device stays silent.
            eprintln!("sandbox-vmm: the vsock thread cannot install its seccomp filter: {error}");
            return;
        }
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let Ok(count) = epoll_fd.wait(-1, &mut events) else { continue };
            let mut guard = muxer.lock().unwrap_or_else(|p| p.into_inner());
            for event in &events[..count] {
                match event.data() {
                    STOP_TOKEN => return,
                    LISTENER_TOKEN => guard.accept_host(),
                    other => {
                        let ready = event.event_set();
                        if ready.contains(EventSet::OUT) {
                            guard.flush(key_of(other));
                        }
                        if ready.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
                            guard.host_readable(key_of(other));
                        }
                    }
                }
            }
            guard.fill_rx();
        }
    })?;
    Ok(thread)
}
