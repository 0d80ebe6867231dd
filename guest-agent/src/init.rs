//! Duties of PID 1 in a microVM: mount the basic file systems and name the
//! host. (In a jail the launcher has already built the mounts.)

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot mount {target}: {source}")]
    Mount { target: &'static str, source: nix::Error },
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: &[Mount] = &[
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC), data: None },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC), data: None },
    Mount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
    Mount { source: "devpts", target: "/dev/pts", fstype: "devpts", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC), data: Some("newinstance,ptmxmode=0666,mode=0620") },
    Mount { source: "tmpfs", target: "/tmp", fstype: "tmpfs", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: Some("mode=1777") },
    Mount { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: Some("mode=0755") },
];

/// Mounts what a guest needs; a file system already mounted is left alone.
pub fn mount_basics() -> Result<(), InitError> {
    for m in MOUNTS {
        let _ = std::fs::create_dir_all(m.target);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => return Err(InitError::Mount { target: m.target, source }),
        }
    }
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx.new").and_then(|()| std::fs::rename("/dev/ptmx.new", "/dev/ptmx"));
    let _ = std::fs::create_dir_all("/home/user");
    let _ = nix::unistd::sethostname("sandbox");
    Ok(())
}
