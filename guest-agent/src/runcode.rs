//! RunCode without a context: runs a snippet with python3, node or sh,
//! streams its output and ends with its exit and the JSON value it handed
//! to `__return__` over fd 3. Also what both kinds of run share: the
//! output budget of one call and the collection of a stream into the
//! unary RunCode's response.

use std::{
    io::Write,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use sandbox_proto::api::{
    exec_event::Event, run_code_event::Event as CodeEvent, Language, RunCodeEnd, RunCodeEvent, RunCodeRequest,
    RunCodeResponse,
};
use tokio::{io::AsyncReadExt, net::unix::pipe, sync::mpsc};
use tonic::Status;

use crate::{
    process::{self, ProcessSpec, SpawnOptions},
    reaper::Reaper,
};

/// Output of one call (stdout, stderr, results and errors together); the
/// rest is dropped and the end says so.
const OUTPUT_CAP: usize = 16 * 1024 * 1024;

/// What is left of a call's output allowance.
#[derive(Default)]
pub struct OutputBudget {
    used: usize,
}

impl OutputBudget {
    /// Passes `event` if it fits (stdout and stderr are cut to fit);
    /// None when it is dropped.
    pub fn admit(&mut self, event: CodeEvent) -> Option<CodeEvent> {
        let room = OUTPUT_CAP.saturating_sub(self.used);
        let size = match &event {
            CodeEvent::Stdout(data) | CodeEvent::Stderr(data) => data.len(),
            CodeEvent::Result(result) => result.data.iter().map(|(k, v)| k.len() + v.len()).sum(),
            CodeEvent::Error(error) => error.name.len() + error.value.len() + error.traceback.len(),
            CodeEvent::ExecutionCount(_) | CodeEvent::End(_) => 0,
        };
        if size <= room {
            self.used += size;
            return Some(event);
        }
        self.used = OUTPUT_CAP;
        match event {
            CodeEvent::Stdout(data) if room > 0 => Some(CodeEvent::Stdout(data.slice(..room))),
            CodeEvent::Stderr(data) if room > 0 => Some(CodeEvent::Stderr(data.slice(..room))),
            _ => None,
        }
    }
}

/// Python runs the user's file through this bootstrap, which installs
/// `__return__` as a builtin: the file stays untouched, so `from __future__`
/// imports and traceback line numbers work.
const PYTHON_BOOTSTRAP: &str = "import builtins, json, os, runpy, sys\n\
def __return__(value):\n    os.write(3, (json.dumps(value) + '\\n').encode())\n\
builtins.__return__ = __return__\n\
sys.argv = sys.argv[1:]\n\
runpy.run_path(sys.argv[0], run_name='__main__')\n";
const NODE_PRELUDE: &str =
    "const __return__ = (value) => require('fs').writeSync(3, JSON.stringify(value) + '\\n');\n";
const SH_PRELUDE: &str = "__return__() { printf '%s' \"$1\" | tr '\\n' ' ' >&3; printf '\\n' >&3; }\n";

struct Interpreter {
    program: &'static str,
    /// Arguments before the script's path.
    args: &'static [&'static str],
    /// Code written into the script before the user's.
    prelude: &'static str,
    extension: &'static str,
}

fn interpreter(language: i32) -> Result<Interpreter, Status> {
    match Language::try_from(language) {
        Ok(Language::Python) => {
            Ok(Interpreter { program: "python3", args: &["-c", PYTHON_BOOTSTRAP], prelude: "", extension: "py" })
        }
        Ok(Language::Node) => Ok(Interpreter { program: "node", args: &[], prelude: NODE_PRELUDE, extension: "js" }),
        Ok(Language::Sh) => Ok(Interpreter { program: "sh", args: &[], prelude: SH_PRELUDE, extension: "sh" }),
        _ => Err(Status::invalid_argument(
            "language is not set or unknown: use LANGUAGE_PYTHON, LANGUAGE_NODE or LANGUAGE_SH",
        )),
    }
}

pub type EventSender = mpsc::Sender<Result<RunCodeEvent, Status>>;

/// Starts the snippet; its events go to `events`, ending with `end`.
pub fn start(reaper: &Reaper, request: RunCodeRequest, events: EventSender) -> Result<(), Status> {
    let interpreter = interpreter(request.language)?;
    let run_as = process::RunAs::parse(&request.user)?;
    let script = write_script(&interpreter, &request.code)?;
    let spec = ProcessSpec {
        argv: std::iter::once(interpreter.program)
            .chain(interpreter.args.iter().copied())
            .map(String::from)
            .chain(std::iter::once(script.path().display().to_string()))
            .collect(),
        env: request.env,
        cwd: if Path::new("/home/user").is_dir() { "/home/user".into() } else { "/".into() },
        timeout: (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms)),
        run_as,
    };
    let (result_read, result_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Status::internal(format!("cannot create the result pipe: {e}")))?;
    let (input, running) = process::spawn(reaper, &spec, SpawnOptions { pty: None, fd3: Some(result_write) }).map_err(|status| {
        if status.code() == tonic::Code::NotFound {
            Status::failed_precondition(format!("{} is not installed in this sandbox's image", interpreter.program))
        } else {
            status
        }
    })?;
    drop(input);
    let result = tokio::spawn(read_results(result_read));
    let (output_tx, output_rx) = mpsc::channel(64);
    tokio::spawn(process::supervise(running, spec.timeout, output_tx));
    tokio::spawn(async move {
        let end = stream_output(output_rx, &events).await;
        // Descendants may hold fd 3 open; the values written so far are enough.
        let returned = match tokio::time::timeout(Duration::from_millis(250), result).await {
            Ok(Ok(text)) => text,
            _ => String::new(),
        };
        drop(script);
        let end = end.map(|mut end| {
            end.result_json = match validated_json(&returned) {
                Ok(json) => json,
                Err(note) => {
                    let _ = events.try_send(Ok(RunCodeEvent { event: Some(CodeEvent::Stderr(note.into())) }));
                    String::new()
                }
            };
            end
        });
        let _ = events.send(end.map(|end| RunCodeEvent { event: Some(CodeEvent::End(end)) })).await;
    });
    Ok(())
}

/// Passes the process's output on within the budget; returns the end so far.
async fn stream_output(
    mut output: mpsc::Receiver<Result<sandbox_proto::api::ExecEvent, Status>>,
    events: &EventSender,
) -> Result<RunCodeEnd, Status> {
    let (mut budget, mut end) = (OutputBudget::default(), RunCodeEnd::default());
    while let Some(event) = output.recv().await {
        let event = match event?.event {
            Some(Event::Stdout(data)) => CodeEvent::Stdout(data),
            Some(Event::Stderr(data)) => CodeEvent::Stderr(data),
            Some(Event::Exit(status)) => {
                end.timed_out = status.timed_out;
                end.exit = Some(status);
                continue;
            }
            Some(Event::Started(_)) | None => continue,
        };
        match budget.admit(event) {
            Some(event) => {
                if events.send(Ok(RunCodeEvent { event: Some(event) })).await.is_err() {
                    // The client left: dropping `output` kills the process group.
                    return Err(Status::cancelled("the client went away"));
                }
            }
            None => end.output_truncated = true,
        }
    }
    Ok(end)
}

/// Gathers a RunCode stream into the unary RunCode's response.
pub async fn collect(mut events: mpsc::Receiver<Result<RunCodeEvent, Status>>) -> Result<RunCodeResponse, Status> {
    let mut response = RunCodeResponse::default();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(event) = events.recv().await {
        match event?.event {
            Some(CodeEvent::Stdout(data)) => stdout.extend_from_slice(&data),
            Some(CodeEvent::Stderr(data)) => stderr.extend_from_slice(&data),
            Some(CodeEvent::Result(result)) => response.results.push(result),
            Some(CodeEvent::Error(error)) => response.error = Some(error),
            Some(CodeEvent::ExecutionCount(count)) => response.execution_count = count,
            Some(CodeEvent::End(end)) => {
                if end.output_truncated {
                    let note = format!("\nsandbox: output was cut at {} MiB; write large output to a file and download it\n", OUTPUT_CAP >> 20);
                    stderr.extend_from_slice(note.as_bytes());
                }
                response.exit = end.exit;
                response.result_json = end.result_json;
                response.timed_out = end.timed_out;
                response.context_restarted = end.context_restarted;
                response.output_truncated = end.output_truncated;
                break;
            }
            None => {}
        }
    }
    response.stdout = stdout.into();
    response.stderr = stderr.into();
    Ok(response)
}

/// The code, written to a file of its own, removed when dropped.
struct Script(PathBuf);

impl Script {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_script(interpreter: &Interpreter, code: &str) -> Result<Script, Status> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let serial = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(".sandbox-run-{}-{serial}.{}", std::process::id(), interpreter.extension));
    let cannot_write = |e: std::io::Error| {
        Status::resource_exhausted(format!("cannot write the code to {}: {e}; free space in /tmp", path.display()))
    };
    // create_new refuses an existing path, so a planted symlink is never followed.
    let mut file = std::fs::File::create_new(&path).map_err(cannot_write)?;
    let script = Script(path.clone());
    file.write_all(interpreter.prelude.as_bytes()).and_then(|()| file.write_all(code.as_bytes())).map_err(cannot_write)?;
    Ok(script)
}

/// Reads every value handed to `__return__`; keeps the last line.
async fn read_results(fd: OwnedFd) -> String {
    let Ok(mut receiver) = pipe::Receiver::from_owned_fd(fd) else { return String::new() };
    let mut text = Vec::new();
    let _ = receiver.read_to_end(&mut text).await;
    let text = String::from_utf8_lossy(&text);
    text.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or_default().trim().to_string()
}

/// Keeps valid JSON (compacted); anything else is explained in the error.
pub fn validated_json(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Ok(String::new());
    }
    serde_json::from_str::<serde_json::Value>(text)
        .map(|value| value.to_string())
        .map_err(|error| format!("\nsandbox: the value given to __return__ is not valid JSON ({error})\n"))
}
