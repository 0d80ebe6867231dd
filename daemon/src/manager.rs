//! The domain core: creates, finds, pauses and deletes sandboxes, enforces
//! ownership by API key and lifetimes, and hands out agent clients. Every
//! Create is admitted first (see [`crate::admission`]); a sandbox whose
//! guest died is reported STOPPED with the reason, and its share of the
//! quotas is given back at once. The gRPC services are thin wrappers over
//! this.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sandbox_proto::{
    agent::{agent_client::AgentClient, RefreshRequest},
    api,
};
use tonic::transport::Channel;

use crate::{
    admission::{Admission, AdmissionError, HostFacts, Quotas, Reservation},
    auth::Caller,
    backend::{Backend, BackendError, Instance, LaunchSpec, ResourceLimits},
    ids, metrics,
    pool::{PoolConfig, WarmPool},
};

/// Defaults and bounds applied to every Create.
#[derive(Clone, Debug)]
pub struct Policy {
    pub default_limits: ResourceLimits,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Bounds of one sandbox's limits (within what the host has).
    pub max_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_processes: u32,
    pub max_disk_mib: u32,
    /// Caps on all sandboxes together, per key and per host.
    pub quotas: Quotas,
    pub host: HostFacts,
}

/// Longest stop reason kept (its tail), in bytes.
const MAX_STOP_REASON: usize = 4096;
/// How long reading a dead guest's diagnostics may take.
const DIAGNOSTICS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox '{0}' does not exist or belongs to another API key: check the id returned by Create, or call List")]
    NotFound(String),
    #[error("template '{name}' does not exist: use one of: {available}")]
    UnknownTemplate { name: String, available: String },
    #[error("sandbox '{0}' is paused: call Sandboxes.Resume first")]
    Paused(String),
    #[error("sandbox '{0}' is not paused: only a paused sandbox can be resumed")]
    NotPaused(String),
    #[error("sandbox '{id}' has stopped (its init exited, for example after hitting its memory limit; {detail}): delete it and create a new one")]
    Stopped { id: String, detail: String },
    #[error("{0}")]
    InvalidLimits(String),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    /// The guest died; why, from its last words.
    Stopped(String),
}

/// One sandbox.
struct Sandbox {
    id: String,
    owner: String,
    template: String,
    limits: ResourceLimits,
    ttl: Duration,
    env: BTreeMap<String, String>,
    metadata: HashMap<String, String>,
    created_at: SystemTime,
    state: Mutex<RunState>,
    instance: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
    /// Its share of the quotas, until it is deleted or stops.
    reservation: Mutex<Option<Reservation>>,
}

impl Sandbox {
    fn run_state(&self) -> RunState {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn set_run_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = state;
    }

    /// Gives the sandbox's share of the quotas back.
    fn release(&self) {
        drop(self.reservation.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
    }

    fn expires_at(&self) -> SystemTime {
        self.created_at + self.ttl
    }

    fn to_proto(&self, backend: &str) -> api::Sandbox {
        let (state, stopped_reason) = match self.run_state() {
            RunState::Running => (api::SandboxState::Running, String::new()),
            RunState::Paused => (api::SandboxState::Paused, String::new()),
            RunState::Stopped(reason) => (api::SandboxState::Stopped, reason),
        };
        api::Sandbox {
            id: self.id.clone(),
            template: self.template.clone(),
            state: state as i32,
            limits: Some(api::Limits {
                memory_mib: self.limits.memory_mib,
                vcpus: self.limits.vcpus,
                timeout_seconds: self.ttl.as_secs() as u32,
                max_processes: self.limits.max_processes,
                disk_mib: self.limits.disk_mib,
            }),
            metadata: self.metadata.clone(),
            created_at_unix_ms: unix_ms(self.created_at),
            expires_at_unix_ms: unix_ms(self.expires_at()),
            backend: backend.to_string(),
            stopped_reason,
        }
    }
}

/// A running sandbox's agent, and the environment its processes start with.
pub struct AgentHandle {
    pub agent: AgentClient<Channel>,
    pub env: BTreeMap<String, String>,
}

impl AgentHandle {
    /// Overlays a request's environment on the sandbox's.
    pub fn merged_env(&self, request_env: HashMap<String, String>) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = self.env.clone().into_iter().collect();
        env.extend(request_env);
        env
    }
}

/// The set of sandboxes of this daemon.
pub struct SandboxManager {
    backend: Arc<dyn Backend>,
    templates: BTreeMap<String, Option<PathBuf>>,
    pools: HashMap<String, Arc<WarmPool>>,
    policy: Policy,
    admission: Arc<Admission>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl SandboxManager {
    /// `templates` maps a template name to its root filesystem or, for
    /// microVMs, its template directory (`None`: the default). With
    /// `pool.max` > 0 each template gets a warm pool.
    pub fn new(
        backend: Arc<dyn Backend>,
        templates: BTreeMap<String, Option<PathBuf>>,
        policy: Policy,
        pool: PoolConfig,
    ) -> Arc<Self> {
        let pools = if pool.max == 0 {
            HashMap::new()
        } else {
            templates
                .iter()
                .map(|(name, rootfs)| {
                    let spec = LaunchSpec { id: String::new(), rootfs: rootfs.clone(), limits: policy.default_limits };
                    (name.clone(), WarmPool::start(name.clone(), Arc::clone(&backend), spec, pool))
                })
                .collect()
        };
        let admission = Admission::new(policy.quotas);
        Arc::new(Self { backend, templates, pools, policy, admission, sandboxes: Mutex::new(HashMap::new()) })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.kind().as_str()
    }

    pub async fn create(&self, caller: &Caller, request: api::CreateSandboxRequest) -> Result<api::Sandbox, SandboxError> {
        let started = std::time::Instant::now();
        let template = if request.template.is_empty() { "default".to_string() } else { request.template };
        let rootfs = self.templates.get(&template).cloned().ok_or_else(|| SandboxError::UnknownTemplate {
            available: self.templates.keys().cloned().collect::<Vec<_>>().join(", "),
            name: template.clone(),
        })?;
        let (limits, ttl) = self.resolve_limits(request.limits.unwrap_or_default())?;
        // Held from here on; dropped (given back) if the launch fails.
        let reservation = self.admission.reserve(&caller.key_id, limits)?;
        let (id, instance, source) = self.obtain_guest(&template, rootfs, limits).await?;
        if let Err(error) = refresh_guest(instance.agent()).await {
            let _ = instance.destroy().await;
            return Err(error);
        }
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            owner: caller.key_id.clone(),
            template,
            limits,
            ttl,
            env: request.env.into_iter().collect(),
            metadata: request.metadata,
            created_at: SystemTime::now(),
            state: Mutex::new(RunState::Running),
            instance: tokio::sync::Mutex::new(Some(instance)),
            reservation: Mutex::new(Some(reservation)),
        });
        let reply = sandbox.to_proto(self.backend_name());
        self.lock().insert(id, sandbox);
        ::metrics::histogram!(metrics::CREATE_SECONDS, "source" => source).record(started.elapsed().as_secs_f64());
        Ok(reply)
    }

    /// A guest from the warm pool (with the requested limits applied), or a
    /// freshly launched one.
    async fn obtain_guest(
        &self,
        template: &str,
        rootfs: Option<PathBuf>,
        limits: ResourceLimits,
    ) -> Result<(String, Box<dyn Instance>, &'static str), SandboxError> {
        let defaults = self.policy.default_limits;
        // A pooled guest's disk was made at the default size.
        let pool_shape = limits.disk_mib == defaults.disk_mib
            && (self.backend.resizes_guests() || (limits.memory_mib, limits.vcpus) == (defaults.memory_mib, defaults.vcpus));
        if let Some(pool) = self.pools.get(template).filter(|_| pool_shape) {
            if let Some(guest) = pool.take().await {
                ::metrics::counter!(metrics::POOL_HITS).increment(1);
                if limits != self.policy.default_limits {
                    if let Err(error) = guest.instance.set_limits(limits).await {
                        let _ = guest.instance.destroy().await;
                        return Err(error.into());
                    }
                }
                return Ok((guest.id, guest.instance, "pool"));
            }
            ::metrics::counter!(metrics::POOL_MISSES).increment(1);
        }
        let spec = LaunchSpec { id: ids::new_sandbox_id(), rootfs, limits };
        let id = spec.id.clone();
        Ok((id, self.backend.launch(spec).await?, "cold"))
    }

    fn resolve_limits(&self, requested: api::Limits) -> Result<(ResourceLimits, Duration), SandboxError> {
        let policy = &self.policy;
        let pick = |value: u32, default: u32| if value == 0 { default } else { value };
        let limits = ResourceLimits {
            memory_mib: pick(requested.memory_mib, policy.default_limits.memory_mib),
            vcpus: pick(requested.vcpus, policy.default_limits.vcpus),
            max_processes: pick(requested.max_processes, policy.default_limits.max_processes),
            disk_mib: pick(requested.disk_mib, policy.default_limits.disk_mib),
        };
        let ttl = match requested.timeout_seconds {
            0 => policy.default_ttl,
            seconds => Duration::from_secs(seconds.into()),
        };
        let host = policy.host;
        let checks = [
            (limits.memory_mib < 16 || limits.memory_mib > policy.max_memory_mib,
             format!("limits.memory_mib = {} is out of range: use 16..={} (--max-memory-mib; this host has {} MiB)", limits.memory_mib, policy.max_memory_mib, host.memory_mib)),
            (limits.vcpus > policy.max_vcpus,
             format!("limits.vcpus = {} is out of range: use 1..={} (this host has {} CPUs)", limits.vcpus, policy.max_vcpus, host.cpus)),
            (limits.max_processes < 8 || limits.max_processes > policy.max_processes,
             format!("limits.max_processes = {} is out of range: use 8..={} (--max-processes; the host's pid_max is {})", limits.max_processes, policy.max_processes, host.pid_max)),
            (limits.disk_mib < 16 || limits.disk_mib > policy.max_disk_mib,
             format!("limits.disk_mib = {} is out of range: use 16..={}", limits.disk_mib, policy.max_disk_mib)),
            (ttl > policy.max_ttl,
             format!("limits.timeout_seconds = {} is too long: use at most {}", ttl.as_secs(), policy.max_ttl.as_secs())),
        ];
        match checks.into_iter().find(|(failed, _)| *failed) {
            Some((_, message)) => Err(SandboxError::InvalidLimits(message)),
            None => Ok((limits, ttl)),
        }
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        notice_stop(&sandbox).await;
        Ok(sandbox.to_proto(self.backend_name()))
    }

    pub async fn list(&self, caller: &Caller) -> Vec<api::Sandbox> {
        let owned: Vec<_> = self.lock().values().filter(|sandbox| sandbox.owner == caller.key_id).cloned().collect();
        let mut visible = Vec::with_capacity(owned.len());
        for sandbox in owned {
            notice_stop(&sandbox).await;
            visible.push(sandbox.to_proto(self.backend_name()));
        }
        visible.sort_by(|a, b| a.created_at_unix_ms.cmp(&b.created_at_unix_ms).then(a.id.cmp(&b.id)));
        visible
    }

    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), SandboxError> {
        let sandbox = self.find(caller, id)?;
        self.remove(&sandbox).await
    }

    pub async fn pause(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        notice_stop(&sandbox).await;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| stopped_or_gone(&sandbox))?;
        if sandbox.run_state() == RunState::Running {
            instance.suspend().await?;
            sandbox.set_run_state(RunState::Paused);
        }
        Ok(sandbox.to_proto(self.backend_name()))
    }

    pub async fn resume(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| stopped_or_gone(&sandbox))?;
        if sandbox.run_state() != RunState::Paused {
            return Err(SandboxError::NotPaused(id.to_string()));
        }
        instance.wake().await?;
        if let Err(error) = refresh_guest(instance.agent()).await {
            // Not handed out without fresh clock and entropy: set it aside again.
            if let Err(suspend) = instance.suspend().await {
                tracing::warn!(error = %suspend, sandbox = %id, "cannot suspend a sandbox whose refresh failed");
            }
            return Err(error);
        }
        sandbox.set_run_state(RunState::Running);
        Ok(sandbox.to_proto(self.backend_name()))
    }

    /// The agent of a running sandbox that `caller` owns.
    pub async fn agent(&self, caller: &Caller, id: &str) -> Result<AgentHandle, SandboxError> {
        let sandbox = self.find(caller, id)?;
        notice_stop(&sandbox).await;
        match sandbox.run_state() {
            RunState::Paused => return Err(SandboxError::Paused(id.to_string())),
            RunState::Stopped(detail) => return Err(SandboxError::Stopped { id: id.to_string(), detail }),
            RunState::Running => {}
        }
        let instance = sandbox.instance.lock().await;
        match instance.as_ref() {
            Some(instance) => Ok(AgentHandle { agent: instance.agent(), env: sandbox.env.clone() }),
            None => Err(stopped_or_gone(&sandbox)),
        }
    }

    /// Marks every running sandbox whose guest died as stopped, and gives
    /// its share of the quotas back (run periodically).
    pub async fn sweep_stopped(&self) {
        let running: Vec<_> =
            self.lock().values().filter(|sandbox| sandbox.run_state() == RunState::Running).cloned().collect();
        for sandbox in running {
            notice_stop(&sandbox).await;
        }
    }

    /// Deletes every sandbox whose lifetime has passed; returns their ids.
    pub async fn expire(&self) -> Vec<String> {
        let now = SystemTime::now();
        let expired: Vec<_> =
            self.lock().values().filter(|sandbox| sandbox.expires_at() <= now).cloned().collect();
        let mut ids = Vec::with_capacity(expired.len());
        for sandbox in expired {
            match self.remove(&sandbox).await {
                Ok(()) => ids.push(sandbox.id.clone()),
                Err(error) => tracing::warn!(%error, sandbox = %sandbox.id, "cannot delete an expired sandbox"),
            }
        }
        ::metrics::counter!(metrics::SANDBOXES_EXPIRED).increment(ids.len() as u64);
        ids
    }

    /// Destroys every sandbox and pooled guest (at shutdown).
    pub async fn shutdown(&self) {
        for pool in self.pools.values() {
            pool.drain().await;
        }
        let all: Vec<_> = self.lock().values().cloned().collect();
        for sandbox in all {
            if let Err(error) = self.remove(&sandbox).await {
                tracing::warn!(%error, sandbox = %sandbox.id, "cannot delete a sandbox at shutdown");
            }
        }
    }

    async fn remove(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let instance = sandbox.instance.lock().await.take();
        self.lock().remove(&sandbox.id);
        sandbox.release();
        match instance {
            Some(instance) => Ok(instance.destroy().await?),
            None => Ok(()),
        }
    }

    fn find(&self, caller: &Caller, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.lock()
            .get(id)
            .filter(|sandbox| sandbox.owner == caller.key_id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// If `sandbox` is running but its guest died: records why, gives its
/// share of the quotas back and destroys what is left of the guest in the
/// background. A sandbox another call is working on is left to the next
/// look.
async fn notice_stop(sandbox: &Sandbox) {
    if sandbox.run_state() != RunState::Running {
        return;
    }
    let Ok(mut slot) = sandbox.instance.try_lock() else { return };
    if slot.as_ref().is_none_or(|instance| instance.is_alive()) {
        return;
    }
    let Some(instance) = slot.take() else { return };
    sandbox.release();
    let (instance, reason) = last_words(instance).await;
    tracing::warn!(sandbox = %sandbox.id, %reason, "the sandbox's guest died; it is reported STOPPED");
    sandbox.set_run_state(RunState::Stopped(reason));
    drop(slot);
    if let Some(instance) = instance {
        let id = sandbox.id.clone();
        tokio::spawn(async move {
            if let Err(error) = instance.destroy().await {
                tracing::warn!(%error, sandbox = %id, "cannot clean up a stopped sandbox");
            }
        });
    }
}

/// A dead guest's diagnostics, read off the async runtime within
/// [`DIAGNOSTICS_TIMEOUT`], as one bounded line of printable text. The
/// instance comes back unless the read overran (it is then dropped by the
/// blocking task once done).
async fn last_words(instance: Box<dyn Instance>) -> (Option<Box<dyn Instance>>, String) {
    let read = tokio::task::spawn_blocking(move || {
        let text = instance.diagnostics();
        (instance, text)
    });
    match tokio::time::timeout(DIAGNOSTICS_TIMEOUT, read).await {
        Ok(Ok((instance, text))) => (Some(instance), format!("its init exited; last output: {}", printable_tail(&text, MAX_STOP_REASON))),
        Ok(Err(_)) => (None, "its diagnostics could not be read".to_string()),
        Err(_) => (None, format!("its diagnostics were not readable within {DIAGNOSTICS_TIMEOUT:?}")),
    }
}

/// The last `max` bytes of `text` (on a character boundary), with control
/// characters shown as spaces.
fn printable_tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}

/// The error for a sandbox whose guest is gone: stopped, or being deleted.
fn stopped_or_gone(sandbox: &Sandbox) -> SandboxError {
    match sandbox.run_state() {
        RunState::Stopped(detail) => SandboxError::Stopped { id: sandbox.id.clone(), detail },
        _ => SandboxError::NotFound(sandbox.id.clone()),
    }
}

/// Gives a guest the wall-clock time and fresh entropy before it is handed
/// out, so that guests cloned from one template never share RNG state.
pub(crate) async fn refresh_guest(mut agent: AgentClient<Channel>) -> Result<(), SandboxError> {
    let request = RefreshRequest {
        wall_clock_unix_ns: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        entropy: ids::random_bytes::<64>().to_vec().into(),
    };
    let failed = |reason: String| SandboxError::Backend(BackendError::Control { action: "refresh", reason });
    match tokio::time::timeout(REFRESH_TIMEOUT, agent.refresh(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(failed(format!("the agent refused the clock and entropy refresh: {}", status.message()))),
        Err(_) => Err(failed(format!("the agent did not take the clock and entropy refresh within {REFRESH_TIMEOUT:?}"))),
    }
}

/// How long a guest's agent has to take the clock and entropy refresh.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::printable_tail;

    #[test]
    fn stop_reasons_are_a_bounded_printable_tail() {
        assert_eq!(printable_tail("a\u{1b}[2mb\nc", 100), "a [2mb c");
        let long = format!("{}é{}", "x".repeat(10), "y".repeat(10));
        let tail = printable_tail(&long, 11);
        assert!(tail.len() <= 11 && tail.ends_with('y'), "{tail:?}");
    }
}
