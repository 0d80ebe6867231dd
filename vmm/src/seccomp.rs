//! Seccomp allow-lists per VMM thread type. A vCPU thread may only run
//! KVM ioctls, touch its eventfds and log, and manage memory; the VMM's
//! control thread additionally serves its socket and writes snapshots; the
//! uffd thread only serves faults. Anything else kills the VMM process
//! (SIGSYS), which the daemon sees as the VMM's exit status.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} seccomp filter: {1}")]
    Build(&'static str, String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug)]
pub enum ThreadKind {
    Vcpu,
    Control,
    Uffd,
    /// The vsock device's event loop (host unix streams).
    Vsock,
}

/// Calls every thread needs: memory, futexes, signals, exit, time, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
];

/// The control thread serves its socket, kicks vCPUs, writes snapshots.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_tgkill,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
];

/// Device emulation on vCPU threads: disk I/O, and vsock streams to host
/// processes (unix sockets only).
const VCPU: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_epoll_ctl,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

/// The vsock event loop accepts and reads host unix streams.
const VSOCK: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
];

/// The uffd handler polls its fds.
const UFFD: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll];

/// `ioctl` restricted to one ioctl type (the second byte of the request).
fn ioctl_of_type(kind: u64, thread: &'static str) -> Result<SeccompRule, SeccompError> {
    let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), kind << 8)
        .map_err(|e| SeccompError::Build(thread, e.to_string()))?;
    SeccompRule::new(vec![condition]).map_err(|e| SeccompError::Build(thread, e.to_string()))
}

/// KVM's ioctl type.
const KVMIO: u64 = 0xae;
/// userfaultfd's ioctl type.
const UFFDIO: u64 = 0xaa;

/// Compiles the allow-list of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let (name, extra, ioctl_kind): (&'static str, &[i64], Option<u64>) = match kind {
        ThreadKind::Vcpu => ("vcpu", VCPU, Some(KVMIO)),
        ThreadKind::Control => ("control", CONTROL, Some(KVMIO)),
        ThreadKind::Uffd => ("uffd", UFFD, Some(UFFDIO)),
        // The vsock thread makes no KVM ioctls; only FIONBIO below.
        ThreadKind::Vsock => ("vsock", VSOCK, None),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().chain(extra).map(|&nr| (nr, Vec::new())).collect();
    let mut ioctls = ioctl_kind.map(|kind| ioctl_of_type(kind, name)).transpose()?.into_iter().collect::<Vec<_>>();
    if matches!(kind, ThreadKind::Control | ThreadKind::Vsock) {
        // Switching a connection between blocking and non-blocking mode.
        let fionbio = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)
            .and_then(|condition| SeccompRule::new(vec![condition]))
            .map_err(|e| SeccompError::Build(name, e.to_string()))?;
        ioctls.push(fionbio);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    if matches!(kind, ThreadKind::Vcpu) {
        // Guest-initiated vsock connections dial unix sockets, nothing else.
        let unix_only = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)
            .and_then(|condition| SeccompRule::new(vec![condition]))
            .map_err(|e| SeccompError::Build(name, e.to_string()))?;
        rules.insert(libc::SYS_socket, vec![unix_only]);
    }
    let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| SeccompError::Build(name, e.to_string()))?;
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(name, e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| SeccompError::Build(name, e.to_string()))
}

/// Installs `program` on the calling thread.
pub fn apply(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `work` in a forked child under the vCPU filter; returns the
    /// signal that ended the child, if one did.
    fn in_filtered_child(work: fn()) -> Option<i32> {
        let program = filter(ThreadKind::Vcpu).unwrap();
        // SAFETY: the child only applies a prebuilt filter, makes raw
        // syscalls and exits; no allocation or locks after fork.
        match unsafe { libc::fork() } {
            0 => {
                if apply(&program).is_err() {
                    unsafe { libc::_exit(2) };
                }
                work();
                unsafe { libc::_exit(0) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
            }
        }
    }

    #[test]
    fn a_vcpu_thread_dies_on_a_syscall_outside_its_filter() {
        // SAFETY: raw syscalls with constant arguments.
        let opens_socket = || unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
        };
        let execs = || unsafe {
            libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), std::ptr::null::<*const libc::c_char>(), std::ptr::null::<*const libc::c_char>());
        };
        assert_eq!(in_filtered_child(execs), Some(libc::SIGSYS));
        assert_eq!(in_filtered_child(opens_socket), Some(libc::SIGSYS));
        let non_kvm_ioctl = || unsafe {
            libc::syscall(libc::SYS_ioctl, 0, libc::TIOCGWINSZ, 0);
        };
        assert_eq!(in_filtered_child(non_kvm_ioctl), Some(libc::SIGSYS));
        let allowed = || unsafe {
            libc::syscall(libc::SYS_getpid);
        };
        assert_eq!(in_filtered_child(allowed), None);
    }
}
