//! `sandboxd jail-exec`: the single-threaded launcher of one jail. It
//! joins the jail's cgroup, unshares the mount, pid, network, ipc and uts
//! namespaces, and forks the jail's PID 1, which builds the root, drops
//! capabilities, installs seccomp and executes the agent. The launcher
//! stays outside as the jail's parent and exits with its status. Its stdin
//! is a lifeline pipe from the daemon: when the daemon closes it (or dies),
//! the launcher kills the jail.

use std::{
    convert::Infallible,
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
};

use nix::{
    sched::{unshare, CloneFlags},
    sys::wait::{waitpid, WaitStatus},
    unistd::{execve, fork, sethostname, ForkResult},
};
use serde::{Deserialize, Serialize};

use super::{caps, mounts, seccomp};

/// Environment variable carrying the [`LaunchConfig`] as JSON.
pub const CONFIG_ENV: &str = "SANDBOXD_JAIL_CONFIG";
/// Exit code of the launcher when setting up the jail failed.
const SETUP_FAILED: i32 = 125;

/// What the launcher needs, passed from the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchConfig {
    pub root: PathBuf,
    pub system: PathBuf,
    pub tmp: PathBuf,
    pub home: PathBuf,
    pub run: PathBuf,
    pub agent: PathBuf,
    /// `cgroup.procs` files the launcher joins before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// The jail's PID 1 and its arguments, as seen inside the jail.
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{CONFIG_ENV} is missing or malformed: {0}")]
    Config(String),
    #[error("cannot join the cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("cannot {action}: {source}")]
    Sys { action: &'static str, source: nix::Error },
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot bring up the loopback interface: {0}")]
    Loopback(std::io::Error),
}

fn sys(action: &'static str) -> impl Fn(nix::Error) -> LaunchError {
    move |source| LaunchError::Sys { action, source }
}

/// Entry point of `sandboxd jail-exec`; never returns.
pub fn exec_main() -> ! {
    let code = run().unwrap_or_else(|error| {
        eprintln!("sandboxd jail-exec: {error}");
        SETUP_FAILED
    });
    std::process::exit(code)
}

fn run() -> Result<i32, LaunchError> {
    let config: LaunchConfig = serde_json::from_str(&std::env::var(CONFIG_ENV).unwrap_or_default())
        .map_err(|e| LaunchError::Config(e.to_string()))?;
    for path in &config.cgroup_procs {
        std::fs::write(path, std::process::id().to_string())
            .map_err(|source| LaunchError::Cgroup { path: path.clone(), source })?;
    }
    let namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    unshare(namespaces).map_err(sys("unshare namespaces"))?;
    // SAFETY: the launcher is single-threaded (jail-exec is dispatched
    // before any thread starts), so the child may run arbitrary code.
    match unsafe { fork() }.map_err(sys("fork the jail's init"))? {
        ForkResult::Child => {
            let error = match become_init(&config) {
                Ok(never) => match never {},
                Err(error) => error,
            };
            eprintln!("sandboxd jail-exec: {error}");
            std::process::exit(SETUP_FAILED)
        }
        ForkResult::Parent { child } => supervise(child),
    }
}

/// Waits for the jail's init to exit, killing it if the lifeline on stdin
/// closes first. Returns the exit code (128 + signal when killed).
fn supervise(child: nix::unistd::Pid) -> Result<i32, LaunchError> {
    // SAFETY: pidfd_open with a pid we forked and have not reaped.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) } as libc::c_int;
    if pidfd < 0 {
        return Err(sys("watch the jail's init")(nix::Error::last()));
    }
    let mut watched = [
        libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 },
    ];
    while watched[1].revents == 0 {
        // SAFETY: poll reads and writes the two pollfds of a live array.
        if unsafe { libc::poll(watched.as_mut_ptr(), 2, -1) } < 0 && nix::Error::last() != nix::Error::EINTR {
            return Err(sys("watch the jail's init")(nix::Error::last()));
        }
        if watched[0].revents != 0 {
            // The daemon let go: nothing may outlive it.
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            watched[0].fd = -1;
            watched[0].revents = 0;
        }
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(error) => return Err(sys("wait for the jail's init")(error)),
        }
    }
}

/// Makes the kernel SIGKILL the jail's init when the launcher dies, so a
/// jail never outlives the process that supervises it.
fn die_with_parent() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

/// Runs as PID 1 of the new namespaces: builds the jail and executes its command.
fn become_init(config: &LaunchConfig) -> Result<Infallible, LaunchError> {
    die_with_parent();
    mounts::build_root(&mounts::RootLayout {
        root: &config.root,
        system: &config.system,
        tmp: &config.tmp,
        home: &config.home,
        run: &config.run,
        agent: &config.agent,
    })?;
    sethostname("sandbox").map_err(sys("set the hostname"))?;
    bring_up_loopback().map_err(LaunchError::Loopback)?;
    caps::drop_all_but_kept()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("set no_new_privs")(nix::Error::last()));
    }
    seccomp::install()?;
    let argv: Vec<CString> = config.command.iter().map(|a| CString::new(a.as_str())).collect::<Result<_, _>>()
        .map_err(|e| LaunchError::Config(e.to_string()))?;
    let env = [c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", c"HOME=/home/user", c"LANG=C.UTF-8"];
    let program = argv.first().ok_or_else(|| LaunchError::Config("the command is empty".into()))?;
    execve(program, &argv, &env).map_err(sys("execute the jail's init"))
}

/// Sets IFF_UP on `lo`, the only interface of the new network namespace.
fn bring_up_loopback() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
