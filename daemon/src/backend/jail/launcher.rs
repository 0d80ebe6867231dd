//! `sandboxd jail-exec`: the single-threaded launcher of one jail.
//!
//! The launcher unshares the pid namespace and forks the jail's PID 1.
//! That child unshares the mount, network, ipc and uts namespaces, joins
//! the jail's cgroup and a cgroup namespace, builds the root (still as the host's root, so it can
//! mount the sandbox's disk), and only then enters a new **user
//! namespace**, whose root the launcher maps to the sandbox's own range of
//! host ids. Every other namespace and mount belongs to the host's user
//! namespace, so root inside the jail holds no privilege over its mounts,
//! network, hostname or kernel knobs. The child then drops capabilities,
//! closes every fd but the agent's listening socket (fd 3), sets
//! no_new_privs, installs the seccomp allow-list and executes the agent.
//!
//! The launcher stays outside the jail's cgroup (a frozen jail never
//! freezes its supervisor), in a session of its own, and drains the
//! jail's console pipe into a capped file until the jail's init exits;
//! then it exits too. It needs nothing from the daemon once started, so a
//! jail outlives a daemon that stops or dies (the daemon re-adopts it when
//! it starts again). To end a jail, the daemon sends the launcher SIGTERM, on
//! which it kills the jail's init (and with it the jail's pid namespace)
//! and thaws the cgroup so that the kill lands, and removes the cgroup,
//! which kills whatever is left. The launcher's own death takes the init
//! with it (its parent-death signal, armed again once the init has
//! changed its credentials, which clears it).

use std::{
    convert::Infallible,
    ffi::CString,
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
};

use nix::{
    sched::{unshare, CloneFlags},
    sys::{
        signal::{SigSet, Signal as UnixSignal},
        signalfd::{SfdFlags, SignalFd},
    },
    sys::wait::{waitpid, WaitStatus},
    unistd::{execve, fork, sethostname, ForkResult, Pid},
};
use serde::{Deserialize, Serialize};

use super::{caps, console::{self, CappedLog}, mounts, seccomp};
use crate::backend::cgroup::Cgroup;

/// Environment variable carrying the [`LaunchConfig`] as JSON.
pub const CONFIG_ENV: &str = "SANDBOXD_JAIL_CONFIG";
/// The fd on which the agent's listening socket reaches the launcher and the agent.
pub const AGENT_FD: RawFd = 3;
/// Exit code of the launcher when setting up the jail failed.
const SETUP_FAILED: i32 = 125;
/// Ids mapped into each jail's user namespace.
pub const ID_RANGE: u32 = 65_536;

/// What the launcher needs, passed from the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// The template's root image, mounted read-only on the host.
    pub image: PathBuf,
    pub root: PathBuf,
    pub disk: PathBuf,
    pub disk_mount: PathBuf,
    pub agent: PathBuf,
    /// The capped console file the launcher writes.
    pub console: PathBuf,
    pub cgroup: Cgroup,
    /// First host uid and gid of the jail's range; root inside maps to it.
    pub id_base: u32,
    /// Most open files of any process in the jail.
    pub max_open_files: u64,
    /// The jail's PID 1 and its arguments, as seen inside the jail.
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{CONFIG_ENV} is missing or malformed: {0}")]
    Config(String),
    #[error("cannot join the jail's cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("cannot {action}: {source}")]
    Sys { action: &'static str, source: nix::Error },
    #[error("cannot map the jail's user namespace: {0}")]
    IdMap(std::io::Error),
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

/// A pipe pair for one message between launcher and child.
struct Signal {
    read: OwnedFd,
    write: OwnedFd,
}

impl Signal {
    fn new() -> Result<Self, LaunchError> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("create a pipe"))?;
        Ok(Self { read, write })
    }

    fn send(self) {
        let _ = File::from(self.write).write_all(b"1");
    }

    /// Waits for the other side's message; false if it went away instead.
    fn wait(self) -> bool {
        drop(self.write);
        let mut byte = [0u8; 1];
        matches!(File::from(self.read).read(&mut byte), Ok(1))
    }
}

fn run() -> Result<i32, LaunchError> {
    let config: LaunchConfig = serde_json::from_str(&std::env::var(CONFIG_ENV).unwrap_or_default())
        .map_err(|e| LaunchError::Config(e.to_string()))?;
    let mut console = CappedLog::new(console::create(&config.console).map_err(|e| LaunchError::Config(e.to_string()))?);
    let (console_read, console_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("create the console pipe"))?;
    let (unshared, mapped) = (Signal::new()?, Signal::new()?);
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the pid namespace"))?;
    // Blocked before the fork, so that a SIGTERM is never lost or fatal
    // in between; the child unblocks it at once.
    let terminate = terminate_signals();
    terminate.thread_block().map_err(sys("block SIGTERM"))?;
    // SAFETY: the launcher is single-threaded (jail-exec is dispatched
    // before any thread starts), so the child may run arbitrary code.
    match unsafe { fork() }.map_err(sys("fork the jail's init"))? {
        ForkResult::Child => {
            drop(console_read);
            let _ = terminate.thread_unblock();
            let error = match become_init(&config, console_write, unshared, mapped) {
                Ok(never) => match never {},
                Err(error) => error,
            };
            eprintln!("sandboxd jail-exec: {error}");
            std::process::exit(SETUP_FAILED)
        }
        ForkResult::Parent { child } => {
            drop(console_write);
            if unshared.wait() {
                if let Err(error) = map_ids(child, config.id_base) {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    return Err(error);
                }
                mapped.send();
            }
            let terminate = SignalFd::with_flags(&terminate, SfdFlags::SFD_CLOEXEC).map_err(sys("watch for SIGTERM"))?;
            supervise(child, &config.cgroup, console_read, terminate, &mut console)
        }
    }
}

/// Maps root..ID_RANGE inside the child's user namespace to the jail's
/// range of host ids.
fn map_ids(child: Pid, base: u32) -> Result<(), LaunchError> {
    let map = format!("0 {base} {ID_RANGE}\n");
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{child}/{file}"), &map).map_err(LaunchError::IdMap)?;
    }
    Ok(())
}

/// The signal on which the launcher kills its jail.
fn terminate_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(UnixSignal::SIGTERM);
    set
}

/// Drains the console until the jail's init exits; on SIGTERM kills the
/// init and thaws the jail so that the kill lands. Returns the exit code
/// (128 + signal when killed).
fn supervise(child: Pid, cgroup: &Cgroup, console_read: OwnedFd, terminate: SignalFd, console: &mut CappedLog) -> Result<i32, LaunchError> {
    // The child is ours and not reaped yet, so its pid cannot be reused.
    let pidfd = crate::backend::process_identity::open(child.as_raw()).map_err(|e| sys("watch the jail's init")(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL))))?;
    let mut output = File::from(console_read);
    let mut watched = [
        libc::pollfd { fd: terminate.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: output.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: poll reads and writes the pollfds of a live array.
        if unsafe { libc::poll(watched.as_mut_ptr(), watched.len() as libc::nfds_t, -1) } < 0 && nix::Error::last() != nix::Error::EINTR {
            return Err(sys("watch the jail's init")(nix::Error::last()));
        }
        if watched[0].revents != 0 {
            // The daemon wants the jail gone. A frozen jail only dies once thawed.
            let _ = terminate.read_signal();
            let _ = nix::sys::signal::kill(child, UnixSignal::SIGKILL);
            let _ = cgroup.thaw();
        }
        if watched[1].revents != 0 {
            match output.read(&mut buffer) {
                Ok(0) | Err(_) => watched[1].fd = -1,
                Ok(n) => console.write(&buffer[..n]),
            }
        }
        if watched[2].revents != 0 {
            break;
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

/// Runs as PID 1 of the new namespaces: builds the jail, becomes root of
/// its own user namespace, and executes its command.
fn become_init(config: &LaunchConfig, console: OwnedFd, unshared: Signal, mapped: Signal) -> Result<Infallible, LaunchError> {
    die_with_parent();
    // The mount namespace is the child's alone: pivoting must not move the
    // launcher's root.
    let namespaces = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    unshare(namespaces).map_err(sys("unshare namespaces"))?;
    for procs in config.cgroup.procs_files() {
        std::fs::write(&procs, "0").map_err(LaunchError::Cgroup)?;
    }
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(sys("unshare the cgroup namespace"))?;
    mounts::build_root(&mounts::RootLayout {
        image: &config.image,
        root: &config.root,
        disk: &config.disk,
        disk_mount: &config.disk_mount,
        agent: &config.agent,
        id_base: config.id_base,
    })?;
    sethostname("sandbox").map_err(sys("set the hostname"))?;
    bring_up_loopback().map_err(LaunchError::Loopback)?;
    redirect_stdio(console)?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(sys("unshare the user namespace"))?;
    unshared.send();
    if !mapped.wait() {
        return Err(LaunchError::IdMap(std::io::Error::other("the launcher went away before mapping ids")));
    }
    become_root_of_namespace()?;
    // Changing credentials cleared the parent-death signal.
    die_with_parent();
    limit_open_files(config.max_open_files)?;
    caps::drop_all_but_kept()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("set no_new_privs")(nix::Error::last()));
    }
    close_inherited_fds();
    seccomp::install()?;
    let argv: Vec<CString> = config.command.iter().map(|a| CString::new(a.as_str())).collect::<Result<_, _>>()
        .map_err(|e| LaunchError::Config(e.to_string()))?;
    let env = [c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", c"HOME=/root", c"LANG=C.UTF-8"];
    let program = argv.first().ok_or_else(|| LaunchError::Config("the command is empty".into()))?;
    execve(program, &argv, &env).map_err(sys("execute the jail's init"))
}

/// stdin from /dev/null, stdout and stderr into the console pipe.
fn redirect_stdio(console: OwnedFd) -> Result<(), LaunchError> {
    let null = File::open("/dev/null").map_err(|e| LaunchError::Config(format!("cannot open /dev/null: {e}")))?;
    for (from, to) in [(null.as_raw_fd(), 0), (console.as_raw_fd(), 1), (console.as_raw_fd(), 2)] {
        // SAFETY: dup2 onto the standard fds of this single-threaded process.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(sys("redirect the jail's standard fds")(nix::Error::last()));
        }
    }
    Ok(())
}

/// Takes uid and gid 0 of the new user namespace (the jail's first host id).
fn become_root_of_namespace() -> Result<(), LaunchError> {
    nix::unistd::setgroups(&[]).map_err(sys("drop supplementary groups"))?;
    let root_gid = nix::unistd::Gid::from_raw(0);
    let root_uid = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(sys("become gid 0 of the jail"))?;
    nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(sys("become uid 0 of the jail"))
}

fn limit_open_files(max: u64) -> Result<(), LaunchError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(sys("read the open files limit")(nix::Error::last()));
        }
        limit.rlim_max = limit.rlim_max.min(max);
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(sys("limit open files")(nix::Error::last()));
        }
    }
    Ok(())
}

/// Closes everything but the standard fds and the agent's socket.
fn close_inherited_fds() {
    // SAFETY: close_range on fds this process no longer needs; the
    // agent's socket (fd 3) and the standard fds stay open.
    unsafe { libc::syscall(libc::SYS_close_range, AGENT_FD as libc::c_uint + 1, libc::c_uint::MAX, 0) };
}

/// Sets IFF_UP on `lo`, the only interface of the new network namespace.
fn bring_up_loopback() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
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
