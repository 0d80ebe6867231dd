//! The audit log: one JSON line per operation (time, key id, sandbox,
//! operation, outcome). It never records payloads, environment values,
//! code, file contents or keys.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}; pass --audit-log with a writable path")]
    Open { path: String, source: std::io::Error },
}

#[derive(Serialize)]
struct Record<'a> {
    time_unix_ms: u128,
    key_id: &'a str,
    sandbox: &'a str,
    operation: &'a str,
    outcome: &'a str,
}

/// An append-only audit log shared by every service.
#[derive(Clone)]
pub struct AuditLog {
    file: Arc<Mutex<File>>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Open { path: path.display().to_string(), source })?;
        Ok(Self { file: Arc::new(Mutex::new(file)) })
    }

    /// Appends one record. `outcome` is "ok" or a gRPC status code name.
    pub fn record(&self, key_id: &str, sandbox: &str, operation: &str, outcome: &str) {
        let time_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let record = Record { time_unix_ms, key_id, sandbox, operation, outcome };
        let Ok(mut line) = serde_json::to_vec(&record) else { return };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(&line) {
            tracing::error!(%error, "cannot append to the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_json_lines() {
        let dir = std::env::temp_dir().join(format!("sandboxd-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record("key-1", "sb-1", "Create", "ok");
        log.record("key-1", "sb-1", "Exec", "NotFound");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["operation"], "Exec");
        assert_eq!(lines[1]["outcome"], "NotFound");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
