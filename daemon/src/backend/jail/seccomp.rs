//! The jail's seccomp filter: an allow-list of the system calls ordinary
//! Linux programs make (files, memory, processes, signals, time, sockets of
//! the unix, inet, inet6 and netlink families). Everything else fails with
//! EPERM: modules, kexec, bpf, keyrings, io_uring, userfaultfd,
//! memfd_secret, perf, ptrace and cross-process memory access, mounts and
//! namespaces, vsock and packet sockets. `clone` may not carry namespace
//! flags, and `clone3` fails with ENOSYS so that libc falls back to
//! `clone`, whose flags the filter can see.

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// System calls allowed whatever their arguments.
const ALLOWED: &[i64] = &[
    // Files and directories.
    libc::SYS_read, libc::SYS_write, libc::SYS_open, libc::SYS_openat, libc::SYS_openat2, libc::SYS_close,
    libc::SYS_close_range, libc::SYS_creat, libc::SYS_stat, libc::SYS_fstat, libc::SYS_lstat, libc::SYS_newfstatat,
    libc::SYS_statx, libc::SYS_statfs, libc::SYS_fstatfs, libc::SYS_lseek, libc::SYS_pread64, libc::SYS_pwrite64,
    libc::SYS_readv, libc::SYS_writev, libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_preadv2, libc::SYS_pwritev2,
    libc::SYS_access, libc::SYS_faccessat, libc::SYS_faccessat2, libc::SYS_dup, libc::SYS_dup2, libc::SYS_dup3,
    libc::SYS_fcntl, libc::SYS_flock, libc::SYS_fsync, libc::SYS_fdatasync, libc::SYS_sync, libc::SYS_syncfs,
    libc::SYS_sync_file_range, libc::SYS_truncate, libc::SYS_ftruncate, libc::SYS_fallocate, libc::SYS_fadvise64,
    libc::SYS_readahead, libc::SYS_getdents, libc::SYS_getdents64, libc::SYS_getcwd, libc::SYS_chdir,
    libc::SYS_fchdir, libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2, libc::SYS_mkdir, libc::SYS_mkdirat,
    libc::SYS_rmdir, libc::SYS_link, libc::SYS_linkat, libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_symlink,
    libc::SYS_symlinkat, libc::SYS_readlink, libc::SYS_readlinkat, libc::SYS_chmod, libc::SYS_fchmod,
    libc::SYS_fchmodat, libc::SYS_chown, libc::SYS_fchown, libc::SYS_lchown, libc::SYS_fchownat, libc::SYS_umask,
    libc::SYS_utime, libc::SYS_utimes, libc::SYS_utimensat, libc::SYS_futimesat, libc::SYS_mknod, libc::SYS_mknodat,
    libc::SYS_setxattr, libc::SYS_lsetxattr, libc::SYS_fsetxattr, libc::SYS_getxattr, libc::SYS_lgetxattr,
    libc::SYS_fgetxattr, libc::SYS_listxattr, libc::SYS_llistxattr, libc::SYS_flistxattr, libc::SYS_removexattr,
    libc::SYS_lremovexattr, libc::SYS_fremovexattr, libc::SYS_sendfile, libc::SYS_splice, libc::SYS_tee,
    libc::SYS_vmsplice, libc::SYS_copy_file_range, libc::SYS_pipe, libc::SYS_pipe2, libc::SYS_inotify_init,
    libc::SYS_inotify_init1, libc::SYS_inotify_add_watch, libc::SYS_inotify_rm_watch, libc::SYS_memfd_create,
    libc::SYS_io_setup, libc::SYS_io_destroy, libc::SYS_io_getevents, libc::SYS_io_submit, libc::SYS_io_cancel,
    libc::SYS_landlock_create_ruleset, libc::SYS_landlock_add_rule, libc::SYS_landlock_restrict_self,
    // Memory.
    libc::SYS_brk, libc::SYS_mmap, libc::SYS_munmap, libc::SYS_mprotect, libc::SYS_mremap, libc::SYS_msync,
    libc::SYS_mincore, libc::SYS_madvise, libc::SYS_mlock, libc::SYS_mlock2, libc::SYS_munlock, libc::SYS_mlockall,
    libc::SYS_munlockall, libc::SYS_mbind, libc::SYS_set_mempolicy, libc::SYS_get_mempolicy,
    libc::SYS_membarrier, libc::SYS_pkey_mprotect, libc::SYS_pkey_alloc, libc::SYS_pkey_free,
    libc::SYS_shmget, libc::SYS_shmat, libc::SYS_shmdt, libc::SYS_shmctl,
    // Processes, threads and credentials.
    libc::SYS_fork, libc::SYS_vfork, libc::SYS_clone3, libc::SYS_execve, libc::SYS_execveat, libc::SYS_exit,
    libc::SYS_exit_group, libc::SYS_wait4, libc::SYS_waitid, libc::SYS_getpid, libc::SYS_getppid, libc::SYS_gettid,
    libc::SYS_getpgid, libc::SYS_setpgid, libc::SYS_getpgrp, libc::SYS_getsid, libc::SYS_setsid,
    libc::SYS_set_tid_address, libc::SYS_set_robust_list, libc::SYS_get_robust_list, libc::SYS_rseq,
    libc::SYS_futex, libc::SYS_arch_prctl, libc::SYS_prctl, libc::SYS_personality, libc::SYS_seccomp,
    libc::SYS_getuid, libc::SYS_geteuid, libc::SYS_getgid, libc::SYS_getegid, libc::SYS_setuid, libc::SYS_setgid,
    libc::SYS_setreuid, libc::SYS_setregid, libc::SYS_setresuid, libc::SYS_getresuid, libc::SYS_setresgid,
    libc::SYS_getresgid, libc::SYS_setfsuid, libc::SYS_setfsgid, libc::SYS_getgroups, libc::SYS_setgroups,
    libc::SYS_capget, libc::SYS_capset, libc::SYS_getrlimit, libc::SYS_setrlimit, libc::SYS_prlimit64,
    libc::SYS_getrusage, libc::SYS_getpriority, libc::SYS_setpriority, libc::SYS_sched_yield,
    libc::SYS_sched_setparam, libc::SYS_sched_getparam, libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler, libc::SYS_sched_get_priority_max, libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval, libc::SYS_sched_setaffinity, libc::SYS_sched_getaffinity,
    libc::SYS_sched_setattr, libc::SYS_sched_getattr, libc::SYS_getcpu, libc::SYS_uname, libc::SYS_sysinfo,
    libc::SYS_times, libc::SYS_getrandom, libc::SYS_pidfd_open, libc::SYS_pidfd_send_signal,
    // Signals.
    libc::SYS_rt_sigaction, libc::SYS_rt_sigprocmask, libc::SYS_rt_sigreturn, libc::SYS_rt_sigpending,
    libc::SYS_rt_sigtimedwait, libc::SYS_rt_sigqueueinfo, libc::SYS_rt_tgsigqueueinfo, libc::SYS_rt_sigsuspend,
    libc::SYS_sigaltstack, libc::SYS_kill, libc::SYS_tkill, libc::SYS_tgkill, libc::SYS_pause,
    libc::SYS_signalfd, libc::SYS_signalfd4, libc::SYS_restart_syscall,
    // Time and waiting.
    libc::SYS_nanosleep, libc::SYS_clock_nanosleep, libc::SYS_clock_gettime, libc::SYS_clock_getres,
    libc::SYS_gettimeofday, libc::SYS_time, libc::SYS_alarm, libc::SYS_getitimer, libc::SYS_setitimer,
    libc::SYS_timer_create, libc::SYS_timer_settime, libc::SYS_timer_gettime, libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete, libc::SYS_timerfd_create, libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime,
    libc::SYS_eventfd, libc::SYS_eventfd2, libc::SYS_poll, libc::SYS_ppoll, libc::SYS_select, libc::SYS_pselect6,
    libc::SYS_epoll_create, libc::SYS_epoll_create1, libc::SYS_epoll_ctl, libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2,
    // Sockets (the families are checked on `socket` and `socketpair`).
    libc::SYS_connect, libc::SYS_accept, libc::SYS_accept4, libc::SYS_bind, libc::SYS_listen,
    libc::SYS_sendto, libc::SYS_recvfrom, libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_sendmmsg,
    libc::SYS_recvmmsg, libc::SYS_shutdown, libc::SYS_getsockname, libc::SYS_getpeername, libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    // System V semaphores and message queues, POSIX message queues.
    libc::SYS_semget, libc::SYS_semop, libc::SYS_semtimedop, libc::SYS_semctl, libc::SYS_msgget, libc::SYS_msgsnd,
    libc::SYS_msgrcv, libc::SYS_msgctl, libc::SYS_mq_open, libc::SYS_mq_unlink, libc::SYS_mq_timedsend,
    libc::SYS_mq_timedreceive, libc::SYS_mq_notify, libc::SYS_mq_getsetattr,
    // Newer calls that libc and runtimes probe for (x86_64 numbers):
    // futex_waitv, fchmodat2, map_shadow_stack, futex_wake, futex_wait, futex_requeue, mseal.
    449, 452, 453, 454, 455, 456, 462,
];

/// Socket families a sandbox may open: unix, inet, inet6 and netlink.
const SOCKET_FAMILIES: [u64; 4] = [libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64, libc::AF_NETLINK as u64];

/// `clone` flags that would make new namespaces.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// Terminal ioctls that push input into another process's terminal.
const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

fn arch() -> seccompiler::TargetArch {
    std::env::consts::ARCH.try_into().unwrap_or(seccompiler::TargetArch::x86_64)
}

fn build_error(error: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build(error.to_string())
}

fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(build_error)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(build_error)
}

/// Rules allowing a call only when its first argument is a permitted family.
fn family_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    SOCKET_FAMILIES
        .iter()
        .map(|&family| rule(vec![condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family)?]))
        .collect()
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch: SeccompAction, matched: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch()).map_err(build_error)?;
    filter.try_into().map_err(|e: seccompiler::BackendError| build_error(e))
}

/// The allow-list, then the filter that turns `clone3` into ENOSYS (the
/// later filter's errno wins over the earlier one's allow).
fn filters() -> Result<[BpfProgram; 2], SeccompError> {
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, vec![])).collect();
    allowed.insert(libc::SYS_socket, family_rules()?);
    allowed.insert(libc::SYS_socketpair, vec![rule(vec![condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?]);
    let no_namespaces = condition(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0)?;
    allowed.insert(libc::SYS_clone, vec![rule(vec![no_namespaces])?]);
    let ioctl_conditions = DENIED_IOCTLS
        .iter()
        .map(|&request| condition(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, request))
        .collect::<Result<Vec<_>, _>>()?;
    allowed.insert(libc::SYS_ioctl, vec![rule(ioctl_conditions)?]);
    let allow_list = compile(allowed, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow)?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into();
    let no_clone3 = compile(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))?;
    Ok([allow_list, no_clone3])
}

/// Installs the filters on the calling thread (and what it executes).
/// Requires no_new_privs or CAP_SYS_ADMIN.
pub fn install() -> Result<(), SeccompError> {
    for program in filters()? {
        apply_filter(&program).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let [allow_list, no_clone3] = filters().expect("the jail's filters compile");
        assert!(allow_list.len() > ALLOWED.len(), "every allowed call has at least one instruction");
        assert!(!no_clone3.is_empty());
    }
}
