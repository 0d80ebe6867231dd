//! The warm pool: guests launched ahead of time and kept paused (for the
//! microvm backend, restored from the template's snapshot and stopped), so
//! that Create only has to resume one. A background task keeps between
//! `min` and `max` guests ready: every Create the pool cannot serve raises
//! the target by one, a quiet minute lowers it again, and the memory the
//! pooled guests use stays within the budget.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    backend::{Backend, Instance, LaunchSpec},
    ids, metrics,
};

/// After this long without a miss, the target shrinks by one.
const IDLE: Duration = Duration::from_secs(60);
/// First and longest wait before another try after a failed launch.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Bounds of one template's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Guests kept ready at all times.
    pub min: usize,
    /// Most guests kept ready after a burst of Creates.
    pub max: usize,
    /// Most host memory the ready guests may use together (0: no budget).
    pub memory_budget_bytes: u64,
}

/// A paused guest waiting in the pool, with the id it was launched under.
pub struct PooledGuest {
    pub id: String,
    pub instance: Box<dyn Instance>,
}

/// Guests of one template, launched with the template's default limits.
pub struct WarmPool {
    /// The template's name, as metrics label it.
    name: String,
    backend: Arc<dyn Backend>,
    template: LaunchSpec,
    config: PoolConfig,
    target: AtomicUsize,
    last_miss: Mutex<Instant>,
    ready: Mutex<VecDeque<PooledGuest>>,
    wake: Notify,
    /// Set once the pool is drained: it launches no more guests.
    closed: AtomicBool,
    /// Held while a guest is being launched, so that draining waits for it
    /// (a guest outlives the daemon, so none may be left half-pooled).
    launching: tokio::sync::Mutex<()>,
}

impl WarmPool {
    /// Creates the pool and starts filling it up to `config.min` guests.
    pub fn start(name: String, backend: Arc<dyn Backend>, template: LaunchSpec, config: PoolConfig) -> Arc<Self> {
        let pool = Arc::new(Self {
            name,
            backend,
            template,
            config,
            target: AtomicUsize::new(config.min),
            last_miss: Mutex::new(Instant::now()),
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            launching: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(Arc::clone(&pool).refill_forever());
        pool
    }

    /// Takes a guest and resumes it; `None` when the pool is empty (which
    /// raises its target).
    pub async fn take(&self) -> Option<PooledGuest> {
        loop {
            let Some(guest) = self.lock().pop_front() else {
                self.missed();
                return None;
            };
            self.wake.notify_one();
            self.record_size();
            if !guest.instance.is_alive() {
                discard(guest).await;
                continue;
            }
            match guest.instance.resume().await {
                Ok(()) => return Some(guest),
                Err(error) => {
                    tracing::warn!(%error, sandbox = %guest.id, "discarding a pooled guest that did not resume");
                    discard(guest).await;
                }
            }
        }
    }

    /// Destroys every pooled guest and stops refilling (at shutdown),
    /// waiting for a launch under way to end and be destroyed too.
    pub async fn drain(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        let _idle = self.launching.lock().await;
        let guests: Vec<_> = self.lock().drain(..).collect();
        for guest in guests {
            discard(guest).await;
        }
        self.record_size();
    }

    pub fn ready_count(&self) -> usize {
        self.lock().len()
    }

    fn target(&self) -> usize {
        self.target.load(Ordering::Relaxed)
    }

    fn missed(&self) {
        *self.last_miss.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let max = self.config.max;
        let _ = self.target.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_add(1).min(max)));
        self.wake.notify_one();
    }

    async fn refill_forever(self: Arc<Self>) {
        let mut backoff = RETRY_FIRST;
        loop {
            while self.ready_count() < self.target() && self.within_budget() {
                let launching = self.launching.lock().await;
                if self.closed.load(Ordering::Relaxed) {
                    return;
                }
                let added = self.add_one().await;
                drop(launching);
                match added {
                    Ok(()) => backoff = RETRY_FIRST,
                    Err(error) => {
                        tracing::warn!(%error, template = %self.name, retry_in = ?backoff, "cannot refill the warm pool");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            ::metrics::gauge!(metrics::POOL_TARGET, "template" => self.name.clone()).set(self.target() as f64);
            if tokio::time::timeout(IDLE / 2, self.wake.notified()).await.is_err() {
                self.shrink_when_idle().await;
            }
        }
    }

    /// Lowers the target by one after a quiet spell, and lets one surplus
    /// guest go.
    async fn shrink_when_idle(&self) {
        let quiet = self.last_miss.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= IDLE;
        if quiet {
            let min = self.config.min;
            let _ = self.target.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| (t > min).then(|| t - 1));
        }
        if self.ready_count() > self.target() {
            let surplus = self.lock().pop_back();
            if let Some(guest) = surplus {
                discard(guest).await;
                self.record_size();
            }
        }
    }

    /// Whether one more guest, costing what the pooled ones cost on
    /// average, keeps the pool within its memory budget.
    fn within_budget(&self) -> bool {
        if self.config.memory_budget_bytes == 0 {
            return true;
        }
        let used: Vec<u64> = self.lock().iter().map(|guest| guest.instance.memory_bytes()).collect();
        let total: u64 = used.iter().sum();
        let next = total.checked_div(used.len() as u64).unwrap_or(0);
        total + next <= self.config.memory_budget_bytes
    }

    async fn add_one(&self) -> Result<(), crate::backend::BackendError> {
        let spec = LaunchSpec { id: ids::new_sandbox_id(), ..self.template.clone() };
        let id = spec.id.clone();
        let instance = self.backend.launch(spec).await?;
        if let Err(error) = instance.pause().await {
            discard(PooledGuest { id, instance }).await;
            return Err(error);
        }
        self.lock().push_back(PooledGuest { id, instance });
        self.record_size();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PooledGuest>> {
        self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record_size(&self) {
        let (count, bytes) = {
            let ready = self.lock();
            (ready.len(), ready.iter().map(|guest| guest.instance.memory_bytes()).sum::<u64>())
        };
        ::metrics::gauge!(metrics::POOL_READY, "template" => self.name.clone()).set(count as f64);
        ::metrics::gauge!(metrics::POOL_MEMORY_BYTES, "template" => self.name.clone()).set(bytes as f64);
    }
}

async fn discard(guest: PooledGuest) {
    if let Err(error) = guest.instance.destroy().await {
        tracing::warn!(%error, sandbox = %guest.id, "cannot destroy a pooled guest");
    }
}
