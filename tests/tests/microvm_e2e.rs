//! The full Linux-guest suite on the microvm backend: a cold boot to the
//! agent's hello over vsock with exec, a PTY and files; `sandboxd template
//! build`; sandboxes restored from a template snapshot (cold and from the
//! warm pool) that serve exec and never share RNG state; Pause to disk
//! and Resume with files and processes intact; and no sandbox lost when
//! the daemon is killed or stopped and started again. It needs a host with
//! hardware virtualization (VT-x/AMD-V; on PVM hosts guest ring 0 is
//! emulated and Linux cannot boot), so it runs only with SANDBOXD_E2E_KVM=1,
//! SANDBOXD_KERNEL_DIR (kernel-config/build.sh) and SANDBOXD_GUEST_IMAGE_DIR
//! (scripts/guest-image.sh). See README.md, "Linux guests".

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sandbox_proto::api::{
    connect_request::Input, exec_event::Event, upload_request::Part, ConnectRequest, ConnectStart, CreateSandboxRequest,
    DeleteSandboxRequest, DownloadRequest, ExecRequest, Limits, PauseSandboxRequest, PtySize, ResumeSandboxRequest,
    Sandbox, SandboxState, UploadHeader, UploadRequest,
};
use sandboxd_tests::{binary, dir_names, print_vm_logs, proc_status, Clients, Daemon, DaemonOptions, Watchdog, COUNTER};

/// Guest memory of every sandbox here (a template snapshot writes it out).
const MEMORY_MIB: u32 = 128;

struct Images {
    kernel: String,
    rootfs: String,
}

fn images() -> Option<Images> {
    if std::env::var("SANDBOXD_E2E_KVM").as_deref() != Ok("1") {
        eprintln!("skipped: set SANDBOXD_E2E_KVM=1 on a host with VT-x/AMD-V (see README.md, Linux guests)");
        return None;
    }
    let kernel = std::env::var("SANDBOXD_KERNEL_DIR").expect("SANDBOXD_KERNEL_DIR (kernel-config/build.sh)");
    let image = std::env::var("SANDBOXD_GUEST_IMAGE_DIR").expect("SANDBOXD_GUEST_IMAGE_DIR (scripts/guest-image.sh)");
    Some(Images { kernel: format!("{kernel}/vmlinux"), rootfs: format!("{image}/rootfs.ext4") })
}

fn microvm_options(images: &Images, pool_size: usize, extra: &[String]) -> DaemonOptions {
    let mut extra_args =
        vec!["--kernel".into(), images.kernel.clone(), "--rootfs-image".into(), images.rootfs.clone(), "--default-memory-mib".into(), MEMORY_MIB.to_string()];
    extra_args.extend_from_slice(extra);
    DaemonOptions {
        backend: "microvm",
        pool_size,
        extra_args,
        metrics: true,
        // The daemon builds its default template (boot, snapshot, one recorded restore) before
        // serving; the test's own deadline (armed before, and shorter) fires first, with the
        // threads' stacks.
        start_timeout: test_deadline() + Duration::from_secs(30),
        ..Default::default()
    }
}

/// Longest a test here may take, its daemon's start-up (which builds the
/// default template) included, before it is failed with every thread's
/// kernel stack and the microVMs' logs: SANDBOXD_E2E_DEADLINE_SECS, or 300 s.
fn test_deadline() -> Duration {
    let seconds = std::env::var("SANDBOXD_E2E_DEADLINE_SECS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(seconds.unwrap_or(300))
}

/// Arms a test's deadline (from its first line, so that it covers the
/// daemon's start-up) and makes a panic print the tails of the microVMs'
/// logs first, before unwinding stops the daemon (which removes them).
fn arm_deadline(test: &str, deadline: Duration) -> Watchdog {
    static LOGS_ON_PANIC: std::sync::Once = std::sync::Once::new();
    LOGS_ON_PANIC.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            print_vm_logs();
        }));
    });
    Watchdog::arm(test, deadline)
}

async fn timed_create(api: &mut Clients, request: CreateSandboxRequest) -> (String, Duration) {
    let started = Instant::now();
    let id = api.sandboxes.create(request).await.expect("Create").into_inner().id;
    (id, started.elapsed())
}

async fn create_timed(api: &mut Clients, request: CreateSandboxRequest, what: &str) -> String {
    let (id, took) = timed_create(api, request).await;
    eprintln!("microVM Create ({what}): {took:?}");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn linux_guest_boots_to_the_agent_and_serves_the_api() {
    let Some(images) = images() else { return };
    let _deadline = arm_deadline("linux_guest_boots_to_the_agent_and_serves_the_api", test_deadline());
    let daemon = Daemon::start(microvm_options(&images, 0, &[])).await;
    let mut api = daemon.clients(None).await;
    // Another memory size than the template's: a cold boot.
    let limits = Limits { memory_mib: MEMORY_MIB + 64, ..Default::default() };
    let id = create_timed(&mut api, CreateSandboxRequest { limits: Some(limits), ..Default::default() }, "boot to the agent's hello over vsock").await;
    let sandbox = api.sandboxes.get(sandbox_proto::api::GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(sandbox.backend, "microvm");

    let output = api.exec(&id, &["sh", "-c", "echo out; echo err >&2; uname -r; exit 3"]).await.unwrap();
    assert!(output.stdout_text().starts_with("out\n6.12"), "{}", output.stdout_text());
    assert_eq!((output.stderr_text().as_str(), output.code()), ("err\n", Some(3)));
    let memory_kib: u32 = api.sh(&id, "awk '/MemTotal/ {print $2}' /proc/meminfo").await.trim().parse().unwrap();
    assert!(memory_kib > MEMORY_MIB * 1024, "the guest has the requested {} MiB: MemTotal {memory_kib} kB", MEMORY_MIB + 64);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let start = ConnectStart {
        process: Some(ExecRequest { sandbox_id: id.clone(), argv: vec!["sh".into()], ..Default::default() }),
        pty: Some(PtySize { rows: 30, cols: 90 }),
    };
    tx.send(ConnectRequest { input: Some(Input::Start(start)) }).await.unwrap();
    tx.send(ConnectRequest { input: Some(Input::Stdin(b"stty size; exit\n".to_vec().into())) }).await.unwrap();
    let mut events = api.processes.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut screen = String::new();
    while let Some(event) = events.message().await.unwrap() {
        if let Some(Event::Stdout(data)) = event.event {
            screen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(screen.contains("30 90"), "{screen}");

    upload(&mut api, &id, "/home/user/f", b"in a microVM").await.expect("Upload");
    assert_eq!(download(&mut api, &id, "/home/user/f").await.expect("Download"), b"in a microVM");
    api.sandboxes.delete(DeleteSandboxRequest { id }).await.unwrap();
}

async fn upload(api: &mut Clients, id: &str, path: &str, data: &[u8]) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = UploadHeader { sandbox_id: id.into(), path: path.into(), mode: 0 };
    for part in [Part::Header(header), Part::Data(data.to_vec().into())] {
        tx.send(UploadRequest { part: Some(part) }).await.expect("the upload stream is open");
    }
    drop(tx);
    api.files.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(drop)
}

async fn download(api: &mut Clients, id: &str, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut chunks = api.files.download(DownloadRequest { sandbox_id: id.into(), path: path.into() }).await?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

#[tokio::test(flavor = "multi_thread")]
async fn template_build_reports_progress_and_writes_a_restorable_template() {
    let Some(images) = images() else { return };
    let _deadline = arm_deadline("template_build_reports_progress_and_writes_a_restorable_template", test_deadline());
    let out = std::env::temp_dir().join(format!("sandboxd-e2e-template-{}", std::process::id()));
    let started = Instant::now();
    let output = std::process::Command::new(binary("sandboxd"))
        .args(["template", "build", "--kernel", &images.kernel, "--rootfs-image", &images.rootfs, "--memory-mib", "128", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{progress}");
    eprintln!("sandboxd template build: {:?}\n{progress}", started.elapsed());
    for line in ["booting", "the agent answered", "working set:", "template ready"] {
        assert!(progress.contains(line), "progress shows '{line}': {progress}");
    }
    for file in ["state", "memory", "disk0.overlay", "working-set", "template.json"] {
        assert!(out.join(file).is_file(), "the template has {file}");
    }

    // A daemon serves it under a name of its own.
    let extra = vec!["--template".to_string(), format!("built={}", out.display())];
    let daemon = Daemon::start(microvm_options(&images, 0, &extra)).await;
    let mut api = daemon.clients(None).await;
    let request = CreateSandboxRequest { template: "built".into(), ..Default::default() };
    let id = create_timed(&mut api, request, "restore of a `template build` template").await;
    assert_eq!(api.sh(&id, "echo restored").await, "restored\n");
    std::fs::remove_dir_all(out).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_sandboxes_differ_in_rng_and_survive_pause_to_disk() {
    let Some(images) = images() else { return };
    let _deadline = arm_deadline("restored_sandboxes_differ_in_rng_and_survive_pause_to_disk", test_deadline());
    let daemon = Daemon::start(microvm_options(&images, 1, &["--pool-max".into(), "1".into()])).await;
    let mut api = daemon.clients(None).await;
    let ready = "sandboxd_pool_ready{template=\"default\"}";
    let deadline = Instant::now() + Duration::from_secs(120);
    while daemon.metric(ready) != Some(1.0) {
        assert!(Instant::now() < deadline, "the warm pool never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two Creates at once: one takes the pooled guest, the other finds the
    // pool empty and restores the template cold.
    let mut second = Clients::new_from(&api);
    let (first, other) = tokio::join!(
        timed_create(&mut api, CreateSandboxRequest::default()),
        timed_create(&mut second, CreateSandboxRequest::default()),
    );
    let ((pooled, pooled_took), (cold, cold_took)) = if first.1 <= other.1 { (first, other) } else { (other, first) };
    eprintln!("microVM Create from the warm pool: {pooled_took:?}; by a cold restore of the template: {cold_took:?}");
    assert_eq!(daemon.metric("sandboxd_pool_hits_total"), Some(1.0));
    assert_eq!(daemon.metric("sandboxd_pool_misses_total"), Some(1.0));
    assert!(daemon.metric("sandboxd_restore_duration_seconds_count{mode=\"uffd_prefetch\"}").unwrap_or(0.0) >= 2.0);

    let random = "head -c 16 /dev/urandom | od -An -tx1";
    let (a, b) = (api.sh(&pooled, random).await, api.sh(&cold, random).await);
    assert_ne!(a, b, "clones of one snapshot must not share RNG state");
    let clock = api.sh(&cold, "date +%s").await;
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let guest_now: u64 = clock.trim().parse().unwrap();
    assert!(guest_now.abs_diff(host_now) < 30, "the restored guest's clock was set: guest {guest_now}, host {host_now}");

    // Pause to disk: files and processes come back.
    upload(&mut api, &cold, "/home/user/kept", b"across a pause").await.expect("Upload");
    let sleeper = api.sh(&cold, "sleep 10000 >/dev/null 2>&1 & echo $!").await;
    let paused = api.sandboxes.pause(PauseSandboxRequest { id: cold.clone() }).await.unwrap().into_inner();
    assert_eq!(paused.state, SandboxState::Paused as i32);
    let vm_dir = daemon.state_dir.join("microvms").join(&cold);
    assert!(vm_dir.join("suspended").join("memory").is_file(), "the paused sandbox is on disk");
    let error = api.exec(&cold, &["true"]).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    let started = Instant::now();
    api.sandboxes.resume(ResumeSandboxRequest { id: cold.clone() }).await.unwrap();
    eprintln!("microVM Resume from disk: {:?}", started.elapsed());
    assert_eq!(download(&mut api, &cold, "/home/user/kept").await.expect("Download"), b"across a pause");
    let alive = api.exec(&cold, &["kill", "-0", sleeper.trim()]).await.unwrap();
    assert_eq!(alive.code(), Some(0), "the process started before the pause still runs");
    assert_eq!(api.sh(&pooled, "echo untouched").await, "untouched\n", "the other sandbox is unaffected");
    for id in [pooled, cold] {
        api.sandboxes.delete(DeleteSandboxRequest { id }).await.unwrap();
    }
}

/// How long a restarted daemon has to serve again (it reuses its template).
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// The VMMs' uids (uid_slots::FIRST_UID and SLOTS).
const VMM_UIDS: std::ops::Range<u32> = 2_000_000..2_065_536;

/// Restart tests (issue 9): with a running sandbox whose background
/// process counts, a sandbox paused to disk and a full warm pool, the
/// daemon is killed with SIGKILL and started again.
#[tokio::test(flavor = "multi_thread")]
async fn microvm_sandboxes_survive_a_killed_daemon() {
    let Some(images) = images() else { return };
    let _deadline = arm_deadline("microvm_sandboxes_survive_a_killed_daemon", test_deadline());
    let mut daemon = Daemon::start(restart_options(&images, "keep")).await;
    let _reaper = KillVmmsOnPanic(vm_root(&daemon));
    let mut api = daemon.clients(None).await;
    let scene = Scene::set_up(&daemon, &mut api).await;
    let started = Instant::now();
    daemon.kill_and_restart(RESTART_TIMEOUT).await;
    eprintln!("microVM daemon killed and serving again: {:?}", started.elapsed());
    let mut api = daemon.clients(None).await;
    scene.check_kept(&daemon, &mut api, "kill -9").await;
    assert_eq!(daemon.metric("sandboxd_sandboxes_readopted_total{outcome=\"adopted\"}"), Some(2.0));
    scene.delete(&mut api).await;
}

/// The same after graceful stops: `--on-stop keep` leaves the running
/// sandbox running, then `--on-stop suspend` pauses it to disk and no VMM
/// runs while the daemon is away; the next start, as after a host reboot
/// (no VMM left, the cgroups gone), brings both back from disk.
#[tokio::test(flavor = "multi_thread")]
async fn microvm_sandboxes_survive_graceful_stops_with_keep_and_with_suspend() {
    let Some(images) = images() else { return };
    let _deadline = arm_deadline("microvm_sandboxes_survive_graceful_stops_with_keep_and_with_suspend", test_deadline());
    let mut daemon = Daemon::start(restart_options(&images, "keep")).await;
    let _reaper = KillVmmsOnPanic(vm_root(&daemon));
    let mut api = daemon.clients(None).await;
    let scene = Scene::set_up(&daemon, &mut api).await;
    // The next run stops with suspend.
    daemon.set_on_stop("suspend");
    daemon.terminate_and_restart(RESTART_TIMEOUT).await;
    let mut api = daemon.clients(None).await;
    scene.check_kept(&daemon, &mut api, "a stop with --on-stop keep").await;

    api.sandboxes.pause(PauseSandboxRequest { id: scene.paused.clone() }).await.expect("Pause again");
    let counted = api.wait_for_count_above(&scene.counting, 0).await;
    let started = Instant::now();
    daemon.terminate(RESTART_TIMEOUT).await;
    eprintln!("microVM daemon stopped with --on-stop suspend: {:?}", started.elapsed());
    assert_eq!(live_vmm_pids(), BTreeSet::new(), "no VMM runs once the daemon stopped with --on-stop suspend");
    for id in [&scene.counting, &scene.paused] {
        assert!(vm_root(&daemon).join(id).join("suspended").join("memory").is_file(), "{id} is on disk");
    }
    remove_vmm_cgroups(&vm_root(&daemon));
    daemon.start_again(RESTART_TIMEOUT).await;

    let mut api = daemon.clients(None).await;
    let after = api.list_by_id().await;
    assert_eq!(after.keys().collect::<Vec<_>>(), scene.before.keys().collect::<Vec<_>>(), "the same sandboxes after the suspend");
    for (id, sandbox) in &after {
        assert_eq!(sandbox.state, SandboxState::Paused as i32, "{id} was paused to disk at the stop");
        assert_same_sandbox(sandbox, &scene.before[id]);
    }
    for id in [&scene.counting, &scene.paused] {
        let started = Instant::now();
        api.sandboxes.resume(ResumeSandboxRequest { id: id.clone() }).await.expect("Resume after the suspend");
        eprintln!("microVM Resume from disk after a restart: {:?}", started.elapsed());
    }
    api.wait_for_count_above(&scene.counting, counted).await;
    assert_eq!(api.sh(&scene.paused, "cat /home/user/file").await, "kept\n");
    assert_nothing_orphaned(&daemon, &after).await;
    scene.delete(&mut api).await;
}

fn restart_options(images: &Images, on_stop: &str) -> DaemonOptions {
    microvm_options(images, 1, &["--pool-max".into(), "1".into(), "--on-stop".into(), on_stop.into()])
}

/// What a restart test sets up before the daemon goes: a sandbox counting
/// in the background, one paused to disk with a file, and a full pool.
struct Scene {
    counting: String,
    paused: String,
    /// The counting sandbox's VMM.
    counting_vmm: u32,
    /// What the counter read just before the restart.
    counted: u64,
    before: BTreeMap<String, Sandbox>,
    /// The pooled guests and their VMMs.
    pooled: BTreeSet<String>,
    pooled_vmms: Vec<u32>,
}

impl Scene {
    async fn set_up(daemon: &Daemon, api: &mut Clients) -> Scene {
        wait_for_full_pool(daemon).await;
        let counting = create_with_role(api, "counter").await;
        let paused = create_with_role(api, "paused").await;
        api.sh(&counting, COUNTER).await;
        api.sh(&paused, "echo kept > /home/user/file").await;
        api.sandboxes.pause(PauseSandboxRequest { id: paused.clone() }).await.expect("Pause");
        wait_for_full_pool(daemon).await;
        let counted = api.wait_for_count_above(&counting, 0).await;
        let before = api.list_by_id().await;
        let pooled: BTreeSet<String> = dir_names(&vm_root(daemon)).into_iter().filter(|id| !before.contains_key(id)).collect();
        assert_eq!(pooled.len(), 1, "the pool's guest before the restart");
        let pooled_vmms: Vec<u32> = pooled.iter().flat_map(|id| vmm_pids(id)).collect();
        assert!(!pooled_vmms.is_empty(), "the pooled guest has a VMM");
        let counting_vmm = *vmm_pids(&counting).first().expect("the counting sandbox has a VMM");
        assert_eq!(vmm_pids(&paused), Vec::<u32>::new(), "a sandbox paused to disk has no VMM");
        Scene { counting, paused, counting_vmm, counted, before, pooled, pooled_vmms }
    }

    /// After a restart that kept the sandboxes: the same sandboxes, the
    /// counting one still on the same VMM and counting, the paused one
    /// paused until it resumes with its file, the old pool gone and a new
    /// one filled, and no VMM or VM directory that is neither.
    async fn check_kept(&self, daemon: &Daemon, api: &mut Clients, restart: &str) {
        let after = api.list_by_id().await;
        assert_eq!(after.keys().collect::<Vec<_>>(), self.before.keys().collect::<Vec<_>>(), "the same sandboxes after {restart}");
        for (id, sandbox) in &after {
            assert_eq!(sandbox.state, self.before[id].state, "{id}'s state after {restart}");
            assert_same_sandbox(sandbox, &self.before[id]);
        }
        assert_eq!(vmm_pids(&self.counting), vec![self.counting_vmm], "the counting sandbox runs on in the same VMM");
        api.wait_for_count_above(&self.counting, self.counted).await;
        let status = api.exec(&self.paused, &["true"]).await.expect_err("a paused sandbox refuses Exec");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        api.sandboxes.resume(ResumeSandboxRequest { id: self.paused.clone() }).await.expect("Resume after the restart");
        assert_eq!(api.sh(&self.paused, "cat /home/user/file").await, "kept\n");
        wait_for_full_pool(daemon).await;
        assert!(!self.pooled_vmms.iter().any(|&pid| is_running(pid)), "the old pool's VMMs are left: {:?}", self.pooled_vmms);
        let dirs = dir_names(&vm_root(daemon));
        assert!(self.pooled.iter().all(|id| !dirs.contains(id)), "the old pool's directories are left: {:?}", self.pooled);
        assert_nothing_orphaned(daemon, &after).await;
    }

    async fn delete(&self, api: &mut Clients) {
        for id in [&self.counting, &self.paused] {
            api.sandboxes.delete(DeleteSandboxRequest { id: id.clone() }).await.expect("Delete");
        }
    }
}

fn assert_same_sandbox(after: &Sandbox, before: &Sandbox) {
    assert_eq!(after.metadata, before.metadata, "{}'s metadata", before.id);
    assert_eq!(after.limits, before.limits, "{}'s limits", before.id);
    assert_eq!((after.created_at_unix_ms, after.expires_at_unix_ms), (before.created_at_unix_ms, before.expires_at_unix_ms), "{}'s lifetime", before.id);
}

/// Every VM directory is a sandbox or the pool's one guest, and every live
/// VMM (any process of a VMM uid) is in the cgroup of one of them.
async fn assert_nothing_orphaned(daemon: &Daemon, sandboxes: &BTreeMap<String, Sandbox>) {
    wait_for_full_pool(daemon).await;
    let dirs = dir_names(&vm_root(daemon));
    let unknown: Vec<_> = dirs.iter().filter(|id| !sandboxes.contains_key(*id)).collect();
    assert_eq!(unknown.len(), 1, "every VM directory is a sandbox or the pool's guest: {unknown:?}");
    let accounted: BTreeSet<u32> = dirs.iter().flat_map(|id| vmm_pids(id)).collect();
    let orphans: Vec<u32> = live_vmm_pids().difference(&accounted).copied().collect();
    assert!(orphans.is_empty(), "VMMs that belong to no VM directory: {orphans:?}");
}

async fn create_with_role(api: &mut Clients, role: &str) -> String {
    let request = CreateSandboxRequest { metadata: [("role".to_string(), role.to_string())].into(), ..Default::default() };
    api.sandboxes.create(request).await.expect("Create").into_inner().id
}

async fn wait_for_full_pool(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while daemon.metric("sandboxd_pool_ready{template=\"default\"}") != Some(1.0) {
        assert!(Instant::now() < deadline, "the warm pool never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn vm_root(daemon: &Daemon) -> PathBuf {
    daemon.state_dir.join("microvms")
}

/// The cgroup directories of microVM `id`: one on cgroup v2, one per
/// controller on v1 (under `sandboxd/microvms-<scope>`).
fn vmm_cgroups(id: &str) -> Vec<PathBuf> {
    let roots = ["/sys/fs/cgroup/sandboxd", "/sys/fs/cgroup/memory/sandboxd", "/sys/fs/cgroup/cpu/sandboxd", "/sys/fs/cgroup/pids/sandboxd", "/sys/fs/cgroup/freezer/sandboxd"];
    roots
        .iter()
        .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
        .filter(|group| group.file_name().to_string_lossy().starts_with("microvms-"))
        .map(|group| group.path().join(id))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// The VMMs in microVM `id`'s cgroup (KVM's kernel workers of its VM
/// join it too, as root's).
fn vmm_pids(id: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = vmm_cgroups(id)
        .iter()
        .flat_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect::<Vec<_>>())
        .filter(|&pid| is_vmm(pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Every live (not zombie) process whose real uid is a VMM's.
fn live_vmm_pids() -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_vmm(pid))
        .collect()
}

/// Whether `pid` is a live process of a VMM's uid.
fn is_vmm(pid: u32) -> bool {
    let uid = proc_status(pid, "Uid").split_whitespace().next().and_then(|uid| uid.parse().ok());
    is_running(pid) && uid.is_some_and(|uid| VMM_UIDS.contains(&uid))
}

fn is_running(pid: u32) -> bool {
    let state = proc_status(pid, "State");
    !state.is_empty() && !state.starts_with('Z')
}

/// Removes the (empty) cgroups of the VMMs of the VM directories under
/// `vm_root`, as a host reboot does.
fn remove_vmm_cgroups(vm_root: &Path) {
    for id in dir_names(vm_root) {
        for dir in vmm_cgroups(&id) {
            // KVM's workers of a VM that just ended may still be leaving it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(error) = std::fs::remove_dir(&dir) {
                assert!(Instant::now() < deadline, "remove {}: {error}", dir.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            // The group goes too once it is empty.
            let _ = dir.parent().map(std::fs::remove_dir);
        }
    }
}

/// A failed restart test must not leave VMMs that a daemon with
/// `--on-stop keep` lets run on: kills them (through their cgroups) when
/// dropped while panicking, before the daemon is stopped.
struct KillVmmsOnPanic(PathBuf);

impl Drop for KillVmmsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for id in dir_names(&self.0) {
            for pid in vmm_pids(&id) {
                // SAFETY: kill(2) has no memory effects.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Longest one step of a stress cycle may take before it counts as hung.
const STRESS_STEP_DEADLINE: Duration = Duration::from_secs(90);
/// What the stress run's own deadline allows per cycle (a cycle takes well
/// under a minute; hung steps end at their own deadline).
const STRESS_CYCLE_BUDGET: Duration = Duration::from_secs(120);
/// A stress run stops early after this many hung steps (the daemon is stuck).
const STRESS_MOST_HANGS: u32 = 3;

/// What a stress run counted: each step's durations, restores that
/// succeeded, and steps (of any kind) that failed or hung.
#[derive(Default)]
struct StressTally {
    durations: std::collections::BTreeMap<&'static str, Vec<Duration>>,
    restores_ok: u32,
    failed: Vec<String>,
    hung: Vec<String>,
}

impl StressTally {
    /// Runs one step under its deadline; `None` when it failed or hung.
    async fn step<T>(&mut self, cycle: u32, name: &'static str, restore: bool, work: impl std::future::Future<Output = Result<T, String>>) -> Option<T> {
        let started = Instant::now();
        match tokio::time::timeout(STRESS_STEP_DEADLINE, work).await {
            Ok(Ok(value)) => {
                self.durations.entry(name).or_default().push(started.elapsed());
                self.restores_ok += u32::from(restore);
                Some(value)
            }
            Ok(Err(error)) => {
                eprintln!("stress: cycle {cycle}: {name} failed after {:.1?}: {error}; microVM logs follow", started.elapsed());
                print_vm_logs();
                self.failed.push(format!("cycle {cycle}: {name}: {error}"));
                None
            }
            Err(_) => {
                eprintln!("stress: cycle {cycle}: {name} hung for {STRESS_STEP_DEADLINE:?}; threads and microVM logs follow");
                sandboxd_tests::dump_threads();
                print_vm_logs();
                self.hung.push(format!("cycle {cycle}: {name}"));
                None
            }
        }
    }

    fn report(&self, cycles: u32) {
        for (step, durations) in &self.durations {
            let mut sorted = durations.clone();
            sorted.sort_unstable();
            let at = |percent: usize| sorted[(sorted.len() * percent).div_ceil(100).max(1) - 1];
            eprintln!("stress step {step}: {} runs, p50 {:.2?}, p99 {:.2?}", sorted.len(), at(50), at(99));
        }
        eprintln!("stress: {cycles} cycles, {} restores ok, {} failed, {} hung", self.restores_ok, self.failed.len(), self.hung.len());
    }
}

/// Creates a sandbox from `template` (a restore, or a take from the pool)
/// and checks that its agent runs a command. One that does not is left for
/// the daemon to remove when it stops, so that its logs can be printed.
async fn create_and_check(api: &mut Clients, template: &str) -> Result<String, String> {
    let request = CreateSandboxRequest { template: template.into(), ..Default::default() };
    let id = api.sandboxes.create(request).await.map_err(|e| format!("Create: {e}"))?.into_inner().id;
    answers(api, &id).await?;
    Ok(id)
}

/// Whether the sandbox's agent runs `echo` and returns its output.
async fn answers(api: &mut Clients, id: &str) -> Result<(), String> {
    let output = api.exec(id, &["echo", "alive"]).await.map_err(|e| format!("Exec in {id}: {e}"))?;
    match output.stdout_text().as_str() {
        "alive\n" => Ok(()),
        other => Err(format!("Exec in {id} printed {other:?}, stderr {:?}", output.stderr_text())),
    }
}

async fn delete(api: &mut Clients, id: String) -> Result<(), String> {
    api.sandboxes.delete(DeleteSandboxRequest { id }).await.map(drop).map_err(|e| format!("Delete: {e}"))
}

/// Restores one template and deletes the clone again.
async fn restore_cycle_step(tally: &mut StressTally, cycle: u32, api: &mut Clients, step: &'static str, template: &str) {
    if let Some(id) = tally.step(cycle, step, true, create_and_check(api, template)).await {
        tally.step(cycle, "delete", false, delete(api, id)).await;
    }
}

async fn wait_for_pool(daemon: &Daemon) -> Result<(), String> {
    while daemon.metric("sandboxd_pool_ready{template=\"default\"}") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Two Creates at once on the default template (one from the pool, one cold).
async fn two_creates(api: &mut Clients) -> Result<(String, String), String> {
    let mut second = Clients::new_from(api);
    let (first, other) = tokio::join!(create_and_check(api, ""), create_and_check(&mut second, ""));
    Ok((first?, other?))
}

async fn pause(api: &mut Clients, id: &str) -> Result<(), String> {
    upload(api, id, "/home/user/kept", b"across a pause").await.map_err(|e| format!("Upload: {e}"))?;
    api.sandboxes.pause(PauseSandboxRequest { id: id.into() }).await.map(drop).map_err(|e| format!("Pause: {e}"))
}

async fn resume(api: &mut Clients, id: &str) -> Result<(), String> {
    api.sandboxes.resume(ResumeSandboxRequest { id: id.into() }).await.map_err(|e| format!("Resume: {e}"))?;
    answers(api, id).await?;
    match download(api, id, "/home/user/kept").await.map_err(|e| format!("Download: {e}"))?.as_slice() {
        b"across a pause" => Ok(()),
        other => Err(format!("the file written before the pause reads {:?}", String::from_utf8_lossy(other))),
    }
}

/// One cycle: a restore in each memory mode, a pool take and refill, two
/// concurrent Creates, Pause to disk and Resume, Delete.
async fn stress_cycle(tally: &mut StressTally, cycle: u32, uffd: &Daemon, uffd_api: &mut Clients, map_private_api: &mut Clients) {
    restore_cycle_step(tally, cycle, uffd_api, "restore uffd_prefetch", "built").await;
    restore_cycle_step(tally, cycle, uffd_api, "restore uffd", "bare").await;
    restore_cycle_step(tally, cycle, map_private_api, "restore map_private", "built").await;
    if tally.step(cycle, "pool refill", true, wait_for_pool(uffd)).await.is_none() {
        return;
    }
    let Some(pooled) = tally.step(cycle, "pool take", false, create_and_check(uffd_api, "")).await else { return };
    tally.step(cycle, "delete", false, delete(uffd_api, pooled)).await;
    let Some((first, second)) = tally.step(cycle, "two concurrent creates", true, two_creates(uffd_api)).await else { return };
    if tally.step(cycle, "pause to disk", false, pause(uffd_api, &first)).await.is_some() {
        tally.step(cycle, "resume from disk", true, resume(uffd_api, &first)).await;
    }
    for id in [first, second] {
        tally.step(cycle, "delete", false, delete(uffd_api, id)).await;
    }
}

/// Builds a template with `sandboxd template build` into `dir`, and a copy
/// without its recorded working set (restores of it do not prefetch).
fn build_stress_templates(images: &Images, dir: &std::path::Path) -> (String, String) {
    let built = dir.join("built");
    let output = std::process::Command::new(binary("sandboxd"))
        .args(["template", "build", "--kernel", &images.kernel, "--rootfs-image", &images.rootfs, "--memory-mib", "128", "--out"])
        .arg(&built)
        .output()
        .expect("run sandboxd template build");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for file in std::fs::read_dir(&built).unwrap().flatten().filter(|f| f.file_name() != "working-set") {
        std::fs::copy(file.path(), bare.join(file.file_name())).unwrap();
    }
    (format!("built={}", built.display()), format!("bare={}", bare.display()))
}

/// `tests/nested/run.sh --stress N` (issue 9): N cycles of restores in both
/// memory modes with and without prefetch, pool take and refill, two
/// concurrent Creates, Pause to disk and Resume, Delete; none may fail or hang.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by tests/nested/run.sh --stress N (SANDBOXD_STRESS_CYCLES)"]
async fn restore_stress() {
    let Some(images) = images() else { return };
    let cycles: u32 = std::env::var("SANDBOXD_STRESS_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(3);
    let _deadline = arm_deadline("restore_stress", test_deadline() * 2 + STRESS_CYCLE_BUDGET * cycles);
    let dir = std::env::temp_dir().join(format!("sandboxd-e2e-stress-{}", std::process::id()));
    let (built, bare) = build_stress_templates(&images, &dir);
    let uffd_args = ["--pool-max".into(), "1".into(), "--template".into(), built.clone(), "--template".into(), bare];
    let map_private_args = ["--restore-memory".into(), "map-private".into(), "--template".into(), built];
    let (uffd, map_private) = tokio::join!(
        Daemon::start(microvm_options(&images, 1, &uffd_args)),
        Daemon::start(microvm_options(&images, 0, &map_private_args)),
    );
    let (mut uffd_api, mut map_private_api) = (uffd.clients(None).await, map_private.clients(None).await);
    let mut tally = StressTally::default();
    for cycle in 1..=cycles {
        stress_cycle(&mut tally, cycle, &uffd, &mut uffd_api, &mut map_private_api).await;
        if tally.hung.len() as u32 >= STRESS_MOST_HANGS {
            eprintln!("stress: stopping after cycle {cycle}: {} steps hung", tally.hung.len());
            break;
        }
    }
    tally.report(cycles);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(tally.failed.is_empty() && tally.hung.is_empty(), "failed: {:?}; hung: {:?}", tally.failed, tally.hung);
}
