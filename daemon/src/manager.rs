//! The domain core: creates, finds, pauses and deletes sandboxes, enforces
//! ownership by API key and lifetimes, and hands out agent clients. Every
//! Create is admitted first (see [`crate::admission`]); a sandbox whose
//! guest died is reported STOPPED with the reason, and its share of the
//! quotas is given back at once. The gRPC services are thin wrappers over
//! this.
//!
//! Every change (Create, Pause, Resume, Delete, a stop) is written to the
//! [`Registry`] before the call answers. At start the manager reads it
//! back: live guests are re-adopted, dead ones reported STOPPED with the
//! reason, and whatever else an earlier run left is reaped before the warm
//! pools fill.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sandbox_proto::{
    agent::agent_client::AgentClient,
    api,
};
use tonic::transport::Channel;

use crate::{
    admission::{Admission, AdmissionError, HostFacts, Quotas, Reservation},
    agent_client,
    auth::Caller,
    backend::{Backend, BackendError, BackendKind, Instance, LaunchSpec, ResourceLimits},
    ids, metrics,
    pool::{PoolConfig, WarmPool},
    registry::{Registry, RegistryError, SandboxRecord, StoredState},
};

/// What a graceful stop does with the sandboxes (`--on-stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// Leave them running (paused ones paused) for the next start to re-adopt.
    Keep,
    /// Pause microVMs to disk first, then keep them; for jails the same as keep.
    Suspend,
    /// Delete every sandbox.
    Delete,
}

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
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
    /// Its lifetime from creation (SetTimeout moves it).
    ttl: Mutex<Duration>,
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

    fn ttl(&self) -> Duration {
        *self.ttl.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expires_at(&self) -> SystemTime {
        self.created_at + self.ttl()
    }

    /// The sandbox's registry row; `adoption` is its backend's record.
    fn to_record(&self, backend: &str, adoption: String) -> SandboxRecord {
        let (state, stopped_reason) = match self.run_state() {
            RunState::Running => (StoredState::Running, String::new()),
            RunState::Paused => (StoredState::Paused, String::new()),
            RunState::Stopped(reason) => (StoredState::Stopped, reason),
        };
        SandboxRecord {
            id: self.id.clone(),
            owner: self.owner.clone(),
            template: self.template.clone(),
            limits: self.limits,
            ttl_seconds: self.ttl().as_secs(),
            created_at_unix_ms: unix_ms(self.created_at),
            expires_at_unix_ms: unix_ms(self.expires_at()),
            env: self.env.clone(),
            metadata: self.metadata.clone(),
            state,
            stopped_reason,
            backend: backend.to_string(),
            adoption,
        }
    }

    /// A sandbox of an earlier run, from its registry row.
    fn from_record(record: SandboxRecord, state: RunState, instance: Option<Box<dyn Instance>>, reservation: Option<Reservation>) -> Self {
        Self {
            id: record.id,
            owner: record.owner,
            template: record.template,
            limits: record.limits,
            ttl: Mutex::new(Duration::from_secs(record.ttl_seconds)),
            env: record.env,
            metadata: record.metadata,
            created_at: UNIX_EPOCH + Duration::from_millis(record.created_at_unix_ms.max(0) as u64),
            state: Mutex::new(state),
            instance: tokio::sync::Mutex::new(instance),
            reservation: Mutex::new(reservation),
        }
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
                timeout_seconds: self.ttl().as_secs() as u32,
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

/// What a sandbox's guest uses (see [`SandboxManager::usage`]).
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub memory_bytes: u64,
    /// CPU time so far, where the backend can tell.
    pub cpu_nanos: Option<u64>,
    /// Host disk its writable disk takes, where the backend can tell.
    pub disk_bytes: Option<u64>,
    /// How long it has existed.
    pub lived: Duration,
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
    registry: Arc<Registry>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl SandboxManager {
    /// Re-adopts the sandboxes of `registry`, reaps what an earlier run
    /// left besides them, then starts the warm pools. `templates` maps a
    /// template name to its root filesystem or, for microVMs, its template
    /// directory (`None`: the default). With `pool.max` > 0 each template
    /// gets a warm pool.
    pub async fn start(
        backend: Arc<dyn Backend>,
        templates: BTreeMap<String, Option<PathBuf>>,
        policy: Policy,
        pool: PoolConfig,
        registry: Registry,
    ) -> Result<Arc<Self>, SandboxError> {
        let registry = Arc::new(registry);
        let admission = Admission::new(policy.quotas);
        let sandboxes = restore(&backend, &registry, &admission).await?;
        let pools = start_pools(&backend, &templates, &policy, pool);
        Ok(Arc::new(Self { backend, templates, pools, policy, admission, registry, sandboxes: Mutex::new(sandboxes) }))
    }

    /// Pushes the clock and fresh entropy to a guest about to be handed
    /// out, unless it runs on the host's own kernel (a jail), whose clock
    /// and CRNG it already shares, so there is no cloned state to refresh.
    async fn refresh(&self, instance: &dyn Instance) -> Result<(), SandboxError> {
        if self.backend.guests_share_host_kernel() {
            return Ok(());
        }
        agent_client::refresh(instance.agent())
            .await
            .map_err(|error| SandboxError::Backend(BackendError::Control { action: "refresh", reason: error.to_string() }))
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
        if let Err(error) = self.refresh(instance.as_ref()).await {
            let _ = instance.destroy().await;
            return Err(error);
        }
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            owner: caller.key_id.clone(),
            template,
            limits,
            ttl: Mutex::new(ttl),
            env: request.env.into_iter().collect(),
            metadata: request.metadata,
            created_at: SystemTime::now(),
            state: Mutex::new(RunState::Running),
            instance: tokio::sync::Mutex::new(Some(instance)),
            reservation: Mutex::new(Some(reservation)),
        });
        let record = sandbox.to_record(self.backend_name(), instance_record(&sandbox).await);
        if let Err(error) = self.persist(move |registry| registry.put(&record)).await {
            if let Some(instance) = sandbox.instance.lock().await.take() {
                let _ = instance.destroy().await;
            }
            return Err(error.into());
        }
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
        self.notice_stop(&sandbox).await;
        Ok(sandbox.to_proto(self.backend_name()))
    }

    pub async fn list(&self, caller: &Caller) -> Vec<api::Sandbox> {
        let owned: Vec<_> = self.lock().values().filter(|sandbox| sandbox.owner == caller.key_id).cloned().collect();
        let mut visible = Vec::with_capacity(owned.len());
        for sandbox in owned {
            self.notice_stop(&sandbox).await;
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
        self.suspend(&sandbox).await?;
        Ok(sandbox.to_proto(self.backend_name()))
    }

    /// Sets a running sandbox aside (a microVM to disk), recorded as paused.
    async fn suspend(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        self.notice_stop(sandbox).await;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| stopped_or_gone(sandbox))?;
        if sandbox.run_state() == RunState::Running {
            instance.suspend().await?;
            sandbox.set_run_state(RunState::Paused);
            self.persist_state(&sandbox.id, StoredState::Paused, "").await?;
        }
        Ok(())
    }

    pub async fn resume(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| stopped_or_gone(&sandbox))?;
        if sandbox.run_state() != RunState::Paused {
            return Err(SandboxError::NotPaused(id.to_string()));
        }
        instance.wake().await?;
        if let Err(error) = self.refresh(instance.as_ref()).await {
            // Not handed out without fresh clock and entropy: set it aside again.
            if let Err(suspend) = instance.suspend().await {
                tracing::warn!(error = %suspend, sandbox = %id, "cannot suspend a sandbox whose refresh failed");
            }
            return Err(error);
        }
        sandbox.set_run_state(RunState::Running);
        self.persist_state(&sandbox.id, StoredState::Running, "").await?;
        Ok(sandbox.to_proto(self.backend_name()))
    }

    /// Makes the sandbox expire `timeout` from now (at most the policy's
    /// longest lifetime), whatever its state.
    pub async fn set_timeout(&self, caller: &Caller, id: &str, timeout: Duration) -> Result<api::Sandbox, SandboxError> {
        if timeout > self.policy.max_ttl {
            return Err(SandboxError::InvalidLimits(format!(
                "timeout {} s is too long: use at most {} (--max-ttl-seconds)",
                timeout.as_secs(),
                self.policy.max_ttl.as_secs()
            )));
        }
        let sandbox = self.find(caller, id)?;
        let lived = SystemTime::now().duration_since(sandbox.created_at).unwrap_or_default();
        let ttl = Duration::from_secs((lived + timeout).as_secs_f64().ceil() as u64);
        *sandbox.ttl.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = ttl;
        let (id, expires) = (sandbox.id.clone(), unix_ms(sandbox.expires_at()));
        self.persist(move |registry| registry.set_lifetime(&id, ttl.as_secs(), expires)).await?;
        Ok(sandbox.to_proto(self.backend_name()))
    }

    /// The owner's key id of a sandbox, for front doors whose callers
    /// prove themselves with a per-sandbox token derived from it.
    pub fn owner_of(&self, id: &str) -> Option<String> {
        self.lock().get(id).map(|sandbox| sandbox.owner.clone())
    }

    /// What the sandbox's guest uses now.
    pub async fn usage(&self, caller: &Caller, id: &str) -> Result<Usage, SandboxError> {
        let sandbox = self.find(caller, id)?;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| stopped_or_gone(&sandbox))?;
        Ok(Usage {
            memory_bytes: instance.memory_bytes(),
            cpu_nanos: instance.cpu_nanos(),
            disk_bytes: instance.disk_bytes(),
            lived: SystemTime::now().duration_since(sandbox.created_at).unwrap_or_default(),
        })
    }

    /// Whether `name` is a template of this daemon.
    pub fn has_template(&self, name: &str) -> bool {
        self.templates.contains_key(name)
    }

    /// The agent of a running sandbox that `caller` owns.
    pub async fn agent(&self, caller: &Caller, id: &str) -> Result<AgentHandle, SandboxError> {
        let sandbox = self.find(caller, id)?;
        self.notice_stop(&sandbox).await;
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
            self.notice_stop(&sandbox).await;
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

    /// At a graceful stop: destroys the pooled guests (no one's yet), and
    /// deletes every sandbox or leaves them for the next start (running,
    /// or with `suspend` microVMs paused to disk first).
    pub async fn shutdown(&self, on_stop: OnStop) {
        for pool in self.pools.values() {
            pool.drain().await;
        }
        let all: Vec<_> = self.lock().values().cloned().collect();
        for sandbox in all {
            let outcome = match on_stop {
                OnStop::Delete => self.remove(&sandbox).await,
                OnStop::Suspend if self.backend.kind() == BackendKind::MicroVm => self.suspend_and_keep(&sandbox).await,
                OnStop::Keep | OnStop::Suspend => self.keep(&sandbox).await,
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, sandbox = %sandbox.id, ?on_stop, "cannot stop with a sandbox as asked");
            }
        }
    }

    /// Pauses a running sandbox to disk, then keeps it; one that cannot be
    /// paused is kept running.
    async fn suspend_and_keep(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let suspended = match sandbox.run_state() {
            RunState::Running => self.suspend(sandbox).await,
            RunState::Paused | RunState::Stopped(_) => Ok(()),
        };
        if let Err(error) = suspended {
            tracing::warn!(%error, sandbox = %sandbox.id, "cannot pause a sandbox to disk at stop; keeping it running");
        }
        self.keep(sandbox).await
    }

    /// Lets a sandbox's guest run on after the daemon ends. A backend that
    /// cannot keep it destroys it: it is then recorded STOPPED, with why.
    async fn keep(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let Some(instance) = sandbox.instance.lock().await.take() else { return Ok(()) };
        if let Err(error) = instance.release().await {
            let reason = format!("the daemon stopped and could not keep it: {error}");
            self.persist_state(&sandbox.id, StoredState::Stopped, &reason).await?;
            return Err(error.into());
        }
        Ok(())
    }

    /// Forgets the sandbox (first in the registry: a crash before the
    /// guest is gone leaves a leftover the next start reaps) and destroys
    /// its guest.
    async fn remove(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let instance = sandbox.instance.lock().await.take();
        self.lock().remove(&sandbox.id);
        sandbox.release();
        let id = sandbox.id.clone();
        let forgotten = self.persist(move |registry| registry.remove(&id)).await;
        if let Some(instance) = instance {
            instance.destroy().await?;
        }
        Ok(forgotten?)
    }

    /// If `sandbox` is running but its guest died: records why (in the
    /// registry too), gives its share of the quotas back and destroys what
    /// is left of the guest in the background. A sandbox another call is
    /// working on is left to the next look.
    async fn notice_stop(&self, sandbox: &Sandbox) {
        let Some(reason) = notice_stop(sandbox).await else { return };
        if let Err(error) = self.persist_state(&sandbox.id, StoredState::Stopped, &reason).await {
            tracing::warn!(%error, sandbox = %sandbox.id, "cannot record that a sandbox stopped");
        }
    }

    async fn persist_state(&self, id: &str, state: StoredState, reason: &str) -> Result<(), RegistryError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.persist(move |registry| registry.set_state(&id, state, &reason)).await
    }

    /// Runs one registry write off the async threads.
    async fn persist(&self, write: impl FnOnce(&Registry) -> Result<(), RegistryError> + Send + 'static) -> Result<(), RegistryError> {
        on_registry(&self.registry, write).await
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

/// If `sandbox` is running but its guest died: marks it stopped, gives its
/// share of the quotas back, destroys what is left of the guest in the
/// background, and returns why it stopped.
async fn notice_stop(sandbox: &Sandbox) -> Option<String> {
    if sandbox.run_state() != RunState::Running {
        return None;
    }
    let Ok(mut slot) = sandbox.instance.try_lock() else { return None };
    if slot.as_ref().is_none_or(|instance| instance.is_alive()) {
        return None;
    }
    let instance = slot.take()?;
    sandbox.release();
    let (instance, reason) = last_words(instance).await;
    tracing::warn!(sandbox = %sandbox.id, %reason, "the sandbox's guest died; it is reported STOPPED");
    sandbox.set_run_state(RunState::Stopped(reason.clone()));
    drop(slot);
    if let Some(instance) = instance {
        let id = sandbox.id.clone();
        tokio::spawn(async move {
            if let Err(error) = instance.destroy().await {
                tracing::warn!(%error, sandbox = %id, "cannot clean up a stopped sandbox");
            }
        });
    }
    Some(reason)
}

/// The backend's re-adoption record of a sandbox's guest.
async fn instance_record(sandbox: &Sandbox) -> String {
    let instance = sandbox.instance.lock().await;
    instance.as_ref().map(|instance| instance.adoption_record()).unwrap_or_default()
}

/// Runs one registry call off the async threads.
async fn on_registry<T: Send + 'static>(
    registry: &Arc<Registry>,
    call: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    let registry = Arc::clone(registry);
    tokio::task::spawn_blocking(move || call(&registry))
        .await
        .unwrap_or_else(|join| Err(RegistryError::Task(join.to_string())))
}

/// One warm pool per template, unless `pool.max` is 0.
fn start_pools(
    backend: &Arc<dyn Backend>,
    templates: &BTreeMap<String, Option<PathBuf>>,
    policy: &Policy,
    pool: PoolConfig,
) -> HashMap<String, Arc<WarmPool>> {
    if pool.max == 0 {
        return HashMap::new();
    }
    templates
        .iter()
        .map(|(name, rootfs)| {
            let spec = LaunchSpec { id: String::new(), rootfs: rootfs.clone(), limits: policy.default_limits };
            (name.clone(), WarmPool::start(name.clone(), Arc::clone(backend), spec, pool))
        })
        .collect()
}

/// Brings back the sandboxes of the registry: live guests re-adopted
/// (with their share of the quotas), dead or unadoptable ones STOPPED with
/// the reason; then reaps every guest of an earlier run that is not
/// among them (pooled or half-made ones).
async fn restore(
    backend: &Arc<dyn Backend>,
    registry: &Arc<Registry>,
    admission: &Arc<Admission>,
) -> Result<HashMap<String, Arc<Sandbox>>, SandboxError> {
    let records = on_registry(registry, Registry::all).await?;
    let mut sandboxes = HashMap::with_capacity(records.len());
    let mut adopted = HashSet::new();
    for record in records {
        let sandbox = restore_one(backend, registry, admission, record).await?;
        if !matches!(sandbox.run_state(), RunState::Stopped(_)) {
            adopted.insert(sandbox.id.clone());
        }
        sandboxes.insert(sandbox.id.clone(), Arc::new(sandbox));
    }
    let (reaper, keep) = (Arc::clone(backend), adopted.clone());
    tokio::task::spawn_blocking(move || reaper.reap_unknown(&keep))
        .await
        .map_err(|join| RegistryError::Task(join.to_string()))?;
    let stopped = sandboxes.len() - adopted.len();
    ::metrics::counter!(metrics::SANDBOXES_READOPTED, "outcome" => "adopted").increment(adopted.len() as u64);
    ::metrics::counter!(metrics::SANDBOXES_READOPTED, "outcome" => "stopped").increment(stopped as u64);
    if !sandboxes.is_empty() {
        tracing::info!(adopted = adopted.len(), stopped, "restored the sandboxes of the registry");
    }
    Ok(sandboxes)
}

/// One registry row brought back: its guest re-adopted, or the sandbox
/// STOPPED with why (recorded).
async fn restore_one(
    backend: &Arc<dyn Backend>,
    registry: &Arc<Registry>,
    admission: &Arc<Admission>,
    record: SandboxRecord,
) -> Result<Sandbox, SandboxError> {
    let paused = match record.state {
        StoredState::Stopped => {
            let reason = record.stopped_reason.clone();
            return Ok(Sandbox::from_record(record, RunState::Stopped(reason), None, None));
        }
        StoredState::Paused => true,
        StoredState::Running => false,
    };
    let adopted = if record.backend == backend.kind().as_str() {
        backend.adopt(&record.id, &record.adoption, paused).await
    } else {
        Err(BackendError::Adopt(format!("it ran on the {} backend and this daemon runs {}", record.backend, backend.kind().as_str())))
    };
    match adopted {
        Ok(instance) => {
            let reservation = admission
                .reserve(&record.owner, record.limits)
                .inspect_err(|error| tracing::warn!(%error, sandbox = %record.id, "a re-adopted sandbox exceeds today's quotas; it is kept"))
                .ok();
            tracing::info!(sandbox = %record.id, paused, "re-adopted a sandbox of an earlier run");
            let state = if paused { RunState::Paused } else { RunState::Running };
            Ok(Sandbox::from_record(record, state, Some(instance), reservation))
        }
        Err(error) => {
            let reason = format!("not re-adopted after the daemon restarted: {error}");
            tracing::warn!(sandbox = %record.id, %reason, "a sandbox of the registry is reported STOPPED");
            let (id, stored_reason) = (record.id.clone(), reason.clone());
            on_registry(registry, move |registry| registry.set_state(&id, StoredState::Stopped, &stored_reason)).await?;
            Ok(Sandbox::from_record(record, RunState::Stopped(reason), None, None))
        }
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
