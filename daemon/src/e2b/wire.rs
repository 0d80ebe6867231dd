//! The JSON forms (proto3 JSON mapping) of envd's `process.Process` and
//! `filesystem.Filesystem` messages, written from their field names and
//! numbers. Requests accept lowerCamelCase and snake_case names, numbers
//! as JSON numbers or strings, enums by name or number, `bytes` as
//! standard or URL-safe base64; unknown fields are ignored. Responses
//! leave out default values, as proto3 JSON does.

use std::collections::HashMap;

use base64::Engine;
use sandbox_proto::api::{FileInfo, FileType};
use serde::{de, Deserialize, Deserializer};
use serde_json::{json, Map, Value};

/// `ProcessConfig` (cmd = 1, args = 2, envs = 3, cwd = 4).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: HashMap<String, String>,
    pub cwd: Option<String>,
}

/// `PTY.Size` (cols = 1, rows = 2).
#[derive(Deserialize, Default, Debug, Clone, Copy)]
#[serde(default)]
pub struct Size {
    #[serde(deserialize_with = "number")]
    pub cols: u32,
    #[serde(deserialize_with = "number")]
    pub rows: u32,
}

/// `PTY` (size = 1).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Pty {
    pub size: Size,
}

/// `StartRequest` (process = 1, pty = 2, tag = 3, stdin = 4).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct StartRequest {
    pub process: ProcessConfig,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    pub stdin: Option<bool>,
}

/// `ProcessSelector`: oneof pid = 1 | tag = 2.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Selector {
    #[serde(deserialize_with = "optional_number")]
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

/// Requests that only name a process: Connect, CloseStdin (process = 1).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct ProcessRequest {
    pub process: Selector,
}

/// `ProcessInput`: oneof stdin = 1 | pty = 2 (bytes).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Input {
    #[serde(deserialize_with = "optional_bytes")]
    pub stdin: Option<Vec<u8>>,
    #[serde(deserialize_with = "optional_bytes")]
    pub pty: Option<Vec<u8>>,
}

impl Input {
    pub fn into_bytes(self) -> Vec<u8> {
        self.stdin.or(self.pty).unwrap_or_default()
    }
}

/// `SendInputRequest` (process = 1, input = 2).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct SendInputRequest {
    pub process: Selector,
    pub input: Input,
}

/// `SendSignalRequest` (process = 1, signal = 2).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct SendSignalRequest {
    pub process: Selector,
    #[serde(deserialize_with = "signal")]
    pub signal: i32,
}

/// `UpdateRequest` (process = 1, pty = 2).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct UpdateRequest {
    pub process: Selector,
    pub pty: Option<Pty>,
}

/// `StreamInputRequest`: oneof start = 1 {process} | data = 2 {input} |
/// keepalive = 3.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct StreamInputRequest {
    pub start: Option<ProcessRequest>,
    pub data: Option<DataEvent>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct DataEvent {
    pub input: Input,
}

/// Filesystem requests: `path` (Stat, MakeDir, Remove, ListDir with
/// `depth`, WatchDir and CreateWatcher with `recursive`), Move's
/// `source` and `destination`, the polling watcher's `watcherId`.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct FsRequest {
    pub path: String,
    #[serde(deserialize_with = "number")]
    pub depth: u32,
    pub recursive: bool,
    pub source: String,
    pub destination: String,
    #[serde(alias = "watcher_id", rename = "watcherId")]
    pub watcher_id: String,
}

/// `EntryInfo` (name = 1, type = 2, path = 3, size = 4 as a string,
/// mode = 5, permissions = 6, owner = 7, group = 8, modified_time = 9,
/// symlink_target = 10).
pub fn entry_info(info: &FileInfo) -> Value {
    let kind = match FileType::try_from(info.r#type) {
        Ok(FileType::File) => "FILE_TYPE_FILE",
        Ok(FileType::Directory) => "FILE_TYPE_DIRECTORY",
        Ok(FileType::Symlink) => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let modified = std::time::UNIX_EPOCH + std::time::Duration::from_millis(info.modified_unix_ms.max(0) as u64);
    let mut entry = Map::new();
    entry.insert("name".into(), json!(info.name));
    entry.insert("type".into(), json!(kind));
    entry.insert("path".into(), json!(info.path));
    entry.insert("size".into(), json!(info.size.to_string()));
    entry.insert("mode".into(), json!(info.mode));
    entry.insert("permissions".into(), json!(permissions(info)));
    entry.insert("owner".into(), json!(info.owner));
    entry.insert("group".into(), json!(info.group));
    entry.insert("modifiedTime".into(), json!(humantime::format_rfc3339_millis(modified).to_string()));
    if !info.symlink_target.is_empty() {
        entry.insert("symlinkTarget".into(), json!(info.symlink_target));
    }
    Value::Object(entry)
}

/// `ls -l`'s mode string, such as `-rw-r--r--`.
fn permissions(info: &FileInfo) -> String {
    let kind = match FileType::try_from(info.r#type) {
        Ok(FileType::Directory) => 'd',
        Ok(FileType::Symlink) => 'l',
        _ => '-',
    };
    let bits = "rwxrwxrwx".chars().enumerate().map(|(index, letter)| if info.mode & (0o400 >> index) != 0 { letter } else { '-' });
    std::iter::once(kind).chain(bits).collect()
}

pub fn encode_bytes(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn decode_bytes(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(text).ok())
}

fn optional_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|text| decode_bytes(&text).ok_or_else(|| de::Error::custom("bytes must be base64"))).transpose()
}

/// A JSON number or a string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn to_u32<E: de::Error>(value: NumberOrText) -> Result<u32, E> {
    let number = match value {
        NumberOrText::Number(number) => number,
        NumberOrText::Text(text) => text.trim().parse().map_err(|_| E::custom(format!("{text:?} is not a number")))?,
    };
    u32::try_from(number).map_err(|_| E::custom(format!("{number} is too large")))
}

fn number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    to_u32(NumberOrText::deserialize(deserializer)?)
}

fn optional_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    Option::<NumberOrText>::deserialize(deserializer)?.map(to_u32).transpose()
}

/// `Signal`: SIGNAL_SIGTERM (15) or SIGNAL_SIGKILL (9), by name or number.
fn signal<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(number) => i32::try_from(number).map_err(|_| de::Error::custom("signal out of range")),
        NumberOrText::Text(name) => match name.as_str() {
            "SIGNAL_SIGKILL" => Ok(9),
            "SIGNAL_SIGTERM" => Ok(15),
            other => other.parse().map_err(|_| de::Error::custom(format!("unknown signal {other:?}: use SIGNAL_SIGTERM or SIGNAL_SIGKILL"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_either_spelling_of_numbers_enums_and_bytes() {
        let request: SendSignalRequest = serde_json::from_str(r#"{"process":{"pid":"42"},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!((request.process.pid, request.signal), (Some(42), 9));
        let request: SendInputRequest = serde_json::from_str(r#"{"process":{"tag":"t"},"input":{"pty":"aGk="},"x":1}"#).unwrap();
        assert_eq!((request.process.tag.as_deref(), request.input.into_bytes()), (Some("t"), b"hi".to_vec()));
        let request: FsRequest = serde_json::from_str(r#"{"path":"/a","depth":2,"watcher_id":"w"}"#).unwrap();
        assert_eq!((request.depth, request.watcher_id.as_str()), (2, "w"));
        assert!(serde_json::from_str::<SendInputRequest>(r#"{"input":{"stdin":"***"}}"#).is_err());
    }

    #[test]
    fn entries_are_proto3_json() {
        let info = FileInfo { path: "/home/user/a".into(), name: "a".into(), r#type: FileType::File as i32, size: 12, mode: 0o644, owner: "user".into(), group: "user".into(), ..Default::default() };
        let entry = entry_info(&info);
        assert_eq!(entry["size"], "12");
        assert_eq!(entry["type"], "FILE_TYPE_FILE");
        assert_eq!(entry["permissions"], "-rw-r--r--");
        assert!(entry.get("symlinkTarget").is_none());
    }
}
