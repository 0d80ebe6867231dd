//! The jail backend: each sandbox is a [`Jail`] (namespaces, pivot_root,
//! cgroup, seccomp) whose PID 1 is the guest agent on a unix socket.

use std::{path::PathBuf, sync::Arc, time::Duration};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::{host_support, Jail, JailError, JailLimits, JailSpec};
use crate::backend::{Backend, BackendError, BackendKind, Instance, LaunchSpec, ResourceLimits};
use crate::agent_client::{self, AgentAddress};

/// How long a new jail's agent has to answer `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct JailBackend {
    state_root: PathBuf,
    agent_binary: PathBuf,
    launcher: PathBuf,
}

impl JailBackend {
    /// Checks that the host can run jails (cgroups, the agent binary).
    pub fn new(state_root: PathBuf, agent_binary: PathBuf) -> Result<Self, JailError> {
        let flavor = host_support()?;
        if !agent_binary.is_file() {
            return Err(JailError::Setup(format!(
                "the guest agent {} does not exist: build it with `cargo build -p sandbox-agent` or pass --agent-binary",
                agent_binary.display()
            )));
        }
        let launcher = std::env::current_exe()
            .map_err(|e| JailError::Setup(format!("cannot find the sandboxd binary to launch jails: {e}")))?;
        tracing::info!(cgroups = ?flavor, "jail backend: namespaces, pivot_root, cgroups and seccomp per sandbox");
        Ok(Self { state_root, agent_binary, launcher })
    }
}

fn jail_limits(limits: ResourceLimits) -> JailLimits {
    JailLimits {
        memory_bytes: u64::from(limits.memory_mib) * 1024 * 1024,
        cpu_millis: limits.vcpus.saturating_mul(1000),
        max_pids: limits.max_processes,
    }
}

fn control_error(action: &'static str) -> impl Fn(JailError) -> BackendError {
    move |error| BackendError::Control { action, reason: error.to_string() }
}

#[tonic::async_trait]
impl Backend for JailBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Jail
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        let jail_spec = JailSpec {
            state_dir: self.state_root.join(&spec.id),
            id: spec.id,
            launcher: self.launcher.clone(),
            agent_binary: self.agent_binary.clone(),
            rootfs: spec.rootfs,
            limits: jail_limits(spec.limits),
            command: None,
        };
        let jail = blocking(move || Jail::spawn(jail_spec))
            .await
            .map_err(|error| BackendError::Launch(error.to_string()))?;
        let jail = Arc::new(jail);
        match agent_client::wait_for_hello(AgentAddress::Unix(jail.agent_socket()), HELLO_TIMEOUT).await {
            Ok(agent) => Ok(Box::new(JailInstance { jail, agent })),
            Err(error) => {
                let log = jail.log();
                let _ = destroy(jail).await;
                Err(BackendError::AgentTimeout(HELLO_TIMEOUT, format!("{error}; jail log: {}", log.trim())))
            }
        }
    }
}

struct JailInstance {
    jail: Arc<Jail>,
    agent: AgentClient<Channel>,
}

#[tonic::async_trait]
impl Instance for JailInstance {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.freeze()).await.map_err(control_error("pause"))
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.thaw()).await.map_err(control_error("resume"))
    }

    async fn set_limits(&self, limits: ResourceLimits) -> Result<(), BackendError> {
        let jail = Arc::clone(&self.jail);
        blocking(move || jail.set_limits(&jail_limits(limits))).await.map_err(control_error("limit"))
    }

    fn memory_bytes(&self) -> u64 {
        self.jail.memory_bytes()
    }

    fn is_alive(&self) -> bool {
        self.jail.is_alive()
    }

    fn diagnostics(&self) -> String {
        format!("jail log: {}", crate::backend::last_lines(&self.jail.log(), 3))
    }

    async fn destroy(self: Box<Self>) -> Result<(), BackendError> {
        destroy(self.jail).await
    }
}

async fn destroy(jail: Arc<Jail>) -> Result<(), BackendError> {
    let Ok(jail) = Arc::try_unwrap(jail) else {
        return Err(BackendError::Control { action: "destroy", reason: "the jail is still in use".to_string() });
    };
    blocking(move || jail.destroy()).await.map_err(control_error("destroy"))
}

/// Runs blocking jail work (process spawning, cgroup polling) off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, JailError> + Send + 'static) -> Result<T, JailError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(JailError::Setup(format!("jail task failed: {join}"))))
}
