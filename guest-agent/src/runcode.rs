//! RunCode: runs a snippet with python3, node or sh, and collects its
//! output and the JSON value it handed to `__return__` over fd 3.

use std::{
    collections::HashMap,
    io::Write,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use sandbox_proto::api::{exec_event::Event, Language, RunCodeRequest, RunCodeResponse};
use tokio::{io::AsyncReadExt, net::unix::pipe, sync::mpsc};
use tonic::Status;

use crate::{
    process::{self, ProcessSpec, SpawnOptions},
    reaper::Reaper,
};

/// Output kept per stream; the rest is dropped with a note on stderr.
const OUTPUT_CAP: usize = 16 * 1024 * 1024;

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

pub async fn run(reaper: &Reaper, request: RunCodeRequest) -> Result<RunCodeResponse, Status> {
    let interpreter = interpreter(request.language)?;
    let run_as = process::RunAs::parse(&request.user)?;
    let script = write_script(&interpreter, &request.code)?;
    let result = run_script(reaper, &interpreter, script.path(), request.env, request.timeout_ms, run_as).await;
    drop(script);
    result
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

async fn run_script(
    reaper: &Reaper,
    interpreter: &Interpreter,
    script: &Path,
    env: HashMap<String, String>,
    timeout_ms: u64,
    run_as: process::RunAs,
) -> Result<RunCodeResponse, Status> {
    let spec = ProcessSpec {
        argv: std::iter::once(interpreter.program)
            .chain(interpreter.args.iter().copied())
            .map(String::from)
            .chain(std::iter::once(script.display().to_string()))
            .collect(),
        env,
        cwd: if Path::new("/home/user").is_dir() { "/home/user".into() } else { "/".into() },
        timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
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
    let result = tokio::spawn(read_results(result_read));
    let (events_tx, mut events_rx) = mpsc::channel(64);
    drop(input);
    let supervisor = tokio::spawn(process::supervise(running, spec.timeout, events_tx));
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    let (mut stdout_cut, mut stderr_cut) = (false, false);
    while let Some(event) = events_rx.recv().await {
        match event?.event {
            Some(Event::Stdout(data)) => stdout_cut |= append_capped(&mut stdout, &data),
            Some(Event::Stderr(data)) => stderr_cut |= append_capped(&mut stderr, &data),
            Some(Event::Exit(status)) => exit = Some(status),
            Some(Event::Started(_)) | None => {}
        }
    }
    let _ = supervisor.await;
    // Descendants may hold fd 3 open; the values written so far are enough.
    let returned = match tokio::time::timeout(Duration::from_millis(250), result).await {
        Ok(Ok(text)) => text,
        _ => String::new(),
    };
    for (cut, stream) in [(stdout_cut, "stdout"), (stderr_cut, "stderr")] {
        if cut {
            let note = format!("\nsandbox: {stream} was cut at {} MiB; write large output to a file and download it\n", OUTPUT_CAP >> 20);
            stderr.extend_from_slice(note.as_bytes());
        }
    }
    let result_json = validated_json(&returned, &mut stderr);
    Ok(RunCodeResponse { stdout: stdout.into(), stderr: stderr.into(), exit, result_json })
}

/// Keeps output up to the cap; returns whether anything was dropped.
fn append_capped(buffer: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = OUTPUT_CAP.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

/// Reads every value handed to `__return__`; keeps the last line.
async fn read_results(fd: OwnedFd) -> String {
    let Ok(mut receiver) = pipe::Receiver::from_owned_fd(fd) else { return String::new() };
    let mut text = Vec::new();
    let _ = receiver.read_to_end(&mut text).await;
    let text = String::from_utf8_lossy(&text);
    text.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or_default().trim().to_string()
}

/// Keeps valid JSON; explains anything else on stderr.
fn validated_json(text: &str, stderr: &mut Vec<u8>) -> String {
    if text.is_empty() {
        return String::new();
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => value.to_string(),
        Err(error) => {
            stderr.extend_from_slice(format!("\nsandbox: the value given to __return__ is not valid JSON ({error})\n").as_bytes());
            String::new()
        }
    }
}
