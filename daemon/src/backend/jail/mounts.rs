//! Builds a jail's root inside its new mount namespace and pivots into it:
//! the template's root image read-only as `/`, the sandbox's own disk
//! (an ext4 file on a loop device, mounted only in this namespace) as
//! `/tmp` and `/home/user`, a fresh `/proc` with its kernel knobs read-only
//! and its kernel-internal files masked, a read-only `/dev` with a few
//! devices, private `/dev/pts` and `/dev/shm`, and a small `/run`. No host
//! path is mounted besides the image and the agent binary, and no `/sys`.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    unistd::{chdir, chown, pivot_root, Gid, Uid},
};

use super::loopdev::{self, LoopError};

/// Device nodes bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Where the agent binary appears inside the jail (the image's init).
pub const AGENT_PATH: &str = "/sbin/init";
/// Uid and gid of the sandbox user inside the jail.
pub const USER_ID: u32 = 1000;
/// `/proc` entries that must stay read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// `/proc` entries hidden behind an empty file or directory.
const PROC_MASKED: &[&str] = &["kcore", "kallsyms", "keys", "timer_list", "sched_debug", "kmsg", "acpi", "scsi", "asound"];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {what} at {target}: {source}")]
    Mount { what: String, target: PathBuf, source: nix::Error },
    #[error("cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: std::io::Error },
    #[error("cannot pivot into {root}: {source}")]
    Pivot { root: PathBuf, source: nix::Error },
    #[error("the root image lacks {0}: rebuild it with scripts/guest-image.sh")]
    Image(String),
    #[error(transparent)]
    Loop(#[from] LoopError),
}

/// Host paths the jail's root is built from.
pub struct RootLayout<'a> {
    /// The template's root image, mounted read-only on the host.
    pub image: &'a Path,
    /// The jail's empty root mountpoint.
    pub root: &'a Path,
    /// The sandbox's disk (an ext4 file) and an empty mountpoint for it.
    pub disk: &'a Path,
    pub disk_mount: &'a Path,
    pub agent: &'a Path,
    /// Host uid and gid that root inside the jail maps to.
    pub id_base: u32,
}

fn mount_at(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>) -> Result<(), MountError> {
    mount(source, target, fstype, flags, data).map_err(|source_error| MountError::Mount {
        what: source.map_or_else(|| fstype.unwrap_or("remount").to_string(), |s| s.display().to_string()),
        target: target.to_path_buf(),
        source: source_error,
    })
}

fn prepare(path: &Path) -> impl Fn(std::io::Error) -> MountError + '_ {
    move |source| MountError::Prepare { path: path.to_path_buf(), source }
}

/// Bind-mounts `source` at `target` with `flags` (read-only, nosuid...).
fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
    mount_at(Some(source), target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    mount_at(None, target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags, None)
}

fn read_only() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

fn hardened() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// A mountpoint the read-only image must already have.
fn existing(root: &Path, inside: &str) -> Result<PathBuf, MountError> {
    let path = root.join(inside.trim_start_matches('/'));
    if fs::symlink_metadata(&path).is_ok_and(|meta| !meta.file_type().is_symlink()) {
        Ok(path)
    } else {
        Err(MountError::Image(inside.to_string()))
    }
}

/// Builds the root and pivots into it. Runs as PID 1 of the new namespaces,
/// still as the host's root: the user namespace comes afterwards.
pub fn build_root(layout: &RootLayout) -> Result<(), MountError> {
    let root = layout.root;
    mount_at(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    bind(layout.image, root, read_only())?;
    mount_disk(layout)?;
    bind(layout.agent, &existing(root, AGENT_PATH)?, read_only())?;
    mount_proc(&existing(root, "proc")?)?;
    build_dev(&existing(root, "dev")?)?;
    let run_options = format!("mode=0755,size=1m,uid={0},gid={0}", layout.id_base);
    mount_at(Some(Path::new("tmpfs")), &existing(root, "run")?, Some("tmpfs"), hardened(), Some(&run_options))?;
    pivot(root)
}

/// Mounts the sandbox's disk and binds its `tmp` and `home` directories,
/// owned by the sandbox's mapped ids, at `/tmp` and `/home/user`.
fn mount_disk(layout: &RootLayout) -> Result<(), MountError> {
    let device = loopdev::attach(layout.disk, false)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    mount_at(Some(device.path()), layout.disk_mount, Some("ext4"), flags, None)?;
    let root_id = layout.id_base;
    let user_id = layout.id_base + USER_ID;
    for (dir, mode, owner, inside) in [("tmp", 0o1777, root_id, "tmp"), ("home", 0o750, user_id, "home/user")] {
        let source = layout.disk_mount.join(dir);
        fs::create_dir_all(&source).map_err(prepare(&source))?;
        chown(&source, Some(Uid::from_raw(owner)), Some(Gid::from_raw(owner)))
            .map_err(|e| MountError::Prepare { path: source.clone(), source: e.into() })?;
        fs::set_permissions(&source, fs::Permissions::from_mode(mode)).map_err(prepare(&source))?;
        bind(&source, &existing(layout.root, inside)?, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }
    umount2(layout.disk_mount, MntFlags::MNT_DETACH)
        .map_err(|source| MountError::Mount { what: "the disk's staging mount".into(), target: layout.disk_mount.to_path_buf(), source })
}

/// A fresh `/proc` whose kernel knobs are read-only and whose views of
/// kernel memory, keys and timers are masked.
fn mount_proc(proc_dir: &Path) -> Result<(), MountError> {
    mount_at(Some(Path::new("proc")), proc_dir, Some("proc"), hardened(), None)?;
    for name in PROC_READ_ONLY {
        let path = proc_dir.join(name);
        if path.exists() {
            bind(&path, &path, read_only())?;
        }
    }
    for name in PROC_MASKED {
        let path = proc_dir.join(name);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                mount_at(Some(Path::new("tmpfs")), &path, Some("tmpfs"), read_only() | MsFlags::MS_NOEXEC, Some("size=0,mode=0555"))?
            }
            Ok(_) => bind(Path::new("/dev/null"), &path, read_only())?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// A read-only tmpfs `/dev` with a few host devices, a private devpts and
/// a writable `/dev/shm`.
fn build_dev(dev: &Path) -> Result<(), MountError> {
    mount_at(Some(Path::new("tmpfs")), dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755,size=64k"))?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::File::create(&target).map_err(prepare(&target))?;
        mount_at(Some(&Path::new("/dev").join(name)), &target, None, MsFlags::MS_BIND, None)?;
    }
    for (link, target) in [("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
        symlink(target, dev.join(link)).map_err(prepare(&dev.join(link)))?;
    }
    let (pts, shm) = (dev.join("pts"), dev.join("shm"));
    fs::create_dir(&pts).map_err(prepare(&pts))?;
    fs::create_dir(&shm).map_err(prepare(&shm))?;
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_at(None, dev, None, remount, Some("mode=0755,size=64k"))?;
    mount_at(Some(Path::new("devpts")), &pts, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620"))?;
    mount_at(Some(Path::new("tmpfs")), &shm, Some("tmpfs"), hardened(), Some("mode=1777,size=64m"))
}

/// Makes `root` the new `/` and drops the old root.
fn pivot(root: &Path) -> Result<(), MountError> {
    let pivot_error = |source| MountError::Pivot { root: root.to_path_buf(), source };
    chdir(root).map_err(pivot_error)?;
    // Stacks the old root on the new one (no directory needed in the
    // read-only image), then detaches it.
    pivot_root(".", ".").map_err(pivot_error)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(pivot_error)?;
    chdir("/").map_err(pivot_error)
}
