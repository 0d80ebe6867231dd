//! Starting a `sandboxd vmm` process as PID 1 of a new PID namespace, and
//! ending it within a deadline.
//!
//! A PID namespace can only be entered by a new process, so it is made
//! here, at the clone; everything else of the VMM's jail the VMM does
//! itself ([`sandbox_vmm::jailer`]). The clone shares the daemon's memory
//! and stops the calling thread until the child has exec'd (like
//! `posix_spawn`), and between the two the child only makes async-signal-
//! safe calls on values prepared before the clone: it starts a session of
//! its own (so that no signal to the daemon's terminal or process group
//! reaches it, and it outlives the daemon), resets signal handlers and the
//! signal mask, moves four descriptors onto 0..=3 and execs. The daemon
//! gets a pidfd of the VMM itself: kill and wait go through it, so neither
//! can hit a reused PID, and a wait can have a deadline (a VMM stuck in
//! uninterruptible sleep does not die at once on SIGKILL; its threads'
//! states say where it sleeps). A VMM an earlier run of the daemon started
//! is watched the same way ([`VmmChild::adopt`]), though its exit status
//! goes to whoever inherited it.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::ExitStatusExt},
    },
    path::Path,
    process::ExitStatus,
    time::Duration,
};

use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::backend::process_identity::has_exited;

/// The child's stack until it execs (it needs a few hundred bytes).
const CHILD_STACK: usize = 256 * 1024;
/// Descriptors handed to the child are first moved this high, above the
/// slots 0..=3 they are moved onto, so no move overwrites another's source.
const HIGH_FD: libc::c_int = 16;
/// The only variables of the daemon's environment a VMM gets (the rest may
/// hold secrets, such as API keys, that a compromised VMM must not see).
const PASSED_ENV: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];
/// At most this many threads are described in a report.
const MOST_THREADS: usize = 64;

/// A VMM process started by [`VmmChild::spawn`], or by an earlier run of
/// the daemon ([`VmmChild::adopt`]).
pub struct VmmChild {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// Whether this process is its parent (and so can reap it).
    ours: bool,
    status: Option<VmmExit>,
}

/// How a VMM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    Status(ExitStatus),
    /// It was started by an earlier run of the daemon: its exit status went
    /// to the process that inherited it.
    NotOurs,
}

impl VmmExit {
    /// The signal that killed it, when known.
    pub fn signal(self) -> Option<i32> {
        match self {
            VmmExit::Status(status) => status.signal(),
            VmmExit::NotOurs => None,
        }
    }
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmmExit::Status(status) => status.fmt(f),
            VmmExit::NotOurs => f.write_str("exited (started by an earlier run of the daemon, so its status is unknown)"),
        }
    }
}

/// What the child needs between the clone and exec, prepared beforehand.
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Moved onto descriptors 0, 1, 2 and 3.
    fds: [libc::c_int; 4],
    /// Where the child writes errno if it cannot exec (closed on exec).
    error_pipe: libc::c_int,
    /// The calling thread's signal mask, restored in the child.
    mask: libc::sigset_t,
}

/// Runs in the child, on its own stack, in the daemon's memory, until exec.
extern "C" fn child_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` points to the ChildPlan the parent keeps alive (its
    // thread is stopped until this child execs or exits); everything below
    // is an async-signal-safe call on values prepared before the clone.
    unsafe {
        let plan = &*(plan as *const ChildPlan);
        if libc::setsid() == -1 {
            child_failed(plan);
        }
        reset_signal_handlers();
        libc::sigprocmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
        for (target, &source) in (0..).zip(plan.fds.iter()) {
            if libc::dup2(source, target) == -1 {
                child_failed(plan);
            }
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        child_failed(plan)
    }
}

/// Sets every caught signal back to its default action: the daemon's
/// handlers must not run in the child, and SIGPIPE, which the Rust runtime
/// ignores, gets its default back as in any spawned process.
///
/// # Safety
/// Only for the child between clone and exec.
unsafe fn reset_signal_handlers() {
    // SAFETY: sigaction with valid pointers to local structs.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=libc::SIGRTMAX() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                && (old.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
                && old.sa_sigaction != libc::SIG_DFL
            {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
    }
}

/// Reports errno to the parent and exits.
///
/// # Safety
/// Only for the child between clone and exec.
unsafe fn child_failed(plan: &ChildPlan) -> ! {
    // SAFETY: errno is readable; write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(plan.error_pipe, (&errno as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>());
        libc::_exit(127)
    }
}

/// An mmap'd stack with a guard page below it.
struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    fn new() -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; the lowest page becomes the guard.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Self { base };
            if libc::mprotect(base, 4096, libc::PROT_NONE) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is 16-byte aligned.
        unsafe { self.base.cast::<u8>().add(CHILD_STACK).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), no longer used by any child.
        unsafe { libc::munmap(self.base, CHILD_STACK) };
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument or the environment"))
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

impl VmmChild {
    /// Starts `program args...` in a new PID namespace with `fds` as its
    /// descriptors 0, 1, 2 and 3, and the logging variables of this
    /// process's environment.
    pub fn spawn(program: &Path, args: &[&OsStr], fds: [BorrowedFd<'_>; 4]) -> io::Result<Self> {
        let program_c = c_string(program.as_os_str().as_bytes())?;
        let arg_strings = std::iter::once(Ok(program_c.clone()))
            .chain(args.iter().map(|arg| c_string(arg.as_bytes())))
            .collect::<io::Result<Vec<_>>>()?;
        let env_strings = std::env::vars_os()
            .filter(|(key, _)| PASSED_ENV.iter().any(|passed| key == passed))
            .map(|(key, value)| c_string(&[key.as_bytes(), b"=", value.as_bytes()].concat()))
            .collect::<io::Result<Vec<_>>>()?;
        let (argv, envp) = (null_terminated(&arg_strings), null_terminated(&env_strings));
        let sources = fds
            .iter()
            .map(|&fd| move_high(fd))
            .collect::<io::Result<Vec<_>>>()?;
        let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let stack = ChildStack::new()?;
        let mut plan = ChildPlan {
            program: program_c.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            fds: [0, 1, 2, 3].map(|slot| sources[slot].as_raw_fd()),
            error_pipe: error_write.as_raw_fd(),
            // SAFETY: a sigset_t is plain data; it is filled in below.
            mask: unsafe { std::mem::zeroed() },
        };
        let mut pidfd: libc::c_int = -1;
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_NEWPID | libc::CLONE_PIDFD | libc::SIGCHLD;
        // SAFETY: all signals are blocked in this thread across the clone so
        // that no handler runs on the child's stack before it resets them;
        // the child runs `child_main` on `stack` with `plan`, both alive
        // until clone returns (CLONE_VFORK); the kernel writes the pidfd
        // to `pidfd` (CLONE_PIDFD uses the parent_tid argument).
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut plan.mask);
            let pid = libc::clone(child_main, stack.top(), flags, (&mut plan as *mut ChildPlan).cast(), &mut pidfd as *mut libc::c_int);
            let error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
            if pid == -1 {
                return Err(error);
            }
            pid
        };
        drop(error_write);
        // SAFETY: the kernel gave us this pidfd, and nothing else owns it.
        let mut child = Self { pid, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) }, ours: true, status: None };
        let mut errno = [0u8; 4];
        match nix::unistd::read(error_read.as_raw_fd(), &mut errno) {
            Ok(4) => {
                let _ = child.wait_timeout(Duration::from_secs(1));
                Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
            }
            _ => Ok(child),
        }
    }

    /// A VMM an earlier run of the daemon started, watched through
    /// `pidfd` (opened on `pid` once its identity was checked).
    pub fn adopt(pid: libc::pid_t, pidfd: OwnedFd) -> Self {
        Self { pid, pidfd, ours: false, status: None }
    }

    /// The VMM's PID in the daemon's PID namespace.
    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// How the VMM ended, once it has exited (our child is then reaped).
    pub fn try_wait(&mut self) -> io::Result<Option<VmmExit>> {
        if self.status.is_none() {
            self.status = if self.ours { self.reap()?.map(VmmExit::Status) } else { has_exited(&self.pidfd).then_some(VmmExit::NotOurs) };
        }
        Ok(self.status)
    }

    fn reap(&self) -> io::Result<Option<ExitStatus>> {
        match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::from_raw((code & 0xff) << 8))),
            Ok(WaitStatus::Signaled(_, signal, core)) => Ok(Some(ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 }))),
            Ok(_) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Sends SIGKILL (nothing happens if the VMM has already exited).
    pub fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with our pidfd and no siginfo.
        let result = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) };
        match result {
            -1 if io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) => Err(io::Error::last_os_error()),
            _ => Ok(()),
        }
    }

    /// Waits up to `timeout` for the VMM to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<VmmExit>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        let mut poll = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd on our pidfd, readable once the process exits.
        if unsafe { libc::poll(&mut poll, 1, millis) } == -1 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        self.try_wait()
    }

    /// Waits for the VMM to exit however long it takes; for a thread of its own.
    pub fn wait_forever(&mut self) -> io::Result<VmmExit> {
        loop {
            if let Some(status) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(status);
            }
        }
    }

    /// One line per thread of the VMM: id, name, scheduler state (R, S, D,
    /// T, Z...), where in the kernel it sleeps and, for a thread in
    /// uninterruptible sleep, its kernel stack's top frames.
    pub fn thread_states(&self) -> String {
        let task_dir = format!("/proc/{}/task", self.pid);
        let Ok(entries) = std::fs::read_dir(&task_dir) else { return format!("no {task_dir}: the process is gone") };
        let mut threads: Vec<String> = entries
            .flatten()
            .take(MOST_THREADS)
            .map(|entry| describe_thread(&entry.path(), &entry.file_name().to_string_lossy()))
            .collect();
        threads.sort();
        threads.join("; ")
    }
}

/// Moves a copy of `fd` to HIGH_FD or above, close-on-exec.
fn move_high(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one we own.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if high == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `high` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// "TID NAME STATE wchan=SYMBOL" from /proc/PID/task/TID/{stat,wchan,stack}.
fn describe_thread(task: &Path, tid: &str) -> String {
    let read = |name: &str| std::fs::read_to_string(task.join(name)).unwrap_or_default();
    let stat = read("stat");
    // The name is in parentheses and may itself contain them: it ends at the last ')'.
    let (name, state) = match (stat.find('('), stat.rfind(')')) {
        (Some(open), Some(close)) if open < close => (&stat[open + 1..close], stat[close + 1..].split_whitespace().next().unwrap_or("?")),
        _ => ("?", "?"),
    };
    let wchan = read("wchan");
    let mut line = format!("{tid} {name} {state} wchan={}", if wchan.is_empty() { "?" } else { wchan.trim() });
    if state == "D" {
        let stack = read("stack");
        let frames: Vec<&str> = stack.lines().take(4).filter_map(|frame| frame.split_whitespace().nth(1)).collect();
        line.push_str(&format!(" stack={}", frames.join("<")));
    }
    line
}
