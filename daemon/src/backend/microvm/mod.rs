//! The microvm backend: each sandbox is a KVM microVM run by its own
//! `sandboxd vmm` process, in its own cgroup, booting the template's kernel
//! with its root image behind a copy-on-write overlay. The guest agent is
//! the VM's init and serves on vsock port 1024, reached through the VMM's
//! vsock unix socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::{
    cgroup::{self, Cgroup, CgroupFlavor, Limits},
    Backend, BackendError, BackendKind, Instance, LaunchSpec, ResourceLimits,
};
use crate::agent_client::{self, AgentAddress};

/// How long a booting guest has to answer `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's vsock port.
const AGENT_PORT: u32 = 1024;
const GUEST_CID: u64 = 3;
/// Memory the VMM process needs beyond guest RAM.
const VMM_OVERHEAD_MIB: u64 = 64;
const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/init quiet";

/// The kernel and root image microVMs boot.
#[derive(Clone, Debug)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

pub struct MicroVmBackend {
    state_root: PathBuf,
    launcher: PathBuf,
    images: GuestImages,
    cgroups: CgroupFlavor,
}

fn launch_error(context: &str) -> impl Fn(String) -> BackendError + '_ {
    move |reason| BackendError::Launch(format!("{context}: {reason}"))
}

impl MicroVmBackend {
    pub fn new(state_root: PathBuf, images: GuestImages) -> Result<Self, String> {
        for (what, path, fix) in [
            ("guest kernel", &images.kernel, "build it with kernel-config/build.sh and pass --kernel"),
            ("guest root image", &images.rootfs, "build it with scripts/guest-image.sh and pass --rootfs-image"),
        ] {
            if !path.is_file() {
                return Err(format!("the {what} {} does not exist: {fix}", path.display()));
            }
        }
        let launcher = std::env::current_exe().map_err(|e| format!("cannot find the sandboxd binary: {e}"))?;
        let cgroups = cgroup::detect().map_err(|e| e.to_string())?;
        Ok(Self { state_root, launcher, images, cgroups })
    }

    fn vmm_config(&self, dir: &Path, spec: &LaunchSpec) -> serde_json::Value {
        let rootfs = spec.rootfs.clone().unwrap_or_else(|| self.images.rootfs.clone());
        serde_json::json!({
            "boot": {
                "kernel": self.images.kernel,
                "cmdline": GUEST_CMDLINE,
                "memory_mib": spec.limits.memory_mib,
                "vcpus": spec.limits.vcpus.clamp(1, 32),
            },
            "drive": { "base": rootfs, "overlay": dir.join("overlay.img") },
            "vsock": { "guest_cid": GUEST_CID, "uds": dir.join("vsock.sock") },
            "serial_log": dir.join("serial.log"),
            "control_socket": dir.join("control.sock"),
        })
    }
}

fn cgroup_limits(limits: ResourceLimits) -> Limits {
    Limits {
        memory_bytes: (u64::from(limits.memory_mib) + VMM_OVERHEAD_MIB) << 20,
        cpu_millis: limits.vcpus.saturating_mul(1000),
        max_pids: 64,
    }
}

#[tonic::async_trait]
impl Backend for MicroVmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::MicroVm
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        let dir = self.state_root.join(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|e| BackendError::Launch(format!("cannot create {}: {e}", dir.display())))?;
        let config_path = dir.join("vmm.json");
        std::fs::write(&config_path, self.vmm_config(&dir, &spec).to_string())
            .map_err(|e| BackendError::Launch(format!("cannot write {}: {e}", config_path.display())))?;
        let cgroup = Cgroup::create(self.cgroups, &spec.id, &cgroup_limits(spec.limits))
            .map_err(|e| launch_error("cannot create the VMM's cgroup")(e.to_string()))?;
        let child = Command::new(&self.launcher)
            .arg("vmm")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| launch_error("cannot start the VMM process")(e.to_string()))?;
        for procs in cgroup.procs_files() {
            let _ = std::fs::write(procs, child.id().to_string());
        }
        let vm = Arc::new(VmProcess { dir: dir.clone(), child: Mutex::new(child), cgroup });
        let address = AgentAddress::Vsock { uds: dir.join("vsock.sock"), port: AGENT_PORT };
        match agent_client::wait_for_hello(address, HELLO_TIMEOUT).await {
            Ok(agent) => Ok(Box::new(MicroVmInstance { vm, agent })),
            Err(error) => {
                let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
                let tail: String = serial.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                let _ = vm.destroy();
                Err(BackendError::AgentTimeout(HELLO_TIMEOUT, format!("{error}; last console lines: {tail}")))
            }
        }
    }
}

/// One `sandboxd vmm` process and its cgroup.
struct VmProcess {
    dir: PathBuf,
    child: Mutex<Child>,
    cgroup: Cgroup,
}

impl VmProcess {
    /// Sends one control request and returns the reply.
    fn control(&self, op: &str) -> Result<serde_json::Value, String> {
        let stream = UnixStream::connect(self.dir.join("control.sock")).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        writeln!(&stream, "{}", serde_json::json!({ "op": op })).map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(|e| e.to_string())?;
        let reply: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        match reply["ok"].as_bool() {
            Some(true) => Ok(reply),
            _ => Err(reply["error"].as_str().unwrap_or("the VMM refused").to_string()),
        }
    }

    /// Whether the VMM still runs; says why when it died (a seccomp
    /// violation kills it with SIGSYS).
    fn is_alive(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        match self.child.lock().unwrap_or_else(|p| p.into_inner()).try_wait() {
            Ok(None) => true,
            Ok(Some(status)) if status.signal() == Some(libc::SIGSYS) => {
                tracing::error!(vmm = %self.dir.display(), "the VMM was killed by its seccomp filter (SIGSYS)");
                false
            }
            Ok(Some(status)) => {
                tracing::warn!(vmm = %self.dir.display(), %status, "the VMM exited");
                false
            }
            Err(_) => false,
        }
    }

    /// Asks the VMM to stop, then makes sure: kills what is left and
    /// removes the cgroup and the sandbox's files.
    fn destroy(&self) -> Result<(), String> {
        let _ = self.control("shutdown");
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        drop(child);
        self.cgroup.remove().map_err(|e| e.to_string())?;
        std::fs::remove_dir_all(&self.dir).map_err(|e| e.to_string())
    }
}

struct MicroVmInstance {
    vm: Arc<VmProcess>,
    agent: AgentClient<Channel>,
}

async fn blocking<T: Send + 'static>(
    action: &'static str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(join.to_string()))
        .map_err(|reason| BackendError::Control { action, reason })
}

#[tonic::async_trait]
impl Instance for MicroVmInstance {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let vm = Arc::clone(&self.vm);
        blocking("pause", move || vm.control("pause").map(drop)).await
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let vm = Arc::clone(&self.vm);
        blocking("resume", move || vm.control("resume").map(drop)).await
    }

    async fn set_limits(&self, limits: ResourceLimits) -> Result<(), BackendError> {
        // Guest memory and vCPUs are fixed at boot; the VMM's cgroup follows.
        let vm = Arc::clone(&self.vm);
        blocking("limit", move || vm.cgroup.set_limits(&cgroup_limits(limits)).map_err(|e| e.to_string())).await
    }

    fn is_alive(&self) -> bool {
        self.vm.is_alive()
    }

    async fn destroy(self: Box<Self>) -> Result<(), BackendError> {
        let vm = self.vm;
        blocking("destroy", move || vm.destroy()).await
    }
}
