//! Jails: isolated sandboxes made of Linux namespaces, a pivot_root'ed
//! read-only system with private writable /tmp and /home/user, a cgroup
//! with memory, CPU and pids limits (and the freezer), dropped
//! capabilities and a seccomp filter. The guest agent runs as PID 1.

mod backend;
mod caps;
pub mod launcher;
mod mounts;
mod seccomp;

use std::{
    fs,
    os::{fd::OwnedFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
};

pub use backend::JailBackend;
pub use super::cgroup::{CgroupFlavor, Limits as JailLimits};
use super::cgroup::{self, Cgroup, CgroupError};
use launcher::{LaunchConfig, CONFIG_ENV};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("jail id {0:?} is invalid: use lowercase letters, digits and dashes")]
    InvalidId(String),
    #[error("cannot prepare {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot start the jail launcher {launcher}: {source}")]
    Launch { launcher: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

/// Everything needed to start one jail.
#[derive(Clone, Debug)]
pub struct JailSpec {
    /// Sandbox id: lowercase letters, digits and dashes.
    pub id: String,
    /// Host directory of this jail; created here and deleted on destroy.
    pub state_dir: PathBuf,
    /// The `sandboxd` binary, which runs the `jail-exec` launcher.
    pub launcher: PathBuf,
    /// The guest agent binary, mounted read-only into the jail.
    pub agent_binary: PathBuf,
    /// A template root file system; `None` shares the host's system directories.
    pub rootfs: Option<PathBuf>,
    pub limits: JailLimits,
    /// PID 1's command inside the jail; `None` runs the agent on its socket.
    pub command: Option<Vec<String>>,
}

/// A running jail. Dropping it destroys it.
#[derive(Debug)]
pub struct Jail {
    state_dir: PathBuf,
    cgroup: Cgroup,
    launcher: Mutex<Child>,
    /// Write end of the launcher's stdin; closing it kills the jail.
    _lifeline: OwnedFd,
    torn_down: bool,
}

/// Checks that this host can run jails, and which cgroups it has.
pub fn host_support() -> Result<CgroupFlavor, JailError> {
    Ok(cgroup::detect()?)
}

fn state_dir_error(path: &Path) -> impl Fn(std::io::Error) -> JailError + '_ {
    move |source| JailError::StateDir { path: path.to_path_buf(), source }
}

impl Jail {
    /// Starts the jail; returns once its launcher runs. The caller waits for
    /// the agent's socket.
    pub fn spawn(spec: JailSpec) -> Result<Jail, JailError> {
        if spec.id.is_empty() || !spec.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(JailError::InvalidId(spec.id));
        }
        let flavor = cgroup::detect()?;
        let dirs = ["root", "tmp", "home", "run"].map(|name| spec.state_dir.join(name));
        for dir in &dirs {
            fs::create_dir_all(dir).map_err(state_dir_error(dir))?;
        }
        let [root, tmp, home, run] = dirs;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(state_dir_error(&tmp))?;
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).map_err(state_dir_error(&run))?;
        let cgroup = Cgroup::create(flavor, &spec.id, &spec.limits)?;
        let command = spec.command.clone().unwrap_or_else(|| {
            vec![mounts::AGENT_PATH.into(), "--unix".into(), format!("{}/agent.sock", mounts::RUN_DIR)]
        });
        let config = LaunchConfig {
            root,
            system: spec.rootfs.clone().unwrap_or_else(|| PathBuf::from("/")),
            tmp,
            home,
            run,
            agent: spec.agent_binary.clone(),
            cgroup_procs: cgroup.procs_files(),
            command,
        };
        let log_path = spec.state_dir.join("jail.log");
        let log = fs::File::create(&log_path).map_err(state_dir_error(&log_path))?;
        let log_err = log.try_clone().map_err(state_dir_error(&log_path))?;
        let (lifeline_read, lifeline) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| JailError::Setup(format!("cannot create the jail's lifeline pipe: {e}")))?;
        let child = Command::new(&spec.launcher)
            .arg("jail-exec")
            .env_clear()
            .env(CONFIG_ENV, serde_json::to_string(&config).map_err(|e| JailError::Setup(e.to_string()))?)
            .stdin(Stdio::from(lifeline_read))
            .stdout(log)
            .stderr(log_err)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(source) => {
                let _ = cgroup.remove();
                return Err(JailError::Launch { launcher: spec.launcher, source });
            }
        };
        Ok(Jail { state_dir: spec.state_dir, cgroup, launcher: Mutex::new(child), _lifeline: lifeline, torn_down: false })
    }

    /// Host path of the agent's socket (`/run/sandbox/agent.sock` inside).
    pub fn agent_socket(&self) -> PathBuf {
        self.state_dir.join("run").join("agent.sock")
    }

    /// What the launcher logged (setup errors, the agent's log).
    pub fn log(&self) -> String {
        fs::read_to_string(self.state_dir.join("jail.log")).unwrap_or_default()
    }

    pub fn freeze(&self) -> Result<(), JailError> {
        Ok(self.cgroup.freeze()?)
    }

    pub fn thaw(&self) -> Result<(), JailError> {
        Ok(self.cgroup.thaw()?)
    }

    /// Memory the jail uses now, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.cgroup.memory_bytes()
    }

    pub fn set_limits(&self, limits: &JailLimits) -> Result<(), JailError> {
        Ok(self.cgroup.set_limits(limits)?)
    }

    /// Whether the jail's init is still running.
    pub fn is_alive(&self) -> bool {
        let mut launcher = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        matches!(launcher.try_wait(), Ok(None))
    }

    /// Kills everything in the jail and deletes its cgroup and state.
    pub fn destroy(mut self) -> Result<(), JailError> {
        self.tear_down()
    }

    fn tear_down(&mut self) -> Result<(), JailError> {
        self.torn_down = true;
        let removed = self.cgroup.remove();
        let mut launcher = self.launcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = launcher.kill();
        let _ = launcher.wait();
        drop(launcher);
        removed?;
        fs::remove_dir_all(&self.state_dir).map_err(state_dir_error(&self.state_dir))
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(error) = self.tear_down() {
                tracing::warn!(%error, "cannot clean up a jail");
            }
        }
    }
}
