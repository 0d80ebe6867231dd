//! Capabilities of a jail: everything outside a small container-root set
//! is dropped from the bounding set (so no exec can regain it) and from
//! the effective, permitted and inheritable sets.

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot drop capability {cap} from the bounding set: {source}")]
    Bounding { cap: u32, source: std::io::Error },
    #[error("cannot set the process capabilities: {0}")]
    Set(std::io::Error),
}

/// Capabilities a jail's root keeps (over its own user namespace only):
/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, NET_BIND_SERVICE.
const KEPT: [u32; 8] = [0, 1, 3, 4, 5, 6, 7, 10];

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops every capability outside [`KEPT`].
pub fn drop_all_but_kept() -> Result<(), CapsError> {
    for cap in (0..=last_cap()).filter(|cap| !KEPT.contains(cap)) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(CapsError::Bounding { cap, source: std::io::Error::last_os_error() });
        }
    }
    let mask = KEPT.iter().fold(0u32, |mask, cap| mask | (1 << cap));
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: VERSION_3, pid: 0 };
    let data = [Data { effective: mask, permitted: mask, inheritable: 0 }, Data { effective: 0, permitted: 0, inheritable: 0 }];
    // SAFETY: capset reads a v3 header and two data structs from live locals
    // laid out as the kernel's __user_cap_header_struct / __user_cap_data_struct.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(CapsError::Set(std::io::Error::last_os_error()));
    }
    Ok(())
}
