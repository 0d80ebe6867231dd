//! Runs the daemon: picks the backend, builds the manager, serves the gRPC
//! API on TCP and a unix socket, serves /metrics, and deletes sandboxes
//! whose lifetime has passed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use sandbox_proto::api::{
    files_server::FilesServer, processes_server::ProcessesServer, sandboxes_server::SandboxesServer,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::{
    wrappers::{TcpListenerStream, UnixListenerStream},
    StreamExt,
};
use tonic::{service::interceptor::InterceptedService, transport::Server};

use crate::{
    api::{files::FilesService, processes::ProcessesService, sandboxes::SandboxesService, ApiContext},
    audit::{AuditError, AuditLog},
    auth::ApiKeys,
    backend::{
        self,
        microvm::{vmm_process::RestoreMemory, GuestImages},
        BackendChoice, MicroVmOptions, SelectError,
    },
    manager::{Policy, SandboxManager},
    pool::PoolConfig,
    metrics::{self, MetricsError},
};

/// Largest message the public API decodes; field checks are stricter.
const MAX_API_MESSAGE: usize = 8 * 1024 * 1024;

/// Everything `sandboxd serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub unix_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub backend: BackendChoice,
    pub guest_images: Option<GuestImages>,
    pub restore_memory: RestoreMemory,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub agent_binary: PathBuf,
    pub templates: BTreeMap<String, Option<PathBuf>>,
    pub pool: PoolConfig,
    pub policy: Policy,
    pub api_keys: ApiKeys,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to serve on {0} without API keys: set SANDBOXD_API_KEYS, or listen on a loopback address such as 127.0.0.1:50051")]
    OpenWithoutKeys(SocketAddr),
    #[error("cannot create the state directory {path}: {source}; pass --state-dir with a writable path")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {what}: {source}; pick a free address")]
    Listen { what: String, source: std::io::Error },
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Backend(#[from] SelectError),
}

/// Serves until SIGINT or SIGTERM, then deletes every sandbox.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    if config.api_keys.is_empty() {
        if !config.listen.ip().is_loopback() {
            return Err(ServeError::OpenWithoutKeys(config.listen));
        }
        tracing::warn!(listen = %config.listen, "SANDBOXD_API_KEYS is not set: serving without authentication, on loopback only");
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| ServeError::StateDir { path: config.state_dir.clone(), source })?;
    if let Some(addr) = config.metrics_listen {
        metrics::install(addr)?;
    }
    let microvm = MicroVmOptions {
        images: config.guest_images.clone(),
        default_limits: config.policy.default_limits,
        restore_memory: config.restore_memory,
    };
    let backend = backend::select(config.backend, &config.state_dir, &config.agent_binary, microvm).await?;
    tracing::info!(backend = backend.kind().as_str(), "backend ready");
    let manager = SandboxManager::new(backend, config.templates.clone(), config.policy.clone(), config.pool);
    let context = ApiContext { manager: Arc::clone(&manager), audit: AuditLog::open(&config.audit_log)? };
    let reaper = tokio::spawn(expire_forever(context.clone()));

    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen { what: config.listen.to_string(), source })?;
    let _ = std::fs::remove_file(&config.unix_socket);
    let unix = UnixListener::bind(&config.unix_socket)
        .map_err(|source| ServeError::Listen { what: config.unix_socket.display().to_string(), source })?;
    tracing::info!(listen = %tcp.local_addr().unwrap_or(config.listen), unix = %config.unix_socket.display(), "serving sandbox.v1");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Small stream frames (exec events) must not wait for Nagle's algorithm.
    let tcp_streams = TcpListenerStream::new(tcp).map(|stream| {
        if let Ok(stream) = &stream {
            let _ = stream.set_nodelay(true);
        }
        stream
    });
    let on_tcp = router(&context, &config.api_keys).serve_with_incoming_shutdown(tcp_streams, stopped(stop_rx.clone()));
    let on_unix = router(&context, &config.api_keys)
        .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(stop_rx));
    let servers = async { tokio::try_join!(on_tcp, on_unix) };
    tokio::pin!(servers);
    let result = tokio::select! {
        result = &mut servers => result.map(|_| ()),
        () = termination() => {
            tracing::info!("stopping: deleting every sandbox");
            let _ = stop_tx.send(true);
            servers.await.map(|_| ())
        }
    };
    reaper.abort();
    manager.shutdown().await;
    let _ = std::fs::remove_file(&config.unix_socket);
    Ok(result?)
}

fn router(context: &ApiContext, keys: &ApiKeys) -> tonic::transport::server::Router {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    for service in ["sandbox.v1.Sandboxes", "sandbox.v1.Processes", "sandbox.v1.Files", ""] {
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
        });
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sandbox_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let sandboxes = SandboxesServer::new(SandboxesService(context.clone()))
        .max_decoding_message_size(MAX_API_MESSAGE);
    let processes = ProcessesServer::new(ProcessesService(context.clone()))
        .max_decoding_message_size(MAX_API_MESSAGE);
    let files = FilesServer::new(FilesService(context.clone())).max_decoding_message_size(MAX_API_MESSAGE);
    Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(InterceptedService::new(sandboxes, keys.interceptor()))
        .add_service(InterceptedService::new(processes, keys.interceptor()))
        .add_service(InterceptedService::new(files, keys.interceptor()))
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

/// Deletes expired sandboxes twice a second.
async fn expire_forever(context: ApiContext) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for id in context.manager.expire().await {
            tracing::info!(sandbox = %id, "deleted: its lifetime passed");
            context.audit.record("system", &id, "Expire", "ok");
        }
    }
}
