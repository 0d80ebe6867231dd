//! Finding a process of an earlier run of the daemon again, without ever
//! mistaking another process for it: a process is named by its pid, its
//! start time (clock ticks after boot, from the kernel's `/proc/PID/stat`)
//! and the host's boot id, and is watched through a pidfd, which no reused
//! pid can redirect. Both jails (their launchers) and microVMs (their
//! VMMs) are re-adopted this way.

use std::{
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Where the kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Who a process is, as a restarted daemon can check it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Clock ticks after boot at which it started.
    pub started: u64,
    /// The boot it started in: after a host reboot, pids and start times repeat.
    pub boot_id: String,
}

impl ProcessIdentity {
    /// The identity of the live process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<Self> {
        Some(Self { pid, started: start_time(pid)?, boot_id: boot_id()? })
    }

    /// A pidfd on the process, if it is still this very process and has
    /// not exited. The start time is read again after the pidfd is open,
    /// so that the pidfd cannot be a newcomer's under the same pid.
    pub fn open(&self) -> Option<OwnedFd> {
        if !self.is_current() {
            return None;
        }
        let pidfd = open(self.pid).ok()?;
        (self.is_current() && !has_exited(&pidfd)).then_some(pidfd)
    }

    fn is_current(&self) -> bool {
        boot_id().as_ref() == Some(&self.boot_id) && start_time(self.pid) == Some(self.started)
    }
}

/// Opens a pidfd on `pid`.
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open with plain integers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh pidfd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (without waiting).
pub fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut watched = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one live pollfd we own.
    let ready = unsafe { libc::poll(&mut watched, 1, 0) };
    ready > 0
}

/// When process `pid` started (clock ticks after boot), if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command (field 2, which the process may set) can hold
    // spaces and parentheses but ends at the last ')'.
    let after_command = &stat[stat.rfind(')')? + 1..];
    after_command.split_whitespace().nth(19)?.parse().ok()
}

/// The real uid of process `pid`, if it exists.
pub fn real_uid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

fn boot_id() -> Option<String> {
    fs::read_to_string(BOOT_ID).ok().map(|id| id.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_found_again_only_under_its_own_identity() {
        let me = ProcessIdentity::of(std::process::id() as i32).expect("this process has an identity");
        assert!(me.open().is_some(), "this very process is found");
        let later = ProcessIdentity { started: me.started + 1, ..me.clone() };
        assert!(later.open().is_none(), "another process under the same pid is not");
        let other_boot = ProcessIdentity { boot_id: "another boot".into(), ..me.clone() };
        assert!(other_boot.open().is_none(), "nor is a process of another boot");
        assert_eq!(real_uid(me.pid), Some(nix::unistd::getuid().as_raw()));
    }
}
