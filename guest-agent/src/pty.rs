//! Pseudo-terminals: a master side the agent reads and writes without
//! blocking, and a slave side that becomes a process's controlling terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot open a pseudo-terminal: {0}")]
    Open(std::io::Error),
    #[error("cannot register the pseudo-terminal with the runtime: {0}")]
    Register(std::io::Error),
}

/// The master side of a PTY.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// Opens a PTY of `rows` x `cols`; returns the master and the slave.
pub fn open(rows: u16, cols: u16) -> Result<(PtyMaster, OwnedFd), PtyError> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the out-pointers, which point to
    // live locals; name and termios may be null; `size` outlives the call.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    if rc != 0 {
        return Err(PtyError::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: openpty succeeded, so both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        set_flags(fd, libc::F_SETFD, libc::FD_CLOEXEC).map_err(PtyError::Open)?;
    }
    set_flags(&master, libc::F_SETFL, libc::O_NONBLOCK).map_err(PtyError::Open)?;
    // SAFETY: `master` is an open fd owned by the AsyncFd for its whole
    // life, and OwnedFd::as_raw_fd always returns that same fd.
    let fd = unsafe { AsyncFd::register(master) }.map_err(|error| PtyError::Register(error.into_parts().1))?;
    Ok((PtyMaster { fd }, slave))
}

fn set_flags(fd: &OwnedFd, command: libc::c_int, flag: libc::c_int) -> std::io::Result<()> {
    let get = if command == libc::F_SETFD { libc::F_GETFD } else { libc::F_GETFL };
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let current = unsafe { libc::fcntl(fd.as_raw_fd(), get) };
    // SAFETY: as above.
    if current < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), command, current | flag) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl PtyMaster {
    /// Reads what the terminal printed; 0 means every slave fd is closed.
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: reading into a live, exclusively borrowed buffer of buf.len() bytes.
            let result = guard.try_io(|fd| match unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } {
                n if n >= 0 => Ok(n as usize),
                _ => Err(std::io::Error::last_os_error()),
            });
            match result {
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Types `data` into the terminal.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            // SAFETY: writing from a live buffer of data.len() bytes.
            let result = guard.try_io(|fd| match unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) } {
                n if n >= 0 => Ok(n as usize),
                _ => Err(std::io::Error::last_os_error()),
            });
            match result {
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Changes the terminal size; the foreground process gets SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize from a pointer to a live local.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
