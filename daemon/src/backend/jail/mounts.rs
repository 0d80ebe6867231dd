//! Builds a jail's root file system inside its new mount namespace and
//! pivots into it: a read-only system (the host's /usr, /etc and friends,
//! or a template rootfs), private writable /tmp and /home/user, the agent's
//! socket directory, a fresh /proc and a minimal /dev.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    unistd::{chdir, pivot_root},
};

/// System directories shared read-only from the host or the rootfs.
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt"];
/// Device nodes bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Where the agent binary appears inside the jail.
pub const AGENT_PATH: &str = "/.sandbox/sandbox-agent";
/// Where the agent's socket directory appears inside the jail.
pub const RUN_DIR: &str = "/run/sandbox";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {what} at {target}: {source}")]
    Mount { what: String, target: PathBuf, source: nix::Error },
    #[error("cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: std::io::Error },
    #[error("cannot pivot into {root}: {source}")]
    Pivot { root: PathBuf, source: nix::Error },
}

/// Host paths the jail's root is built from.
pub struct RootLayout<'a> {
    /// The jail's empty root mountpoint.
    pub root: &'a Path,
    /// Where system directories come from: "/" or a template rootfs.
    pub system: &'a Path,
    pub tmp: &'a Path,
    pub home: &'a Path,
    pub run: &'a Path,
    pub agent: &'a Path,
}

fn mount_at(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>) -> Result<(), MountError> {
    mount(source, target, fstype, flags, data).map_err(|source_error| MountError::Mount {
        what: source.map_or_else(|| fstype.unwrap_or("remount").to_string(), |s| s.display().to_string()),
        target: target.to_path_buf(),
        source: source_error,
    })
}

fn prepare_dir(path: &Path) -> Result<(), MountError> {
    fs::create_dir_all(path).map_err(|source| MountError::Prepare { path: path.to_path_buf(), source })
}

fn prepare_file(path: &Path) -> Result<(), MountError> {
    fs::File::create(path).map(drop).map_err(|source| MountError::Prepare { path: path.to_path_buf(), source })
}

/// Bind-mounts `source` at `target` and makes it read-only, nosuid, nodev.
fn bind_read_only(source: &Path, target: &Path) -> Result<(), MountError> {
    mount_at(Some(source), target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_at(None, target, None, flags, None)
}

/// Bind-mounts `source` at `target` writable, without setuid or devices.
fn bind_writable(source: &Path, target: &Path) -> Result<(), MountError> {
    mount_at(Some(source), target, None, MsFlags::MS_BIND, None)?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_at(None, target, None, flags, None)
}

/// Builds the root and pivots into it. Runs as PID 1 of the new namespaces.
pub fn build_root(layout: &RootLayout) -> Result<(), MountError> {
    let root = layout.root;
    mount_at(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    mount_at(Some(Path::new("tmpfs")), root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755,size=4m"))?;
    share_system(layout)?;
    for (source, inside) in [(layout.tmp, "tmp"), (layout.home, "home/user"), (layout.run, RUN_DIR.trim_start_matches('/'))] {
        let target = root.join(inside);
        prepare_dir(&target)?;
        bind_writable(source, &target)?;
    }
    let agent = root.join(AGENT_PATH.trim_start_matches('/'));
    prepare_dir(agent.parent().unwrap_or(root))?;
    prepare_file(&agent)?;
    bind_read_only(layout.agent, &agent)?;
    let proc_dir = root.join("proc");
    prepare_dir(&proc_dir)?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at(Some(Path::new("proc")), &proc_dir, Some("proc"), hardened, None)?;
    build_dev(&root.join("dev"))?;
    pivot(root)
}

fn share_system(layout: &RootLayout) -> Result<(), MountError> {
    for name in SYSTEM_DIRS {
        let source = layout.system.join(name);
        let target = layout.root.join(name);
        match fs::symlink_metadata(&source) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&source).map_err(|e| MountError::Prepare { path: source.clone(), source: e })?;
                symlink(&link, &target).map_err(|e| MountError::Prepare { path: target.clone(), source: e })?;
            }
            Ok(meta) if meta.is_dir() => {
                prepare_dir(&target)?;
                bind_read_only(&source, &target)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn build_dev(dev: &Path) -> Result<(), MountError> {
    prepare_dir(dev)?;
    mount_at(Some(Path::new("tmpfs")), dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755,size=64k"))?;
    for name in DEVICES {
        let target = dev.join(name);
        prepare_file(&target)?;
        mount_at(Some(&Path::new("/dev").join(name)), &target, None, MsFlags::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    prepare_dir(&pts)?;
    mount_at(Some(Path::new("devpts")), &pts, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620"))?;
    let shm = dev.join("shm");
    prepare_dir(&shm)?;
    mount_at(Some(Path::new("tmpfs")), &shm, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777,size=64m"))?;
    for (link, target) in [("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
        symlink(target, dev.join(link)).map_err(|e| MountError::Prepare { path: dev.join(link), source: e })?;
    }
    Ok(())
}

/// Makes `root` the new `/`, drops the old root, and makes `/` read-only.
fn pivot(root: &Path) -> Result<(), MountError> {
    let old = root.join(".old-root");
    prepare_dir(&old)?;
    pivot_root(root, &old).map_err(|source| MountError::Pivot { root: root.to_path_buf(), source })?;
    chdir("/").map_err(|source| MountError::Pivot { root: root.to_path_buf(), source })?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(|source| MountError::Pivot { root: root.to_path_buf(), source })?;
    let _ = fs::remove_dir("/.old-root");
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_at(None, Path::new("/"), None, flags, None)
}
