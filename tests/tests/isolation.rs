//! The jail tried as a hostile tenant would, through the public API only:
//! host root, host kernel knobs, setuid planting, the agent channel,
//! host secrets, kernel surfaces outside the seccomp allow-list, inherited
//! fds, disk and console flooding, and what a crashed daemon leaves. After
//! each attack the daemon and a neighbour sandbox still serve.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use sandbox_proto::api::{
    upload_request::Part, DownloadRequest, ExecRequest, GetSandboxRequest, Limits, StatRequest, UploadHeader, UploadRequest,
};
use sandboxd_tests::{Clients, Daemon, DaemonOptions, Output};
use tonic::Code;

/// A neighbour sandbox with a file in it, to check after each attack.
async fn neighbour(api: &mut Clients) -> String {
    let id = api.create(None).await;
    api.sh(&id, "echo intact > /home/user/canary").await;
    id
}

async fn assert_neighbour_untouched(api: &mut Clients, id: &str) {
    assert_eq!(api.sh(id, "cat /home/user/canary").await, "intact\n");
}

/// Runs a shell script as root of the sandbox.
async fn as_root(api: &mut Clients, id: &str, script: &str) -> Output {
    let request = ExecRequest {
        sandbox_id: id.to_string(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        user: "root".into(),
        timeout_ms: 60_000,
        ..Default::default()
    };
    api.exec_request(request).await.expect("Exec as root")
}

/// Runs Python code as the sandbox user and returns what it printed.
async fn python(api: &mut Clients, id: &str, code: &str) -> String {
    let output = api.exec(id, &["python3", "-c", code]).await.expect("Exec python3");
    assert_eq!(output.code(), Some(0), "python failed: {}", output.stderr_text());
    output.stdout_text()
}

/// The sandbox's cgroup directory in `controller` (v1 layout, or v2).
fn cgroup_dir(controller: &str, id: &str) -> PathBuf {
    find_cgroup_dir(controller, id).unwrap_or_else(|| panic!("no {controller} cgroup for {id}"))
}

fn find_cgroup_dir(controller: &str, id: &str) -> Option<PathBuf> {
    [format!("/sys/fs/cgroup/{controller}/sandboxd"), "/sys/fs/cgroup/sandboxd".to_string()]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
        .map(|group| group.path().join(id))
        .find(|dir| dir.is_dir())
}

fn cgroup_file(controller: &str, id: &str, name: &str) -> String {
    std::fs::read_to_string(cgroup_dir(controller, id).join(name)).unwrap_or_default().trim().to_string()
}

/// Host pids of every process of the sandbox.
fn host_pids(id: &str) -> Vec<u32> {
    cgroup_file("pids", id, "cgroup.procs").lines().filter_map(|line| line.parse().ok()).collect()
}

/// A field of /proc/PID/status on the host (e.g. "Uid").
fn host_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|line| line.strip_prefix(&format!("{field}:"))).unwrap_or("").trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_root_is_an_unprivileged_host_uid_of_its_own() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let (a, b) = (api.create(None).await, api.create(None).await);
    assert_eq!(api.sh(&a, "id -u; id -un").await, "1000\nuser\n", "code runs as the sandbox user by default");
    assert_eq!(as_root(&mut api, &a, "id -u").await.stdout_text(), "0\n", "Exec may ask for root inside");
    let mut host_uids = Vec::new();
    for id in [&a, &b] {
        let pids = host_pids(id);
        assert!(!pids.is_empty(), "the sandbox has processes");
        for pid in pids {
            let uid: u32 = host_status(pid, "Uid").split_whitespace().next().unwrap().parse().unwrap();
            assert!(uid >= 0x1000_0000, "process {pid} of {id} runs as host uid {uid}, not an unprivileged one");
            assert_eq!(host_status(pid, "NoNewPrivs"), "1");
            assert_eq!(host_status(pid, "Seccomp"), "2", "a seccomp filter is installed");
            host_uids.push((id.clone(), uid));
        }
    }
    let uids_of = |id: &str| host_uids.iter().filter(|(owner, _)| owner == id).map(|(_, uid)| *uid).collect::<Vec<_>>();
    assert!(uids_of(&a).iter().all(|uid| !uids_of(&b).contains(uid)), "two sandboxes never share a host uid: {host_uids:?}");
    let caps = api.sh(&a, "grep CapEff /proc/self/status").await;
    assert!(caps.ends_with("0000000000000000\n"), "the sandbox user has no capabilities: {caps}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_kernel_knobs_cannot_be_changed_from_inside() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    for script in [
        "echo '|/tmp/evil' > /proc/sys/kernel/core_pattern",
        "echo 1 > /proc/sys/kernel/sysrq",
        "echo b > /proc/sysrq-trigger",
        "echo 1 > /proc/sys/vm/drop_caches",
        "hostname evil",
        "ip link add dummy0 type dummy",
    ] {
        let output = as_root(&mut api, &id, script).await;
        assert_ne!(output.code(), Some(0), "`{script}` must fail even as root of the sandbox");
    }
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(), before);
    let masked = as_root(&mut api, &id, "cat /proc/kcore /proc/keys 2>/dev/null | wc -c; ls /sys 2>/dev/null | wc -l").await;
    assert_eq!(masked.stdout_text(), "0\n0\n", "kernel memory and keys are masked, /sys is empty");
    let mounts = api.sh(&id, "cat /proc/self/mountinfo /proc/self/cgroup").await;
    let state_dir = daemon.state_dir.display().to_string();
    assert!(!mounts.contains(&state_dir) && !mounts.contains("/sandboxd/"), "no host path shows inside: {mounts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn setuid_files_made_inside_give_nobody_root() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let planted = as_root(&mut api, &id, "cp /bin/sh /tmp/rootsh && chmod 4755 /tmp/rootsh && cp /bin/sh /home/user/rootsh && chmod 4755 /home/user/rootsh").await;
    assert_eq!(planted.code(), Some(0), "{}", planted.stderr_text());
    let header = UploadHeader { sandbox_id: id.clone(), path: "/home/user/uploaded".into(), mode: 0o4755 };
    let chunks = vec![
        UploadRequest { part: Some(Part::Header(header)) },
        UploadRequest { part: Some(Part::Data(std::fs::read("/bin/sh").unwrap().into())) },
    ];
    api.files.upload(tokio_stream::iter(chunks)).await.expect("Upload");
    assert_eq!(api.sh(&id, "/tmp/rootsh -p -c 'id -u'").await, "1000\n", "setuid does nothing inside (nosuid)");
    // On the host, nothing the sandbox wrote is a path another user reaches.
    let state_dir = &daemon.state_dir;
    assert_eq!(std::fs::metadata(state_dir).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in walk(state_dir) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        assert_eq!(meta.mode() & 0o4000, 0, "{} is setuid on the host", entry.display());
    }
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(state_dir.join("jails"))
        .output()
        .expect("run setpriv (util-linux)");
    assert!(!as_nobody.status.success(), "nobody cannot look into the state directory");
}

/// Every path under `dir` on the host (not following symlinks).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_channel_cannot_be_redirected_to_another_sandbox() {
    let daemon = Daemon::start(DaemonOptions { api_keys: Some("key-a,key-b".into()), ..Default::default() }).await;
    let mut tenant_a = daemon.clients(Some("key-a")).await;
    let mut tenant_b = daemon.clients(Some("key-b")).await;
    let a = tenant_a.create(None).await;
    let b = neighbour(&mut tenant_b).await;
    let b_socket = daemon.state_dir.join("jails").join(&b).join("agent.sock");
    assert!(b_socket.exists(), "the daemon keeps each agent's socket in its own directory");
    // Everything a tenant could try from inside: find the socket, replace
    // it, cut the daemon's connection by taking the agent's fds.
    let attack = format!(
        "ls -a /run; find / -xdev -name agent.sock 2>/dev/null; ln -sf {} /run/agent.sock; \
         python3 -c 'import ctypes,os; l=ctypes.CDLL(None); fd=os.pidfd_open(1); print(\"getfd\", l.syscall(438, fd, 3, 0), ctypes.get_errno())'",
        b_socket.display()
    );
    let output = as_root(&mut tenant_a, &a, &attack).await;
    assert!(!output.stdout_text().contains("agent.sock\n"), "no agent socket is visible inside: {}", output.stdout_text());
    assert!(output.stdout_text().contains("getfd -1"), "pidfd_getfd is refused: {}", output.stdout_text());
    tenant_a.sh(&a, "echo a-only > /home/user/mark").await;
    assert_eq!(tenant_a.sh(&a, "cat /home/user/mark; test -e /home/user/canary || echo no-canary").await, "a-only\nno-canary\n");
    assert_neighbour_untouched(&mut tenant_b, &b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_secrets_and_paths_are_not_visible() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let host_root_entry = host_shadow.lines().next().unwrap().to_string();
    let inside = as_root(&mut api, &id, "cat /etc/shadow").await.stdout_text();
    assert!(!inside.contains(&host_root_entry), "the host's /etc/shadow is not the sandbox's");
    // The image's /etc/shadow belongs to an id outside the sandbox's range,
    // so Download is refused; whatever it returns is never the host's.
    let mut downloaded = Vec::new();
    if let Ok(reply) = api.files.download(DownloadRequest { sandbox_id: id.clone(), path: "/etc/shadow".into() }).await {
        let mut chunks = reply.into_inner();
        while let Ok(Some(chunk)) = chunks.message().await {
            downloaded.extend_from_slice(&chunk.data);
        }
    }
    assert!(!String::from_utf8_lossy(&downloaded).contains(&host_root_entry), "Download reads the sandbox's files only");
    let state_dir = daemon.state_dir.display().to_string();
    let probe = format!("ls {state_dir} /root/.cargo /work 2>&1; cat /etc/hostname");
    let listing = as_root(&mut api, &id, &probe).await.stdout_text();
    assert!(!listing.contains("api-key") && !listing.contains("bin\n"), "host directories are absent: {listing}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_surfaces_outside_the_allow_list_are_refused() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    // Each line prints the raw syscall result and errno; -1 with EPERM (1)
    // or ENOSYS (38) is a refusal.
    let code = r#"
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    result = libc.syscall(*args)
    print(name, result, ctypes.get_errno())
call("io_uring_setup", 425, 8, ctypes.create_string_buffer(120))
call("bpf", 321, 0, 0, 0)
call("keyctl", 250, 0, 0, 0, 0)
call("userfaultfd", 323, 0)
call("memfd_secret", 447, 0)
call("unshare_user", 272, 0x10000000)
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, 0)
try:
    socket.socket(40, socket.SOCK_STREAM)
    print("vsock 0 0")
except OSError as error:
    print("vsock -1", error.errno)
"#;
    let output = python(&mut api, &id, code).await;
    for line in output.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "-1", "{} must be refused: {output}", fields[0]);
        assert!(["1", "38"].contains(&fields[2]), "{} fails with EPERM or ENOSYS: {output}", fields[0]);
    }
    assert_eq!(output.lines().count(), 9, "{output}");
    // What ordinary programs need is there: node seeds its CSPRNG with getrandom.
    assert_eq!(api.sh(&id, "node -e 'console.log(require(\"crypto\").randomBytes(4).length)'").await, "4\n");
    assert_eq!(python(&mut api, &id, "import os; print(len(os.getrandom(8)))").await, "8\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_fd_of_the_daemon_reaches_the_sandbox() {
    // A pipe the daemon inherits without close-on-exec, as from whatever
    // started it: it must not reach any process of the sandbox.
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", fds[0])).unwrap().ino();
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let user_fds = api.sh(&id, "ls /proc/self/fd | sort -n | tr '\\n' ' '").await;
    assert_eq!(user_fds.trim(), "0 1 2 3", "only the standard fds (and ls's own) are open");
    let leaked = format!("pipe:[{inode}]");
    for pid in host_pids(&id) {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            let target = std::fs::read_link(fd.path()).map(|t| t.display().to_string()).unwrap_or_default();
            assert_ne!(target, leaked, "process {pid} holds the daemon's inherited pipe as fd {:?}", fd.file_name());
            assert!(!target.starts_with(&daemon.state_dir.display().to_string()), "process {pid} holds a host file {target}");
        }
    }
    // SAFETY: closing the two fds made above.
    unsafe { libc::close(fds[0]) };
    // SAFETY: as above.
    unsafe { libc::close(fds[1]) };
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_the_sandboxs_own() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(Some(Limits { disk_mib: 64, ..Default::default() })).await;
    let fill = api.exec(&id, &["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1; echo dd=$?"]).await.unwrap();
    let text = fill.stdout_text();
    assert!(text.contains("No space left on device"), "writes past the disk size get ENOSPC: {text}");
    let disk = daemon.state_dir.join("jails").join(&id).join("disk.ext4");
    let allocated = std::fs::metadata(&disk).unwrap().blocks() * 512;
    assert!(allocated <= 70 << 20, "the host holds at most the disk's size: {allocated} bytes");
    assert_eq!(std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777, 0o600);
    api.sh(&id, "rm /tmp/fill && echo ok > /tmp/after").await;
    assert_neighbour_untouched(&mut api, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn console_flooding_is_capped_on_the_host() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(None).await;
    // Root of the sandbox writes 64 MiB, in one line, to the agent's console.
    let flood = as_root(&mut api, &id, "head -c 67108864 /dev/zero | tr '\\0' x > /proc/1/fd/2; echo done").await;
    assert_eq!(flood.stdout_text(), "done\n", "{}", flood.stderr_text());
    let console = daemon.state_dir.join("jails").join(&id).join("console.log");
    let size = std::fs::metadata(&console).unwrap().len();
    assert!(size <= 256 * 1024, "the console file is capped: {size} bytes");
    let rss_kib: u64 = host_status(daemon.pid(), "VmRSS").split_whitespace().next().unwrap().parse().unwrap();
    assert!(rss_kib < 256 * 1024, "the daemon did not read the flood into memory: {rss_kib} KiB");
    assert_neighbour_untouched(&mut api, &bystander).await;
    let sandbox = api.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(sandbox.id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_hits_the_pids_limit() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(Some(Limits { max_processes: 64, ..Default::default() })).await;
    let bomb = api
        .exec_request(ExecRequest {
            sandbox_id: id.clone(),
            argv: vec!["sh".into(), "-c".into(), "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived".into()],
            timeout_ms: 10_000,
            ..Default::default()
        })
        .await;
    // However the bomb's own shell ends, the bomb stays inside its pids cgroup.
    drop(bomb);
    assert_eq!(cgroup_file("pids", &id, "pids.max"), "64");
    let current: u32 = cgroup_file("pids", &id, "pids.current").parse().unwrap_or(0);
    assert!(current <= 64, "{current} processes exceed the limit");
    let events = cgroup_file("pids", &id, "pids.events");
    let refused: u64 = events.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(refused > 0, "the kernel refused forks at the limit: {events:?}");
    api.sandboxes.delete(sandbox_proto::api::DeleteSandboxRequest { id }).await.unwrap();
    assert_neighbour_untouched(&mut api, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_is_oom_killed_inside_its_cgroup() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let bystander = neighbour(&mut api).await;
    let id = api.create(Some(Limits { memory_mib: 64, ..Default::default() })).await;
    let hog = api.exec(&id, &["python3", "-c", "blocks = []\nwhile True: blocks.append(bytearray(16 << 20))"]).await;
    match hog {
        Ok(output) => assert_eq!(output.signal(), Some(libc::SIGKILL), "the hog is killed: {output:?}"),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "the agent itself was killed: {status:?}"),
    }
    assert_neighbour_untouched(&mut api, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_sees_only_loopback_and_its_own_processes() {
    let daemon = Daemon::start(DaemonOptions::default()).await;
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    let interfaces = api.sh(&id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").await;
    assert_eq!(interfaces.trim(), "lo", "only loopback exists");
    let pids = api.sh(&id, "ls /proc | grep -E '^[0-9]+$' | wc -l").await;
    assert!(pids.trim().parse::<u32>().unwrap() < 10, "only the sandbox's own processes are visible: {pids}");
    let reach = python(&mut api, &id, "import socket\ntry:\n socket.create_connection(('1.1.1.1', 53), timeout=2); print('reached')\nexcept OSError: print('no route')").await;
    assert_eq!(reach, "no route\n");
    for path in ["/usr/evil", "/etc/evil", "/evil", "/dev/evil"] {
        let output = as_root(&mut api, &id, &format!("echo x > {path}")).await;
        assert_ne!(output.code(), Some(0), "writing {path} must fail even as root");
    }
    let stat = api.files.stat(StatRequest { sandbox_id: id.clone(), path: "/home/user".into() }).await.unwrap().into_inner();
    assert_eq!(stat.path, "/home/user");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemon_leaves_nothing_unaccounted_for_after_restart() {
    // A pool of exactly two: misses while it fills must not grow it.
    let options = DaemonOptions { pool_size: 2, extra_args: vec!["--pool-max".into(), "2".into()], ..Default::default() };
    let mut daemon = Daemon::start(options).await;
    let mut api = daemon.clients(None).await;
    let running = api.create(None).await;
    let paused = api.create(None).await;
    api.sandboxes.pause(sandbox_proto::api::PauseSandboxRequest { id: paused.clone() }).await.expect("Pause");
    let jails_dir = daemon.state_dir.join("jails");
    let sandboxes = [running.clone(), paused.clone()];
    // Give the pool time to refill after the two Creates, then note its jails.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pooled = loop {
        let pooled: Vec<String> = dir_names(&jails_dir).into_iter().filter(|id| !sandboxes.contains(id)).collect();
        let launched = pooled.iter().all(|id| find_cgroup_dir("pids", id).is_some_and(|dir| dir.join("cgroup.procs").exists()) && !host_pids(id).is_empty());
        if (pooled.len() == 2 && launched) || std::time::Instant::now() > deadline {
            break pooled;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(pooled.len(), 2, "the pool's jails before the kill: {pooled:?}");
    let sandbox_pids: Vec<u32> = sandboxes.iter().flat_map(|id| host_pids(id)).collect();
    let pooled_pids: Vec<u32> = pooled.iter().flat_map(|id| host_pids(id)).collect();
    let pooled_cgroups: Vec<PathBuf> = pooled.iter().map(|id| cgroup_dir("pids", id)).collect();
    daemon.kill_and_restart(Duration::from_secs(30)).await;
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists() && !host_status(*pid, "State").starts_with('Z');
    // The sandboxes were re-adopted, not reaped: their processes go on.
    for pid in &sandbox_pids {
        assert!(alive(pid), "process {pid} of a sandbox did not survive the daemon's death");
    }
    // The pooled jails were no one's: reaped at the restart.
    for pid in &pooled_pids {
        assert!(!alive(pid), "process {pid} of a pooled jail of the killed daemon is still there");
    }
    for dir in &pooled_cgroups {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    let mut api = daemon.clients(None).await;
    let listed = api.sandboxes.list(sandbox_proto::api::ListSandboxesRequest {}).await.unwrap().into_inner().sandboxes;
    let known: Vec<String> = listed.iter().map(|sandbox| sandbox.id.clone()).collect();
    for id in &sandboxes {
        assert!(known.contains(id), "{id} is not listed after the restart");
    }
    for id in &pooled {
        assert!(!jails_dir.join(id).exists(), "the state of the old pooled jail {id} is left");
    }
    let state_dir = daemon.state_dir.display().to_string();
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(&state_dir), "no mount of the daemon's is visible on the host: {host_mounts}");
    let loops: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|dev| std::fs::read_to_string(dev.path().join("loop/backing_file")).ok())
        .filter(|backing| pooled.iter().any(|id| backing.contains(&format!("{state_dir}/jails/{id}/"))))
        .collect();
    assert!(loops.is_empty(), "loop devices of the old pooled jails' disks are left: {loops:?}");
    assert_eq!(api.sh(&running, "echo still here").await, "still here\n");
    let fresh = api.create(None).await;
    assert_eq!(api.sh(&fresh, "echo serving").await, "serving\n");
}

/// The names of the directories in `dir`.
fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_keys_sandbox_is_not_found() {
    let daemon = Daemon::start(DaemonOptions { api_keys: Some("key-alice,key-bob".into()), ..Default::default() }).await;
    let mut alice = daemon.clients(Some("key-alice")).await;
    let mut bob = daemon.clients(Some("key-bob")).await;
    let id = alice.create(None).await;
    for status in [
        bob.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err(),
        bob.exec(&id, &["true"]).await.unwrap_err(),
        bob.files.stat(StatRequest { sandbox_id: id.clone(), path: "/tmp".into() }).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let bob_list = bob.sandboxes.list(sandbox_proto::api::ListSandboxesRequest {}).await.unwrap().into_inner();
    assert!(bob_list.sandboxes.is_empty());
    assert_eq!(alice.sh(&id, "echo mine").await, "mine\n");
    let mut anonymous = daemon.clients(None).await;
    let status = anonymous.sandboxes.get(GetSandboxRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = daemon.clients(Some("key-mallory")).await;
    let status = wrong.sandboxes.get(GetSandboxRequest { id }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let audit = daemon.audit_log();
    assert!(!audit.contains("key-alice") && !audit.contains("key-bob"), "keys never reach the audit log");
}
