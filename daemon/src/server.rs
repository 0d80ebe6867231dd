//! Runs the daemon: secures its state directory, loads the API keys, picks
//! the backend, builds the manager, serves the gRPC API on TCP and a 0600
//! unix socket behind authentication and connection limits, serves
//! /metrics, marks sandboxes whose guest died as stopped, and deletes
//! sandboxes whose lifetime has passed. At start the manager re-adopts
//! the sandboxes of the registry; a graceful stop keeps them (or deletes
//! them, with `--on-stop delete`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sandbox_proto::api::{
    files_server::FilesServer, processes_server::ProcessesServer, sandboxes_server::SandboxesServer,
};
use prost::Message;
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use crate::{
    api::{files::FilesService, processes::ProcessesService, sandboxes::SandboxesService, ApiContext},
    audit::{AuditError, AuditLog, Entry},
    auth::{ApiKeys, AuthError, AuthLayer, KeyList, KeySource},
    backend::{
        self,
        microvm::{vmm_process::RestoreMemory, GuestImages},
        BackendChoice, MicroVmOptions, SelectError,
    },
    connections::{self, ConnectionLimits, Gate},
    manager::{OnStop, Policy, SandboxError, SandboxManager},
    registry::{Registry, RegistryError},
    pool::PoolConfig,
    metrics::{self, MetricsError},
};

/// Largest message the public API decodes; field checks are stricter.
const MAX_API_MESSAGE: usize = 8 * 1024 * 1024;
/// Calls one connection may have in progress at once (more wait).
const CALLS_PER_CONNECTION: usize = 256;
/// HTTP/2 streams one connection may have open at once.
const STREAMS_PER_CONNECTION: u32 = 512;
/// Largest header block a call may send.
const MAX_HEADER_BYTES: u32 = 16 * 1024;
/// Idle connections are pinged this often, and closed when a ping is not
/// answered in time.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stop waits for open calls to end before deleting sandboxes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the kernel queues for the accept loop (capped by
/// net.core.somaxconn).
const ACCEPT_BACKLOG: u32 = 4096;
/// File descriptors kept free of API connections, for sandboxes and logs.
const FD_RESERVE: u64 = 512;
/// The package of the internal host-guest API, which reflection hides.
const AGENT_PACKAGE: &str = "sandbox.agent.v1";

/// Where the E2B front door listens, and the domain it names sandboxes under.
#[derive(Clone, Debug)]
pub struct E2bConfig {
    pub listen: SocketAddr,
    pub domain: String,
}

/// Everything `sandboxd serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// The E2B-compatible HTTP front door, when asked for.
    pub e2b: Option<E2bConfig>,
    pub unix_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub backend: BackendChoice,
    pub guest_images: Option<GuestImages>,
    /// The guest root image (the jail backend's `/` as well).
    pub rootfs_image: Option<PathBuf>,
    pub restore_memory: RestoreMemory,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub agent_binary: PathBuf,
    pub templates: BTreeMap<String, Option<PathBuf>>,
    pub pool: PoolConfig,
    /// What a graceful stop does with the sandboxes.
    pub on_stop: OnStop,
    pub policy: Policy,
    pub connections: ConnectionLimits,
    pub api_keys: KeyList,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the state directory {path}: {source}; pass --state-dir with a writable path")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {what}: {source}; pick a free address")]
    Listen { what: String, source: std::io::Error },
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Backend(#[from] SelectError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot restore the sandboxes of the registry: {0}")]
    Restore(#[from] SandboxError),
}

/// Serves until SIGINT or SIGTERM, then keeps or deletes every sandbox
/// (`on_stop`).
pub async fn serve(mut config: ServeConfig) -> Result<(), ServeError> {
    private_state_dir(&config.state_dir)?;
    let (keys, source) = ApiKeys::load(std::mem::replace(&mut config.api_keys, KeyList::parse("")), &config.state_dir)?;
    log_key_source(&source, config.listen);
    config.connections.max_connections = fit_to_fd_limit(config.connections.max_connections);
    if let Some(addr) = config.metrics_listen {
        metrics::install(addr)?;
    }
    let microvm = MicroVmOptions {
        images: config.guest_images.clone(),
        rootfs_image: config.rootfs_image.clone(),
        default_limits: config.policy.default_limits,
        restore_memory: config.restore_memory,
    };
    let backend = backend::select(config.backend, &config.state_dir, &config.agent_binary, microvm).await?;
    tracing::info!(backend = backend.kind().as_str(), "backend ready");
    let registry = Registry::open(&config.state_dir)?;
    let manager = SandboxManager::start(backend, config.templates.clone(), config.policy.clone(), config.pool, registry).await?;
    let context = ApiContext { manager: Arc::clone(&manager), audit: AuditLog::open(&config.audit_log)? };
    let reaper = tokio::spawn(expire_forever(context.clone()));

    let tcp = Arc::new(
        listen_tcp(config.listen).map_err(|source| ServeError::Listen { what: config.listen.to_string(), source })?,
    );
    let unix = Arc::new(private_socket(&config.unix_socket)?);
    tracing::info!(listen = %tcp.local_addr().unwrap_or(config.listen), unix = %config.unix_socket.display(), "serving sandbox.v1");

    let gate = Gate::new(config.connections);
    let tcp_connections = connections::incoming(Arc::clone(&gate), move || {
        let tcp = Arc::clone(&tcp);
        async move {
            let (stream, _) = tcp.accept().await?;
            // Small stream frames (exec events) must not wait for Nagle's algorithm.
            stream.set_nodelay(true)?;
            Ok(stream)
        }
    });
    let unix_connections = connections::incoming(Arc::clone(&gate), move || {
        let unix = Arc::clone(&unix);
        async move { Ok(unix.accept().await?.0) }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(e2b) = &config.e2b {
        let listener = listen_tcp(e2b.listen).map_err(|source| ServeError::Listen { what: e2b.listen.to_string(), source })?;
        let front = crate::e2b::Front::new(Arc::clone(&manager), context.audit.clone(), keys.clone(), e2b.domain.clone());
        tracing::info!(listen = %listener.local_addr().unwrap_or(e2b.listen), domain = %e2b.domain, "serving the E2B API");
        tokio::spawn(crate::e2b::serve(listener, front, stop_rx.clone()));
    }
    let auth = keys.layer(context.audit.clone());
    let on_tcp = router(&context, &auth).serve_with_incoming_shutdown(tcp_connections, stopped(stop_rx.clone()));
    let on_unix = router(&context, &auth).serve_with_incoming_shutdown(unix_connections, stopped(stop_rx));
    let servers = async { tokio::try_join!(on_tcp, on_unix) };
    tokio::pin!(servers);
    let result = tokio::select! {
        result = &mut servers => result.map(|_| ()),
        () = termination() => {
            tracing::info!(on_stop = ?config.on_stop, "stopping: pooled guests are destroyed, sandboxes kept or deleted as --on-stop says");
            let _ = stop_tx.send(true);
            gate.close_waiting();
            match tokio::time::timeout(DRAIN_TIMEOUT, servers).await {
                Ok(result) => result.map(|_| ()),
                Err(_) => {
                    tracing::warn!("open calls did not end within {DRAIN_TIMEOUT:?}; stopping without them");
                    Ok(())
                }
            }
        }
    };
    reaper.abort();
    manager.shutdown(config.on_stop).await;
    let _ = std::fs::remove_file(&config.unix_socket);
    Ok(result?)
}

/// Creates the state directory, or narrows an existing one, to 0700: it
/// holds the keys, the audit log, the socket and every sandbox's files.
fn private_state_dir(dir: &Path) -> Result<(), ServeError> {
    let failed = |source| ServeError::StateDir { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

/// Binds the TCP listener with a deep accept queue, so that a burst of
/// connections waits for the accept loop instead of being dropped (and
/// retried by the clients a second later).
fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Binds the unix socket, readable and writable by the daemon's user only.
fn private_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let failed = |source| ServeError::Listen { what: path.display().to_string(), source };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

/// Says where the keys come from and, for the generated admin key, how to
/// use it (never the key itself).
fn log_key_source(source: &KeySource, listen: SocketAddr) {
    match source {
        KeySource::Environment(count) => tracing::info!(keys = count, "API keys from SANDBOXD_API_KEYS"),
        KeySource::Generated(path) | KeySource::Reused(path) => tracing::info!(
            "SANDBOXD_API_KEYS is not set: every call needs the admin key in {path} ({state}), e.g. \
             grpcurl -plaintext -H \"authorization: Bearer $(cat {path})\" {listen} list",
            path = path.display(),
            state = if matches!(source, KeySource::Generated(_)) { "generated now" } else { "kept from an earlier run" },
        ),
    }
}

/// Lowers `wanted` so that API connections leave [`FD_RESERVE`] file
/// descriptors of the daemon's limit for everything else.
fn fit_to_fd_limit(wanted: usize) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    let room = limit.rlim_cur.saturating_sub(FD_RESERVE).max(limit.rlim_cur / 2).max(1);
    if wanted as u64 > room {
        tracing::warn!(wanted, open_files = limit.rlim_cur, "--max-connections lowered to {room} to fit the open-files limit (raise `ulimit -n` for more)");
        return room as usize;
    }
    wanted
}

/// Every public service and health: the descriptor set without the
/// internal agent API.
fn public_descriptors() -> prost_types::FileDescriptorSet {
    let mut set = prost_types::FileDescriptorSet::decode(sandbox_proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set is valid");
    set.file.retain(|file| file.package() != AGENT_PACKAGE);
    set
}

fn reflection_builder(public: &prost_types::FileDescriptorSet) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(public.clone())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

type ApiRouter = tonic::transport::server::Router<Stack<AuthLayer, Identity>>;

fn router(context: &ApiContext, auth: &AuthLayer) -> ApiRouter {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    for service in ["sandbox.v1.Sandboxes", "sandbox.v1.Processes", "sandbox.v1.Files", ""] {
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
        });
    }
    // v1 for current tools, v1alpha for grpcurl 1.8 and ghz.
    let public = public_descriptors();
    let reflection = reflection_builder(&public).build_v1().expect("the embedded descriptor sets are valid");
    let reflection_alpha = reflection_builder(&public).build_v1alpha().expect("the embedded descriptor sets are valid");
    let sandboxes = SandboxesServer::new(SandboxesService(context.clone()))
        .max_decoding_message_size(MAX_API_MESSAGE);
    let processes = ProcessesServer::new(ProcessesService(context.clone()))
        .max_decoding_message_size(MAX_API_MESSAGE);
    let files = FilesServer::new(FilesService(context.clone())).max_decoding_message_size(MAX_API_MESSAGE);
    Server::builder()
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(auth.clone())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(sandboxes)
        .add_service(processes)
        .add_service(files)
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Twice a second: marks sandboxes whose guest died as stopped, and
/// deletes expired sandboxes.
async fn expire_forever(context: ApiContext) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        context.manager.sweep_stopped().await;
        for id in context.manager.expire().await {
            tracing::info!(sandbox = %id, "deleted: its lifetime passed");
            let entry = Entry { key_id: "system", peer: "-", sandbox: &id, operation: "Sandboxes.Expire", outcome: "ok" };
            context.audit.record(entry);
        }
    }
}
