//! Per-sandbox cgroups on either hierarchy: the unified cgroup v2 tree of
//! modern hosts, or the v1 controllers (memory, cpu, pids, freezer)
//! mounted separately. Sets limits, freezes and thaws, and kills
//! everything inside on removal.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Every sandbox cgroup lives under this group.
const PARENT: &str = "sandboxd";
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "freezer"];
const CPU_PERIOD_US: u64 = 100_000;
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup controller `{0}` is not mounted: mount it at /sys/fs/cgroup/{0}, or boot with the unified cgroup v2 hierarchy")]
    MissingV1Controller(&'static str),
    #[error("cgroup v2 at /sys/fs/cgroup lacks the `{0}` controller: enable it in cgroup.subtree_control of the parent groups")]
    MissingV2Controller(&'static str),
    #[error("cannot {action} {path}: {source}; the daemon needs root and a writable cgroup hierarchy")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the cgroup {0} did not freeze within {FREEZE_TIMEOUT:?}")]
    FreezeTimeout(PathBuf),
}

/// Which cgroup hierarchy the host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CgroupFlavor {
    V1,
    V2,
}

/// Limits applied to one sandbox's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per wall-clock time, in thousandths of a CPU.
    pub cpu_millis: u32,
    pub max_pids: u32,
}

/// Finds the hierarchy and checks the controllers sandboxes need.
pub fn detect() -> Result<CgroupFlavor, CgroupError> {
    let unified = Path::new(CGROUP_ROOT).join("cgroup.controllers");
    if let Ok(controllers) = fs::read_to_string(&unified) {
        for needed in ["memory", "pids", "cpu"] {
            if !controllers.split_whitespace().any(|c| c == needed) {
                return Err(CgroupError::MissingV2Controller(needed));
            }
        }
        return Ok(CgroupFlavor::V2);
    }
    for controller in V1_CONTROLLERS {
        if !Path::new(CGROUP_ROOT).join(controller).join("cgroup.procs").exists() {
            return Err(CgroupError::MissingV1Controller(controller));
        }
    }
    Ok(CgroupFlavor::V1)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Io { action: "write", path: path.to_path_buf(), source })
}

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Io { action: "create", path: path.to_path_buf(), source })
}

/// One sandbox's cgroup: a directory per v1 controller, or one v2 directory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    flavor: CgroupFlavor,
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `sandboxd/<name>` and applies `limits`. `name` may have
    /// several levels (`group/sandbox`); on cgroup v2 the controllers are
    /// enabled on the way down.
    pub fn create(flavor: CgroupFlavor, name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        let cgroup = Self::at(flavor, name);
        if flavor == CgroupFlavor::V2 {
            // A failure here shows up as a missing limit file below, with its path.
            let mut level = PathBuf::from(CGROUP_ROOT);
            let _ = fs::write(level.join("cgroup.subtree_control"), "+memory +pids +cpu");
            for part in Path::new(PARENT).join(name).parent().into_iter().flat_map(Path::components) {
                level.push(part);
                create_dir(&level)?;
                let _ = fs::write(level.join("cgroup.subtree_control"), "+memory +pids +cpu");
            }
        }
        for dir in &cgroup.dirs {
            create_dir(dir)?;
        }
        if let Err(error) = cgroup.set_limits(limits) {
            let _ = cgroup.remove();
            return Err(error);
        }
        Ok(cgroup)
    }

    /// The cgroup `sandboxd/<name>`, whether or not it exists.
    pub fn at(flavor: CgroupFlavor, name: &str) -> Self {
        let root = Path::new(CGROUP_ROOT);
        let dirs = match flavor {
            CgroupFlavor::V1 => V1_CONTROLLERS.iter().map(|c| root.join(c).join(PARENT).join(name)).collect(),
            CgroupFlavor::V2 => vec![root.join(PARENT).join(name)],
        };
        Self { flavor, dirs }
    }

    /// The cgroups directly under `sandboxd/<group>` in any controller (for
    /// reaping what an earlier run left).
    pub fn children(flavor: CgroupFlavor, group: &str) -> Vec<Self> {
        Self::child_names(flavor, group).iter().map(|name| Self::at(flavor, &format!("{group}/{name}"))).collect()
    }

    /// The names of the cgroups directly under `sandboxd/<group>` in any controller.
    pub fn child_names(flavor: CgroupFlavor, group: &str) -> Vec<String> {
        let mut names: Vec<String> = Self::at(flavor, group)
            .dirs
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    fn controller(&self, name: &str) -> &Path {
        match self.flavor {
            CgroupFlavor::V2 => &self.dirs[0],
            CgroupFlavor::V1 => self
                .dirs
                .iter()
                .find(|dir| dir.components().any(|c| c.as_os_str() == name))
                .unwrap_or(&self.dirs[0]),
        }
    }

    /// The files a process writes its pid to, to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|dir| dir.join("cgroup.procs")).collect()
    }

    pub fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let quota_us = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        match self.flavor {
            CgroupFlavor::V1 => {
                let memory = self.controller("memory");
                let bytes = limits.memory_bytes.to_string();
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                // memory+swap may never be below memory: raise it first when
                // growing (a failure here just means we are shrinking).
                if memsw.exists() {
                    let _ = fs::write(&memsw, &bytes);
                }
                write(&memory.join("memory.limit_in_bytes"), &bytes)?;
                if memsw.exists() {
                    write(&memsw, &bytes)?;
                }
                let cpu = self.controller("cpu");
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                write(&self.controller("pids").join("pids.max"), &limits.max_pids.to_string())
            }
            CgroupFlavor::V2 => {
                let dir = &self.dirs[0];
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    write(&dir.join("memory.swap.max"), "0")?;
                }
                write(&dir.join("cpu.max"), &format!("{quota_us} {CPU_PERIOD_US}"))?;
                write(&dir.join("pids.max"), &limits.max_pids.to_string())
            }
        }
    }

    /// Stops every process in the cgroup and waits until they are stopped.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set_frozen(true)
    }

    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        // (file to write, value, file to watch, whether it shows the new state)
        type Freeze<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&str) -> bool);
        let (file, value, state_file, done): Freeze<'_> = match (self.flavor, frozen) {
            (CgroupFlavor::V1, true) => ("freezer.state", "FROZEN", "freezer.state", &|s| s.trim() == "FROZEN"),
            (CgroupFlavor::V1, false) => ("freezer.state", "THAWED", "freezer.state", &|s| s.trim() == "THAWED"),
            (CgroupFlavor::V2, true) => ("cgroup.freeze", "1", "cgroup.events", &|s| s.lines().any(|l| l == "frozen 1")),
            (CgroupFlavor::V2, false) => ("cgroup.freeze", "0", "cgroup.events", &|s| s.lines().any(|l| l == "frozen 0")),
        };
        let dir = self.controller("freezer");
        write(&dir.join(file), value)?;
        let started = Instant::now();
        while !fs::read_to_string(dir.join(state_file)).is_ok_and(|s| done(&s)) {
            if started.elapsed() > FREEZE_TIMEOUT {
                return Err(CgroupError::FreezeTimeout(dir.to_path_buf()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Current memory use, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        let file = match self.flavor {
            CgroupFlavor::V1 => "memory.usage_in_bytes",
            CgroupFlavor::V2 => "memory.current",
        };
        fs::read_to_string(self.controller("memory").join(file)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// CPU time used by everything in the group so far, in nanoseconds
    /// (v1 `cpuacct.usage`, which sits in the cpu controller's directory
    /// where the two are mounted together; v2 `cpu.stat`'s `usage_usec`).
    pub fn cpu_nanos(&self) -> Option<u64> {
        let dir = self.controller("cpu");
        match self.flavor {
            CgroupFlavor::V1 => fs::read_to_string(dir.join("cpuacct.usage")).ok()?.trim().parse().ok(),
            CgroupFlavor::V2 => {
                let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                let micros: u64 = stat.lines().find_map(|line| line.strip_prefix("usage_usec "))?.trim().parse().ok()?;
                Some(micros * 1000)
            }
        }
    }

    /// Removes the directories if nothing lives in them any more (a group
    /// whose sandboxes are all gone); leaves them otherwise.
    pub fn remove_if_empty(&self) {
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Kills every process inside, then removes the directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let _ = self.thaw();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) with plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for dir in &self.dirs {
            let mut attempts = 0;
            while let Err(source) = fs::remove_dir(dir) {
                if source.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                attempts += 1;
                if attempts > 200 {
                    return Err(CgroupError::Io { action: "remove", path: dir.clone(), source });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// Every pid in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|dir| fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<_>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}
