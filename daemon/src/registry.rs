//! The daemon's registry: every user sandbox (owner, template, limits,
//! lifetime, environment, metadata, state) and what its backend needs to
//! find the guest again, in an embedded SQLite database at
//! `STATE_DIR/registry.db` (mode 0600). The manager writes a change here
//! before the API answers, and a restarted daemon reads it back to
//! re-adopt the sandboxes that are still alive. Pooled guests are not in
//! it: they are no one's yet.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use rusqlite::{params, Connection};

use crate::backend::ResourceLimits;

/// How long a write waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    template TEXT NOT NULL,
    memory_mib INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    max_processes INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    created_at_unix_ms INTEGER NOT NULL,
    expires_at_unix_ms INTEGER NOT NULL,
    env TEXT NOT NULL,
    metadata TEXT NOT NULL,
    state TEXT NOT NULL,
    stopped_reason TEXT NOT NULL,
    backend TEXT NOT NULL,
    adoption TEXT NOT NULL
);";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open the registry {path}: {source}; check that the state directory is writable and on a local disk")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("the registry database failed to {action}: {source}; if registry.db is damaged, move it aside (its sandboxes are then reaped at the next start)")]
    Sql { action: &'static str, source: rusqlite::Error },
    #[error("the registry's row for sandbox '{id}' is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("a registry task failed: {0}")]
    Task(String),
}

fn sql(action: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |source| RegistryError::Sql { action, source }
}

/// A sandbox's state as the registry keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredState {
    Running,
    Paused,
    Stopped,
}

impl StoredState {
    fn as_str(self) -> &'static str {
        match self {
            StoredState::Running => "running",
            StoredState::Paused => "paused",
            StoredState::Stopped => "stopped",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(StoredState::Running),
            "paused" => Some(StoredState::Paused),
            "stopped" => Some(StoredState::Stopped),
            _ => None,
        }
    }
}

/// One sandbox's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub owner: String,
    pub template: String,
    pub limits: ResourceLimits,
    pub ttl_seconds: u64,
    pub created_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    pub env: BTreeMap<String, String>,
    pub metadata: HashMap<String, String>,
    pub state: StoredState,
    pub stopped_reason: String,
    /// The backend that runs it (`jail`, `microvm`).
    pub backend: String,
    /// What the backend needs to re-adopt the guest (its own JSON; empty
    /// when the backend cannot re-adopt).
    pub adoption: String,
}

/// The open database. Calls block briefly (one local transaction, at most
/// [`BUSY_TIMEOUT`] waiting for a lock): run them off the async threads.
pub struct Registry {
    connection: Mutex<Connection>,
}

impl Registry {
    /// Opens (or creates, 0600) `STATE_DIR/registry.db`.
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = state_dir.join("registry.db");
        let failed = |source| RegistryError::Open { path: path.clone(), source };
        fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(failed)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(failed)?;
        let connection = Connection::open(&path).map_err(sql("open"))?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql("set its lock timeout"))?;
        // A write-ahead log with normal syncing: a commit is in the log (the
        // kernel's hands) before the API answers, so it survives a daemon
        // crash or kill -9; only a host power loss can take the last
        // commits. Fully synchronous commits cost about 40x more here.
        connection.pragma_update(None, "journal_mode", "WAL").map_err(sql("use a write-ahead log"))?;
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(sql("set its syncing"))?;
        connection.execute_batch(SCHEMA).map_err(sql("create its table"))?;
        Ok(Self { connection: Mutex::new(connection) })
    }

    /// Records a new sandbox, or replaces its row.
    pub fn put(&self, record: &SandboxRecord) -> Result<(), RegistryError> {
        let env = serde_json::to_string(&record.env).unwrap_or_default();
        let metadata = serde_json::to_string(&record.metadata).unwrap_or_default();
        let limits = record.limits;
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO sandboxes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    record.id, record.owner, record.template,
                    limits.memory_mib, limits.vcpus, limits.max_processes, limits.disk_mib,
                    record.ttl_seconds as i64, record.created_at_unix_ms, record.expires_at_unix_ms,
                    env, metadata, record.state.as_str(), record.stopped_reason, record.backend, record.adoption,
                ],
            )
            .map(drop)
            .map_err(sql("record a sandbox"))
    }

    /// Changes a sandbox's state (and its stop reason).
    pub fn set_state(&self, id: &str, state: StoredState, stopped_reason: &str) -> Result<(), RegistryError> {
        self.lock()
            .execute("UPDATE sandboxes SET state = ?2, stopped_reason = ?3 WHERE id = ?1", params![id, state.as_str(), stopped_reason])
            .map(drop)
            .map_err(sql("record a sandbox's state"))
    }

    /// Changes a sandbox's lifetime (SetTimeout).
    pub fn set_lifetime(&self, id: &str, ttl_seconds: u64, expires_at_unix_ms: i64) -> Result<(), RegistryError> {
        self.lock()
            .execute(
                "UPDATE sandboxes SET ttl_seconds = ?2, expires_at_unix_ms = ?3 WHERE id = ?1",
                params![id, ttl_seconds as i64, expires_at_unix_ms],
            )
            .map(drop)
            .map_err(sql("record a sandbox's lifetime"))
    }

    /// Forgets a deleted sandbox.
    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        self.lock().execute("DELETE FROM sandboxes WHERE id = ?1", params![id]).map(drop).map_err(sql("forget a sandbox"))
    }

    /// Every registered sandbox, oldest first.
    pub fn all(&self) -> Result<Vec<SandboxRecord>, RegistryError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare("SELECT * FROM sandboxes ORDER BY created_at_unix_ms, id").map_err(sql("list sandboxes"))?;
        let rows = statement.query_map([], raw_row).map_err(sql("list sandboxes"))?;
        rows.map(|row| row.map_err(sql("list sandboxes")).and_then(RawRow::into_record)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A row as SQLite returns it, before its JSON and state are parsed.
struct RawRow {
    id: String,
    owner: String,
    template: String,
    limits: ResourceLimits,
    ttl_seconds: i64,
    created_at_unix_ms: i64,
    expires_at_unix_ms: i64,
    env: String,
    metadata: String,
    state: String,
    stopped_reason: String,
    backend: String,
    adoption: String,
}

fn raw_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: row.get("id")?,
        owner: row.get("owner")?,
        template: row.get("template")?,
        limits: ResourceLimits {
            memory_mib: row.get("memory_mib")?,
            vcpus: row.get("vcpus")?,
            max_processes: row.get("max_processes")?,
            disk_mib: row.get("disk_mib")?,
        },
        ttl_seconds: row.get("ttl_seconds")?,
        created_at_unix_ms: row.get("created_at_unix_ms")?,
        expires_at_unix_ms: row.get("expires_at_unix_ms")?,
        env: row.get("env")?,
        metadata: row.get("metadata")?,
        state: row.get("state")?,
        stopped_reason: row.get("stopped_reason")?,
        backend: row.get("backend")?,
        adoption: row.get("adoption")?,
    })
}

impl RawRow {
    fn into_record(self) -> Result<SandboxRecord, RegistryError> {
        let corrupt = |reason: String| RegistryError::Corrupt { id: self.id.clone(), reason };
        let env = serde_json::from_str(&self.env).map_err(|e| corrupt(format!("env: {e}")))?;
        let metadata = serde_json::from_str(&self.metadata).map_err(|e| corrupt(format!("metadata: {e}")))?;
        let state = StoredState::parse(&self.state).ok_or_else(|| corrupt(format!("unknown state {:?}", self.state)))?;
        Ok(SandboxRecord {
            id: self.id,
            owner: self.owner,
            template: self.template,
            limits: self.limits,
            ttl_seconds: self.ttl_seconds.max(0) as u64,
            created_at_unix_ms: self.created_at_unix_ms,
            expires_at_unix_ms: self.expires_at_unix_ms,
            env,
            metadata,
            state,
            stopped_reason: self.stopped_reason,
            backend: self.backend,
            adoption: self.adoption,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.to_string(),
            owner: "key-1".into(),
            template: "default".into(),
            limits: ResourceLimits { memory_mib: 256, vcpus: 1, max_processes: 64, disk_mib: 512 },
            ttl_seconds: 300,
            created_at_unix_ms: 1_000,
            expires_at_unix_ms: 301_000,
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            metadata: HashMap::from([("team".to_string(), "blue".to_string())]),
            state: StoredState::Running,
            stopped_reason: String::new(),
            backend: "jail".into(),
            adoption: "{\"slot\":3}".into(),
        }
    }

    #[test]
    fn rows_survive_reopening_and_follow_state_changes() {
        let dir = std::env::temp_dir().join(format!("sandboxd-registry-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let registry = Registry::open(&dir).unwrap();
        registry.put(&record("a")).unwrap();
        registry.put(&record("b")).unwrap();
        registry.set_state("a", StoredState::Paused, "").unwrap();
        registry.remove("b").unwrap();
        drop(registry);
        let mode = fs::metadata(dir.join("registry.db")).unwrap().permissions().mode() & 0o777;
        let reopened = Registry::open(&dir).unwrap();
        let rows = reopened.all().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
        assert_eq!(rows, vec![SandboxRecord { state: StoredState::Paused, ..record("a") }]);
    }
}
