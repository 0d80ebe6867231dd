//! Host uids for jailed VMMs: each VMM process runs as its own uid and gid
//! `FIRST_UID + slot`, never shared with another live VMM. A slot is
//! taken by an exclusive `flock` on `LOCK_DIR/<slot>`, held through one
//! open file shared by the daemon and the VMM (its descriptor 3): the
//! kernel releases it only when both have let go, so a slot stays taken
//! while its VMM lives, even across a restart of the daemon, and two
//! daemons (or a daemon and `sandboxd template build`) never hand out the
//! same uid. A VMM that closed its copy cannot free its uid for reuse
//! either: when a lease is taken, the uids of live processes seen when this
//! daemon started are skipped.

use std::{
    collections::HashSet,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

/// The first VMM uid (and gid).
pub const FIRST_UID: u32 = 2_000_000;
/// How many VMMs can run at once.
pub const SLOTS: u32 = 65_536;
/// Host-wide (not per state directory): every sandboxd on the host shares
/// the range. Under /run, so a reboot, which ends every VMM, clears it.
const LOCK_DIR: &str = "/run/sandboxd-vmm-uids";

#[derive(Debug, thiserror::Error)]
pub enum UidSlotError {
    #[error("cannot {action} {path}: {source}; the daemon needs root and a writable /run")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("all {SLOTS} VMM uids from {FIRST_UID} are taken by live VMMs: stop some sandboxes")]
    Exhausted,
}

/// One VMM's uid, held until dropped (and until the VMM holding the same
/// lock has exited).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    lock: OwnedFd,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The lock to hand to the VMM process.
    pub fn lock(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }
}

struct Slots {
    /// Uids in the range that live processes had when this daemon started.
    live_at_start: HashSet<u32>,
    next: Mutex<u32>,
}

static SLOTS_IN_USE: OnceLock<Slots> = OnceLock::new();

/// Whether `uid` is one of the VMMs' uids.
pub fn is_vmm_uid(uid: u32) -> bool {
    (FIRST_UID..FIRST_UID + SLOTS).contains(&uid)
}

/// Takes the next free uid.
pub fn lease() -> Result<UidLease, UidSlotError> {
    let slots = SLOTS_IN_USE.get_or_init(|| Slots { live_at_start: live_uids_in_range(), next: Mutex::new(0) });
    let dir = Path::new(LOCK_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| UidSlotError::Io { action: "create", path: dir.to_path_buf(), source })?;
    let mut next = slots.next.lock().unwrap_or_else(|p| p.into_inner());
    for offset in 0..SLOTS {
        let slot = (*next + offset) % SLOTS;
        let uid = FIRST_UID + slot;
        if slots.live_at_start.contains(&uid) {
            continue;
        }
        if let Some(lock) = try_lock(&dir.join(slot.to_string()))? {
            *next = (slot + 1) % SLOTS;
            return Ok(UidLease { uid, lock });
        }
    }
    Err(UidSlotError::Exhausted)
}

/// The slot's lock file, locked, or None when someone holds it.
fn try_lock(path: &Path) -> Result<Option<OwnedFd>, UidSlotError> {
    let io_error = |action| move |source| UidSlotError::Io { action, path: path.to_path_buf(), source };
    // Read-only: the VMM gets this descriptor and must not be able to
    // write to a host file with it.
    let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(path, flags, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|errno| io_error("open")(errno.into()))?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: flock on a descriptor `file` owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    match std::io::Error::last_os_error() {
        error if error.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        error => Err(io_error("lock")(error)),
    }
}

/// The real uids in the VMM range of the processes alive now.
fn live_uids_in_range() -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return HashSet::new() };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("status")).ok())
        .filter_map(|status| status.lines().find_map(|line| line.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok())
        .filter(|uid| is_vmm_uid(*uid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_while_held_and_a_slot_is_free_again_once_released() {
        let first = lease().unwrap();
        let second = lease().unwrap();
        assert_ne!(first.uid(), second.uid());
        assert!((FIRST_UID..FIRST_UID + SLOTS).contains(&first.uid()));
        let slot = first.uid() - FIRST_UID;
        let path = Path::new(LOCK_DIR).join(slot.to_string());
        assert!(try_lock(&path).unwrap().is_none(), "a held slot cannot be locked again");
        drop(first);
        assert!(try_lock(&path).unwrap().is_some(), "a released slot can be taken");
    }
}
