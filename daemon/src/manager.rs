//! The domain core: creates, finds, pauses and deletes sandboxes, enforces
//! ownership by API key and lifetimes, and hands out agent clients. The gRPC
//! services are thin wrappers over this.

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
    pub max_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_processes: u32,
    pub max_disk_mib: u32,
    pub max_sandboxes: usize,
}

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
    #[error("the daemon already runs {0} sandboxes, its maximum: delete unused sandboxes first")]
    TooMany(usize),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

/// One live sandbox.
struct Sandbox {
    id: String,
    owner: Option<String>,
    template: String,
    limits: ResourceLimits,
    ttl: Duration,
    env: BTreeMap<String, String>,
    metadata: HashMap<String, String>,
    created_at: SystemTime,
    state: Mutex<RunState>,
    instance: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
}

impl Sandbox {
    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_run_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = state;
    }

    fn expires_at(&self) -> SystemTime {
        self.created_at + self.ttl
    }

    fn to_proto(&self, backend: &str) -> api::Sandbox {
        let state = match self.run_state() {
            RunState::Running => api::SandboxState::Running,
            RunState::Paused => api::SandboxState::Paused,
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
            stopped_reason: String::new(),
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
        Arc::new(Self { backend, templates, pools, policy, sandboxes: Mutex::new(HashMap::new()) })
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
        if self.lock().len() >= self.policy.max_sandboxes {
            return Err(SandboxError::TooMany(self.policy.max_sandboxes));
        }
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
        });
        let reply = sandbox.to_proto(self.backend_name());
        let active = {
            let mut sandboxes = self.lock();
            sandboxes.insert(id, sandbox);
            sandboxes.len()
        };
        ::metrics::gauge!(metrics::SANDBOXES_ACTIVE).set(active as f64);
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
        let pool_shape = self.backend.resizes_guests()
            || (limits.memory_mib, limits.vcpus) == (self.policy.default_limits.memory_mib, self.policy.default_limits.vcpus);
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
        let checks = [
            (limits.memory_mib < 16 || limits.memory_mib > policy.max_memory_mib,
             format!("limits.memory_mib = {} is out of range: use 16..={}", limits.memory_mib, policy.max_memory_mib)),
            (limits.vcpus > policy.max_vcpus,
             format!("limits.vcpus = {} is out of range: use 1..={}", limits.vcpus, policy.max_vcpus)),
            (limits.max_processes < 8 || limits.max_processes > policy.max_processes,
             format!("limits.max_processes = {} is out of range: use 8..={}", limits.max_processes, policy.max_processes)),
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

    pub fn get(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        Ok(self.find(caller, id)?.to_proto(self.backend_name()))
    }

    pub fn list(&self, caller: &Caller) -> Vec<api::Sandbox> {
        let mut visible: Vec<_> = self
            .lock()
            .values()
            .filter(|sandbox| sandbox.owner == caller.key_id)
            .map(|sandbox| sandbox.to_proto(self.backend_name()))
            .collect();
        visible.sort_by(|a, b| a.created_at_unix_ms.cmp(&b.created_at_unix_ms).then(a.id.cmp(&b.id)));
        visible
    }

    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), SandboxError> {
        let sandbox = self.find(caller, id)?;
        self.remove(&sandbox).await
    }

    pub async fn pause(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
        if sandbox.run_state() == RunState::Running {
            instance.suspend().await?;
            sandbox.set_run_state(RunState::Paused);
        }
        Ok(sandbox.to_proto(self.backend_name()))
    }

    pub async fn resume(&self, caller: &Caller, id: &str) -> Result<api::Sandbox, SandboxError> {
        let sandbox = self.find(caller, id)?;
        let instance = sandbox.instance.lock().await;
        let instance = instance.as_ref().ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
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
        if sandbox.run_state() == RunState::Paused {
            return Err(SandboxError::Paused(id.to_string()));
        }
        let instance = sandbox.instance.lock().await;
        match instance.as_ref() {
            Some(instance) if instance.is_alive() => Ok(AgentHandle { agent: instance.agent(), env: sandbox.env.clone() }),
            Some(instance) => Err(SandboxError::Stopped { id: id.to_string(), detail: instance.diagnostics() }),
            None => Err(SandboxError::NotFound(id.to_string())),
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
        let active = {
            let mut sandboxes = self.lock();
            sandboxes.remove(&sandbox.id);
            sandboxes.len()
        };
        ::metrics::gauge!(metrics::SANDBOXES_ACTIVE).set(active as f64);
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
