//! The VMM's jail, entered by the `sandboxd vmm` process itself while it is
//! still single-threaded and root, before it opens anything of its VM:
//! it joins its cgroup, closes every inherited descriptor but standard
//! input, output, error and the ones it is told to keep, enters new mount,
//! network, IPC and UTS namespaces (its PID namespace is made by the daemon
//! when it starts the process, which must therefore be PID 1), mounts its
//! directory as its whole file system (nosuid, nodev, noexec) with the
//! host files it needs bound in read-only and a private `/dev` holding only
//! `kvm` and `userfaultfd` nodes it owns, pivots into it, and becomes its
//! own unprivileged uid and gid with no supplementary groups, no
//! capabilities and `no_new_privs`. From then on no host path outside its
//! directory can be opened. The per-thread seccomp filters come later, when
//! the VM's threads start.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::FileTypeExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where a jailed VMM lives and what it may see.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct JailConfig {
    /// The host directory that becomes the VMM's `/`.
    pub root: PathBuf,
    /// The VMM's own unprivileged host uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Host files and directories mounted read-only under the root.
    #[serde(default)]
    pub binds: Vec<JailBind>,
    /// `cgroup.procs` files the VMM joins before it allocates anything.
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    /// Inherited descriptors kept open besides 0, 1 and 2.
    #[serde(default)]
    pub keep_fds: Vec<i32>,
}

/// A host file or directory seen read-only at `/<name>` inside the jail.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct JailBind {
    pub source: PathBuf,
    /// One path component.
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the VMM jail needs root to set itself up (the VMM runs as uid {0}): run sandboxd as root")]
    NotRoot(u32),
    #[error("the VMM must enter its jail while single-threaded, but it has {0} threads")]
    Threads(String),
    #[error("a jailed VMM must start as PID 1 of a new PID namespace (it is PID {0}): let the daemon start it")]
    NotPidOne(i32),
    #[error("uid {uid} / gid {gid} is not an unprivileged identity for a VMM")]
    Identity { uid: u32, gid: u32 },
    #[error("the jail's bind name {0:?} must be one path component")]
    BindName(String),
    #[error("{path} is neither a regular file nor a directory, so it cannot be bound into the jail")]
    BindKind { path: PathBuf },
    #[error("/dev/kvm is not a character device on this host")]
    NoKvm,
    #[error("cannot {action} {path}: {source}")]
    Os { action: &'static str, path: PathBuf, source: std::io::Error },
}

fn os_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Os { action, path: path.to_path_buf(), source }
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn check(result: libc::c_int) -> std::io::Result<()> {
    if result == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Confines the calling process as `jail` says. On error the process must
/// exit: it may be half-confined.
pub fn enter(jail: &JailConfig) -> Result<(), JailError> {
    check_preconditions(jail)?;
    join_cgroups(&jail.cgroup_procs)?;
    close_inherited_fds(&jail.keep_fds)?;
    // Snapshots of clones find their pages in pagemap, and the jail has no /proc.
    crate::snapshot::keep_page_map().map_err(|e| os_error("keep open", Path::new("/proc/self/pagemap"))(std::io::Error::other(e)))?;
    let devices = HostDevices::find()?;
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes no pointers; the process is single-threaded.
    check(unsafe { libc::unshare(flags) }).map_err(os_error("unshare the namespaces of", Path::new("the VMM")))?;
    build_root(jail, &devices)?;
    pivot_into(&jail.root)?;
    become_unprivileged(jail.uid, jail.gid)
}

fn check_preconditions(jail: &JailConfig) -> Result<(), JailError> {
    check_names_and_identity(jail)?;
    // SAFETY: getters without arguments.
    let (euid, pid) = unsafe { (libc::geteuid(), libc::getpid()) };
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if pid != 1 {
        return Err(JailError::NotPidOne(pid));
    }
    let status = Path::new("/proc/self/status");
    let text = std::fs::read_to_string(status).map_err(os_error("read", status))?;
    let threads = text.lines().find_map(|line| line.strip_prefix("Threads:")).map(str::trim).unwrap_or("?");
    if threads != "1" {
        return Err(JailError::Threads(threads.to_string()));
    }
    Ok(())
}

fn check_names_and_identity(jail: &JailConfig) -> Result<(), JailError> {
    if jail.uid == 0 || jail.gid == 0 {
        return Err(JailError::Identity { uid: jail.uid, gid: jail.gid });
    }
    for bind in &jail.binds {
        if bind.name.is_empty() || bind.name.contains('/') || bind.name == "." || bind.name == ".." || bind.name == "dev" {
            return Err(JailError::BindName(bind.name.clone()));
        }
    }
    Ok(())
}

/// Joins each cgroup ("0" is the writing process on both hierarchies).
fn join_cgroups(procs: &[PathBuf]) -> Result<(), JailError> {
    for file in procs {
        std::fs::write(file, "0").map_err(os_error("join the cgroup through", file))?;
    }
    Ok(())
}

/// Closes every descriptor from 3 up except those in `keep`.
fn close_inherited_fds(keep: &[i32]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&fd| u32::try_from(fd).ok()).filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for kept in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if kept > first {
            // SAFETY: close_range only closes descriptors; nothing in this
            // single-threaded process uses the ones in the range.
            let result = unsafe { libc::syscall(libc::SYS_close_range, first, kept - 1, 0) };
            if result == -1 {
                return Err(os_error("close the inherited descriptors of", Path::new("the VMM"))(std::io::Error::last_os_error()));
            }
        }
        first = kept.saturating_add(1);
    }
    Ok(())
}

/// The host's device numbers of the nodes the jail's `/dev` gets.
struct HostDevices {
    kvm: libc::dev_t,
    /// Absent on kernels before 6.1.
    userfaultfd: Option<libc::dev_t>,
}

impl HostDevices {
    fn find() -> Result<Self, JailError> {
        let char_device = |path: &str| {
            std::fs::metadata(path)
                .ok()
                .filter(|m| m.file_type().is_char_device())
                .map(|m| std::os::unix::fs::MetadataExt::rdev(&m))
        };
        Ok(Self { kvm: char_device("/dev/kvm").ok_or(JailError::NoKvm)?, userfaultfd: char_device("/dev/userfaultfd") })
    }
}

fn mount(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> Result<(), JailError> {
    let error = |e| JailError::Os { action: "mount", path: target.to_path_buf(), source: e };
    let source = source.map(c_path).transpose().map_err(error)?;
    let target_c = c_path(target).map_err(error)?;
    let fstype = fstype.map(|t| CString::new(t).expect("a file system name without NUL"));
    let data = data.map(|d| CString::new(d).expect("mount options without NUL"));
    let pointer = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // until the call returns.
    let result = unsafe { libc::mount(pointer(&source), target_c.as_ptr(), pointer(&fstype), flags, pointer(&data).cast()) };
    check(result).map_err(error)
}

const HARDENED: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounts the jail's directory onto itself (a mount point to pivot into),
/// the read-only binds under it, and its private `/dev`.
fn build_root(jail: &JailConfig, devices: &HostDevices) -> Result<(), JailError> {
    // Nothing mounted here reaches the host, and nothing mounted on the
    // host later reaches the jail.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(Some(&jail.root), &jail.root, None, libc::MS_BIND, None)?;
    mount(None, &jail.root, None, libc::MS_BIND | libc::MS_REMOUNT | HARDENED, None)?;
    for bind in &jail.binds {
        let target = jail.root.join(&bind.name);
        let source = std::fs::metadata(&bind.source).map_err(os_error("bind", &bind.source))?;
        if !source.is_dir() && !source.is_file() {
            return Err(JailError::BindKind { path: bind.source.clone() });
        }
        let is_dir = source.is_dir();
        mount_point(&target, is_dir)?;
        mount(Some(&bind.source), &target, None, libc::MS_BIND, None)?;
        mount(None, &target, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | HARDENED, None)?;
    }
    let dev = jail.root.join("dev");
    mount_point(&dev, true)?;
    mount(Some(Path::new("tmpfs")), &dev, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NOEXEC, Some("mode=0755,size=16k,nr_inodes=8"))?;
    device_node(&dev.join("kvm"), devices.kvm, jail)?;
    if let Some(userfaultfd) = devices.userfaultfd {
        device_node(&dev.join("userfaultfd"), userfaultfd, jail)?;
    }
    Ok(())
}

/// Makes `path` an empty directory or file to mount on, replacing
/// whatever an earlier VMM of this directory left there (a symlink would
/// have the mount land elsewhere).
fn mount_point(path: &Path, is_dir: bool) -> Result<(), JailError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() == is_dir && (is_dir || meta.is_file()) => return Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).map_err(os_error("remove", path))?,
        Ok(_) => std::fs::remove_file(path).map_err(os_error("remove", path))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(os_error("inspect", path)(error)),
    }
    let created = if is_dir { std::fs::create_dir(path) } else { std::fs::File::create_new(path).map(drop) };
    created.map_err(os_error("create the mount point", path))
}

/// A character device node only the VMM's uid may open.
fn device_node(path: &Path, device: libc::dev_t, jail: &JailConfig) -> Result<(), JailError> {
    let path_c = c_path(path).map_err(os_error("create", path))?;
    // SAFETY: a NUL-terminated path that outlives both calls.
    unsafe {
        check(libc::mknod(path_c.as_ptr(), libc::S_IFCHR | 0o600, device)).map_err(os_error("create the device node", path))?;
        check(libc::chown(path_c.as_ptr(), jail.uid, jail.gid)).map_err(os_error("hand over", path))
    }
}

/// Makes the jail's directory the root and drops the host's file system.
fn pivot_into(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(os_error("enter", root))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // detach below removes it.
    // SAFETY: two NUL-terminated string literals.
    let result = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if result == -1 {
        return Err(os_error("pivot into", root)(std::io::Error::last_os_error()));
    }
    // SAFETY: a NUL-terminated string literal.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }).map_err(os_error("detach the host's root from", root))?;
    std::env::set_current_dir("/").map_err(os_error("enter", Path::new("/")))
}

/// Becomes `uid`/`gid` for good: no supplementary groups, no capabilities
/// left, no way to regain privileges through exec, not dumpable.
fn become_unprivileged(uid: u32, gid: u32) -> Result<(), JailError> {
    let identity = Path::new("the VMM's identity");
    // SAFETY: setgroups with an empty list; the others take integers.
    unsafe {
        check(libc::setgroups(0, std::ptr::null())).map_err(os_error("clear the supplementary groups of", identity))?;
        check(libc::setresgid(gid, gid, gid)).map_err(os_error("set the gid of", identity))?;
        check(libc::setresuid(uid, uid, uid)).map_err(os_error("set the uid of", identity))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)).map_err(os_error("set no_new_privs on", identity))?;
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)).map_err(os_error("make undumpable", identity))?;
        libc::umask(0o077);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(uid: u32, name: &str) -> JailConfig {
        JailConfig {
            root: PathBuf::from("/nonexistent"),
            uid,
            gid: uid,
            binds: vec![JailBind { source: PathBuf::from("/"), name: name.into() }],
            cgroup_procs: Vec::new(),
            keep_fds: Vec::new(),
        }
    }

    #[test]
    fn a_jail_is_refused_before_anything_changes_when_its_process_cannot_hold_it() {
        // The test harness is neither PID 1 nor single-threaded.
        // SAFETY: a getter.
        let refused = if unsafe { libc::geteuid() } == 0 { "PID 1" } else { "needs root" };
        let error = enter(&jail(2_000_000, "kernel")).unwrap_err().to_string();
        assert!(error.contains(refused), "{error}");
    }

    #[test]
    fn bind_names_and_identities_are_checked() {
        for bad in ["", "a/b", "..", "dev"] {
            let config = jail(2_000_000, bad);
            assert!(matches!(check_names_and_identity(&config), Err(JailError::BindName(_))), "{bad:?}");
        }
        assert!(matches!(check_names_and_identity(&jail(0, "kernel")), Err(JailError::Identity { .. })));
        assert!(check_names_and_identity(&jail(2_000_000, "kernel")).is_ok());
    }
}
