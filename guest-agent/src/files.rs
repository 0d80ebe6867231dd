//! File operations on the sandbox's file system. Transfers stream in
//! chunks and never hold a whole file in memory; an upload is written to a
//! temporary file beside its target and renamed into place only when the
//! stream ends cleanly. Both move regular files only: a device, FIFO or
//! socket is refused before any byte moves (a download opens without
//! blocking and checks what it opened). What Upload and MakeDir create
//! belongs to the sandbox user, like what that user's processes create.

use std::{
    io::ErrorKind,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::UNIX_EPOCH,
};

use bytes::Bytes;
use sandbox_proto::api::{upload_request::Part, FileChunk, FileInfo, FileType, UploadRequest};
use tokio::{
    fs,
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tonic::{Status, Streaming};

mod names {
    //! User and group names from the sandbox's own /etc/passwd and
    //! /etc/group (bounded reads), remembered per id.

    use std::{
        collections::HashMap,
        sync::{Mutex, OnceLock},
    };

    /// Most bytes read of either file.
    const MAX_FILE: u64 = 1 << 20;

    pub fn user(uid: u32) -> String {
        lookup("/etc/passwd", uid)
    }

    pub fn group(gid: u32) -> String {
        lookup("/etc/group", gid)
    }

    /// The name of `id` in a `name:x:id:...` file, or the number.
    fn lookup(file: &'static str, id: u32) -> String {
        static CACHE: OnceLock<Mutex<HashMap<(&'static str, u32), String>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(name) = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&(file, id)) {
            return name.clone();
        }
        let name = read_name(file, id).unwrap_or_else(|| id.to_string());
        cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert((file, id), name.clone());
        name
    }

    fn read_name(file: &str, id: u32) -> Option<String> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(file).ok()?.take(MAX_FILE).read_to_string(&mut text).ok()?;
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let number = fields.nth(1)?;
            (number.parse() == Ok(id)).then(|| name.to_string())
        })
    }
}

/// Size of a download chunk.
const DOWNLOAD_CHUNK: usize = 512 * 1024;

/// Checks that `path` is absolute, has no NUL and no `..`; returns it.
pub fn checked_path(path: &str) -> Result<PathBuf, Status> {
    let candidate = Path::new(path);
    let absolute = candidate.is_absolute() && !path.contains('\0');
    if !absolute || candidate.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!(
            "path {path:?} must be absolute, without `..`, e.g. /home/user/file.txt"
        )));
    }
    Ok(candidate.to_path_buf())
}

/// Maps an I/O error on `path` to a status that names the cause and fix.
pub fn io_status(path: &Path, action: &str, error: std::io::Error) -> Status {
    let path = path.display();
    match error.kind() {
        ErrorKind::NotFound => Status::not_found(format!("cannot {action} {path}: it does not exist")),
        ErrorKind::AlreadyExists => Status::already_exists(format!("cannot {action} {path}: it already exists")),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Status::permission_denied(format!(
            "cannot {action} {path}: read-only or not permitted; only /tmp and /home/user are writable"
        )),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            Status::resource_exhausted(format!("cannot {action} {path}: the disk is full; remove files first"))
        }
        ErrorKind::NotADirectory => {
            Status::failed_precondition(format!("cannot {action} {path}: a parent is not a directory"))
        }
        ErrorKind::IsADirectory => Status::failed_precondition(format!("cannot {action} {path}: it is a directory")),
        ErrorKind::DirectoryNotEmpty => Status::failed_precondition(format!(
            "cannot {action} {path}: directory is not empty; set recursive=true"
        )),
        _ => Status::internal(format!("cannot {action} {path}: {error}")),
    }
}

/// Describes the file at `path` without following a final symlink.
pub async fn info(path: &Path) -> Result<FileInfo, Status> {
    let metadata = fs::symlink_metadata(path).await.map_err(|e| io_status(path, "stat", e))?;
    let kind = metadata.file_type();
    let r#type = if kind.is_symlink() {
        FileType::Symlink
    } else if kind.is_dir() {
        FileType::Directory
    } else if kind.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    let symlink_target = if kind.is_symlink() {
        fs::read_link(path).await.map(|t| t.display().to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    let modified = metadata.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
    Ok(FileInfo {
        path: path.display().to_string(),
        name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        r#type: r#type as i32,
        size: metadata.size(),
        mode: metadata.mode() & 0o7777,
        modified_unix_ms: modified.map_or(0, |d| d.as_millis() as i64),
        symlink_target,
        owner: names::user(metadata.uid()),
        group: names::group(metadata.gid()),
    })
}

/// Renames `source` to `destination`, creating the destination's missing
/// parents (owned by the sandbox user); an existing destination file is
/// replaced, as rename(2) does.
pub async fn rename(source: &Path, destination: &Path) -> Result<FileInfo, Status> {
    fs::symlink_metadata(source).await.map_err(|e| io_status(source, "move", e))?;
    if let Some(parent) = destination.parent() {
        create_missing_dirs(parent, 0o755).await?;
    }
    fs::rename(source, destination).await.map_err(|e| io_status(destination, "move to", e))?;
    info(destination).await
}

/// Lists `dir` down to `depth` levels (0 and 1: its own entries), sorted by path.
pub async fn list(dir: &Path, depth: u32) -> Result<Vec<FileInfo>, Status> {
    let top = info(dir).await?;
    if top.r#type != FileType::Directory as i32 {
        return Err(Status::failed_precondition(format!("cannot list {}: not a directory; use Stat", dir.display())));
    }
    let mut entries = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 1u32)];
    while let Some((current, level)) = pending.pop() {
        let mut reader = fs::read_dir(&current).await.map_err(|e| io_status(&current, "list", e))?;
        while let Some(entry) = reader.next_entry().await.map_err(|e| io_status(&current, "list", e))? {
            let entry_info = info(&entry.path()).await?;
            if entry_info.r#type == FileType::Directory as i32 && level < depth.max(1) {
                pending.push((entry.path(), level + 1));
            }
            entries.push(entry_info);
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

pub async fn remove(path: &Path, recursive: bool) -> Result<(), Status> {
    let metadata = fs::symlink_metadata(path).await.map_err(|e| io_status(path, "remove", e))?;
    let result = if !metadata.is_dir() {
        fs::remove_file(path).await
    } else if recursive {
        fs::remove_dir_all(path).await
    } else {
        fs::remove_dir(path).await
    };
    result.map_err(|e| io_status(path, "remove", e))
}

pub async fn make_dir(path: &Path, parents: bool, mode: u32) -> Result<FileInfo, Status> {
    let mode = if mode == 0 { 0o755 } else { mode & 0o7777 };
    if parents {
        create_missing_dirs(path, mode).await?;
    } else {
        create_dir(path, mode).await?;
    }
    info(path).await
}

/// Creates `dir` and its missing parents, each with `mode`.
async fn create_missing_dirs(dir: &Path, mode: u32) -> Result<(), Status> {
    let mut missing = Vec::new();
    for ancestor in dir.ancestors() {
        if fs::symlink_metadata(ancestor).await.is_ok() {
            break;
        }
        missing.push(ancestor);
    }
    for dir in missing.into_iter().rev() {
        match create_dir(dir, mode).await {
            // Made meanwhile by another call: fine for `parents`.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

/// Creates one directory with exactly `mode`, owned by the sandbox user.
async fn create_dir(dir: &Path, mode: u32) -> Result<(), Status> {
    fs::DirBuilder::new().mode(mode).create(dir).await.map_err(|e| io_status(dir, "create directory", e))?;
    // The umask narrowed the mode given at creation; apply it as asked.
    fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).await.map_err(|e| io_status(dir, "chmod", e))?;
    hand_to_user(dir)
}

/// Gives `path` (not what it may link to) to the sandbox user, when the
/// agent runs as root and so creates files as root.
fn hand_to_user(path: &Path) -> Result<(), Status> {
    match crate::process::RunAs::User.ids() {
        Some(id) => std::os::unix::fs::lchown(path, Some(id), Some(id)).map_err(|e| io_status(path, "chown", e)),
        None => Ok(()),
    }
}

/// What a non-regular file is, for messages.
fn kind_of(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Streams the file at `path` in chunks through a small channel, so only a
/// few chunks are ever in memory. Only a regular file is sent: the open
/// does not block (a FIFO without a writer) nor take a terminal, and the
/// type of what was opened is checked before reading.
pub async fn download(path: &Path) -> Result<mpsc::Receiver<Result<FileChunk, Status>>, Status> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .await
        .map_err(|e| io_status(path, "download", e))?;
    let metadata = file.metadata().await.map_err(|e| io_status(path, "download", e))?;
    if metadata.is_dir() {
        return Err(Status::failed_precondition(format!(
            "cannot download {}: it is a directory; use List, then download files one by one",
            path.display()
        )));
    }
    if !metadata.is_file() {
        return Err(Status::failed_precondition(format!(
            "cannot download {}: it is {}, and only regular files can be downloaded; read it with Exec instead",
            path.display(),
            kind_of(metadata.file_type())
        )));
    }
    let (tx, rx) = mpsc::channel(4);
    let path = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; DOWNLOAD_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(FileChunk { data: Bytes::from(buf) })).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = tx.send(Err(io_status(&path, "read", error))).await;
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// Receives an upload stream: one header, then data chunks.
pub async fn upload(mut stream: Streaming<UploadRequest>) -> Result<FileInfo, Status> {
    let header = match stream.message().await?.and_then(|m| m.part) {
        Some(Part::Header(header)) => header,
        _ => {
            return Err(Status::invalid_argument(
                "the first Upload message must be `header`; send data chunks after it",
            ))
        }
    };
    let target = checked_path(&header.path)?;
    refuse_special_target(&target).await?;
    let parent = target.parent().ok_or_else(|| Status::invalid_argument("cannot upload to /: name a file"))?;
    create_missing_dirs(parent, 0o755).await?;
    let staging = Staging::create(&target).await?;
    let mut file = staging.file().await?;
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(Part::Data(data)) => file.write_all(&data).await.map_err(|e| io_status(&target, "write", e))?,
            _ => {
                return Err(Status::invalid_argument(
                    "an Upload stream takes exactly one `header`, first; send the rest as `data` chunks",
                ))
            }
        }
    }
    let mode = if header.mode == 0 { 0o644 } else { header.mode & 0o7777 };
    file.set_permissions(std::fs::Permissions::from_mode(mode)).await.map_err(|e| io_status(&target, "chmod", e))?;
    // flush reports the error of a write still in flight (a full disk);
    // sync_all alone would swallow it.
    file.flush().await.map_err(|e| io_status(&target, "write", e))?;
    file.sync_all().await.map_err(|e| io_status(&target, "sync", e))?;
    drop(file);
    staging.commit().await?;
    info(&target).await
}

/// Refuses to replace anything but a regular file (a FIFO, device,
/// socket, directory or symbolic link stays as it is).
async fn refuse_special_target(target: &Path) -> Result<(), Status> {
    match fs::symlink_metadata(target).await {
        Ok(metadata) if !metadata.is_file() => Err(Status::failed_precondition(format!(
            "cannot upload to {}: it is {}, and an upload only creates or replaces a regular file; remove it first or pick another path",
            target.display(),
            kind_of(metadata.file_type())
        ))),
        Ok(_) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_status(target, "upload", error)),
    }
}

/// A temporary file beside the target; removed unless committed.
struct Staging {
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    async fn create(target: &Path) -> Result<Self, Status> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let serial = NEXT.fetch_add(1, Ordering::Relaxed);
        let temporary = target.with_file_name(format!(".{name}.upload-{}-{serial}", std::process::id()));
        Ok(Self { temporary, target: target.to_path_buf(), committed: false })
    }

    async fn file(&self) -> Result<fs::File, Status> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.temporary)
            .await
            .map_err(|e| io_status(&self.target, "upload", e))?;
        hand_to_user(&self.temporary)?;
        Ok(file)
    }

    async fn commit(mut self) -> Result<(), Status> {
        fs::rename(&self.temporary, &self.target).await.map_err(|e| io_status(&self.target, "replace", e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}
