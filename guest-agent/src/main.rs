//! `sandbox-agent`: PID 1 and API server inside every sandbox.
//!
//! ```text
//! sandbox-agent [--unix PATH] [--listen-fd FD] [--vsock PORT] [--init]
//! ```
//! `--listen-fd` serves the agent API on a listening unix socket it
//! inherited (jails: the daemon binds it where the jail cannot reach),
//! `--unix` on a unix socket it binds itself, `--vsock` on a vsock port. `--init` mounts /proc, /sys, /dev, /dev/pts, /tmp and /run
//! first. Started as PID 1 without arguments (a microVM's init), it does
//! both: mounts, then serves on vsock port 1024.

mod contexts;
mod files;
mod init;
mod kernel;
mod ports;
mod process;
mod processes;
mod pty;
mod reaper;
mod refresh;
mod runcode;
mod service;
mod slots;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use sandbox_proto::agent::agent_server::AgentServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

/// Vsock port the agent serves on in a microVM.
const DEFAULT_VSOCK_PORT: u32 = 1024;
/// Largest message; matches the daemon's agent client.
const MAX_MESSAGE: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("{0}\nusage: sandbox-agent [--unix PATH] [--listen-fd FD] [--vsock PORT] [--init]")]
    Usage(String),
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
    #[error("cannot listen on {what}: {source}")]
    Listen { what: String, source: std::io::Error },
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

enum Listen {
    Unix(PathBuf),
    Inherited(std::os::fd::RawFd),
    Vsock(u32),
}

struct Options {
    listen: Listen,
    init: bool,
}

fn parse_args() -> Result<Options, AgentError> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut init) = (None, false);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| AgentError::Usage(format!("{flag} needs a value")));
        match arg.as_str() {
            "--unix" => listen = Some(Listen::Unix(PathBuf::from(value("--unix")?))),
            "--vsock" => {
                let port = value("--vsock")?;
                let port = port.parse().map_err(|_| AgentError::Usage(format!("--vsock {port}: not a port number")))?;
                listen = Some(Listen::Vsock(port));
            }
            "--listen-fd" => {
                let fd = value("--listen-fd")?;
                let fd = fd.parse().map_err(|_| AgentError::Usage(format!("--listen-fd {fd}: not an fd number")))?;
                listen = Some(Listen::Inherited(fd));
            }
            "--init" => init = true,
            other => return Err(AgentError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    // As a microVM's init (PID 1, started by the kernel without arguments)
    // the agent mounts the basics and serves on vsock.
    let listen = match listen {
        Some(listen) => listen,
        None if std::process::id() == 1 => {
            init = true;
            Listen::Vsock(DEFAULT_VSOCK_PORT)
        }
        None => return Err(AgentError::Usage("pass --unix PATH, --listen-fd FD or --vsock PORT".into())),
    };
    Ok(Options { listen, init })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), AgentError> {
    let options = parse_args()?;
    if options.init {
        init::mount_basics()?;
    }
    if std::process::id() != 1 {
        // Orphans of our children come back to us, as they would to PID 1.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| AgentError::Listen { what: "the async runtime".into(), source })?;
    runtime.block_on(serve(options.listen))
}

async fn serve(listen: Listen) -> Result<(), AgentError> {
    let reaper = reaper::Reaper::start()?;
    let agent = AgentServer::new(service::AgentService::new(reaper))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let server = Server::builder().add_service(agent);
    match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)
                .map_err(|source| AgentError::Listen { what: path.display().to_string(), source })?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            tracing::info!(socket = %path.display(), "agent ready");
            server.serve_with_incoming(UnixListenerStream::new(listener)).await?;
        }
        Listen::Inherited(fd) => {
            let listener = inherited_listener(fd)
                .map_err(|source| AgentError::Listen { what: format!("inherited fd {fd}"), source })?;
            tracing::info!(fd, "agent ready on an inherited socket");
            server.serve_with_incoming(UnixListenerStream::new(listener)).await?;
        }
        Listen::Vsock(port) => {
            let address = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
            let listener = tokio_vsock::VsockListener::bind(address)
                .map_err(|source| AgentError::Listen { what: format!("vsock port {port}"), source })?;
            tracing::info!(port, "agent ready on vsock");
            server.serve_with_incoming(listener.incoming()).await?;
        }
    }
    Ok(())
}

/// Takes over the listening unix socket at `fd`, checking that it is one.
fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<UnixListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat on an fd number only reads its metadata.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the live, zeroed stat above.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a socket"));
    }
    // SAFETY: fd is an open socket handed to this process for it alone;
    // nothing else in the agent owns it. Marked close-on-exec so that no
    // child inherits it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl on the fd now owned by `listener`.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}
