//! Prometheus metrics: the exporter and the names the daemon records.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

pub const RPC_TOTAL: &str = "sandboxd_rpc_total";
pub const RPC_SECONDS: &str = "sandboxd_rpc_duration_seconds";
pub const SANDBOXES_ACTIVE: &str = "sandboxd_sandboxes_active";
pub const SANDBOXES_EXPIRED: &str = "sandboxd_sandboxes_expired_total";
pub const CREATE_SECONDS: &str = "sandboxd_create_duration_seconds";
pub const POOL_READY: &str = "sandboxd_pool_ready";
pub const POOL_HITS: &str = "sandboxd_pool_hits_total";
pub const POOL_MISSES: &str = "sandboxd_pool_misses_total";
pub const POOL_TARGET: &str = "sandboxd_pool_target";
pub const POOL_MEMORY_BYTES: &str = "sandboxd_pool_memory_bytes";
pub const RESTORE_SECONDS: &str = "sandboxd_restore_duration_seconds";
pub const UFFD_FAULTS: &str = "sandboxd_uffd_faults_total";
pub const UFFD_PAGES_PREFETCHED: &str = "sandboxd_uffd_pages_prefetched_total";
pub const RESTORES: &str = "sandboxd_restores_total";
pub const VMMS_KILLED: &str = "sandboxd_vmms_killed_total";
pub const SANDBOXES_READOPTED: &str = "sandboxd_sandboxes_readopted_total";
pub const GUESTS_REAPED: &str = "sandboxd_guests_reaped_total";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve /metrics on {addr}: {reason}; pick a free address with --metrics-listen")]
    Install { addr: SocketAddr, reason: String },
}

/// Serves `/metrics` on `addr` from a background task.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|error| MetricsError::Install { addr, reason: error.to_string() })?;
    describe();
    Ok(())
}

fn describe() {
    metrics::describe_counter!(RPC_TOTAL, "gRPC calls by method and status code");
    metrics::describe_histogram!(RPC_SECONDS, "gRPC call latency by method (unary calls, or stream set-up)");
    metrics::describe_gauge!(SANDBOXES_ACTIVE, "sandboxes holding a slot: running, paused or being created (stopped ones hold none)");
    metrics::describe_counter!(SANDBOXES_EXPIRED, "sandboxes deleted because their TTL passed");
    metrics::describe_histogram!(CREATE_SECONDS, "Create latency by source (pool or cold)");
    metrics::describe_gauge!(POOL_READY, "paused guests waiting in the warm pool, by template");
    metrics::describe_gauge!(POOL_TARGET, "guests the warm pool aims to keep ready, by template (between --pool-size and --pool-max)");
    metrics::describe_gauge!(POOL_MEMORY_BYTES, "host memory the pooled guests use, by template (their cgroups' count)");
    metrics::describe_histogram!(RESTORE_SECONDS, "microVM snapshot restore, from starting the VMM to the agent's hello, by memory mode");
    metrics::describe_counter!(UFFD_FAULTS, "guest page faults served by userfaultfd handlers of VMMs that have ended");
    metrics::describe_counter!(UFFD_PAGES_PREFETCHED, "pages prefetched from recorded working sets by VMMs that have ended");
    metrics::describe_counter!(POOL_HITS, "Creates served from the warm pool");
    metrics::describe_counter!(RESTORES, "microVM snapshot restores by memory mode and outcome (ok, failed)");
    metrics::describe_counter!(VMMS_KILLED, "VMMs killed because they stopped answering a control request (hangs detected)");
    metrics::describe_counter!(SANDBOXES_READOPTED, "sandboxes of the registry brought back at start, by outcome (adopted, stopped)");
    metrics::describe_counter!(GUESTS_REAPED, "guests of an earlier run removed at start because the registry did not know them");
    metrics::describe_counter!(POOL_MISSES, "Creates that launched a guest cold");
}
