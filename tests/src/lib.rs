//! Test support: starts the real `sandboxd` binary on a free loopback port
//! with a private state directory, and builds authenticated gRPC clients
//! (with the daemon's generated admin key unless the test set keys).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sandbox_proto::api::{
    exec_event::Event, files_client::FilesClient, processes_client::ProcessesClient,
    sandboxes_client::SandboxesClient, CreateSandboxRequest, ExecEvent, ExecRequest, ExitStatus, Limits,
    ListSandboxesRequest, Sandbox,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic::{
    metadata::MetadataValue,
    service::{interceptor::InterceptedService, Interceptor},
    transport::Channel,
    Request, Status,
};

/// Where cargo put the binaries of this workspace (next to the test's deps dir).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build -p sandboxd -p sandbox-agent` first", path.display());
    path
}

/// Options of one daemon under test.
pub struct DaemonOptions {
    pub api_keys: Option<String>,
    pub pool_size: usize,
    /// `jail` or `microvm`.
    pub backend: &'static str,
    pub extra_args: Vec<String>,
    /// Serve Prometheus metrics on a free port (see [`Daemon::metric`]).
    pub metrics: bool,
    /// How long the daemon may take to start serving (a microVM daemon
    /// builds its default template first).
    pub start_timeout: Duration,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            api_keys: None,
            pool_size: 1,
            backend: "jail",
            extra_args: Vec::new(),
            metrics: false,
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A running `sandboxd serve`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    pub endpoint: String,
    pub state_dir: PathBuf,
    metrics_addr: Option<String>,
    /// The key `clients(None)` sends: the admin key the daemon generated
    /// in STATE_DIR/api-key when the test set no keys.
    pub admin_key: Option<String>,
    launch: Launch,
}

/// How to start this daemon (again).
struct Launch {
    args: Vec<std::ffi::OsString>,
    api_keys: Option<String>,
}

impl Launch {
    fn spawn(&self) -> Child {
        let mut command = Command::new(binary("sandboxd"));
        command.args(&self.args).env_remove("SANDBOXD_API_KEYS").stdin(Stdio::null());
        if let Some(keys) = &self.api_keys {
            command.env("SANDBOXD_API_KEYS", keys);
        }
        command.spawn().expect("start sandboxd")
    }
}

/// The guest root image that jails mount as `/` (and microVMs boot):
/// `$SANDBOXD_GUEST_IMAGE_DIR/rootfs.ext4`, built by scripts/guest-image.sh.
pub fn guest_root_image() -> PathBuf {
    let dir = std::env::var_os("SANDBOXD_GUEST_IMAGE_DIR")
        .expect("set SANDBOXD_GUEST_IMAGE_DIR=$(scripts/guest-image.sh): jails mount the guest root image as /");
    PathBuf::from(dir).join("rootfs.ext4")
}

impl Daemon {
    pub async fn start(options: DaemonOptions) -> Daemon {
        let port = free_port();
        let state_dir = std::env::temp_dir().join(format!("sandboxd-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).expect("create the state dir");
        let metrics_addr = options.metrics.then(|| format!("127.0.0.1:{}", free_port()));
        let mut args: Vec<std::ffi::OsString> = ["serve", "--backend", options.backend, "--metrics-listen", metrics_addr.as_deref().unwrap_or("off")]
            .iter()
            .map(Into::into)
            .collect();
        args.extend(["--listen".into(), format!("127.0.0.1:{port}").into(), "--state-dir".into(), state_dir.clone().into()]);
        args.extend(["--pool-size".into(), options.pool_size.to_string().into()]);
        if options.backend == "jail" && !options.extra_args.iter().any(|arg| arg == "--rootfs-image") {
            args.extend(["--rootfs-image".into(), guest_root_image().into()]);
        }
        if !options.extra_args.iter().any(|arg| arg == "--on-stop") {
            // Tests end their daemons with SIGTERM: leave no sandbox behind.
            args.extend(["--on-stop".into(), "delete".into()]);
        }
        args.extend(options.extra_args.iter().map(Into::into));
        let launch = Launch { args, api_keys: options.api_keys.clone() };
        let child = launch.spawn();
        let mut daemon =
            Daemon { child, endpoint: format!("http://127.0.0.1:{port}"), state_dir, metrics_addr, admin_key: None, launch };
        daemon.wait_until_serving(options.start_timeout).await;
        if options.api_keys.is_none() {
            let key = std::fs::read_to_string(daemon.state_dir.join("api-key")).expect("the daemon wrote STATE_DIR/api-key");
            daemon.admin_key = Some(key.trim().to_string());
        }
        daemon
    }

    /// Kills the daemon with SIGKILL (no clean-up of its own), waits for
    /// it, and starts it again on the same state directory and port.
    pub async fn kill_and_restart(&mut self, timeout: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = self.launch.spawn();
        self.wait_until_serving(timeout).await;
    }

    /// Stops the daemon with SIGTERM (its graceful stop), waits for it to
    /// exit, and starts it again on the same state directory and port.
    pub async fn terminate_and_restart(&mut self, timeout: Duration) {
        self.terminate(timeout).await;
        self.start_again(timeout).await;
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub async fn terminate(&mut self, timeout: Duration) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            assert!(Instant::now() < deadline, "sandboxd did not stop within {timeout:?} of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the stopped daemon again on the same state directory and port.
    pub async fn start_again(&mut self, timeout: Duration) {
        self.child = self.launch.spawn();
        self.wait_until_serving(timeout).await;
    }

    /// What the daemon's next start does at a graceful stop (`--on-stop`).
    pub fn set_on_stop(&mut self, on_stop: &str) {
        let args = &mut self.launch.args;
        let flag = args.iter().position(|arg| arg == "--on-stop").expect("the daemon is started with --on-stop");
        args[flag + 1] = on_stop.into();
    }

    async fn wait_until_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(channel) = Channel::from_shared(self.endpoint.clone()).unwrap().connect().await {
                if health_is_serving(channel).await {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sandboxd did not start serving on {} within {timeout:?}", self.endpoint);
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint.clone()).unwrap().connect().await.expect("connect to sandboxd")
    }

    /// Clients that send `key` as a bearer token; `None`: the admin key, if
    /// the daemon generated one.
    pub async fn clients(&self, key: Option<&str>) -> Clients {
        Clients::new(self.channel().await, key.or(self.admin_key.as_deref()))
    }

    /// The daemon's audit log.
    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("audit.log")).unwrap_or_default()
    }

    /// The value of one Prometheus sample, such as
    /// `sandboxd_pool_ready{template="default"}`, if the daemon exports it.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let addr = self.metrics_addr.as_ref().expect("start the daemon with metrics: true");
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).ok()?;
        text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.state_dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Whether the daemon's `grpc.health.v1` service reports SERVING.
async fn health_is_serving(channel: Channel) -> bool {
    let mut health = HealthClient::new(channel);
    let reply = health.check(HealthCheckRequest { service: String::new() }).await;
    matches!(reply, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
}

/// Adds `authorization: Bearer <key>` when a key is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// The three public services over one channel.
pub struct Clients {
    pub sandboxes: SandboxesClient<Authed>,
    pub processes: ProcessesClient<Authed>,
    pub files: FilesClient<Authed>,
}

impl Clients {
    pub fn new(channel: Channel, key: Option<&str>) -> Self {
        let bearer = Bearer(key.map(|k| format!("Bearer {k}").parse().expect("an ASCII key")));
        let limit = 64 * 1024 * 1024;
        Clients {
            sandboxes: SandboxesClient::with_interceptor(channel.clone(), bearer.clone()),
            processes: ProcessesClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(limit),
            files: FilesClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        }
    }

    /// Another set of clients sharing the same connection.
    pub fn new_from(other: &Clients) -> Self {
        Clients { sandboxes: other.sandboxes.clone(), processes: other.processes.clone(), files: other.files.clone() }
    }

    /// Creates a sandbox with the given limits and returns its id.
    pub async fn create(&mut self, limits: Option<Limits>) -> String {
        let request = CreateSandboxRequest { limits, ..Default::default() };
        self.sandboxes.create(request).await.expect("Create").into_inner().id
    }

    /// Runs `argv` to completion and collects what it printed.
    pub async fn exec(&mut self, sandbox: &str, argv: &[&str]) -> Result<Output, Status> {
        self.exec_request(ExecRequest { sandbox_id: sandbox.to_string(), argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() })
            .await
    }

    pub async fn exec_request(&mut self, request: ExecRequest) -> Result<Output, Status> {
        let mut events = self.processes.exec(request).await?.into_inner();
        let mut output = Output::default();
        while let Some(event) = events.message().await? {
            output.absorb(event);
        }
        Ok(output)
    }

    /// Every sandbox of this key, by id.
    pub async fn list_by_id(&mut self) -> std::collections::BTreeMap<String, Sandbox> {
        let listed = self.sandboxes.list(ListSandboxesRequest {}).await.expect("List").into_inner();
        listed.sandboxes.into_iter().map(|sandbox| (sandbox.id.clone(), sandbox)).collect()
    }

    /// Waits until the file `/home/user/count` that [`COUNTER`] writes in
    /// the sandbox reads more than `floor`; returns what it read.
    pub async fn wait_for_count_above(&mut self, id: &str, floor: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.sh(id, "cat /home/user/count 2>/dev/null || echo 0").await;
            let count: u64 = text.trim().parse().unwrap_or(0);
            if count > floor {
                return count;
            }
            assert!(Instant::now() < deadline, "the counter of {id} stays at {count} (wanted more than {floor})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs a shell command and returns its stdout as text, asserting it exited 0.
    pub async fn sh(&mut self, sandbox: &str, script: &str) -> String {
        let output = self.exec(sandbox, &["sh", "-c", script]).await.expect("Exec");
        assert_eq!(output.code(), Some(0), "`{script}` failed: {}", output.stderr_text());
        output.stdout_text()
    }
}

/// The names of the directories in `dir` (none if it does not exist).
pub fn dir_names(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

/// A field of /proc/PID/status (such as `State` or `Uid`), empty if the
/// process is gone.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).unwrap_or_default().trim().to_string()
}

/// A shell command that starts a process which outlives its Exec and
/// writes a rising counter to `/home/user/count` five times a second.
pub const COUNTER: &str =
    r#"nohup sh -c "i=0; while true; do i=\$((i+1)); echo \$i > /home/user/count; sleep 0.2; done" >/dev/null 2>&1 &"#;

/// Everything a finished process sent.
#[derive(Default, Debug)]
pub struct Output {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExitStatus>,
}

impl Output {
    pub fn absorb(&mut self, event: ExecEvent) {
        match event.event {
            Some(Event::Started(started)) => self.pid = Some(started.pid),
            Some(Event::Stdout(data)) => self.stdout.extend_from_slice(&data),
            Some(Event::Stderr(data)) => self.stderr.extend_from_slice(&data),
            Some(Event::Exit(exit)) => self.exit = Some(exit),
            None => {}
        }
    }

    pub fn code(&self) -> Option<i32> {
        use sandbox_proto::api::exit_status::Outcome;
        match self.exit.as_ref()?.outcome? {
            Outcome::Code(code) => Some(code),
            Outcome::Signal(_) => None,
        }
    }

    pub fn signal(&self) -> Option<i32> {
        use sandbox_proto::api::exit_status::Outcome;
        match self.exit.as_ref()?.outcome? {
            Outcome::Signal(signal) => Some(signal),
            Outcome::Code(_) => None,
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A test's deadline, kept by a thread of its own so that it fires even
/// when the test's async runtime is blocked. Past the deadline it prints
/// every thread of this test's processes (state, wchan, syscall, kernel
/// stack) and the tails of the microVM logs under this test's temporary
/// directories, kills the processes this test started, and exits 1.
/// Dropping it disarms it.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Arms the deadline; arm it before the daemon starts so that a hung
    /// start-up is caught too.
    pub fn arm(what: &str, deadline: Duration) -> Watchdog {
        let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || {
                if disarmed.recv_timeout(deadline) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    eprintln!("TEST-DEADLINE: {what} still running after {deadline:?}; its threads and microVM logs follow");
                    dump_threads();
                    print_vm_logs();
                    kill_descendants();
                    eprintln!("TEST-DEADLINE: {what} failed");
                    // SAFETY: _exit(2) ends the process without running
                    // exit handlers, which could block on a lock held by a
                    // hung thread.
                    unsafe { libc::_exit(1) };
                }
            })
            .expect("spawn the test watchdog thread");
        Watchdog { _disarm: disarm }
    }
}

/// Lines of a kernel stack printed per thread, and of each log's tail.
const DUMP_LINES: usize = 25;

/// Prints, for every thread of this process, its descendants and any other
/// `sandboxd` process: comm, state, wchan, syscall and kernel stack.
pub fn dump_threads() {
    let parents = process_parents();
    let mut pids = descendants(&parents, std::process::id());
    pids.push(std::process::id());
    let others: Vec<u32> = parents.keys().filter(|pid| !pids.contains(pid) && is_sandboxd(**pid)).copied().collect();
    pids.extend(others);
    pids.sort_unstable();
    for pid in pids {
        let cmdline = read_proc(&format!("/proc/{pid}/cmdline")).replace('\0', " ");
        eprintln!("==== process {pid}: {}", cmdline.trim());
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            dump_task(&task.path());
        }
    }
}

fn dump_task(task: &Path) {
    let field = |name: &str| read_proc(&task.join(name).to_string_lossy()).trim().to_string();
    let state = field("status").lines().find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string())).unwrap_or_default();
    eprintln!(
        "-- tid {} comm {} state {state} wchan {} syscall {}",
        task.file_name().unwrap_or_default().to_string_lossy(),
        field("comm"),
        field("wchan"),
        field("syscall")
    );
    for line in field("stack").lines().take(DUMP_LINES) {
        eprintln!("   {line}");
    }
}

/// A /proc file's text, or why it could not be read.
fn read_proc(path: &str) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_else(|e| format!("({e})"))
}

/// Every process's parent, from /proc/PID/stat.
fn process_parents() -> std::collections::HashMap<u32, u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Default::default() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After "pid (comm)": state, then the parent's pid.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, parent))
        })
        .collect()
}

fn descendants(parents: &std::collections::HashMap<u32, u32>, root: u32) -> Vec<u32> {
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|(_, p)| **p == parent).map(|(pid, _)| *pid));
        next += 1;
    }
    found.remove(0);
    found
}

fn is_sandboxd(pid: u32) -> bool {
    let cmdline = read_proc(&format!("/proc/{pid}/cmdline"));
    cmdline.split('\0').next().is_some_and(|program| program.ends_with("sandboxd"))
}

/// SIGKILLs every process this one started, and theirs.
fn kill_descendants() {
    for pid in descendants(&process_parents(), std::process::id()) {
        // SAFETY: kill(2) has no memory effects; a pid that has exited meanwhile only gives ESRCH.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Prints the tails of every `vmm.log` and `serial.log` under this test
/// process's temporary directories (daemon state dirs and template builds),
/// which the daemon removes when it stops.
pub fn print_vm_logs() {
    let marker = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("sandboxd") && name.split(['-', '.']).any(|part| part == marker) {
            print_logs_under(&entry.path(), 6);
        }
    }
}

fn print_logs_under(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if path.is_dir() && depth > 0 {
            print_logs_under(&path, depth - 1);
        } else if name == "vmm.log" || name == "serial.log" {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<_> = text.lines().collect();
            eprintln!("---- {}\n{}", path.display(), lines[lines.len().saturating_sub(DUMP_LINES)..].join("\n"));
        }
    }
}
