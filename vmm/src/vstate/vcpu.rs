//! vCPU threads: one thread per vCPU runs KVM_RUN and dispatches exits to
//! the port I/O and MMIO buses. The host can pause all vCPUs (each parks
//! outside KVM_RUN, as snapshots need), resume them, or stop them; a guest
//! that shuts down, resets or fails is reported as a [`VmExit`].

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, Once,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::Bus;

/// Why a microVM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest triple-faulted or asked KVM to shut down.
    Shutdown,
    /// The guest reset the machine through the i8042 controller.
    Reset,
    /// The guest halted a vCPU.
    Halted,
    /// The host stopped the VM.
    Stopped,
    /// KVM could not emulate something the guest did.
    InternalError,
    /// KVM could not enter the guest (hardware reason code).
    FailEntry(u64),
    /// KVM_RUN itself failed.
    RunFailed(String),
    /// Guest memory could not be served from the snapshot (the VM was
    /// stopped rather than run on with a page it never had).
    MemoryUnavailable(String),
}

impl VmExit {
    /// Whether the VM ended through a fault of the host or the VMM rather
    /// than by the guest's or the host's choice.
    pub fn is_failure(&self) -> bool {
        matches!(self, VmExit::InternalError | VmExit::FailEntry(_) | VmExit::RunFailed(_) | VmExit::MemoryUnavailable(_))
    }
}

/// The first terminal exit of a VM, shared by all its vCPUs and devices.
#[derive(Default)]
pub struct ExitSignal {
    exit: Mutex<Option<VmExit>>,
    changed: Condvar,
}

impl ExitSignal {
    /// Records `exit` unless an earlier one was recorded.
    pub fn report(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
            self.changed.notify_all();
        }
    }

    /// Waits up to `timeout` for an exit.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = self
            .changed
            .wait_timeout_while(slot, timeout, |exit| exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }

    pub fn current(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Exits a vCPU took, by kind.
#[derive(Default, Debug)]
pub struct ExitCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exited,
}

/// Work run on a parked vCPU thread with its fd (state capture, restore).
type VcpuTask = Box<dyn FnOnce(&VcpuFd) + Send>;

/// What the host asks of a vCPU thread.
#[derive(Default)]
struct Control {
    pause: AtomicBool,
    stop: AtomicBool,
    state: Mutex<Option<RunState>>,
    changed: Condvar,
    task: Mutex<Option<VcpuTask>>,
}

impl Control {
    fn set_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        self.changed.notify_all();
    }

    fn state(&self) -> Option<RunState> {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    #[error("vCPU {0} is not paused: pause the VM before touching vCPU state")]
    NotPaused(u8),
    #[error("vCPU {0} exited before it ran the requested work")]
    Gone(u8),
}

/// How long a vCPU thread may take to leave KVM_RUN and exit when stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs a no-op handler (without SA_RESTART) so the kick signal makes
/// KVM_RUN return EINTR instead of killing the process.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and empty mask;
        // the handler is async-signal-safe (it does nothing).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    /// Seccomp filter the thread installs on itself before running.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

/// The host's handle on a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    control: Arc<Control>,
    counters: Arc<ExitCounters>,
    thread: Option<JoinHandle<()>>,
}

enum Step {
    Continue,
    /// A port I/O or MMIO exit was handled: KVM finishes the instruction
    /// (writes a read's result, advances rip) only on the next KVM_RUN.
    IoHandled,
    Exit(VmExit),
}

impl Vcpu {
    /// Starts the vCPU's thread (parked when `paused`); it runs until
    /// stopped or the guest exits.
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let control = Arc::new(Control { pause: AtomicBool::new(paused), ..Control::default() });
        let counters = Arc::new(ExitCounters::default());
        let (thread_control, thread_counters) = (Arc::clone(&control), Arc::clone(&counters));
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(&thread_control, &thread_counters))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { id, control, counters, thread: Some(thread) })
    }

    fn run(mut self, control: &Control, counters: &ExitCounters) {
        if let Some(program) = self.seccomp.take() {
            if let Err(error) = crate::seccomp::apply(&program) {
                self.exit.report(VmExit::RunFailed(error.to_string()));
                control.set_state(RunState::Exited);
                return;
            }
        }
        control.set_state(RunState::Running);
        let mut io_in_flight = false;
        while !control.stop.load(Ordering::Acquire) {
            if control.pause.load(Ordering::Acquire) {
                if std::mem::take(&mut io_in_flight) {
                    self.complete_io();
                }
                park(control, &self.fd);
                continue;
            }
            match self.step(counters) {
                Step::Continue => io_in_flight = false,
                Step::IoHandled => io_in_flight = true,
                Step::Exit(exit) => {
                    self.exit.report(exit);
                    break;
                }
            }
        }
        control.set_state(RunState::Exited);
    }

    /// Re-enters KVM_RUN with immediate_exit set, so KVM completes the
    /// instruction of the I/O exit just handled and returns at once without
    /// running guest code. Until then a read's result lives only in
    /// kvm_run and rip still points at the instruction: vCPU state saved
    /// from a parked thread would make a restored guest execute it again.
    fn complete_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // EINTR is the expected result; anything else shows on the next run.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn step(&mut self, counters: &ExitCounters) -> Step {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                counters.pio.fetch_add(1, Ordering::Relaxed);
                self.pio.write(u64::from(port), data);
                Step::IoHandled
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                counters.pio.fetch_add(1, Ordering::Relaxed);
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Step::IoHandled
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.read(address, data) {
                    data.fill(0);
                }
                Step::IoHandled
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                self.mmio.write(address, data);
                Step::IoHandled
            }
            Ok(VcpuExit::Hlt) => Step::Exit(VmExit::Halted),
            Ok(VcpuExit::Shutdown) => Step::Exit(VmExit::Shutdown),
            Ok(VcpuExit::InternalError) => Step::Exit(VmExit::InternalError),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Step::Exit(VmExit::FailEntry(reason)),
            Ok(_) => {
                counters.other.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(error) => Step::Exit(VmExit::RunFailed(error.to_string())),
        }
    }
}

/// Parks the vCPU thread while a pause is requested, running any task
/// the host hands it meanwhile.
fn park(control: &Control, fd: &VcpuFd) {
    let mut state = control.state.lock().unwrap_or_else(|p| p.into_inner());
    *state = Some(RunState::Paused);
    control.changed.notify_all();
    while control.pause.load(Ordering::Acquire) && !control.stop.load(Ordering::Acquire) {
        let task = control.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            drop(state);
            task(fd);
            state = control.state.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        state = control.changed.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    *state = Some(RunState::Running);
    control.changed.notify_all();
}

impl VcpuHandle {
    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn counters(&self) -> &ExitCounters {
        &self.counters
    }

    /// Interrupts KVM_RUN on the vCPU thread.
    fn kick(&self) {
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread is alive until joined (we hold its handle),
            // and the kick signal has a no-op handler installed.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Asks the vCPU to pause and waits until it has parked (or exited).
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.control.pause.store(true, Ordering::Release);
        self.wait_for(timeout, |state| matches!(state, Some(RunState::Paused | RunState::Exited)))
            .map_err(|()| VcpuError::PauseTimeout(self.id, timeout))
    }

    /// Runs `work` on the paused vCPU's own thread with its fd and returns
    /// the result: how vCPU state is saved and restored.
    pub fn run_on_vcpu<T: Send + 'static>(&self, work: impl FnOnce(&VcpuFd) -> T + Send + 'static) -> Result<T, VcpuError> {
        if self.control.state() != Some(RunState::Paused) {
            return Err(VcpuError::NotPaused(self.id));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let task: VcpuTask = Box::new(move |fd| {
            let _ = tx.send(work(fd));
        });
        {
            let _state = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
            *self.control.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
            self.control.changed.notify_all();
        }
        rx.recv().map_err(|_| VcpuError::Gone(self.id))
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let _state = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        self.control.pause.store(false, Ordering::Release);
        self.control.changed.notify_all();
    }

    /// Stops the vCPU thread and joins it. A thread that does not stop in
    /// time (asleep on a guest page that will never be served) is left to
    /// die with the process rather than joined forever.
    pub fn stop(&mut self) {
        {
            let _state = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
            self.control.stop.store(true, Ordering::Release);
            self.control.changed.notify_all();
        }
        let stopped = self.wait_for(STOP_TIMEOUT, |state| state == Some(RunState::Exited));
        match (stopped, self.thread.take()) {
            (Ok(()), Some(thread)) => {
                let _ = thread.join();
            }
            (Err(()), Some(_detached)) => eprintln!("sandbox-vmm: vCPU {} did not stop within {STOP_TIMEOUT:?}", self.id),
            (_, None) => {}
        }
    }

    /// Kicks the thread until its state satisfies `done` (a kick sent just
    /// before KVM_RUN starts can be missed, so it is repeated).
    fn wait_for(&self, timeout: Duration, done: impl Fn(Option<RunState>) -> bool) -> Result<(), ()> {
        let started = Instant::now();
        loop {
            if done(self.control.state()) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(());
            }
            self.kick();
            let state = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self.control.changed.wait_timeout(state, Duration::from_millis(1));
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
