//! A jail's writable disk: a sparse file of the sandbox's disk size with
//! an ext4 file system, made by `mkfs.ext4` with lazy initialisation (so a
//! 1 GiB disk costs well under a megabyte until it is written). Writes
//! past its size fail with ENOSPC inside the jail; the host's free space
//! only shrinks by what the sandbox really wrote.

use std::{fs, os::unix::fs::OpenOptionsExt, path::{Path, PathBuf}, process::Command};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the disk file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot run mkfs.ext4 for {path}: {source}; install e2fsprogs")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("mkfs.ext4 failed for {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
}

/// Creates the disk file at `path` (mode 0600) with `size_mib` of space.
pub fn create(path: &Path, size_mib: u32) -> Result<(), DiskError> {
    let file_error = |source| DiskError::File { path: path.to_path_buf(), source };
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(file_error)?;
    file.set_len(u64::from(size_mib) << 20).map_err(file_error)?;
    drop(file);
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|source| DiskError::Spawn { path: path.to_path_buf(), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DiskError::Mkfs { path: path.to_path_buf(), stderr: String::from_utf8_lossy(&output.stderr).trim().to_string() })
    }
}
