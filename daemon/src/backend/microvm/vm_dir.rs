//! A VMM's directory on the host, split between the daemon and its jailed
//! VMM. `DIR` (root, 0700) holds what is the daemon's: the VMM's
//! configuration and log, hard links to the VMM's control and vsock
//! sockets, and published snapshots. `DIR/jail` is the VMM's whole file
//! system, owned by the VMM's uid while it runs and by root otherwise.
//!
//! Nothing under `DIR/jail` is trusted: the daemon never follows a path
//! there that could be a symlink the VMM planted, links a socket only once
//! it has checked that it is a socket owned by the VMM's uid (so the
//! daemon cannot be redirected to another VMM's socket), reads logs with
//! bounded reads, and takes a snapshot out only after the VMM has exited,
//! checking that it holds nothing but plain files.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

/// The VMM's root, inside its directory.
pub const JAIL: &str = "jail";
/// How much of the end of a log is read for a diagnostic.
const TAIL_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a socket of the VMM's uid {uid}; the VMM may be compromised: it was not used")]
    ForeignSocket { path: PathBuf, uid: u32 },
    #[error("the VMM left {path} in its snapshot, which must hold only files and directories: the snapshot was not used")]
    NotPlain { path: PathBuf },
    #[error("{path} is not the regular file the daemon wrote: it was not used")]
    NotAFile { path: PathBuf },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmDirError + 'a {
    move |source| VmDirError::Io { action, path: path.to_path_buf(), source }
}

/// Creates `dir` (root, 0700) and its jail directory.
pub fn prepare(dir: &Path) -> Result<(), VmDirError> {
    let jail = dir.join(JAIL);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&jail).map_err(io_error("create", &jail))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_error("restrict", dir))
}

/// Replaces `path` (the daemon's, never followed if it is a symlink) with
/// a new file only root can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), VmDirError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io_error("replace", path)(error)),
        _ => {}
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))
}

/// Opens `path` for appending (created 0600), refusing a symlink.
pub fn open_log(path: &Path) -> Result<File, VmDirError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_error("open", path))
}

/// Changes the owner of `dir` and everything under it, never following a
/// symlink (a symlink itself gets the owner); nothing to do if it is gone.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), VmDirError> {
    match std::os::unix::fs::lchown(dir, Some(uid), Some(gid)) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        result => result.map_err(io_error("change the owner of", dir))?,
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_error("inspect", dir))?;
    if !meta.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        chown_tree(&entry.path(), uid, gid)?;
    }
    Ok(())
}

/// Replaces whatever is at `path` with an empty directory owned by `uid`
/// (a symlink is removed, not followed).
pub fn recreate_dir(path: &Path, uid: u32) -> Result<(), VmDirError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).map_err(io_error("remove", path))?,
        Ok(_) => std::fs::remove_file(path).map_err(io_error("remove", path))?,
        Err(_) => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(path).map_err(io_error("create", path))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(io_error("change the owner of", path))
}

/// Makes a snapshot the VMM wrote (it has exited) the daemon's: plain files
/// and directories only, owned by root, readable by the uids of later VMMs
/// that restore it (its parents keep other host users out).
pub fn publish(dir: &Path) -> Result<(), VmDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io_error("inspect", dir))?;
    let mode = if meta.is_dir() {
        0o755
    } else if meta.is_file() {
        0o644
    } else {
        return Err(VmDirError::NotPlain { path: dir.to_path_buf() });
    };
    std::os::unix::fs::lchown(dir, Some(0), Some(0)).map_err(io_error("change the owner of", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_error("set the mode of", dir))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(io_error("list", dir))? {
            publish(&entry.map_err(io_error("list", dir))?.path())?;
        }
    }
    Ok(())
}

/// Links the socket `name` of the VMM (uid `uid`) from the jail into
/// `dir`, where the VMM cannot replace it, once it is checked; returns the
/// link, or None while the VMM has not created the socket yet.
pub fn link_socket(dir: &Path, name: &str, uid: u32) -> Result<Option<PathBuf>, VmDirError> {
    let inner = dir.join(JAIL).join(name);
    let flags = nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::open(&inner, flags, nix::sys::stat::Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(errno) => return Err(io_error("open", &inner)(errno.into())),
    };
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let stat = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| io_error("inspect", &inner)(e.into()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK || stat.st_uid != uid {
        return Err(VmDirError::ForeignSocket { path: inner, uid });
    }
    let link = dir.join(name);
    unlink(&link)?;
    let link_c = CString::new(link.as_os_str().as_bytes()).map_err(|_| io_error("link", &link)(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: linkat of the checked inode (an O_PATH descriptor with an
    // empty path, which needs CAP_DAC_READ_SEARCH, which root has) to a
    // NUL-terminated path.
    let linked = unsafe {
        libc::linkat(std::os::fd::AsRawFd::as_raw_fd(&fd), c"".as_ptr(), libc::AT_FDCWD, link_c.as_ptr(), libc::AT_EMPTY_PATH)
    };
    if linked == -1 {
        return Err(io_error("link", &link)(std::io::Error::last_os_error()));
    }
    Ok(Some(link))
}

/// Whether `path` (not followed if it is a symlink) is a socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()))
}

/// The bytes of the regular file `path` (never a symlink), at most `max`
/// of them; None if there is no such file.
pub fn read_small(path: &Path, max: u64) -> Result<Option<Vec<u8>>, VmDirError> {
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(io_error("open", path))?,
    };
    if !file.metadata().map_err(io_error("inspect", path))?.is_file() {
        return Err(VmDirError::NotAFile { path: path.to_path_buf() });
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).map_err(io_error("read", path))?;
    Ok(Some(bytes))
}

/// Removes `path` if it exists.
pub fn unlink(path: &Path) -> Result<(), VmDirError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(io_error("remove", path)(error)),
        _ => Ok(()),
    }
}

/// The last `lines` lines of the file at `path`, joined with " | ", from at
/// most its last 16 KiB; empty if it is not a regular file (a symlink, a
/// FIFO the VMM made) or cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) else {
        return String::new();
    };
    let Some(len) = file.metadata().ok().filter(|m| m.is_file()).map(|m| m.len()) else { return String::new() };
    if file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(TAIL_BYTES).read_to_end(&mut bytes);
    super::super::last_lines(&String::from_utf8_lossy(&bytes), lines)
}

/// Whether a process of another uid can read `path` (for a directory:
/// list it, and read every file in it).
pub fn readable_by_others(path: &Path) -> Result<(), PathBuf> {
    let meta = std::fs::metadata(path).map_err(|_| path.to_path_buf())?;
    if meta.is_file() {
        return if meta.mode() & 0o004 != 0 { Ok(()) } else { Err(path.to_path_buf()) };
    }
    if meta.mode() & 0o005 != 0o005 {
        return Err(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|_| path.to_path_buf())?;
    for entry in entries.flatten() {
        let meta = entry.metadata().map_err(|_| entry.path())?;
        if meta.is_file() && meta.mode() & 0o004 == 0 {
            return Err(entry.path());
        }
    }
    Ok(())
}
