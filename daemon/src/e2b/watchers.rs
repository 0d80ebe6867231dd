//! envd's polling watchers (CreateWatcher, GetWatcherEvents,
//! RemoveWatcher) over the agent's Files.Watch stream: each watcher keeps
//! its stream open and queues what it sends until the client fetches it.
//! Bounded: watchers at once, and events queued per watcher (one that
//! overflows reports so, instead of losing events silently).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use sandbox_proto::api::{watch_event::Event, WatchEvent};
use serde_json::Value;
use tonic::{Code, Streaming};

use super::connect::RpcError;

/// Watchers open at once, over all sandboxes.
const MAX_WATCHERS: usize = 256;
/// Events one watcher queues between fetches.
const MAX_QUEUED: usize = 4096;

/// What a watcher's stream has delivered and not been fetched yet.
#[derive(Default)]
struct Queue {
    events: VecDeque<Value>,
    /// How the stream ended, once it has.
    ended: Option<RpcError>,
}

struct Watcher {
    owner: String,
    sandbox: String,
    queue: Arc<Mutex<Queue>>,
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
pub struct Watchers {
    entries: Mutex<HashMap<String, Watcher>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Watchers {
    /// Keeps `stream` as a new watcher once its watch is in place; returns its id.
    pub async fn create(&self, owner: &str, sandbox: &str, mut stream: Streaming<WatchEvent>) -> Result<String, RpcError> {
        if lock(&self.entries).len() >= MAX_WATCHERS {
            return Err(RpcError::new(Code::ResourceExhausted, format!("{MAX_WATCHERS} watchers are open: remove some (RemoveWatcher) first")));
        }
        match stream.message().await? {
            Some(WatchEvent { event: Some(Event::Started(_)) }) => {}
            _ => return Err(RpcError::new(Code::Internal, "the agent's watch did not start")),
        }
        let queue = Arc::new(Mutex::new(Queue::default()));
        let filling = Arc::clone(&queue);
        let task = tokio::spawn(async move {
            let ended = loop {
                match stream.message().await {
                    Ok(Some(WatchEvent { event: Some(Event::Change(change)) })) => {
                        let mut queue = lock(&filling);
                        if queue.events.len() >= MAX_QUEUED {
                            break RpcError::new(Code::ResourceExhausted, format!("more than {MAX_QUEUED} events were not fetched: fetch them more often"));
                        }
                        queue.events.push_back(super::envd::filesystem_event(&change));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break RpcError::new(Code::NotFound, "the watched directory is gone"),
                    Err(status) => break status.into(),
                }
            };
            lock(&filling).ended = Some(ended);
        });
        let id = format!("w{}", crate::ids::new_sandbox_id().trim_start_matches("sb-"));
        let watcher = Watcher { owner: owner.to_string(), sandbox: sandbox.to_string(), queue, task: task.abort_handle() };
        lock(&self.entries).insert(id.clone(), watcher);
        Ok(id)
    }

    /// The events queued since the last fetch; once the stream ended and
    /// its events are fetched, how it ended (and the watcher is gone).
    pub fn take(&self, owner: &str, sandbox: &str, id: &str) -> Result<Vec<Value>, RpcError> {
        let mut entries = lock(&self.entries);
        let watcher = find(&entries, owner, sandbox, id)?;
        let mut queue = lock(&watcher.queue);
        if queue.events.is_empty() {
            if let Some(ended) = queue.ended.take() {
                drop(queue);
                entries.remove(id);
                return Err(ended);
            }
        }
        Ok(queue.events.drain(..).collect())
    }

    pub fn remove(&self, owner: &str, sandbox: &str, id: &str) -> Result<(), RpcError> {
        let mut entries = lock(&self.entries);
        find(&entries, owner, sandbox, id)?.task.abort();
        entries.remove(id);
        Ok(())
    }
}

fn find<'a>(entries: &'a HashMap<String, Watcher>, owner: &str, sandbox: &str, id: &str) -> Result<&'a Watcher, RpcError> {
    entries
        .get(id)
        .filter(|watcher| watcher.owner == owner && watcher.sandbox == sandbox)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher {id:?} does not exist in this sandbox: create one with CreateWatcher")))
}
