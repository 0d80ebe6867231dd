//! Starts processes for Exec, Connect and RunCode, reads their output into
//! their [`Process`] record and records how they exited, with a reason.
//! Every process leads its own session and process group, so timeouts,
//! signals and disconnects reach all of it.

use std::{
    collections::HashMap,
    os::{fd::OwnedFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use sandbox_proto::api::{exit_status::Outcome, ExecEvent, ExecRequest, ExitReason, ExitStatus};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tonic::Status;

use crate::{
    processes::{self, Process},
    pty::{self, PtyMaster},
    reaper::{Ended, Reaper},
};

/// Largest stdout/stderr event.
const CHUNK: usize = 64 * 1024;
/// How long output is still drained after the process exits, for
/// descendants that keep its pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(250);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOME: &str = "/home/user";
/// Uid and gid of the sandbox user.
const USER_ID: u32 = 1000;

/// Who a process runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// The sandbox user (uid 1000): the default.
    User,
    /// Root of the sandbox.
    Root,
}

impl RunAs {
    pub fn parse(user: &str) -> Result<Self, Status> {
        match user {
            "" | "user" => Ok(RunAs::User),
            "root" => Ok(RunAs::Root),
            other => Err(Status::invalid_argument(format!(
                "user '{other}' is unknown: use \"user\" (the default) or \"root\""
            ))),
        }
    }

    /// The uid and gid to switch to (or to give files to), when the agent
    /// can (it runs as root).
    pub fn ids(self) -> Option<u32> {
        // SAFETY: geteuid has no preconditions.
        (self == RunAs::User && unsafe { libc::geteuid() } == 0).then_some(USER_ID)
    }
}

pub type EventSender = mpsc::Sender<Result<ExecEvent, Status>>;

/// A validated request to start a process.
pub struct ProcessSpec {
    pub argv: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: String,
    pub timeout: Option<Duration>,
    pub run_as: RunAs,
}

impl ProcessSpec {
    pub fn from_request(request: ExecRequest) -> Result<Self, Status> {
        if request.argv.is_empty() || request.argv[0].is_empty() {
            return Err(Status::invalid_argument(
                "argv is empty: pass the program and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"]",
            ));
        }
        let cwd = if request.cwd.is_empty() {
            if Path::new(HOME).is_dir() { HOME.to_string() } else { "/".to_string() }
        } else if Path::new(&request.cwd).is_dir() {
            request.cwd
        } else {
            return Err(Status::invalid_argument(format!(
                "cwd '{}' is not a directory in the sandbox: create it with Files.MakeDir or pass an existing one",
                request.cwd
            )));
        };
        let timeout = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
        let run_as = RunAs::parse(&request.user)?;
        Ok(Self { argv: request.argv, env: request.env, cwd, timeout, run_as })
    }

    fn command(&self, terminal: bool) -> Command {
        let mut command = Command::new(&self.argv[0]);
        command.args(&self.argv[1..]).env_clear().current_dir(&self.cwd);
        let (user, home) = match self.run_as {
            RunAs::User => ("user", HOME),
            RunAs::Root => ("root", "/root"),
        };
        command.env("PATH", DEFAULT_PATH).env("HOME", home).env("LANG", "C.UTF-8").env("USER", user).env("LOGNAME", user);
        if let Some(id) = self.run_as.ids() {
            command.uid(id).gid(id);
        }
        if terminal {
            command.env("TERM", "xterm-256color");
        }
        command.envs(&self.env);
        command
    }
}

/// Where a process's stdin goes.
pub enum Input {
    Pipe(pipe::Sender),
    Pty(Arc<PtyMaster>),
}

impl Input {
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Input::Pipe(sender) => sender.write_all(data).await,
            Input::Pty(master) => master.write_all(data).await,
        }
    }
}

enum Output {
    Pipe(pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

impl Output {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Output::Pipe(receiver) => receiver.read(buf).await,
            Output::Pty(master) => master.read(buf).await,
        }
    }
}

/// A started process, apart from its input.
pub struct Running {
    pub pid: i32,
    pub pty: Option<Arc<PtyMaster>>,
    outputs: Vec<(bool, Output)>,
    ended: oneshot::Receiver<Ended>,
    /// The kernel's OOM kill count when it started (see [`oom_kills`]).
    oom_kills_at_start: Option<u64>,
}

/// Options beyond the spec: a terminal size, and one more fd for the child.
#[derive(Default)]
pub struct SpawnOptions {
    pub pty: Option<(u16, u16)>,
    /// Becomes fd 3 in the child.
    pub fd3: Option<OwnedFd>,
}

/// Checks that `program` names an executable file, directly or on `path`.
/// Done before forking: a failed exec in the child would be reaped by the
/// central reaper and could leave the spawner waiting on a child it lost.
fn require_program(program: &str, path: &str, cwd: &str) -> Result<(), Status> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |candidate: &Path| {
        std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(&Path::new(cwd).join(program))
    } else {
        path.split(':').any(|dir| executable(&Path::new(dir).join(program)))
    };
    if found {
        Ok(())
    } else {
        Err(spawn_error(program, std::io::Error::from(std::io::ErrorKind::NotFound)))
    }
}

/// Starts `spec` in a new session; returns its stdin and the rest.
pub fn spawn(reaper: &Reaper, spec: &ProcessSpec, options: SpawnOptions) -> Result<(Input, Running), Status> {
    require_program(&spec.argv[0], spec.env.get("PATH").map_or(DEFAULT_PATH, String::as_str), &spec.cwd)?;
    let terminal = options.pty.is_some();
    let mut command = spec.command(terminal);
    let master = match options.pty {
        Some((rows, cols)) => {
            let (master, slave) = pty::open(rows, cols).map_err(|e| Status::internal(e.to_string()))?;
            if let Some(id) = spec.run_as.ids() {
                // The terminal belongs to whoever runs on it.
                nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&slave), Some(id.into()), Some(id.into()))
                    .map_err(|e| Status::internal(format!("cannot hand the terminal to the sandbox user: {e}")))?;
            }
            let clone = |fd: &OwnedFd| fd.try_clone().map_err(|e| Status::internal(format!("cannot share the terminal: {e}")));
            command.stdin(clone(&slave)?).stdout(clone(&slave)?).stderr(slave);
            Some(Arc::new(master))
        }
        None => {
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            None
        }
    };
    let fd3 = options.fd3.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (setsid, ioctl, dup2, fcntl).
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = fd3 {
                let moved = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let oom_kills_at_start = oom_kills();
    let (mut child, ended) = reaper.spawn(&mut command).map_err(|error| spawn_error(&spec.argv[0], error))?;
    drop(command);
    let pid = child.id() as i32;
    let (input, outputs) = match &master {
        Some(master) => (Input::Pty(Arc::clone(master)), vec![(true, Output::Pty(Arc::clone(master)))]),
        None => {
            let pipe_in = |fd: OwnedFd| pipe::Sender::from_owned_fd(fd);
            let pipe_out = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd);
            let io = |e: std::io::Error| Status::internal(format!("cannot attach to the process's pipes: {e}"));
            let stdin = child.stdin.take().map(OwnedFd::from).ok_or_else(|| Status::internal("no stdin pipe"))?;
            let stdout = child.stdout.take().map(OwnedFd::from).ok_or_else(|| Status::internal("no stdout pipe"))?;
            let stderr = child.stderr.take().map(OwnedFd::from).ok_or_else(|| Status::internal("no stderr pipe"))?;
            (
                Input::Pipe(pipe_in(stdin).map_err(io)?),
                vec![(true, Output::Pipe(pipe_out(stdout).map_err(io)?)), (false, Output::Pipe(pipe_out(stderr).map_err(io)?))],
            )
        }
    };
    Ok((input, Running { pid, pty: master, outputs, ended, oom_kills_at_start }))
}

fn spawn_error(program: &str, error: std::io::Error) -> Status {
    match error.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(format!(
            "program '{program}' was not found in the sandbox: check PATH or pass an absolute path"
        )),
        std::io::ErrorKind::PermissionDenied => Status::permission_denied(format!(
            "program '{program}' is not executable: check its mode (chmod +x)"
        )),
        _ => Status::internal(format!("cannot start '{program}': {error}")),
    }
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: i32, signal: i32) {
    // SAFETY: kill(2) with plain integers; a stale group gives ESRCH, which is harmless.
    unsafe { libc::kill(-pid, signal) };
}

/// Supervises a process outside the table (RunCode's): streams `started`,
/// its output and its exit into `events`, and kills its process group when
/// the receiver of `events` goes away first.
pub async fn supervise(running: Running, timeout: Option<Duration>, events: EventSender) {
    let process = Process::untracked(&running);
    processes::stream_into(process.reader_from_start(), true, events);
    supervise_into(running, timeout, process).await;
}

/// Reads the output of `running` into `process` and records its exit, with
/// its reason; kills the process group when `timeout` passes.
pub async fn supervise_into(running: Running, timeout: Option<Duration>, process: Arc<Process>) {
    let Running { outputs, ended, oom_kills_at_start, .. } = running;
    let mut readers = JoinSet::new();
    for (is_stdout, output) in outputs {
        readers.spawn(pump(output, is_stdout, Arc::clone(&process)));
    }
    let (ended, timed_out) = wait_for_exit(&process, ended, timeout).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, async { while readers.join_next().await.is_some() {} }).await;
    readers.abort_all();
    process.finish(exit_status(ended, timed_out, process.killed_by_agent(), oom_kills_at_start));
}

async fn wait_for_exit(process: &Process, mut ended: oneshot::Receiver<Ended>, timeout: Option<Duration>) -> (Ended, bool) {
    let lost = Ended::Signal(libc::SIGKILL);
    let Some(timeout) = timeout else { return (ended.await.unwrap_or(lost), false) };
    if let Ok(status) = tokio::time::timeout(timeout, &mut ended).await {
        return (status.unwrap_or(lost), false);
    }
    process.signal(libc::SIGKILL);
    (ended.await.unwrap_or(lost), true)
}

/// The exit as the API reports it. A SIGKILL the agent did not send while
/// the kernel's OOM kill count rose is taken for the OOM killer's.
fn exit_status(ended: Ended, timed_out: bool, killed_by_agent: bool, oom_kills_at_start: Option<u64>) -> ExitStatus {
    let (outcome, reason) = match ended {
        Ended::Code(code) => (Outcome::Code(code), ExitReason::Exited),
        Ended::Signal(signal) => {
            let oom = signal == libc::SIGKILL
                && !killed_by_agent
                && oom_kills_at_start.zip(oom_kills()).is_some_and(|(before, now)| now > before);
            (Outcome::Signal(signal), if oom { ExitReason::OomKilled } else { ExitReason::Signaled })
        }
    };
    let reason = if timed_out { ExitReason::TimedOut } else { reason };
    ExitStatus { outcome: Some(outcome), timed_out, reason: reason as i32 }
}

/// The kernel's count of OOM kills that can reach the agent's processes:
/// `oom_kill` of the agent's cgroup (v2) when it is readable, else of
/// /proc/vmstat (the guest's own in a microVM, the host's in a jail).
fn oom_kills() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
    let cgroup_events = cgroup
        .as_deref()
        .and_then(|text| text.lines().find_map(|line| line.strip_prefix("0::")))
        .map(|path| format!("/sys/fs/cgroup{}/memory.events", path.trim_end_matches('/')));
    cgroup_events
        .and_then(|events| counter(&events, "oom_kill"))
        .or_else(|| counter("/proc/vmstat", "oom_kill"))
}

/// The value of `name` in a file of `name value` lines.
fn counter(file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| match line.split_once(' ') {
        Some((key, value)) if key == name => value.trim().parse().ok(),
        _ => None,
    })
}

async fn pump(mut output: Output, is_stdout: bool, process: Arc<Process>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match output.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => process.append(is_stdout, Bytes::copy_from_slice(&buf[..n])).await,
        }
    }
}

/// Writes `data` to the process's stdin, then closes it.
pub fn feed_stdin(mut input: Input, data: Bytes) {
    tokio::spawn(async move {
        if !data.is_empty() {
            let _ = input.write(&data).await;
        }
        drop(input);
    });
}
