//! The microvm backend: each sandbox is a KVM microVM run by its own
//! `sandboxd vmm` process, in its own cgroup, with the template's root image
//! behind a copy-on-write overlay. A sandbox is restored from its
//! template's snapshot when there is one (cold boot otherwise). The guest
//! agent is the VM's init and serves on vsock port 1024, reached through
//! the VMM's vsock unix socket. Suspending a sandbox snapshots it to disk
//! and ends its VMM; waking it restores that snapshot. Every VMM is jailed
//! (see [`vmm_process`]).
//!
//! VMMs outlive the daemon. A restarted daemon re-adopts each sandbox of
//! its registry from its directory (`STATE_DIR/microvms/<id>`, the
//! daemon's alone) and cgroup (`sandboxd/microvms-<scope>/<id>`): a
//! running one gets its VMM back (the very process, checked through its
//! identity file and a pidfd) and its agent dialled again over vsock; a
//! paused one is its snapshot on disk, which survives a host reboot too.
//! Every VMM and directory the registry does not know (pooled guests,
//! half-made ones) is killed and removed.

pub mod uid_slots;
pub mod vm_dir;
mod vmm_child;
pub mod vmm_process;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sandbox_proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use super::{
    cgroup::{self, Cgroup, CgroupFlavor, Limits},
    Backend, BackendError, BackendKind, Instance, LaunchSpec, ResourceLimits,
};
use crate::{
    agent_client::{self, AgentAddress},
    metrics,
    template::{Template, GUEST_CMDLINE},
};
use vmm_process::{vmm_config, Lifetime, RestoreMemory, VmProcess, VmSource, AGENT_PORT};

/// How long a booting guest has to answer `Hello`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest has to answer `Hello`.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);
/// Memory the VMM process needs beyond guest RAM.
const VMM_OVERHEAD_MIB: u64 = 64;
/// How long a re-adopted running guest's agent has to answer `Hello`.
const ADOPT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A suspended sandbox's snapshot, inside its directory.
const SUSPENDED: &str = "suspended";
/// The files every snapshot has.
const SNAPSHOT_FILES: [&str; 2] = ["state", "memory"];

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
    /// The cgroup group this daemon's VMMs live in (`microvms-<scope>`).
    cgroup_group: String,
    /// What a Create without a template restores.
    default_template: Option<Template>,
    restore_memory: RestoreMemory,
}

fn launch_error(context: &str) -> impl Fn(String) -> BackendError + '_ {
    move |reason| BackendError::Launch(format!("{context}: {reason}"))
}

impl MicroVmBackend {
    /// Checks the images; until [`MicroVmBackend::with_default_template`],
    /// a Create without a template boots cold.
    pub fn new(state_root: PathBuf, images: GuestImages, restore_memory: RestoreMemory) -> Result<Self, String> {
        for (what, path, fix) in [
            ("guest kernel", &images.kernel, "build it with kernel-config/build.sh and pass --kernel"),
            ("guest root image", &images.rootfs, "build it with scripts/guest-image.sh and pass --rootfs-image"),
        ] {
            if !path.is_file() {
                return Err(format!("the {what} {} does not exist: {fix}", path.display()));
            }
            if vm_dir::readable_by_others(path).is_err() {
                return Err(format!("the {what} {} is not readable by others, and VMMs run as unprivileged uids: chmod a+r it", path.display()));
            }
        }
        let launcher = std::env::current_exe().map_err(|e| format!("cannot find the sandboxd binary: {e}"))?;
        let cgroups = cgroup::detect().map_err(|e| e.to_string())?;
        let cgroup_group = format!("microvms-{}", super::daemon_scope(&state_root));
        Ok(Self { state_root, launcher, images, cgroups, cgroup_group, default_template: None, restore_memory })
    }

    /// The cgroup of sandbox `id`'s VMM.
    fn cgroup_name(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_group)
    }

    /// Builds (or reuses) the default template of this backend's images
    /// with `limits` under `state_dir`, logging progress. If it cannot be
    /// built, Creates without a template boot cold.
    pub async fn with_default_template(mut self, state_dir: &Path, limits: ResourceLimits) -> Self {
        let options = crate::template::BuildOptions {
            kernel: self.images.kernel.clone(),
            rootfs: self.images.rootfs.clone(),
            memory_mib: limits.memory_mib,
            vcpus: limits.vcpus,
            out: state_dir.join("templates").join("default"),
            launcher: self.launcher.clone(),
        };
        self.default_template = match Template::load(&options.out) {
            // Templates from before VMMs were jailed may be root's alone.
            Ok(template) if options.matches(&template) && vm_dir::readable_by_others(&template.dir).is_ok() => {
                tracing::info!(template = %options.out.display(), "using the default template's snapshot");
                Some(template)
            }
            _ => match crate::template::build(&options, &|line| tracing::info!("template build: {line}")).await {
                Ok(template) => Some(template),
                Err(error) => {
                    tracing::error!(%error, "cannot build the default template; sandboxes will boot cold");
                    None
                }
            },
        };
        self
    }

    /// The template a spec names: the default one, or a template directory.
    fn template_for(&self, spec: &LaunchSpec) -> Result<Option<Template>, BackendError> {
        match &spec.rootfs {
            None => Ok(self.default_template.clone()),
            Some(dir) => Template::load(dir).map(Some).map_err(|e| BackendError::Template(e.to_string())),
        }
    }

    fn restore_source<'a>(&self, template: &'a Template, working_set: &'a Option<PathBuf>) -> VmSource<'a> {
        VmSource::Restore { snapshot: &template.dir, memory: self.restore_memory, working_set: working_set.as_deref(), record: false }
    }
}

impl Drop for MicroVmBackend {
    /// When the daemon ends with no VMMs left, its cgroup group goes too.
    fn drop(&mut self) {
        Cgroup::at(self.cgroups, &self.cgroup_group).remove_if_empty();
    }
}

/// What a restarted daemon needs to re-adopt a microVM sandbox besides its
/// id, from which its directory and cgroup follow (stored, as JSON, in the
/// daemon's registry).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct MicroVmRecord {
    /// The root image its disk overlays.
    rootfs: PathBuf,
    /// Its guest's shape, which its cgroup's limits follow.
    memory_mib: u32,
    vcpus: u32,
}

impl MicroVmRecord {
    fn cgroup_limits(&self) -> Limits {
        cgroup_limits(ResourceLimits { memory_mib: self.memory_mib, vcpus: self.vcpus, max_processes: 0, disk_mib: 0 })
    }
}

/// Whether `id` can name a directory and a cgroup (letters, digits and dashes).
fn is_plain_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn cgroup_limits(limits: ResourceLimits) -> Limits {
    Limits {
        memory_bytes: (u64::from(limits.memory_mib) + VMM_OVERHEAD_MIB) << 20,
        cpu_millis: limits.vcpus.saturating_mul(1000),
        max_pids: 64,
    }
}

fn memory_label(memory: RestoreMemory, prefetch: bool) -> &'static str {
    match (memory, prefetch) {
        (RestoreMemory::MapPrivate, _) => "map_private",
        (RestoreMemory::Uffd, true) => "uffd_prefetch",
        (RestoreMemory::Uffd, false) => "uffd",
    }
}

#[tonic::async_trait]
impl Backend for MicroVmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::MicroVm
    }

    fn resizes_guests(&self) -> bool {
        false
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        let dir = self.state_root.join(&spec.id);
        let plan = self.plan(&spec)?;
        std::fs::create_dir_all(&dir).map_err(|e| BackendError::Launch(format!("cannot create {}: {e}", dir.display())))?;
        let cgroup = Cgroup::create(self.cgroups, &self.cgroup_name(&spec.id), &cgroup_limits(spec.limits))
            .map_err(|e| launch_error("cannot create the VMM's cgroup")(e.to_string()))?;
        let process = VmProcess::new(dir, Lifetime::OutlivesDaemon);
        let vm = Arc::new(MicroVm { process, cgroup, launcher: self.launcher.clone(), done: AtomicBool::new(false) });
        match vm.run(&plan.config, plan.timeout, plan.restore_label).await {
            Ok(agent) => {
                let record = MicroVmRecord { rootfs: plan.rootfs, memory_mib: spec.limits.memory_mib, vcpus: spec.limits.vcpus };
                Ok(Box::new(MicroVmInstance { vm, agent: Mutex::new(agent), record }))
            }
            Err(error) => {
                let _ = blocking("destroy", move || vm.destroy()).await;
                Err(error)
            }
        }
    }

    async fn adopt(&self, id: &str, record: &str, paused: bool) -> Result<Box<dyn Instance>, BackendError> {
        let record: MicroVmRecord = serde_json::from_str(record)
            .map_err(|error| BackendError::Adopt(format!("its microVM record is unreadable: {error}")))?;
        if !is_plain_id(id) {
            return Err(BackendError::Adopt(format!("its id {id:?} cannot name a directory")));
        }
        let (dir, flavor, cgroup_name, launcher) = (self.state_root.join(id), self.cgroups, self.cgroup_name(id), self.launcher.clone());
        let limits = record.cgroup_limits();
        let vm = tokio::task::spawn_blocking(move || reattach(dir, flavor, &cgroup_name, &limits, launcher))
            .await
            .map_err(|join| BackendError::Adopt(join.to_string()))??;
        let vm = Arc::new(vm);
        match settle(&vm, paused).await {
            Ok(agent) => Ok(Box::new(MicroVmInstance { vm, agent: Mutex::new(agent), record })),
            Err(error) => {
                let _ = blocking("destroy", move || vm.destroy()).await;
                Err(error)
            }
        }
    }

    fn reap_unknown(&self, keep: &HashSet<String>) {
        let cgroups: Vec<String> = Cgroup::child_names(self.cgroups, &self.cgroup_group).into_iter().filter(|id| !keep.contains(id)).collect();
        for id in &cgroups {
            // Removing a VMM's cgroup kills it.
            if let Err(error) = Cgroup::at(self.cgroups, &self.cgroup_name(id)).remove() {
                tracing::warn!(%error, vm = %id, "cannot remove the cgroup of a VMM of an earlier run");
            }
        }
        let mut dirs = 0;
        for entry in std::fs::read_dir(&self.state_root).into_iter().flatten().flatten() {
            if entry.file_name().to_str().is_some_and(|id| keep.contains(id)) {
                continue;
            }
            reap_dir(entry.path());
            dirs += 1;
        }
        ::metrics::counter!(metrics::GUESTS_REAPED, "backend" => "microvm").increment(dirs as u64);
        if cgroups.len() + dirs > 0 {
            tracing::warn!(cgroups = cgroups.len(), dirs, kept = keep.len(), "removed microVMs of an earlier run that the registry does not know (pooled or half-made ones)");
        }
    }
}

/// The sandbox in `dir` of an earlier run, with its VMM if one still runs
/// there, and its cgroup (made again after a host reboot).
fn reattach(dir: PathBuf, flavor: CgroupFlavor, cgroup_name: &str, limits: &Limits, launcher: PathBuf) -> Result<MicroVm, BackendError> {
    if !dir.join(vm_dir::JAIL).is_dir() {
        return Err(BackendError::Gone(format!("its directory {} is gone", dir.display())));
    }
    let process = VmProcess::reattach(dir).map_err(|error| BackendError::Adopt(error.to_string()))?;
    let cgroup = Cgroup::create(flavor, cgroup_name, limits).map_err(|error| BackendError::Adopt(format!("cannot make its cgroup: {error}")))?;
    Ok(MicroVm { process, cgroup, launcher, done: AtomicBool::new(false) })
}

/// Brings a re-adopted microVM to the state its registry row says (the
/// registry has the last word) and returns a client of its agent. A
/// running one that lost its VMM is gone; its VMM is resumed (a daemon
/// that died during a snapshot left it paused) and its agent dialled. A
/// paused one's VMM, left running by a daemon that died during a Resume,
/// is ended; its snapshot on disk must be whole.
async fn settle(vm: &Arc<MicroVm>, paused: bool) -> Result<AgentClient<Channel>, BackendError> {
    let address = AgentAddress::Vsock { uds: vm.process.dir().join(vmm_process::VSOCK_SOCKET), port: AGENT_PORT };
    if !paused {
        if !vm.process.is_alive() {
            return Err(BackendError::Gone(format!("its VMM exited while the daemon was away; {}", vm.process.diagnostics())));
        }
        let resumer = Arc::clone(vm);
        blocking("resume", move || resumer.process.simple("resume").map(drop).map_err(|e| e.to_string())).await?;
        return match agent_client::wait_for_hello(address.clone(), ADOPT_HELLO_TIMEOUT).await {
            Ok(agent) => Ok(agent),
            Err(error) => {
                tracing::warn!(%error, vm = %vm.process.dir().display(), "a re-adopted microVM's agent does not answer yet; keeping the sandbox");
                Ok(agent_client::client(agent_client::channel(address)))
            }
        };
    }
    if vm.process.is_alive() {
        tracing::warn!(vm = %vm.process.dir().display(), "a paused sandbox's VMM runs (the daemon died during a Resume); ending it, the snapshot stays");
        vm.stop().await;
    }
    let snapshot = vm.suspended_dir();
    if let Some(missing) = SNAPSHOT_FILES.iter().find(|file| !snapshot.join(file).is_file()) {
        return Err(BackendError::Gone(format!("its snapshot on disk lacks {missing}")));
    }
    // A paused agent answers once it is woken, which dials it again.
    Ok(agent_client::client(agent_client::channel(address)))
}

/// Removes a VM directory of an earlier run, ending first the VMM its
/// identity file names if it still runs (one whose cgroup is already gone).
fn reap_dir(dir: PathBuf) {
    match VmProcess::reattach(dir.clone()) {
        // Dropping it ends its VMM, within seconds.
        Ok(vm) => drop(vm),
        Err(error) => tracing::warn!(%error, vm = %dir.display(), "not ending the process a leftover VM directory names"),
    }
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(%error, vm = %dir.display(), "cannot remove a VM directory of an earlier run");
    }
}

/// How a new sandbox's VMM starts.
struct LaunchPlan {
    config: serde_json::Value,
    /// The root image its disk overlays.
    rootfs: PathBuf,
    /// How long its agent has to answer.
    timeout: Duration,
    /// For a restore, its memory mode as the metrics label it.
    restore_label: Option<&'static str>,
}

impl MicroVmBackend {
    /// A restore of the spec's template when the template has the spec's
    /// memory and vCPUs (a snapshot fixes both), else a cold boot.
    fn plan(&self, spec: &LaunchSpec) -> Result<LaunchPlan, BackendError> {
        let template = self.template_for(spec)?;
        if let Some(template) = template.as_ref().filter(|t| (t.manifest.memory_mib, t.manifest.vcpus) == (spec.limits.memory_mib, spec.limits.vcpus)) {
            let working_set = template.working_set();
            return Ok(LaunchPlan {
                config: vmm_config(&template.manifest.rootfs, &self.restore_source(template, &working_set)),
                rootfs: template.manifest.rootfs.clone(),
                timeout: RESTORE_TIMEOUT,
                restore_label: Some(memory_label(self.restore_memory, working_set.is_some())),
            });
        }
        let rootfs = template.map_or_else(|| self.images.rootfs.clone(), |t| t.manifest.rootfs);
        let boot = VmSource::Boot {
            kernel: &self.images.kernel,
            cmdline: GUEST_CMDLINE,
            memory_mib: spec.limits.memory_mib,
            vcpus: spec.limits.vcpus,
        };
        Ok(LaunchPlan { config: vmm_config(&rootfs, &boot), rootfs, timeout: BOOT_TIMEOUT, restore_label: None })
    }
}

/// A sandbox's VMM process (or, while suspended, its directory) and cgroup.
struct MicroVm {
    process: VmProcess,
    cgroup: Cgroup,
    launcher: PathBuf,
    /// Destroyed, or released to outlive the daemon.
    done: AtomicBool,
}

impl MicroVm {
    /// Starts the VMM with `config` and waits for the agent's hello; a
    /// restore (`label`: its memory mode) is timed for the metrics. On
    /// failure the VMM is stopped and the directory kept.
    async fn run(self: &Arc<Self>, config: &serde_json::Value, timeout: Duration, label: Option<&'static str>) -> Result<AgentClient<Channel>, BackendError> {
        let started = Instant::now();
        self.process.start(&self.launcher, config, Some(&self.cgroup)).map_err(|e| BackendError::Launch(e.to_string()))?;
        match self.process.wait_for_agent(timeout, &|_| {}).await {
            Ok(agent) => {
                if let Some(mode) = label {
                    ::metrics::histogram!(metrics::RESTORE_SECONDS, "mode" => mode).record(started.elapsed().as_secs_f64());
                    ::metrics::counter!(metrics::RESTORES, "mode" => mode, "outcome" => "ok").increment(1);
                }
                Ok(agent)
            }
            Err(reason) => {
                if let Some(mode) = label {
                    ::metrics::counter!(metrics::RESTORES, "mode" => mode, "outcome" => "failed").increment(1);
                }
                self.stop().await;
                Err(BackendError::AgentTimeout(timeout, reason))
            }
        }
    }

    /// Ends the VMM process, keeping the directory.
    async fn stop(self: &Arc<Self>) {
        let vm = Arc::clone(self);
        let stopped = blocking("stop", move || vm.process.stop().map_err(|e| e.to_string())).await;
        if let Err(error) = stopped {
            tracing::error!(%error, vm = %self.process.dir().display(), "cannot stop a microVM");
        }
    }

    /// Ends the VMM, then removes the cgroup and the sandbox's files (all
    /// three are tried; the first failure is returned).
    fn destroy(&self) -> Result<(), String> {
        self.done.store(true, Ordering::Relaxed);
        let stopped = self.process.stop().map_err(|e| e.to_string());
        let removed = self.cgroup.remove().map_err(|e| e.to_string());
        let deleted = match std::fs::remove_dir_all(self.process.dir()) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.to_string()),
            _ => Ok(()),
        };
        stopped.and(removed).and(deleted)
    }

    /// Leaves the VMM (if any), cgroup and directory to outlive the daemon.
    fn release(&self) {
        self.done.store(true, Ordering::Relaxed);
        self.process.release();
    }

    fn suspended_dir(&self) -> PathBuf {
        self.process.dir().join(SUSPENDED)
    }

    /// Snapshots the VM inside its jail, ends the VMM process, and moves
    /// the snapshot out of the jail into its directory. The new snapshot
    /// replaces the last one only once it is complete; if it cannot be
    /// taken, the VM runs on.
    fn suspend(&self) -> Result<(), String> {
        let dir = self.suspended_dir();
        let partial = self.process.jail_dir().join(format!("{SUSPENDED}.partial"));
        let inside = self.process.create_dir_for_vmm(&partial).map_err(|e| e.to_string())?;
        if let Err(error) = self.process.control(serde_json::json!({ "op": "snapshot", "dir": inside })) {
            let _ = std::fs::remove_dir_all(&partial);
            let resumed = self.process.simple("resume").map_or_else(|e| format!("; resuming it failed too: {e}"), |_| String::new());
            return Err(format!("{error}; the sandbox keeps running{resumed}; free disk space in the state directory and retry"));
        }
        self.process.stop().map_err(|e| e.to_string())?;
        vm_dir::publish(&partial).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir).map_err(|e| format!("cannot move the snapshot to {}: {e}", dir.display()))
    }

    /// Starts a VMM restoring the suspended snapshot, with the disk as it
    /// was at that snapshot (so a failed wake can be retried).
    async fn wake(self: &Arc<Self>, rootfs: &Path) -> Result<AgentClient<Channel>, BackendError> {
        let jail = self.process.jail_dir();
        for stale in ["overlay.img", "overlay.bitmap"] {
            vm_dir::unlink(&jail.join(stale)).map_err(|e| BackendError::Launch(e.to_string()))?;
        }
        let snapshot = self.suspended_dir();
        let source = VmSource::Restore { snapshot: &snapshot, memory: RestoreMemory::MapPrivate, working_set: None, record: false };
        self.run(&vmm_config(rootfs, &source), RESTORE_TIMEOUT, Some("map_private")).await
    }
}

impl Drop for MicroVm {
    /// A sandbox dropped without `destroy` (a Create whose client went
    /// away mid-launch) still leaves nothing behind.
    fn drop(&mut self) {
        if !self.done.load(Ordering::Relaxed) {
            if let Err(error) = self.destroy() {
                tracing::warn!(%error, vm = %self.process.dir().display(), "cannot clean up a microVM");
            }
        }
    }
}

struct MicroVmInstance {
    vm: Arc<MicroVm>,
    agent: Mutex<AgentClient<Channel>>,
    /// What a restarted daemon needs to re-adopt it (its root image among it).
    record: MicroVmRecord,
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

impl MicroVmInstance {
    async fn control(&self, action: &'static str) -> Result<(), BackendError> {
        let vm = Arc::clone(&self.vm);
        blocking(action, move || vm.process.simple(action).map(drop).map_err(|e| e.to_string())).await
    }
}

#[tonic::async_trait]
impl Instance for MicroVmInstance {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn pause(&self) -> Result<(), BackendError> {
        self.control("pause").await
    }

    async fn resume(&self) -> Result<(), BackendError> {
        self.control("resume").await
    }

    async fn suspend(&self) -> Result<(), BackendError> {
        let vm = Arc::clone(&self.vm);
        blocking("suspend", move || vm.suspend()).await
    }

    async fn wake(&self) -> Result<(), BackendError> {
        let agent = self.vm.wake(&self.record.rootfs).await?;
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = agent;
        Ok(())
    }

    async fn set_limits(&self, limits: ResourceLimits) -> Result<(), BackendError> {
        // Guest memory and vCPUs are fixed at boot; the VMM's cgroup follows.
        let vm = Arc::clone(&self.vm);
        blocking("limit", move || vm.cgroup.set_limits(&cgroup_limits(limits)).map_err(|e| e.to_string())).await
    }

    fn memory_bytes(&self) -> u64 {
        self.vm.cgroup.memory_bytes()
    }

    fn is_alive(&self) -> bool {
        self.vm.process.is_alive()
    }

    fn diagnostics(&self) -> String {
        self.vm.process.diagnostics()
    }

    async fn destroy(self: Box<Self>) -> Result<(), BackendError> {
        let vm = self.vm;
        blocking("destroy", move || vm.destroy()).await
    }

    fn adoption_record(&self) -> String {
        serde_json::to_string(&self.record).unwrap_or_default()
    }

    async fn release(self: Box<Self>) -> Result<(), BackendError> {
        self.vm.release();
        Ok(())
    }
}
