//! Templates of the microvm backend: a snapshot of a booted guest whose
//! agent is up and idle, its disk overlay, and the working set the guest
//! touches when a clone is first used. `sandboxd template build` (and the
//! daemon at start, for the default template) boots the guest, snapshots
//! it, then restores it once through userfaultfd to record the working set
//! that later restores prefetch. Both VMMs are jailed like every other:
//! each writes into its own jail, and what it wrote is taken out and
//! published (plain files, root's, readable by later VMMs) once it exited.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sandbox_proto::{agent::agent_client::AgentClient, api::ExecRequest};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::backend::microvm::{
    vm_dir::{self, VmDirError},
    vmm_process::{vmm_config, Lifetime, RestoreMemory, VmProcess, VmProcessError, VmSource},
};

/// The template's description, next to its snapshot files.
const MANIFEST: &str = "template.json";
/// The recorded working set (little-endian u64 offsets into `memory`).
const WORKING_SET: &str = "working-set";
/// How long a booting guest has to answer `Hello`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a restored guest has to answer `Hello`.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first use of a restored guest (refresh, one exec) may take.
const FIRST_USE_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest counts as idle once its console has been quiet this long.
const QUIET: Duration = Duration::from_secs(1);
/// The guest kernel's command line. `no-kvmapf` turns off KVM's
/// asynchronous page faults in the guest: with them, a guest task whose page
/// the host has not served yet (a userfaultfd restore) sleeps until KVM
/// sends "page ready", and a snapshot taken meanwhile (Pause to disk) keeps
/// the sleeping task but not KVM's pending notice, so after a restore it
/// never wakes. Without them a vCPU simply waits for its page.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/init quiet no-kvmapf";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {dir} is missing or unreadable ({reason}): build it with `sandboxd template build --out {dir}`")]
    Missing { dir: PathBuf, reason: String },
    #[error("template {dir} has an unusable snapshot ({reason}): rebuild it with `sandboxd template build`")]
    Snapshot { dir: PathBuf, reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vmm(#[from] VmProcessError),
    #[error(transparent)]
    Dir(#[from] VmDirError),
    #[error("the guest's agent did not answer during the template build: {0}")]
    Agent(String),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io { action, path: path.to_path_buf(), source }
}

/// What a template was built from, and what its build measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TemplateManifest {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Size and modification time of the kernel and root image when built.
    pub images: String,
    /// The guest kernel's command line the template booted with (empty in
    /// manifests from before it was recorded, which then count as stale).
    #[serde(default)]
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub working_set_pages: u64,
    pub boot_seconds: f64,
    pub built_at_unix_ms: u64,
}

/// A built template: a snapshot directory with its manifest.
#[derive(Clone, Debug)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: TemplateManifest,
}

impl Template {
    /// Reads a template and checks that its snapshot can be restored by
    /// this build (format version and checksum).
    pub fn load(dir: &Path) -> Result<Self, TemplateError> {
        let missing = |reason: String| TemplateError::Missing { dir: dir.to_path_buf(), reason };
        let text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| missing(e.to_string()))?;
        let manifest: TemplateManifest = serde_json::from_str(&text).map_err(|e| missing(e.to_string()))?;
        let unusable = |reason: String| TemplateError::Snapshot { dir: dir.to_path_buf(), reason };
        let files = sandbox_vmm::snapshot::SnapshotFiles::in_dir(dir);
        let state = sandbox_vmm::snapshot::load_state(&files).map_err(|e| unusable(e.to_string()))?;
        let memory_len = std::fs::metadata(&files.memory).map_or(0, |m| m.len());
        if memory_len != state.memory_bytes {
            return Err(unusable(format!("its memory file has {memory_len} bytes, the state says {}", state.memory_bytes)));
        }
        if images_fingerprint(&manifest.kernel, &manifest.rootfs) != manifest.images {
            return Err(unusable(format!("{} or {} changed since it was built", manifest.kernel.display(), manifest.rootfs.display())));
        }
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    /// The recorded working set, when the build recorded one.
    pub fn working_set(&self) -> Option<PathBuf> {
        Some(self.dir.join(WORKING_SET)).filter(|path| path.is_file())
    }
}

/// What to build a template from.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub out: PathBuf,
    /// The `sandboxd` binary that runs VMM processes.
    pub launcher: PathBuf,
}

impl BuildOptions {
    /// Whether `template` was built from these options' images and shape,
    /// with today's kernel command line ([`Template::load`] already refused
    /// one whose images changed since).
    pub fn matches(&self, template: &Template) -> bool {
        let manifest = &template.manifest;
        (&manifest.kernel, &manifest.rootfs, manifest.memory_mib, manifest.vcpus, manifest.cmdline.as_str())
            == (&self.kernel, &self.rootfs, self.memory_mib, self.vcpus, GUEST_CMDLINE)
    }
}

/// Size and modification time of both images: a rebuilt image gets a new template.
fn images_fingerprint(kernel: &Path, rootfs: &Path) -> String {
    let describe = |path: &Path| {
        std::fs::metadata(path).map_or_else(
            |_| "missing".to_string(),
            |m| format!("{}@{:?}", m.len(), m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok())),
        )
    };
    format!("{} {}", describe(kernel), describe(rootfs))
}

/// Builds a template into `options.out` (replacing what is there once the
/// new one is complete), reporting progress through `progress`.
pub async fn build(options: &BuildOptions, progress: &(dyn Fn(&str) + Sync)) -> Result<Template, TemplateError> {
    let work = PathBuf::from(format!("{}.building", options.out.display()));
    let _ = std::fs::remove_dir_all(&work);
    let built = build_in(options, &work, progress).await;
    // A failed build leaves no half-written snapshot (guest memory) behind.
    let _ = std::fs::remove_dir_all(&work);
    built
}

async fn build_in(options: &BuildOptions, work: &Path, progress: &(dyn Fn(&str) + Sync)) -> Result<Template, TemplateError> {
    let snapshot = work.join("template");
    std::fs::create_dir_all(work).map_err(io_error("create", work))?;
    let started = Instant::now();
    progress(&format!("booting {} ({} MiB, {} vCPU)", options.kernel.display(), options.memory_mib, options.vcpus));
    boot_and_snapshot(options, &work.join("boot"), &snapshot, progress).await?;
    let boot_seconds = started.elapsed().as_secs_f64();
    progress(&format!("snapshot written after {boot_seconds:.1} s; recording the working set of a first use"));
    let working_set_pages = record_working_set(options, &work.join("record"), &snapshot).await?;
    progress(&format!("working set: {working_set_pages} pages"));
    let manifest = TemplateManifest {
        kernel: options.kernel.clone(),
        rootfs: options.rootfs.clone(),
        images: images_fingerprint(&options.kernel, &options.rootfs),
        cmdline: GUEST_CMDLINE.to_string(),
        memory_mib: options.memory_mib,
        vcpus: options.vcpus,
        working_set_pages,
        boot_seconds,
        built_at_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    };
    let manifest_path = snapshot.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
    std::fs::write(&manifest_path, text).map_err(io_error("write", &manifest_path))?;
    // Every file readable by the VMMs that restore it, whatever the umask.
    vm_dir::publish(&snapshot)?;
    let _ = std::fs::remove_dir_all(&options.out);
    std::fs::rename(&snapshot, &options.out).map_err(io_error("move the template to", &options.out))?;
    progress(&format!("template ready in {} after {:.1} s", options.out.display(), started.elapsed().as_secs_f64()));
    Template::load(&options.out)
}

/// Boots the guest in `dir`, waits for its agent and a quiet console,
/// snapshots it inside its jail, and moves the snapshot to `snapshot`.
async fn boot_and_snapshot(options: &BuildOptions, dir: &Path, snapshot: &Path, progress: &(dyn Fn(&str) + Sync)) -> Result<(), TemplateError> {
    let vm = VmProcess::new(dir.to_path_buf(), Lifetime::WithDaemon);
    let source = VmSource::Boot { kernel: &options.kernel, cmdline: GUEST_CMDLINE, memory_mib: options.memory_mib, vcpus: options.vcpus };
    vm.start(&options.launcher, &vmm_config(&options.rootfs, &source), None)?;
    let written = vm.jail_dir().join("template");
    let result = async {
        vm.wait_for_agent(BOOT_TIMEOUT, progress).await.map_err(TemplateError::Agent)?;
        progress("the agent answered; waiting for the guest to settle");
        wait_until_quiet(&vm.jail_dir().join("serial.log")).await;
        let inside = vm.create_dir_for_vmm(&written)?;
        vm.control(serde_json::json!({ "op": "snapshot", "dir": inside }))?;
        Ok::<_, TemplateError>(())
    }
    .await;
    let stopped = vm.stop();
    result?;
    stopped?;
    take_out(&written, snapshot)
}

/// Restores the snapshot once through userfaultfd, uses it the way a
/// sandbox is first used (agent hello, clock and entropy refresh, one
/// exec), and saves the order of the pages that took next to it.
async fn record_working_set(options: &BuildOptions, dir: &Path, snapshot: &Path) -> Result<u64, TemplateError> {
    let vm = VmProcess::new(dir.to_path_buf(), Lifetime::WithDaemon);
    let source = VmSource::Restore { snapshot, memory: RestoreMemory::Uffd, working_set: None, record: true };
    vm.start(&options.launcher, &vmm_config(&options.rootfs, &source), None)?;
    let written = vm.jail_dir().join(WORKING_SET);
    let result = async {
        let mut agent = vm.wait_for_agent(RESTORE_TIMEOUT, &|_| {}).await.map_err(TemplateError::Agent)?;
        let used = tokio::time::timeout(FIRST_USE_TIMEOUT, first_use(&mut agent))
            .await
            .unwrap_or_else(|_| Err(format!("the first use of the restored guest took over {FIRST_USE_TIMEOUT:?}")));
        used.map_err(|reason| TemplateError::Agent(format!("{reason}; {}", vm.diagnostics())))?;
        let reply = vm.control(serde_json::json!({ "op": "working_set", "path": vm.jail_path(&written)? }))?;
        Ok::<_, TemplateError>(reply["pages"].as_u64().unwrap_or(0))
    }
    .await;
    let stopped = vm.stop();
    let pages = result?;
    stopped?;
    take_out(&written, &snapshot.join(WORKING_SET))?;
    Ok(pages)
}

/// Moves what an exited VMM wrote in its jail to `to`, published.
fn take_out(written: &Path, to: &Path) -> Result<(), TemplateError> {
    vm_dir::publish(written)?;
    std::fs::rename(written, to).map_err(io_error("move a VMM's output to", to))
}

/// What every sandbox does first: refresh, then run a process.
async fn first_use(agent: &mut AgentClient<Channel>) -> Result<(), String> {
    crate::agent_client::refresh(agent.clone()).await.map_err(|e| e.to_string())?;
    let request = ExecRequest { argv: vec!["true".into()], timeout_ms: 10_000, ..Default::default() };
    let mut events = agent.exec(request).await.map_err(|s| s.message().to_string())?.into_inner();
    while events.message().await.map_err(|s| s.message().to_string())?.is_some() {}
    Ok(())
}

/// Waits until the console has not grown for [`QUIET`] (at most ten times that).
async fn wait_until_quiet(serial_log: &Path) {
    let size = || std::fs::metadata(serial_log).map_or(0, |m| m.len());
    let mut last = size();
    for _ in 0..10 {
        tokio::time::sleep(QUIET).await;
        let now = size();
        if now == last {
            return;
        }
        last = now;
    }
}
