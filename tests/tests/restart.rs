//! No sandbox is lost when the daemon restarts (jail backend): with a
//! running sandbox whose background process keeps counting, a paused one
//! and a full warm pool, the daemon is killed with SIGKILL (or stopped
//! with SIGTERM, which keeps sandboxes by default) and started again. The
//! sandboxes come back with their metadata and lifetime, the counter goes
//! on, the paused one resumes with its files, the pool refills with new
//! guests, and no jail is left that is neither a sandbox nor pooled. A
//! jail that died while the daemon was away is reported STOPPED with why,
//! lifetimes run on across a restart, and an Exec cut off by the daemon's
//! death is reattached afterwards with all its output.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sandbox_proto::api::{
    exec_event::Event, AttachRequest, CreateSandboxRequest, ExecRequest, DeleteSandboxRequest, GetSandboxRequest, PauseSandboxRequest,
    ResumeSandboxRequest, SandboxState,
};
use sandboxd_tests::{dir_names, proc_status, Clients, Daemon, DaemonOptions, Output, COUNTER};
use tonic::Code;

const READY: &str = "sandboxd_pool_ready{template=\"default\"}";
const POOL_SIZE: usize = 2;
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Restart {
    Kill,
    Terminate,
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_survive_a_killed_daemon() {
    survives(Restart::Kill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_survive_a_graceful_stop_and_start() {
    survives(Restart::Terminate).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_stop_delete_leaves_no_sandbox() {
    let mut daemon = Daemon::start(options("delete")).await;
    let mut api = daemon.clients(None).await;
    let id = create(&mut api, "doomed").await;
    daemon.terminate_and_restart(DEADLINE).await;
    let mut api = daemon.clients(None).await;
    let status = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.expect_err("the sandbox was deleted at stop");
    assert_eq!(status.code(), Code::NotFound);
    assert!(!jails_dir(&daemon).join(&id).exists(), "the deleted sandbox's jail is left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jail_that_died_while_the_daemon_was_away_is_stopped_with_the_reason() {
    let mut daemon = Daemon::start(DaemonOptions { pool_size: 0, ..Default::default() }).await;
    let mut api = daemon.clients(None).await;
    let id = create(&mut api, "short-lived").await;
    // The daemon goes first, so that only the restarted one can notice.
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
    while daemon.is_running() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pids = cgroup_pids(&id);
    assert!(!pids.is_empty(), "the jail runs on without its daemon");
    for pid in pids {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cgroup_pids(&id).is_empty() {
        assert!(Instant::now() < deadline, "the jail's processes do not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill_and_restart(DEADLINE).await;
    let mut api = daemon.clients(None).await;
    let sandbox = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.expect("Get").into_inner();
    assert_eq!(sandbox.state, SandboxState::Stopped as i32, "{sandbox:?}");
    assert!(sandbox.stopped_reason.contains("while the daemon was away"), "{}", sandbox.stopped_reason);
    assert_eq!(sandbox.metadata["role"], "short-lived");
    assert!(!jails_dir(&daemon).join(&id).exists() && cgroup_dir(&id).is_none(), "the dead jail's leftovers are reaped");
    api.sandboxes.delete(DeleteSandboxRequest { id: id.clone() }).await.expect("a stopped sandbox can be deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lifetime_runs_on_across_a_restart() {
    let mut daemon = Daemon::start(DaemonOptions { pool_size: 0, ..Default::default() }).await;
    let mut api = daemon.clients(None).await;
    let limits = sandbox_proto::api::Limits { timeout_seconds: 4, ..Default::default() };
    let id = api.create(Some(limits)).await;
    daemon.kill_and_restart(DEADLINE).await;
    let mut api = daemon.clients(None).await;
    let sandbox = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.expect("Get right after the restart").into_inner();
    assert_eq!(sandbox.state, SandboxState::Running as i32);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await {
            Err(status) if status.code() == Code::NotFound => break,
            _ => assert!(Instant::now() < deadline, "{id} outlived its 4 s lifetime by far"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while jails_dir(&daemon).join(&id).exists() {
        assert!(Instant::now() < deadline, "the expired sandbox's jail is left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cut_off_by_the_daemons_death_is_reattached_after_the_restart() {
    let mut daemon = Daemon::start(DaemonOptions { pool_size: 0, ..Default::default() }).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let count = "for i in $(seq 1 50); do echo $i; sleep 0.1; done";
    let request = ExecRequest { sandbox_id: id.clone(), argv: vec!["sh".into(), "-c".into(), count.into()], ..Default::default() };
    let mut events = api.processes.exec(request).await.expect("Exec").into_inner();
    let handle = loop {
        let event = events.message().await.expect("the Exec stream").expect("a started event");
        if let Some(Event::Started(started)) = event.event {
            break started.handle;
        }
    };
    daemon.kill_and_restart(DEADLINE).await;
    let mut api = daemon.clients(None).await;
    let attach = AttachRequest { sandbox_id: id.clone(), handle, from_offset: 0 };
    let mut events = api.processes.attach(attach).await.expect("Attach after the restart").into_inner();
    let mut output = Output::default();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.message().await.expect("the Attach stream ends cleanly") {
            output.absorb(event);
        }
    })
    .await
    .expect("the process reached its exit");
    let expected: String = (1..=50).map(|i| format!("{i}\n")).collect();
    assert_eq!(output.stdout_text(), expected, "1..50, each once, across the daemon's death");
    assert_eq!(output.code(), Some(0));
    api.sandboxes.delete(DeleteSandboxRequest { id }).await.expect("Delete");
}

async fn survives(restart: Restart) {
    let mut daemon = Daemon::start(options("keep")).await;
    let _reaper = KillJailsOnPanic(jails_dir(&daemon));
    wait_for_pool(&daemon).await;
    let mut api = daemon.clients(None).await;
    let counting = create(&mut api, "counter").await;
    let paused = create(&mut api, "paused").await;
    api.sh(&counting, COUNTER).await;
    api.sh(&paused, "echo kept > /home/user/file").await;
    api.sandboxes.pause(PauseSandboxRequest { id: paused.clone() }).await.expect("Pause");
    let counted = api.wait_for_count_above(&counting, 0).await;
    let before = api.list_by_id().await;
    wait_for_pool(&daemon).await;
    let pooled: BTreeSet<String> = jail_dirs(&daemon).into_iter().filter(|id| !before.contains_key(id)).collect();
    assert_eq!(pooled.len(), POOL_SIZE, "the pool's jails before the restart");
    let pooled_pids: Vec<u32> = pooled.iter().flat_map(|id| cgroup_pids(id)).collect();
    assert!(!pooled_pids.is_empty(), "pooled jails have processes");
    assert!(is_frozen(&paused), "the paused sandbox is frozen");
    if let Restart::Kill = restart {
        // As if the daemon died halfway through a Resume: thawed, but
        // still paused in the registry.
        set_frozen(&paused, false);
    }

    match restart {
        Restart::Kill => daemon.kill_and_restart(DEADLINE).await,
        Restart::Terminate => daemon.terminate_and_restart(DEADLINE).await,
    }

    let mut api = daemon.clients(None).await;
    let after = api.list_by_id().await;
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "the same sandboxes after {restart:?}");
    for (id, sandbox) in &after {
        let earlier = &before[id];
        assert_eq!(sandbox.metadata, earlier.metadata, "{id}'s metadata");
        assert_eq!(sandbox.state, earlier.state, "{id}'s state");
        assert_eq!(sandbox.limits, earlier.limits, "{id}'s limits");
        assert_eq!((sandbox.created_at_unix_ms, sandbox.expires_at_unix_ms), (earlier.created_at_unix_ms, earlier.expires_at_unix_ms), "{id}'s lifetime");
    }
    let got = api.sandboxes.get(GetSandboxRequest { id: counting.clone() }).await.expect("Get").into_inner();
    assert_eq!(got.metadata["role"], "counter");
    api.wait_for_count_above(&counting, counted).await;

    assert!(is_frozen(&paused), "the paused sandbox is frozen after the restart, as the registry says");
    let status = api.exec(&paused, &["true"]).await.expect_err("a paused sandbox refuses Exec");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    api.sandboxes.resume(ResumeSandboxRequest { id: paused.clone() }).await.expect("Resume after the restart");
    assert_eq!(api.sh(&paused, "cat /home/user/file").await, "kept\n");

    wait_for_pool(&daemon).await;
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists() && !proc_status(*pid, "State").starts_with('Z');
    assert!(!pooled_pids.iter().any(alive), "processes of the old pool's jails are left: {pooled_pids:?}");
    let jails = jail_dirs(&daemon);
    for id in &pooled {
        assert!(!jails.contains(id), "the old pooled jail {id} is left");
        assert!(cgroup_dir(id).is_none(), "the old pooled jail {id}'s cgroup is left");
    }
    let unknown: Vec<_> = jails.iter().filter(|id| !after.contains_key(*id)).collect();
    assert_eq!(unknown.len(), POOL_SIZE, "every jail is a sandbox or one of the refilled pool's: {unknown:?}");
    for id in &jails {
        assert!(cgroup_dir(id).is_some(), "jail {id} has no cgroup");
    }
    assert_eq!(jail_cgroups(&jails), jails, "every jail cgroup belongs to a jail directory");

    for id in [counting, paused] {
        api.sandboxes.delete(DeleteSandboxRequest { id }).await.expect("Delete");
    }
}

/// A failed test must not leave jails that a daemon with `--on-stop keep`
/// lets run on: kills them (through their cgroups) when dropped while
/// panicking, before the daemon is stopped.
struct KillJailsOnPanic(PathBuf);

impl Drop for KillJailsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for id in dir_names(&self.0) {
            let dirs: Vec<PathBuf> = ["memory", "cpu", "pids", "freezer"]
                .iter()
                .map(|controller| format!("/sys/fs/cgroup/{controller}/sandboxd"))
                .chain(["/sys/fs/cgroup/sandboxd".to_string()])
                .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
                .map(|group| group.path().join(&id))
                .filter(|dir| dir.is_dir())
                .collect();
            for dir in &dirs {
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.parse::<i32>().ok()) {
                    // SAFETY: kill(2) has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn options(on_stop: &str) -> DaemonOptions {
    DaemonOptions {
        pool_size: POOL_SIZE,
        metrics: true,
        extra_args: vec!["--on-stop".into(), on_stop.into(), "--pool-max".into(), POOL_SIZE.to_string()],
        start_timeout: DEADLINE,
        ..Default::default()
    }
}

async fn create(api: &mut Clients, role: &str) -> String {
    let request = CreateSandboxRequest { metadata: [("role".to_string(), role.to_string())].into(), ..Default::default() };
    api.sandboxes.create(request).await.expect("Create").into_inner().id
}

async fn wait_for_pool(daemon: &Daemon) {
    let deadline = Instant::now() + DEADLINE;
    while daemon.metric(READY) != Some(POOL_SIZE as f64) {
        assert!(Instant::now() < deadline, "the pool holds {:?} guests, expected {POOL_SIZE}", daemon.metric(READY));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn jails_dir(daemon: &Daemon) -> PathBuf {
    daemon.state_dir.join("jails")
}

fn jail_dirs(daemon: &Daemon) -> BTreeSet<String> {
    dir_names(&jails_dir(daemon))
}

/// The group directories jail cgroups live in (v1 pids controller, or v2).
fn cgroup_groups() -> Vec<PathBuf> {
    ["/sys/fs/cgroup/pids/sandboxd", "/sys/fs/cgroup/sandboxd"]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
        .map(|group| group.path())
        .filter(|path| path.is_dir())
        .collect()
}

fn cgroup_dir(id: &str) -> Option<PathBuf> {
    cgroup_groups().into_iter().map(|group| group.join(id)).find(|dir| dir.is_dir())
}

/// The cgroups in the group of this daemon's jails (found through one of
/// `jails`; other daemons' jails live in other groups).
fn jail_cgroups(jails: &BTreeSet<String>) -> BTreeSet<String> {
    let ours = cgroup_groups().into_iter().find(|group| jails.iter().any(|id| group.join(id).is_dir()));
    ours.map(|group| dir_names(&group)).unwrap_or_default()
}

/// The jail's freezer file and the values for frozen and thawed (cgroup
/// v1 freezer, or v2 cgroup.freeze).
fn freezer(id: &str) -> (PathBuf, &'static str, &'static str) {
    let v1 = std::fs::read_dir("/sys/fs/cgroup/freezer/sandboxd")
        .into_iter()
        .flatten()
        .flatten()
        .map(|group| group.path().join(id).join("freezer.state"))
        .find(|file| file.exists());
    match v1 {
        Some(file) => (file, "FROZEN", "THAWED"),
        None => (cgroup_dir(id).expect("the jail has a cgroup").join("cgroup.freeze"), "1", "0"),
    }
}

fn is_frozen(id: &str) -> bool {
    let (file, frozen, _) = freezer(id);
    std::fs::read_to_string(file).unwrap_or_default().trim() == frozen
}

fn set_frozen(id: &str, frozen: bool) {
    let (file, yes, no) = freezer(id);
    std::fs::write(&file, if frozen { yes } else { no }).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

fn cgroup_pids(id: &str) -> Vec<u32> {
    let Some(dir) = cgroup_dir(id) else { return Vec::new() };
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|line| line.parse().ok()).collect()
}
