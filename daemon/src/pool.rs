//! The warm pool: guests launched ahead of time and kept paused, so that
//! Create only has to resume one. A background task refills the pool after
//! every take.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    backend::{Backend, Instance, LaunchSpec},
    ids, metrics,
};

/// A paused guest waiting in the pool, with the id it was launched under.
pub struct PooledGuest {
    pub id: String,
    pub instance: Box<dyn Instance>,
}

/// Guests of one template, launched with the template's default limits.
pub struct WarmPool {
    backend: Arc<dyn Backend>,
    template: LaunchSpec,
    target: usize,
    ready: Mutex<VecDeque<PooledGuest>>,
    wake: Notify,
}

impl WarmPool {
    /// Creates the pool and starts filling it up to `target` guests.
    pub fn start(backend: Arc<dyn Backend>, template: LaunchSpec, target: usize) -> Arc<Self> {
        let pool = Arc::new(Self { backend, template, target, ready: Mutex::new(VecDeque::new()), wake: Notify::new() });
        tokio::spawn(Arc::clone(&pool).refill_forever());
        pool
    }

    /// Takes a guest and resumes it; `None` when the pool is empty.
    pub async fn take(&self) -> Option<PooledGuest> {
        loop {
            let guest = self.lock().pop_front()?;
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

    /// Destroys every pooled guest (at shutdown).
    pub async fn drain(&self) {
        let guests: Vec<_> = self.lock().drain(..).collect();
        for guest in guests {
            discard(guest).await;
        }
        self.record_size();
    }

    pub fn ready_count(&self) -> usize {
        self.lock().len()
    }

    async fn refill_forever(self: Arc<Self>) {
        loop {
            while self.ready_count() < self.target {
                if let Err(error) = self.add_one().await {
                    tracing::warn!(%error, "cannot refill the warm pool; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            self.wake.notified().await;
        }
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
        ::metrics::gauge!(metrics::POOL_READY).set(self.ready_count() as f64);
    }
}

async fn discard(guest: PooledGuest) {
    if let Err(error) = guest.instance.destroy().await {
        tracing::warn!(%error, sandbox = %guest.id, "cannot destroy a pooled guest");
    }
}
