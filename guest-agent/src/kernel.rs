//! One kernel of a code context: the driver process (`kernels/driver.py`
//! for Jupyter kernels, `kernels/driver.js` for node), which the agent
//! feeds requests on its stdin and whose events it reads, one JSON object a
//! line, from fd 3. Its own stdout and stderr (a cell's child processes
//! write there) come through as raw output; its exit ends the kernel.

use std::{collections::HashMap, os::fd::OwnedFd, time::Duration};

use bytes::Bytes;
use sandbox_proto::api::{exec_event::Event as ExecOutput, ContextLanguage};
use serde_json::Value;
use tokio::{io::AsyncReadExt, net::unix::pipe, sync::mpsc};
use tonic::Status;

use crate::{
    process::{self, Input, ProcessSpec, RunAs, SpawnOptions},
    reaper::Reaper,
};

const JUPYTER_DRIVER: &str = include_str!("kernels/driver.py");
const NODE_DRIVER: &str = include_str!("kernels/driver.js");
/// How long a kernel has to start (ipykernel imports IPython: seconds on a
/// loaded host).
const START_DEADLINE: Duration = Duration::from_secs(90);
/// Longest event line read from a driver; longer ones are dropped.
pub const MAX_EVENT_LINE: usize = 20 * 1024 * 1024;
/// Driver stderr kept to explain a kernel that did not start.
const START_STDERR_KEPT: usize = 4096;
/// Events queued between the driver and the cell that reads them.
const QUEUE: usize = 256;

/// What a driver reports.
#[derive(Debug)]
pub enum KernelEvent {
    Ready,
    Stdout(Bytes),
    Stderr(Bytes),
    Count(u32),
    /// A MIME bundle; `main` for the cell's last expression.
    Result { data: HashMap<String, String>, main: bool },
    Error { name: String, value: String, traceback: String },
    /// JSON text handed to `__return__`.
    Return(String),
    /// The driver stopped the cell at its deadline by itself.
    TimedOut,
    /// The cell is over.
    Done,
    /// A line too long or not understood.
    Dropped(String),
    /// The driver exited; the kernel is gone.
    Exited,
}

/// A running driver. Dropping it kills its process group (the driver and
/// the Jupyter kernel it started).
pub struct Kernel {
    pid: i32,
    stdin: Input,
    pub events: mpsc::Receiver<KernelEvent>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        process::signal_group(self.pid, libc::SIGKILL);
    }
}

/// The program and arguments of a language's driver (fd 3 is the event pipe).
fn driver_argv(language: ContextLanguage) -> Result<Vec<String>, Status> {
    let argv: &[&str] = match language {
        ContextLanguage::Python => &["python3", "-c", JUPYTER_DRIVER, "python", "3"],
        ContextLanguage::Bash => &["python3", "-c", JUPYTER_DRIVER, "bash", "3"],
        ContextLanguage::Javascript => &["node", "-e", NODE_DRIVER, "3"],
        ContextLanguage::Unspecified => {
            return Err(Status::invalid_argument(
                "language is not set: use CONTEXT_LANGUAGE_PYTHON, CONTEXT_LANGUAGE_JAVASCRIPT or CONTEXT_LANGUAGE_BASH",
            ))
        }
    };
    Ok(argv.iter().map(|arg| arg.to_string()).collect())
}

/// What a kernel is started with.
#[derive(Clone)]
pub struct KernelSpec {
    pub language: ContextLanguage,
    pub cwd: String,
    pub env: HashMap<String, String>,
    pub run_as: RunAs,
}

impl Kernel {
    /// Starts the driver and waits until its kernel is ready.
    pub async fn start(reaper: &Reaper, spec: &KernelSpec) -> Result<Self, Status> {
        let argv = driver_argv(spec.language)?;
        let program = argv[0].clone();
        let process_spec =
            ProcessSpec { argv, env: spec.env.clone(), cwd: spec.cwd.clone(), timeout: None, run_as: spec.run_as };
        let (events_read, events_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Status::internal(format!("cannot create the kernel's event pipe: {e}")))?;
        let (stdin, running) = process::spawn(reaper, &process_spec, SpawnOptions { pty: None, fd3: Some(events_write) })
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => {
                    Status::failed_precondition(format!("{program} is not installed in this sandbox's image: use the full image"))
                }
                _ => status,
            })?;
        let pid = running.pid;
        let (sender, events) = mpsc::channel(QUEUE);
        let (output_tx, output_rx) = mpsc::channel(QUEUE);
        tokio::spawn(process::supervise(running, None, output_tx));
        tokio::spawn(forward_output(output_rx, sender.clone()));
        tokio::spawn(read_events(events_read, sender));
        let mut kernel = Kernel { pid, stdin, events };
        kernel.wait_ready(spec.language).await?;
        Ok(kernel)
    }

    async fn wait_ready(&mut self, language: ContextLanguage) -> Result<(), Status> {
        let mut stderr = Vec::new();
        let waited = tokio::time::timeout(START_DEADLINE, async {
            while let Some(event) = self.events.recv().await {
                match event {
                    KernelEvent::Ready => return Ok(()),
                    KernelEvent::Stderr(data) | KernelEvent::Stdout(data) => {
                        let room = START_STDERR_KEPT.saturating_sub(stderr.len());
                        stderr.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    KernelEvent::Exited => break,
                    _ => {}
                }
            }
            Err(())
        })
        .await;
        let said = String::from_utf8_lossy(&stderr).trim().to_string();
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => Err(Status::failed_precondition(format!(
                "the {} kernel did not start: {}",
                language_name(language),
                if said.is_empty() { "its driver exited without a word" } else { &said }
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the {} kernel was not ready within {START_DEADLINE:?}; the sandbox may be short of memory or CPU: {said}",
                language_name(language)
            ))),
        }
    }

    /// The driver's pid, which leads its process group.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends one request line to the driver.
    pub async fn send(&mut self, request: &Value) -> Result<(), Status> {
        let mut line = request.to_string();
        line.push('\n');
        self.stdin.write(line.as_bytes()).await.map_err(|e| Status::unavailable(format!("the kernel is gone: {e}")))
    }

    /// Asks the driver to interrupt the running cell.
    pub async fn interrupt(&mut self) {
        let _ = self.send(&serde_json::json!({ "interrupt": true })).await;
    }

    /// Drops events queued while no cell was running.
    pub fn drop_stale(&mut self) -> bool {
        while let Ok(event) = self.events.try_recv() {
            if matches!(event, KernelEvent::Exited) {
                return false;
            }
        }
        true
    }
}

pub fn language_name(language: ContextLanguage) -> &'static str {
    match language {
        ContextLanguage::Python => "python",
        ContextLanguage::Javascript => "javascript",
        ContextLanguage::Bash => "bash",
        ContextLanguage::Unspecified => "unspecified",
    }
}

/// Passes the driver's own stdout and stderr on, then its exit.
async fn forward_output(mut output: mpsc::Receiver<Result<sandbox_proto::api::ExecEvent, Status>>, sender: mpsc::Sender<KernelEvent>) {
    while let Some(Ok(event)) = output.recv().await {
        let event = match event.event {
            Some(ExecOutput::Stdout(data)) => KernelEvent::Stdout(data),
            Some(ExecOutput::Stderr(data)) => KernelEvent::Stderr(data),
            Some(ExecOutput::Exit(_)) => KernelEvent::Exited,
            Some(ExecOutput::Started(_)) | None => continue,
        };
        if sender.send(event).await.is_err() {
            return;
        }
    }
    let _ = sender.send(KernelEvent::Exited).await;
}

/// Reads the driver's event lines from fd 3, dropping lines over
/// [`MAX_EVENT_LINE`].
async fn read_events(fd: OwnedFd, sender: mpsc::Sender<KernelEvent>) {
    let Ok(mut receiver) = pipe::Receiver::from_owned_fd(fd) else { return };
    let mut line = Vec::new();
    let mut overlong = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match receiver.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for piece in buf[..n].split_inclusive(|&b| b == b'\n') {
            let complete = piece.ends_with(b"\n");
            if !overlong {
                line.extend_from_slice(piece);
                if line.len() > MAX_EVENT_LINE {
                    overlong = true;
                    line = Vec::new();
                }
            }
            if complete {
                let event = if overlong {
                    KernelEvent::Dropped(format!("an output of more than {} MiB", MAX_EVENT_LINE >> 20))
                } else {
                    parse_event(&line)
                };
                line.clear();
                overlong = false;
                if sender.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One driver line as an event.
fn parse_event(line: &[u8]) -> KernelEvent {
    let dropped = || KernelEvent::Dropped("a kernel message that is not understood".into());
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(line) else { return dropped() };
    let Some((kind, value)) = object.into_iter().next() else { return dropped() };
    let text = |value: &Value, key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    match (kind.as_str(), value) {
        ("ready", _) => KernelEvent::Ready,
        ("done", _) => KernelEvent::Done,
        ("timeout", _) => KernelEvent::TimedOut,
        ("stdout", Value::String(s)) => KernelEvent::Stdout(Bytes::from(s)),
        ("stderr", Value::String(s)) => KernelEvent::Stderr(Bytes::from(s)),
        ("count", Value::Number(n)) => KernelEvent::Count(n.as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32),
        ("return", Value::String(s)) => KernelEvent::Return(s),
        ("error", value) => KernelEvent::Error {
            name: text(&value, "name"),
            value: text(&value, "value"),
            traceback: text(&value, "traceback"),
        },
        ("result", value) => {
            let data = value
                .get("data")
                .and_then(Value::as_object)
                .map(|bundle| {
                    bundle.iter().map(|(mime, v)| (mime.clone(), v.as_str().map_or_else(|| v.to_string(), String::from))).collect()
                })
                .unwrap_or_default();
            KernelEvent::Result { data, main: value.get("main").and_then(Value::as_bool).unwrap_or(false) }
        }
        _ => dropped(),
    }
}
