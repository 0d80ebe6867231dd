//! The process table: every process started by Exec or Connect, running or
//! recently exited, with the last [`OUTPUT_BUFFER_BYTES`] of its output
//! (stdout and stderr in one offset space). A client lists them, reattaches
//! after a disconnect and replays what it missed, or retries an Exec under
//! an idempotency key without running it twice. Everything here is bounded:
//! running and exited entries, buffered output, the argv List shows.
//!
//! Output flows from the pumps of [`crate::process::supervise_into`] into a
//! [`Process`]'s buffer, and from there to every attached [`Reader`]. An
//! attached reader holds back eviction of output it has not read yet, so a
//! connected client loses nothing (the process waits, as it would on a
//! full pipe) unless it stops reading for [`READER_STALL`].

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use sandbox_proto::api::{exec_event::Event, ExecEvent, ExitStatus, ProcessInfo, ProcessStarted};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::{
    process::{self, EventSender, Input, Running},
    pty::PtyMaster,
};

/// Output kept per process, stdout and stderr together.
pub const OUTPUT_BUFFER_BYTES: u64 = 1 << 20;
/// Pieces of output kept per process, which bounds their bookkeeping
/// when a process writes a byte at a time.
const MAX_CHUNKS: usize = 16 * 1024;
/// Small reads of one stream are merged into pieces up to this size.
const MERGE_BYTES: usize = 4096;
/// Output kept by all exited processes together; the oldest exits go first.
const EXITED_OUTPUT_BYTES: u64 = 16 << 20;
/// Processes of the table that may run at once.
const MAX_RUNNING: usize = 128;
/// Exited processes kept listable, the most recent first...
const MAX_EXITED: usize = 64;
/// ...for at most this long after their exit.
const EXITED_TTL: Duration = Duration::from_secs(600);
/// Bytes of argv (each argument counted with one more byte) List shows.
const LIST_ARGV_BYTES: usize = 4096;
/// Longest idempotency key.
const MAX_KEY_BYTES: usize = 256;
/// How long output waits for an attached reader that does not read before
/// that reader stops holding the buffer back (it then sees a gap).
const READER_STALL: Duration = Duration::from_secs(30);
/// Events queued per stream towards its client.
const STREAM_QUEUE: usize = 16;
/// Writes queued towards one process's stdin; more wait for room.
const STDIN_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "process '{0}' is not in this sandbox's process table: it never existed here, or it exited more than \
         {minutes} minutes ago or before the last {MAX_EXITED} exits; see Processes.List",
        minutes = EXITED_TTL.as_secs() / 60
    )]
    UnknownHandle(String),
    #[error(
        "{MAX_RUNNING} processes started by Exec or Connect are still running in this sandbox: wait for some to \
         exit or kill them (Processes.List shows them) before starting more"
    )]
    Full,
    #[error("idempotency_key is {0} bytes, over the limit of {MAX_KEY_BYTES}: use a shorter key, such as a UUID")]
    KeyTooLong(usize),
    #[error(
        "idempotency_key {key:?} already started process '{handle}' with a different argv: use a new key for a \
         different command"
    )]
    KeyReused { key: String, handle: String },
    #[error(
        "from_offset {from} is past the {end} bytes process '{handle}' has written so far: attach from at most {end} \
         (Processes.List shows output_bytes)"
    )]
    OffsetPastEnd { handle: String, from: u64, end: u64 },
    #[error("tag is {0} bytes, over the limit of {MAX_KEY_BYTES}: use a shorter tag")]
    TagTooLong(usize),
    #[error(
        "the stdin of process '{0}' is closed: start it with open_stdin (or a terminal) to send input later, and \
         send none after `close`"
    )]
    StdinClosed(String),
    #[error("process '{0}' has exited: signals and resizes reach running processes only")]
    Exited(String),
    #[error("process '{0}' does not run on a terminal: only processes started with a `pty` can be resized")]
    NoTerminal(String),
}

impl From<TableError> for Status {
    fn from(error: TableError) -> Self {
        let message = error.to_string();
        match error {
            TableError::UnknownHandle(_) => Status::not_found(message),
            TableError::Full => Status::resource_exhausted(message),
            TableError::KeyTooLong(_) | TableError::TagTooLong(_) => Status::invalid_argument(message),
            TableError::StdinClosed(_) | TableError::Exited(_) | TableError::NoTerminal(_) => {
                Status::failed_precondition(message)
            }
            TableError::KeyReused { .. } => Status::failed_precondition(message),
            TableError::OffsetPastEnd { .. } => Status::out_of_range(message),
        }
    }
}

/// One piece of output as it was read, at its offset.
struct Chunk {
    offset: u64,
    stdout: bool,
    data: Bytes,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// What changes while a process runs.
#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    /// Offset of the next byte written: all output so far.
    end: u64,
    /// Next offset each attached reader needs, by reader id; output a
    /// reader needs is not evicted.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    exit: Option<ExitStatus>,
    exited_at: Option<(Instant, i64)>,
}

impl State {
    fn oldest(&self) -> u64 {
        self.chunks.front().map_or(self.end, |chunk| chunk.offset)
    }

    fn kept(&self) -> u64 {
        self.end - self.oldest()
    }

    fn full(&self, incoming: u64) -> bool {
        self.kept() + incoming > OUTPUT_BUFFER_BYTES || self.chunks.len() >= MAX_CHUNKS
    }

    /// Appends `data` at the end, merged into the last piece when both are
    /// small and of the same stream (readers address output by offset, so
    /// a merged piece serves them alike).
    fn push(&mut self, stdout: bool, data: Bytes) {
        let offset = self.end;
        self.end += data.len() as u64;
        if let Some(last) = self.chunks.back_mut().filter(|last| last.stdout == stdout) {
            if last.data.len() + data.len() <= MERGE_BYTES {
                let mut merged = bytes::BytesMut::with_capacity(last.data.len() + data.len());
                merged.extend_from_slice(&last.data);
                merged.extend_from_slice(&data);
                last.data = merged.freeze();
                return;
            }
        }
        self.chunks.push_back(Chunk { offset, stdout, data });
    }

    /// Evicts the oldest output until `incoming` more bytes fit. Without
    /// `force`, stops (returning false) at output a reader still needs;
    /// with it, such readers stop holding the buffer back.
    fn make_room(&mut self, incoming: u64, force: bool) -> bool {
        while self.full(incoming) {
            let Some(front_end) = self.chunks.front().map(Chunk::end) else { break };
            if self.readers.values().any(|&next| next < front_end) {
                if !force {
                    return false;
                }
                self.readers.retain(|_, next| *next >= front_end);
            }
            self.chunks.pop_front();
        }
        true
    }

    /// The output at or after `from` (from the oldest byte kept when
    /// `from` is older), up to the end of one chunk.
    fn output_from(&self, from: u64) -> Option<(u64, bool, Bytes)> {
        let index = self.chunks.partition_point(|chunk| chunk.end() <= from);
        let chunk = self.chunks.get(index)?;
        let skip = from.saturating_sub(chunk.offset);
        Some((chunk.offset + skip, chunk.stdout, chunk.data.slice(skip as usize..)))
    }
}

/// A process started by Exec, Connect or RunCode, and its buffered output.
pub struct Process {
    pub handle: String,
    pub pid: i32,
    /// The terminal it runs on, for Connect streams that attach to it.
    pub pty: Option<Arc<PtyMaster>>,
    argv_shown: Vec<String>,
    argv_truncated: bool,
    argv_fingerprint: u64,
    key: String,
    labels: Labels,
    started_at_unix_ms: i64,
    /// The queue towards its stdin, while that is open.
    stdin: Mutex<Option<mpsc::Sender<StdinOp>>>,
    /// Set when the agent sent SIGKILL (timeout, disconnect, a Connect signal).
    killed_by_agent: AtomicBool,
    state: Mutex<State>,
    /// Bumped when output is appended or the exit is known.
    output_changed: watch::Sender<()>,
    /// Bumped when a reader advances or leaves.
    reader_moved: watch::Sender<()>,
}

impl Process {
    /// A process that is in no table (RunCode's): no handle, no key.
    pub fn untracked(running: &Running) -> Arc<Self> {
        Arc::new(Self::new(String::new(), running, &[], String::new(), Labels::default()))
    }

    fn new(handle: String, running: &Running, argv: &[String], key: String, labels: Labels) -> Self {
        let (argv_shown, argv_truncated) = clipped(argv);
        Self {
            handle,
            pid: running.pid,
            pty: running.pty.clone(),
            argv_shown,
            argv_truncated,
            argv_fingerprint: fingerprint(argv),
            key,
            labels,
            started_at_unix_ms: unix_ms(),
            stdin: Mutex::new(None),
            killed_by_agent: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            output_changed: watch::Sender::new(()),
            reader_moved: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_running(&self) -> bool {
        self.lock().exit.is_none()
    }

    fn exited_at(&self) -> Option<Instant> {
        self.lock().exited_at.map(|(at, _)| at)
    }

    fn output_kept(&self) -> u64 {
        self.lock().kept()
    }

    /// Sends `signal` to the process group; remembers a SIGKILL as the agent's.
    pub fn signal(&self, signal: i32) {
        if signal == libc::SIGKILL {
            self.killed_by_agent.store(true, Ordering::Relaxed);
        }
        process::signal_group(self.pid, signal);
    }

    pub fn killed_by_agent(&self) -> bool {
        self.killed_by_agent.load(Ordering::Relaxed)
    }

    /// Adds output read from the process. Waits while attached readers still
    /// need the output that would make room, for at most [`READER_STALL`].
    pub async fn append(&self, stdout: bool, data: Bytes) {
        let incoming = data.len() as u64;
        let deadline = tokio::time::Instant::now() + READER_STALL;
        let mut force = false;
        loop {
            let mut moved = self.reader_moved.subscribe();
            {
                let mut state = self.lock();
                if state.make_room(incoming, force) {
                    state.push(stdout, data);
                    drop(state);
                    self.output_changed.send_modify(|()| {});
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, moved.changed()).await.is_err() {
                tracing::warn!(handle = %self.handle, "a client stopped reading for {READER_STALL:?}; its output buffer moves on without it");
                force = true;
            }
        }
    }

    /// Keeps `input` open for [`Process::write_input`]: a task writes what
    /// is queued, in order, so a process that does not read its input
    /// never holds up the caller for longer than the queue takes.
    pub fn open_input(&self, input: Input) {
        let (queue, pending) = mpsc::channel(STDIN_QUEUE);
        tokio::spawn(write_stdin(input, pending));
        *self.stdin.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(queue);
    }

    /// Queues `data` for the process's stdin; with `close`, then ends it
    /// (end-of-file; ^D on a terminal).
    pub async fn write_input(&self, data: Bytes, close: bool) -> Result<(), TableError> {
        let queue = {
            let mut slot = self.stdin.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if close { slot.take() } else { slot.clone() }
        };
        let queue = queue.ok_or_else(|| TableError::StdinClosed(self.handle.clone()))?;
        let closed = || TableError::StdinClosed(self.handle.clone());
        if !data.is_empty() {
            queue.send(StdinOp::Data(data)).await.map_err(|_| closed())?;
        }
        if close {
            queue.send(StdinOp::Close).await.map_err(|_| closed())?;
        }
        Ok(())
    }

    /// Sends `signal` to the process group of a process still running.
    pub fn signal_running(&self, signal: i32) -> Result<(), TableError> {
        if !self.is_running() {
            return Err(TableError::Exited(self.handle.clone()));
        }
        self.signal(signal);
        Ok(())
    }

    /// Resizes the terminal the process runs on.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), TableError> {
        let master = self.pty.as_ref().ok_or_else(|| TableError::NoTerminal(self.handle.clone()))?;
        if !self.is_running() {
            return Err(TableError::Exited(self.handle.clone()));
        }
        // A terminal whose process just exited cannot be resized; nothing is lost.
        let _ = master.resize(rows, cols);
        Ok(())
    }

    /// Records the exit; readers deliver it after the output.
    pub fn finish(&self, exit: ExitStatus) {
        // Its stdin goes with it (no ^D to a terminal no one reads).
        drop(self.stdin.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
        let mut state = self.lock();
        state.exit = Some(exit);
        state.exited_at = Some((Instant::now(), unix_ms()));
        drop(state);
        self.output_changed.send_modify(|()| {});
    }

    /// A reader of the output from `from` (or the oldest byte kept), then the exit.
    pub fn reader(self: &Arc<Self>, from: u64) -> Result<Reader, TableError> {
        let mut state = self.lock();
        if from > state.end {
            return Err(TableError::OffsetPastEnd { handle: self.handle.clone(), from, end: state.end });
        }
        Ok(self.register(&mut state, from))
    }

    /// A reader of all the output still kept, then the exit.
    pub fn reader_from_start(self: &Arc<Self>) -> Reader {
        let mut state = self.lock();
        self.register(&mut state, 0)
    }

    fn register(self: &Arc<Self>, state: &mut State, from: u64) -> Reader {
        let next = from.max(state.oldest());
        let id = state.next_reader;
        state.next_reader += 1;
        state.readers.insert(id, next);
        Reader { process: Arc::clone(self), id, next, resume_offset: next, exit_sent: false }
    }

    fn info(&self) -> ProcessInfo {
        let state = self.lock();
        ProcessInfo {
            handle: self.handle.clone(),
            pid: self.pid as u32,
            argv: self.argv_shown.clone(),
            argv_truncated: self.argv_truncated,
            started_at_unix_ms: self.started_at_unix_ms,
            exit: state.exit,
            exited_at_unix_ms: state.exited_at.map_or(0, |(_, ms)| ms),
            output_bytes: state.end,
            output_oldest_offset: state.oldest(),
            idempotency_key: self.key.clone(),
            pty: self.pty.is_some(),
            tag: self.labels.tag.clone(),
            env: self.labels.env.clone(),
            cwd: self.labels.cwd.clone(),
        }
    }
}

/// One client's position in a process's output.
pub struct Reader {
    process: Arc<Process>,
    id: u64,
    next: u64,
    resume_offset: u64,
    exit_sent: bool,
}

impl Reader {
    fn started(&self) -> ExecEvent {
        let started = ProcessStarted {
            pid: self.process.pid as u32,
            handle: self.process.handle.clone(),
            resume_offset: self.resume_offset,
        };
        ExecEvent { event: Some(Event::Started(started)), offset: 0 }
    }

    /// The next output event, then the exit, then None; waits for them.
    async fn next_event(&mut self) -> Option<ExecEvent> {
        loop {
            let mut changed = self.process.output_changed.subscribe();
            match self.ready() {
                Ready::Event(event) => return Some(event),
                Ready::Done => return None,
                Ready::Pending => {}
            }
            // The sender lives in the process this reader holds.
            let _ = changed.changed().await;
        }
    }

    fn ready(&mut self) -> Ready {
        let mut state = self.process.lock();
        if let Some((offset, stdout, data)) = state.output_from(self.next) {
            self.next = offset + data.len() as u64;
            if let Some(next) = state.readers.get_mut(&self.id) {
                *next = self.next;
            }
            drop(state);
            self.process.reader_moved.send_modify(|()| {});
            let event = if stdout { Event::Stdout(data) } else { Event::Stderr(data) };
            return Ready::Event(ExecEvent { event: Some(event), offset });
        }
        match state.exit {
            Some(exit) if !self.exit_sent => {
                self.exit_sent = true;
                Ready::Event(ExecEvent { event: Some(Event::Exit(exit)), offset: 0 })
            }
            Some(_) => Ready::Done,
            None => Ready::Pending,
        }
    }
}

enum Ready {
    Event(ExecEvent),
    Done,
    Pending,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.process.lock().readers.remove(&self.id);
        self.process.reader_moved.send_modify(|()| {});
    }
}

pub type EventStream = mpsc::Receiver<Result<ExecEvent, Status>>;

/// Streams `reader` (started, output, exit) to a client. When the client
/// goes away first and `kill_on_disconnect` is set, kills the process group.
pub fn stream(reader: Reader, kill_on_disconnect: bool) -> EventStream {
    let (events, stream) = mpsc::channel(STREAM_QUEUE);
    stream_into(reader, kill_on_disconnect, events);
    stream
}

/// [`stream`] into a channel the caller made.
pub fn stream_into(reader: Reader, kill_on_disconnect: bool, events: EventSender) {
    tokio::spawn(async move {
        let process = Arc::clone(&reader.process);
        if !deliver(reader, &events).await && kill_on_disconnect && process.is_running() {
            tracing::info!(handle = %process.handle, pid = process.pid, "client went away; killing the process group");
            process.signal(libc::SIGKILL);
        }
    });
}

/// Sends everything `reader` yields; false when the client went away first.
async fn deliver(mut reader: Reader, events: &EventSender) -> bool {
    if events.send(Ok(reader.started())).await.is_err() {
        return false;
    }
    loop {
        let event = tokio::select! {
            event = reader.next_event() => event,
            () = events.closed() => return false,
        };
        let Some(event) = event else { return true };
        if events.send(Ok(event)).await.is_err() {
            return false;
        }
    }
}

/// What Processes.List shows of a process besides its argv.
#[derive(Clone, Default)]
pub struct Labels {
    pub tag: String,
    pub env: HashMap<String, String>,
    pub cwd: String,
}

pub enum StdinOp {
    Data(Bytes),
    Close,
}

/// Writes queued stdin in order; on close, ends the input (^D on a
/// terminal). When the queue goes away unclosed (the process exited),
/// just stops.
async fn write_stdin(mut input: Input, mut pending: mpsc::Receiver<StdinOp>) {
    while let Some(op) = pending.recv().await {
        match op {
            StdinOp::Data(data) => {
                let _ = input.write(&data).await;
            }
            StdinOp::Close => {
                if matches!(input, Input::Pty(_)) {
                    let _ = input.write(b"\x04").await;
                }
                return;
            }
        }
    }
}

/// What [`ProcessTable::start`] found or made.
pub enum Started {
    /// A new process: its stdin and the parts its supervisor takes.
    New(Arc<Process>, Input, Running),
    /// The process an earlier request with the same idempotency key started.
    Existing(Arc<Process>),
}

/// The processes of this sandbox started by Exec and Connect.
#[derive(Default)]
pub struct ProcessTable {
    entries: Mutex<Vec<Arc<Process>>>,
    started: AtomicU64,
}

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Process>>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the process `key` already started, or starts one with `spawn`.
    pub fn start(
        &self,
        key: &str,
        argv: &[String],
        labels: Labels,
        spawn: impl FnOnce() -> Result<(Input, Running), Status>,
    ) -> Result<Started, Status> {
        if key.len() > MAX_KEY_BYTES {
            return Err(TableError::KeyTooLong(key.len()).into());
        }
        if labels.tag.len() > MAX_KEY_BYTES {
            return Err(TableError::TagTooLong(labels.tag.len()).into());
        }
        // Held across the spawn, so two requests with one key start one process.
        let mut entries = self.lock();
        prune(&mut entries);
        if let Some(existing) = entries.iter().find(|process| !key.is_empty() && process.key == key) {
            if existing.argv_fingerprint != fingerprint(argv) {
                return Err(TableError::KeyReused { key: key.to_string(), handle: existing.handle.clone() }.into());
            }
            return Ok(Started::Existing(Arc::clone(existing)));
        }
        if entries.iter().filter(|process| process.is_running()).count() >= MAX_RUNNING {
            return Err(TableError::Full.into());
        }
        let (input, running) = spawn()?;
        let handle = format!("p{}", self.started.fetch_add(1, Ordering::Relaxed) + 1);
        let process = Arc::new(Process::new(handle, &running, argv, key.to_string(), labels));
        entries.push(Arc::clone(&process));
        Ok(Started::New(process, input, running))
    }

    pub fn find(&self, handle: &str) -> Result<Arc<Process>, TableError> {
        let mut entries = self.lock();
        prune(&mut entries);
        entries
            .iter()
            .find(|process| process.handle == handle)
            .cloned()
            .ok_or_else(|| TableError::UnknownHandle(handle.to_string()))
    }

    /// Every running process and the recently exited ones, oldest first.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut entries = self.lock();
        prune(&mut entries);
        entries.iter().map(|process| process.info()).collect()
    }
}

/// Drops exited processes past [`EXITED_TTL`], then the oldest exits
/// beyond [`MAX_EXITED`] or [`EXITED_OUTPUT_BYTES`] of output.
fn prune(entries: &mut Vec<Arc<Process>>) {
    let now = Instant::now();
    entries.retain(|process| process.exited_at().is_none_or(|at| now.duration_since(at) < EXITED_TTL));
    let mut exits: Vec<(Instant, u64)> =
        entries.iter().filter_map(|process| Some((process.exited_at()?, process.output_kept()))).collect();
    exits.sort_unstable();
    let mut bytes = 0;
    let kept_from = exits
        .iter()
        .rev()
        .take(MAX_EXITED)
        .take_while(|(_, kept)| {
            bytes += kept;
            bytes <= EXITED_OUTPUT_BYTES
        })
        .last()
        .map(|(at, _)| *at);
    if !exits.is_empty() {
        entries.retain(|process| process.exited_at().is_none_or(|at| kept_from.is_some_and(|from| at >= from)));
    }
}

/// `argv` cut to [`LIST_ARGV_BYTES`], and whether anything was cut.
fn clipped(argv: &[String]) -> (Vec<String>, bool) {
    let mut budget = LIST_ARGV_BYTES;
    let mut shown = Vec::new();
    for arg in argv {
        if arg.len() < budget {
            budget -= arg.len() + 1;
            shown.push(arg.clone());
        } else {
            let cut = (0..=budget).rev().find(|&at| arg.is_char_boundary(at)).unwrap_or(0);
            shown.push(arg[..cut].to_string());
            return (shown, true);
        }
    }
    (shown, false)
}

/// Tells argvs apart without keeping them whole.
fn fingerprint(argv: &[String]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    argv.hash(&mut hasher);
    hasher.finish()
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(pieces: &[(bool, &[u8])]) -> State {
        let mut state = State::default();
        for (stdout, data) in pieces {
            state.push(*stdout, Bytes::copy_from_slice(data));
        }
        state
    }

    #[test]
    fn small_reads_of_one_stream_merge_and_are_read_from_any_offset() {
        let state = state_with(&[(true, b"1\n"), (true, b"2\n"), (false, b"oops"), (true, b"3\n")]);
        assert_eq!(state.chunks.len(), 3, "stdout, stderr, stdout");
        assert_eq!(state.output_from(1), Some((1, true, Bytes::from_static(b"\n2\n"))));
        assert_eq!(state.output_from(4), Some((4, false, Bytes::from_static(b"oops"))));
        assert_eq!(state.output_from(8), Some((8, true, Bytes::from_static(b"3\n"))));
        assert_eq!(state.output_from(10), None, "nothing past the end");
    }

    #[test]
    fn a_reader_holds_back_eviction_until_forced() {
        let big = vec![b'x'; MERGE_BYTES];
        let mut state = State::default();
        while state.kept() + big.len() as u64 <= OUTPUT_BUFFER_BYTES {
            state.push(true, Bytes::copy_from_slice(&big));
        }
        state.readers.insert(0, 0);
        assert!(!state.make_room(big.len() as u64, false), "the reader has read nothing yet");
        assert_eq!(state.oldest(), 0);
        state.readers.insert(0, big.len() as u64);
        assert!(state.make_room(big.len() as u64, false), "the reader moved past the oldest piece");
        assert_eq!(state.oldest(), big.len() as u64);
        state.push(true, Bytes::copy_from_slice(&big));
        assert!(state.make_room(big.len() as u64, true));
        assert!(state.readers.is_empty(), "a forced eviction releases the reader, which then sees a gap");
        assert!(state.kept() + big.len() as u64 <= OUTPUT_BUFFER_BYTES);
        assert_eq!(state.output_from(0).map(|(offset, ..)| offset), Some(state.oldest()), "old offsets start at the oldest kept");
    }

    #[test]
    fn byte_sized_writes_are_bounded_by_the_piece_count() {
        let mut state = State::default();
        for index in 0..MAX_CHUNKS + 10 {
            assert!(state.make_room(1, false));
            state.push(index % 2 == 0, Bytes::from_static(b"x"));
        }
        assert_eq!(state.chunks.len(), MAX_CHUNKS);
        assert_eq!(state.end, (MAX_CHUNKS + 10) as u64);
    }

    #[test]
    fn list_shows_a_bounded_argv() {
        let (shown, cut) = clipped(&["sh".into(), "-c".into(), "echo hi".into()]);
        assert_eq!((shown.len(), cut), (3, false));
        let (shown, cut) = clipped(&["x".repeat(10_000), "more".into()]);
        assert_eq!((shown.len(), shown[0].len(), cut), (1, LIST_ARGV_BYTES, true));
        let (shown, cut) = clipped(&vec![String::new(); 10_000]);
        assert_eq!((shown.len(), cut), (LIST_ARGV_BYTES + 1, true), "empty arguments count too");
        let (shown, _) = clipped(&["é".repeat(LIST_ARGV_BYTES)]);
        assert!(shown[0].len() <= LIST_ARGV_BYTES && shown[0].chars().all(|c| c == 'é'), "cut on a character boundary");
    }
}
