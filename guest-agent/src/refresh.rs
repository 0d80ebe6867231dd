//! After a snapshot restore the host pushes the wall clock and fresh
//! entropy, so that clones of one snapshot neither run on a stale clock
//! nor share RNG state.

use std::{fs::OpenOptions, io::Write, os::fd::AsRawFd};

use sandbox_proto::agent::RefreshRequest;
use tonic::Status;

/// Smallest entropy accepted from the host.
const MIN_ENTROPY: usize = 32;

pub fn apply(request: RefreshRequest) -> Result<(), Status> {
    if request.entropy.len() < MIN_ENTROPY {
        return Err(Status::invalid_argument(format!(
            "entropy is {} bytes: send at least {MIN_ENTROPY} bytes from the host's CSPRNG",
            request.entropy.len()
        )));
    }
    set_clock(request.wall_clock_unix_ns);
    mix_entropy(&request.entropy).map_err(|e| Status::internal(format!("cannot reseed the RNG: {e}")))
}

/// Sets CLOCK_REALTIME. Without CAP_SYS_TIME (in a jail, which shares the
/// host's clock anyway) this fails with EPERM and is skipped.
fn set_clock(unix_ns: i64) {
    if unix_ns <= 0 {
        return;
    }
    let time = libc::timespec { tv_sec: unix_ns / 1_000_000_000, tv_nsec: unix_ns % 1_000_000_000 };
    // SAFETY: clock_settime reads a timespec from a pointer to a live local.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "clock not set");
    }
}

/// Adds the bytes to the kernel's entropy pool, crediting them when
/// permitted (RNDADDENTROPY), else mixing them in by writing /dev/urandom,
/// then has the kernel reseed its CRNG from the pool at once
/// (RNDRESEEDCRNG): a CRNG that is already seeded only reseeds on its own
/// schedule, so without this, clones of one snapshot would keep producing
/// the same random bytes for a while. In a jail (no CAP_SYS_ADMIN, and the
/// host's RNG, which no other sandbox shares a snapshot of) the reseed is
/// refused and skipped.
fn mix_entropy(entropy: &[u8]) -> std::io::Result<()> {
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    add_entropy(&urandom, entropy)?;
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an ioctl without an argument on an open /dev/urandom.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "CRNG not reseeded");
    }
    Ok(())
}

fn add_entropy(mut urandom: &std::fs::File, entropy: &[u8]) -> std::io::Result<()> {
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 256],
    }
    let len = entropy.len().min(256);
    let mut info = PoolInfo { entropy_count: (len * 8) as libc::c_int, buf_size: len as libc::c_int, buf: [0; 256] };
    info.buf[..len].copy_from_slice(&entropy[..len]);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: the ioctl reads a rand_pool_info laid out as the kernel expects
    // (two ints then buf_size bytes) from a live local.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) } == 0 {
        return Ok(());
    }
    urandom.write_all(entropy)
}
