//! Loop devices through `/dev/loop-control`: a file (a jail's disk, a
//! template's root image) attached to a free loop device so that it can be
//! mounted. Devices are attached with autoclear, so the kernel detaches
//! them once their last mount and file handle are gone: a jail's disk
//! disappears with the jail's mount namespace, whatever killed it.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// How long attaching keeps asking for another free device while other
/// processes (dozens of jails starting at once) take each one first.
const ATTACH_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot open {path}: {source}; the host needs loop devices (/dev/loop-control) and root")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot attach {file} to a loop device: {source}")]
    Attach { file: PathBuf, source: std::io::Error },
}

/// The kernel's `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// The kernel's `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device; the device stays attached while it is mounted
/// or this handle is open.
pub struct LoopDevice {
    path: PathBuf,
    _device: File,
}

impl LoopDevice {
    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path, writable: bool) -> Result<File, LoopError> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| LoopError::Open { path: path.to_path_buf(), source })
}

/// Attaches `file` to a free loop device, read-only when asked.
pub fn attach(file: &Path, read_only: bool) -> Result<LoopDevice, LoopError> {
    let backing = open(file, !read_only)?;
    let control = open(Path::new("/dev/loop-control"), true)?;
    let attach_error = |source| LoopError::Attach { file: file.to_path_buf(), source };
    let deadline = Instant::now() + ATTACH_DEADLINE;
    let mut last_error = std::io::Error::from(std::io::ErrorKind::ResourceBusy);
    for round in 0u64.. {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(attach_error(std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = open(&path, !read_only)?;
        let flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        // SAFETY: all-zero is a valid loop_config (plain integers and arrays).
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = backing.as_raw_fd() as u32;
        config.info.flags = flags;
        // SAFETY: LOOP_CONFIGURE reads a loop_config that lives across the call.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) } == 0 {
            return Ok(LoopDevice { path, _device: device });
        }
        last_error = std::io::Error::last_os_error();
        // EBUSY: another process took this device first; ask for another,
        // after a pause that grows and differs between processes, so that
        // the racers spread out.
        if last_error.raw_os_error() != Some(libc::EBUSY) || Instant::now() >= deadline {
            break;
        }
        let jitter = u64::from(std::process::id() % 8);
        std::thread::sleep(Duration::from_micros(100 * (round.min(20) + jitter)));
    }
    Err(attach_error(last_error))
}
