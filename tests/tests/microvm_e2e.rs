//! The full Linux-guest suite on the microvm backend: a cold boot to the
//! agent's hello over vsock with exec, a PTY and files; `sandboxd template
//! build`; sandboxes restored from a template snapshot (cold and from the
//! warm pool) that serve exec and never share RNG state; and Pause to disk
//! and Resume with files and processes intact. It needs a host with
//! hardware virtualization (VT-x/AMD-V; on PVM hosts guest ring 0 is
//! emulated and Linux cannot boot), so it runs only with SANDBOXD_E2E_KVM=1,
//! SANDBOXD_KERNEL_DIR (kernel-config/build.sh) and SANDBOXD_GUEST_IMAGE_DIR
//! (scripts/guest-image.sh). See README.md, "Linux guests".

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sandbox_proto::api::{
    connect_request::Input, exec_event::Event, upload_request::Part, ConnectRequest, ConnectStart, CreateSandboxRequest,
    DeleteSandboxRequest, DownloadRequest, ExecRequest, Limits, PauseSandboxRequest, PtySize, ResumeSandboxRequest,
    SandboxState, UploadHeader, UploadRequest,
};
use sandboxd_tests::{binary, Clients, Daemon, DaemonOptions};

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
        // The daemon builds its default template (boot, snapshot, one recorded restore) before serving.
        start_timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

/// Longest a test here may take before it is failed with the microVMs' logs.
const TEST_DEADLINE: Duration = Duration::from_secs(240);

/// Prints every microVM's VMM log and console when the test fails, or when
/// it hangs past [`TEST_DEADLINE`] (then it also ends the process): the
/// daemon removes its state directory when it stops.
struct LogsOnFailure {
    state_dir: PathBuf,
    done: Arc<AtomicBool>,
}

impl LogsOnFailure {
    fn arm(daemon: &Daemon) -> Self {
        let (state_dir, done) = (daemon.state_dir.clone(), Arc::new(AtomicBool::new(false)));
        let (dir, finished) = (state_dir.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            std::thread::sleep(TEST_DEADLINE);
            if !finished.load(Ordering::Relaxed) {
                eprintln!("the test hung for {TEST_DEADLINE:?}");
                print_vm_logs(&dir);
                std::process::exit(1);
            }
        });
        Self { state_dir, done }
    }
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if std::thread::panicking() {
            print_vm_logs(&self.state_dir);
        }
    }
}

fn print_vm_logs(state_dir: &Path) {
    let Ok(vms) = std::fs::read_dir(state_dir.join("microvms")) else { return };
    for vm in vms.flatten() {
        for log in ["vmm.log", "serial.log"] {
            let text = std::fs::read_to_string(vm.path().join(log)).unwrap_or_default();
            let tail: Vec<_> = text.lines().rev().take(25).collect();
            eprintln!("---- {} {log}\n{}", vm.file_name().to_string_lossy(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
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
    let daemon = Daemon::start(microvm_options(&images, 0, &[])).await;
    let _logs = LogsOnFailure::arm(&daemon);
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

    upload(&mut api, &id, "/home/user/f", b"in a microVM").await;
    assert_eq!(download(&mut api, &id, "/home/user/f").await, b"in a microVM");
    api.sandboxes.delete(DeleteSandboxRequest { id }).await.unwrap();
}

async fn upload(api: &mut Clients, id: &str, path: &str, data: &[u8]) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadRequest { part: Some(Part::Header(UploadHeader { sandbox_id: id.into(), path: path.into(), mode: 0 })) }).await.unwrap();
    tx.send(UploadRequest { part: Some(Part::Data(data.to_vec().into())) }).await.unwrap();
    drop(tx);
    api.files.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
}

async fn download(api: &mut Clients, id: &str, path: &str) -> Vec<u8> {
    let mut chunks = api.files.download(DownloadRequest { sandbox_id: id.into(), path: path.into() }).await.unwrap().into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        data.extend_from_slice(&chunk.data);
    }
    data
}

#[tokio::test(flavor = "multi_thread")]
async fn template_build_reports_progress_and_writes_a_restorable_template() {
    let Some(images) = images() else { return };
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
    let _logs = LogsOnFailure::arm(&daemon);
    let mut api = daemon.clients(None).await;
    let request = CreateSandboxRequest { template: "built".into(), ..Default::default() };
    let id = create_timed(&mut api, request, "restore of a `template build` template").await;
    assert_eq!(api.sh(&id, "echo restored").await, "restored\n");
    std::fs::remove_dir_all(out).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_sandboxes_differ_in_rng_and_survive_pause_to_disk() {
    let Some(images) = images() else { return };
    let daemon = Daemon::start(microvm_options(&images, 1, &["--pool-max".into(), "1".into()])).await;
    let _logs = LogsOnFailure::arm(&daemon);
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
    upload(&mut api, &cold, "/home/user/kept", b"across a pause").await;
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
    assert_eq!(download(&mut api, &cold, "/home/user/kept").await, b"across a pause");
    let alive = api.exec(&cold, &["kill", "-0", sleeper.trim()]).await.unwrap();
    assert_eq!(alive.code(), Some(0), "the process started before the pause still runs");
    assert_eq!(api.sh(&pooled, "echo untouched").await, "untouched\n", "the other sandbox is unaffected");
    for id in [pooled, cold] {
        api.sandboxes.delete(DeleteSandboxRequest { id }).await.unwrap();
    }
}
