//! Code contexts: a table of persistent kernels ([`Kernel`]), at most
//! [`MAX_CONTEXTS`] per sandbox, and the running of one cell in one of them:
//! its events streamed as they come, its output bounded, its deadline
//! enforced by an interrupt and, when the kernel does not stop, a restart.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicI32, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sandbox_proto::api::{
    run_code_event::Event, CodeContext, CodeError, CodeResult, ContextLanguage, CreateContextRequest, RunCodeEnd,
    RunCodeEvent, RunCodeRequest,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    kernel::{language_name, Kernel, KernelEvent, KernelSpec},
    process::RunAs,
    reaper::Reaper,
    runcode::{validated_json, OutputBudget},
};

/// Contexts one sandbox may hold.
pub const MAX_CONTEXTS: usize = 16;
/// A cell's deadline when the request names none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
/// How long an interrupted kernel has to finish its cell before it is
/// started again.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

pub type EventSender = mpsc::Sender<Result<RunCodeEvent, Status>>;

struct Context {
    id: String,
    spec: KernelSpec,
    created_at_unix_ms: i64,
    execution_count: AtomicU32,
    /// The driver's process group, to kill a kernel while a cell holds it.
    kernel_pid: AtomicI32,
    /// The kernel, held by the running cell (cells run one at a time) and
    /// by restarts. None while a restart is starting it again.
    kernel: tokio::sync::Mutex<Option<Kernel>>,
}

impl Context {
    fn kill_kernel(&self) {
        crate::process::signal_group(self.kernel_pid.load(Ordering::Relaxed), libc::SIGKILL);
    }

    fn info(&self) -> CodeContext {
        CodeContext {
            id: self.id.clone(),
            language: self.spec.language as i32,
            cwd: self.spec.cwd.clone(),
            user: match self.spec.run_as {
                RunAs::User => "user".into(),
                RunAs::Root => "root".into(),
            },
            execution_count: self.execution_count.load(Ordering::Relaxed),
            created_at_unix_ms: self.created_at_unix_ms,
        }
    }
}

pub struct Contexts {
    reaper: Reaper,
    table: Mutex<HashMap<String, Arc<Context>>>,
    /// Contexts being created, counted against the limit.
    starting: AtomicU32,
}

impl Contexts {
    pub fn new(reaper: Reaper) -> Self {
        Self { reaper, table: Mutex::default(), starting: AtomicU32::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn find(&self, id: &str) -> Result<Arc<Context>, Status> {
        self.lock().get(id).cloned().ok_or_else(|| {
            Status::not_found(format!("code context '{id}' does not exist in this sandbox: create one with CreateContext, or call ListContexts"))
        })
    }

    pub async fn create(&self, request: CreateContextRequest) -> Result<CodeContext, Status> {
        let language = ContextLanguage::try_from(request.language).unwrap_or(ContextLanguage::Unspecified);
        let spec = KernelSpec {
            language,
            cwd: checked_cwd(&request.cwd)?,
            env: request.env,
            run_as: RunAs::parse(&request.user)?,
        };
        self.reserve()?;
        let started = Kernel::start(&self.reaper, &spec).await;
        self.starting.fetch_sub(1, Ordering::Relaxed);
        let kernel = started?;
        let context = Arc::new(Context {
            id: new_id(),
            spec,
            created_at_unix_ms: unix_ms(),
            execution_count: AtomicU32::new(0),
            kernel_pid: AtomicI32::new(kernel.pid()),
            kernel: tokio::sync::Mutex::new(Some(kernel)),
        });
        tracing::info!(context = %context.id, language = language_name(language), "code context created");
        self.lock().insert(context.id.clone(), Arc::clone(&context));
        Ok(context.info())
    }

    /// Counts a context being created against [`MAX_CONTEXTS`].
    fn reserve(&self) -> Result<(), Status> {
        let table = self.lock();
        if table.len() + self.starting.load(Ordering::Relaxed) as usize >= MAX_CONTEXTS {
            return Err(Status::resource_exhausted(format!(
                "this sandbox already has {MAX_CONTEXTS} code contexts, the most it may hold: delete one with DeleteContext"
            )));
        }
        self.starting.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn list(&self) -> Vec<CodeContext> {
        let mut contexts: Vec<_> = self.lock().values().map(|context| context.info()).collect();
        contexts.sort_by(|a, b| a.created_at_unix_ms.cmp(&b.created_at_unix_ms).then_with(|| a.id.cmp(&b.id)));
        contexts
    }

    pub async fn restart(&self, id: &str) -> Result<CodeContext, Status> {
        let context = self.find(id)?;
        // A running cell ends at once: its kernel is killed under it.
        let mut kernel = match context.kernel.try_lock() {
            Ok(kernel) => kernel,
            Err(_) => {
                context.kill_kernel();
                context.kernel.lock().await
            }
        };
        restart(&self.reaper, &context, &mut kernel).await?;
        Ok(context.info())
    }

    pub fn delete(&self, id: &str) -> Result<(), Status> {
        let context = self.lock().remove(id).ok_or_else(|| {
            Status::not_found(format!("code context '{id}' does not exist in this sandbox: call ListContexts"))
        })?;
        // A running cell holds the kernel: it is killed under it, and the
        // cell, finding its context gone, does not start it again.
        match context.kernel.try_lock() {
            Ok(mut kernel) => drop(kernel.take()),
            Err(_) => context.kill_kernel(),
        }
        tracing::info!(context = %id, "code context deleted");
        Ok(())
    }

    /// Runs one cell of `request.context_id`, sending its events to `events`.
    pub async fn run(self: Arc<Self>, request: RunCodeRequest, events: EventSender) -> Result<(), Status> {
        let context = self.find(&request.context_id)?;
        let deadline = tokio::time::Instant::now()
            + if request.timeout_ms == 0 { DEFAULT_DEADLINE } else { Duration::from_millis(request.timeout_ms) };
        tokio::spawn(async move {
            let mut kernel = context.kernel.lock().await;
            if events.is_closed() {
                return;
            }
            let end = run_cell(&self, &context, &mut kernel, &request, deadline, &events).await;
            if !self.lock().contains_key(&context.id) {
                kernel.take();
            }
            let _ = events.send(end.map(|end| RunCodeEvent { event: Some(Event::End(end)) })).await;
        });
        Ok(())
    }
}

/// Kills the kernel, if any, and starts a fresh one with the same spec.
async fn restart(reaper: &Reaper, context: &Context, kernel: &mut Option<Kernel>) -> Result<(), Status> {
    kernel.take();
    context.execution_count.store(0, Ordering::Relaxed);
    let started = Kernel::start(reaper, &context.spec).await?;
    context.kernel_pid.store(started.pid(), Ordering::Relaxed);
    *kernel = Some(started);
    tracing::info!(context = %context.id, "code context restarted");
    Ok(())
}

/// Where a cell is: running, interrupted at its deadline (or because the
/// client left), or waited on past the interrupt's grace.
struct Cell<'a> {
    events: &'a EventSender,
    budget: OutputBudget,
    end: RunCodeEnd,
    /// False once the client has gone: events are then dropped.
    client: bool,
}

impl Cell<'_> {
    async fn send(&mut self, event: Event) {
        if !self.client {
            return;
        }
        let Some(event) = self.budget.admit(event) else {
            self.end.output_truncated = true;
            return;
        };
        self.client = self.events.send(Ok(RunCodeEvent { event: Some(event) })).await.is_ok();
    }
}

async fn run_cell(
    contexts: &Contexts,
    context: &Context,
    kernel: &mut Option<Kernel>,
    request: &RunCodeRequest,
    deadline: tokio::time::Instant,
    events: &EventSender,
) -> Result<RunCodeEnd, Status> {
    if kernel.as_mut().is_none_or(|kernel| !kernel.drop_stale()) {
        restart(&contexts.reaper, context, kernel).await?;
    }
    let Some(running) = kernel.as_mut() else { return Err(Status::internal("the context has no kernel")) };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    running
        .send(&serde_json::json!({ "execute": {
            "code": request.code, "env": request.env, "timeout_ms": left.as_millis() as u64,
        }}))
        .await?;
    let mut cell = Cell { events, budget: OutputBudget::default(), end: RunCodeEnd::default(), client: true };
    let mut returned = String::new();
    let mut interrupted_at: Option<tokio::time::Instant> = None;
    loop {
        let wake = interrupted_at.map_or(deadline, |at| at + INTERRUPT_GRACE);
        let next = tokio::select! {
            event = running.events.recv() => event,
            () = tokio::time::sleep_until(wake) => {
                if interrupted_at.is_some() {
                    break;
                }
                cell.end.timed_out = true;
                running.interrupt().await;
                interrupted_at = Some(tokio::time::Instant::now());
                continue;
            }
            () = events.closed(), if cell.client && interrupted_at.is_none() => {
                cell.client = false;
                running.interrupt().await;
                interrupted_at = Some(tokio::time::Instant::now());
                continue;
            }
        };
        match next.unwrap_or(KernelEvent::Exited) {
            KernelEvent::Done => {
                cell.end.result_json = validated_json(&returned).unwrap_or_default();
                return Ok(cell.end);
            }
            KernelEvent::Exited => break,
            KernelEvent::Ready => {}
            KernelEvent::TimedOut => cell.end.timed_out = true,
            KernelEvent::Count(count) => {
                context.execution_count.store(count, Ordering::Relaxed);
                cell.send(Event::ExecutionCount(count)).await;
            }
            KernelEvent::Stdout(data) => cell.send(Event::Stdout(data)).await,
            KernelEvent::Stderr(data) => cell.send(Event::Stderr(data)).await,
            KernelEvent::Result { data, main } => cell.send(Event::Result(CodeResult { data, is_main_result: main })).await,
            KernelEvent::Error { name, value, traceback } => cell.send(Event::Error(CodeError { name, value, traceback })).await,
            KernelEvent::Return(text) => returned = text,
            KernelEvent::Dropped(what) => {
                let note = format!("\nsandbox: the kernel sent {what}; it was dropped\n");
                cell.send(Event::Stderr(note.into())).await;
            }
        }
    }
    if !contexts.lock().contains_key(&context.id) {
        return Err(Status::not_found(format!("code context '{}' was deleted while the cell ran", context.id)));
    }
    // The kernel died or did not stop at the interrupt: start it again.
    cell.end.context_restarted = true;
    let why = if cell.end.timed_out {
        format!("the cell ran past its deadline and did not stop within {INTERRUPT_GRACE:?} of the interrupt")
    } else {
        "the kernel died".to_string()
    };
    cell.send(Event::Error(CodeError {
        name: if cell.end.timed_out { "TimeoutError".into() } else { "KernelDied".into() },
        value: format!("{why}; the context was restarted and its variables are gone"),
        traceback: String::new(),
    }))
    .await;
    restart(&contexts.reaper, context, kernel).await?;
    Ok(cell.end)
}

fn checked_cwd(cwd: &str) -> Result<String, Status> {
    if cwd.is_empty() {
        return Ok(if Path::new("/home/user").is_dir() { "/home/user".into() } else { "/".into() });
    }
    if !cwd.starts_with('/') || !Path::new(cwd).is_dir() {
        return Err(Status::invalid_argument(format!(
            "cwd '{cwd}' is not an absolute path to a directory in the sandbox: create it with Files.MakeDir or leave it empty for /home/user"
        )));
    }
    Ok(cwd.to_string())
}

/// 16 random hex digits.
fn new_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut random| random.read_exact(&mut bytes)).is_err() {
        bytes = (unix_ms() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
