//! The one place that waits for child processes. As PID 1 (or a
//! subreaper) the agent inherits orphans, so a single task reaps every
//! child with `waitpid(-1)` and hands each exit status to whoever spawned
//! that pid; statuses of orphans nobody waits for are dropped.

use std::{
    collections::HashMap,
    process::{Child, Command},
    sync::{Arc, Mutex},
};

use nix::{
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::sync::oneshot;

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// Spawns children and delivers their exit statuses.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<Ended>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot watch SIGCHLD: {0}")]
    Signal(std::io::Error),
}

impl Reaper {
    /// Starts the reaping task; call once, inside the runtime.
    pub fn start() -> Result<Self, ReaperError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Reaper { waiters: Arc::new(Mutex::new(HashMap::new())) };
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `command` and returns the child (whose pipes the caller takes)
    /// and a receiver of its exit status. Never call `wait` on the child.
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Ended>)> {
        let (tx, rx) = oneshot::channel();
        // Holding the lock across spawn means the reaping task cannot see
        // this pid before it is registered.
        let mut waiters = self.lock();
        let child = command.spawn()?;
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), Ended::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => self.deliver(pid.as_raw(), Ended::Signal(signal as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn deliver(&self, pid: i32, ended: Ended) {
        // A pid nobody registered is an orphan re-parented to us: drop it.
        if let Some(waiter) = self.lock().remove(&pid) {
            let _ = waiter.send(ended);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<Ended>>> {
        self.waiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
