//! The audit log: one JSON line per operation (time, key id, caller
//! address, sandbox, operation, outcome), refused authentications
//! included. The file is 0600. It never records payloads, environment
//! values, code, file contents or keys.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
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

/// One audited operation.
#[derive(Clone, Copy, Serialize)]
pub struct Entry<'a> {
    /// The caller's key id, "-" when none was sent, or "system".
    pub key_id: &'a str,
    /// The caller's address (`ip:port` or `unix:uid=N`), or "-".
    pub peer: &'a str,
    pub sandbox: &'a str,
    /// `Service.Method`, such as `Files.List`.
    pub operation: &'a str,
    /// "ok" or a gRPC status code name.
    pub outcome: &'a str,
}

#[derive(Serialize)]
struct Record<'a> {
    time_unix_ms: u128,
    #[serde(flatten)]
    entry: Entry<'a>,
}

/// An append-only audit log shared by every service.
#[derive(Clone)]
pub struct AuditLog {
    file: Arc<Mutex<File>>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let failed = |source| AuditError::Open { path: path.display().to_string(), source };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(failed)?;
        // A log created by an earlier version may be wider open.
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        Ok(Self { file: Arc::new(Mutex::new(file)) })
    }

    /// Appends one record.
    pub fn record(&self, entry: Entry<'_>) {
        let time_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let record = Record { time_unix_ms, entry };
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
        let entry = Entry { key_id: "key-1", peer: "127.0.0.1:5000", sandbox: "sb-1", operation: "Sandboxes.Create", outcome: "ok" };
        log.record(entry);
        log.record(Entry { operation: "Processes.Exec", outcome: "NotFound", ..entry });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["operation"], "Processes.Exec");
        assert_eq!(lines[1]["outcome"], "NotFound");
        assert_eq!(lines[1]["peer"], "127.0.0.1:5000");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
