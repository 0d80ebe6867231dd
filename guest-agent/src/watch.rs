//! Files.Watch: inotify on a directory (and, when recursive, on every
//! directory below it, including ones made while watching), reported as
//! create, write, remove, rename and chmod changes named relative to the
//! watched directory. Bounded: directories per watch, watches per agent,
//! and events queued per stream (a stream that falls behind ends with
//! RESOURCE_EXHAUSTED instead of losing events silently).

use std::{
    collections::HashMap,
    ffi::OsStr,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor},
};
use sandbox_proto::api::{watch_event::Event, FileChange, WatchEvent, WatchEventType, WatchStarted};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tonic::Status;

use crate::{files::io_status, slots::Slots};

/// Directories one recursive watch may cover.
const MAX_DIRS: usize = 4096;
/// Watches open at once in the agent.
const MAX_WATCHES: usize = 64;
/// Events queued towards one client.
const QUEUE: usize = 1024;

static OPEN: Slots = Slots::new(MAX_WATCHES, "watches");

pub type WatchStream = mpsc::Receiver<Result<WatchEvent, Status>>;

/// The inotify instance, for tokio's readiness.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The watches of one stream: inotify's descriptors and the directories,
/// relative to the root, they stand for.
struct Watcher {
    inotify: AsyncFd<Fd>,
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// Starts watching `root`; the stream's first event says it is in place.
pub async fn start(root: PathBuf, recursive: bool) -> Result<WatchStream, Status> {
    let slot = OPEN.take()?;
    let metadata = tokio::fs::symlink_metadata(&root).await.map_err(|e| io_status(&root, "watch", e))?;
    if !metadata.is_dir() {
        return Err(Status::failed_precondition(format!("cannot watch {}: not a directory", root.display())));
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| Status::resource_exhausted(format!("cannot start a watch: {e}; close other watches first")))?;
    // SAFETY: `Fd` owns the inotify instance, whose descriptor stays open and
    // the same until the AsyncFd (which owns `Fd`) is dropped.
    let inotify = unsafe { AsyncFd::register_with_interest(Fd(inotify), tokio::io::Interest::READABLE) }
        .map_err(|e| Status::internal(format!("cannot start a watch: {}", e.into_parts().1)))?;
    let mut watcher = Watcher { inotify, root: root.clone(), recursive, dirs: HashMap::new() };
    watcher.add_tree(Path::new(""))?;
    let (events, stream) = mpsc::channel(QUEUE);
    let _ = events.try_send(Ok(WatchEvent { event: Some(Event::Started(WatchStarted {})) }));
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(status) = watcher.run(&events).await {
            let _ = events.send(Err(status)).await;
        }
    });
    Ok(stream)
}

impl Watcher {
    /// Watches the directory `relative` (to the root) and, when recursive,
    /// every directory below it.
    fn add_tree(&mut self, relative: &Path) -> Result<(), Status> {
        let mut pending = vec![relative.to_path_buf()];
        while let Some(dir) = pending.pop() {
            if self.dirs.len() >= MAX_DIRS {
                return Err(Status::resource_exhausted(format!(
                    "a watch covers at most {MAX_DIRS} directories: watch a smaller tree or without recursive"
                )));
            }
            let absolute = self.root.join(&dir);
            match self.inotify.get_ref().0.add_watch(&absolute, mask()) {
                Ok(descriptor) => {
                    self.dirs.insert(descriptor, dir.clone());
                }
                // Gone or replaced meanwhile: nothing to watch there.
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(error) => {
                    return Err(Status::resource_exhausted(format!("cannot watch {}: {error}", absolute.display())))
                }
            }
            if !self.recursive {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&absolute) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push(dir.join(entry.file_name()));
                }
            }
        }
        Ok(())
    }

    /// Reads inotify until the client goes away or the root is gone.
    async fn run(&mut self, events: &mpsc::Sender<Result<WatchEvent, Status>>) -> Result<(), Status> {
        loop {
            let mut ready = tokio::select! {
                ready = self.inotify.readable() => ready.map_err(|e| Status::internal(format!("the watch failed: {e}")))?,
                () = events.closed() => return Ok(()),
            };
            let batch = match self.inotify.get_ref().0.read_events() {
                Ok(batch) => batch,
                Err(Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(error) => return Err(Status::internal(format!("the watch failed: {error}"))),
            };
            drop(ready);
            for event in batch {
                if !self.handle(event, events)? {
                    return Ok(());
                }
            }
        }
    }

    /// Reports one inotify event; false when the watch is over.
    fn handle(&mut self, event: InotifyEvent, events: &mpsc::Sender<Result<WatchEvent, Status>>) -> Result<bool, Status> {
        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return Err(overflow());
        }
        let Some(dir) = self.dirs.get(&event.wd).cloned() else { return Ok(true) };
        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
            self.dirs.remove(&event.wd);
            return Ok(!dir.as_os_str().is_empty());
        }
        let name = match &event.name {
            Some(name) => dir.join(name),
            None => dir.clone(),
        };
        let is_dir = event.mask.contains(AddWatchFlags::IN_ISDIR);
        if self.recursive && is_dir && event.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            self.add_tree(&name)?;
        }
        // A directory's own removal or move is reported by its parent (or,
        // for the root, ends the watch).
        let on_self = event.mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF);
        if on_self {
            return Ok(!dir.as_os_str().is_empty());
        }
        let Some(kind) = change_type(event.mask) else { return Ok(true) };
        let change = FileChange { name: display(&name), r#type: kind as i32 };
        match events.try_send(Ok(WatchEvent { event: Some(Event::Change(change)) })) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Full(_)) => Err(overflow()),
        }
    }
}

fn overflow() -> Status {
    Status::resource_exhausted(format!(
        "the watch fell behind (more than {QUEUE} events unread, or the kernel's queue overflowed): read its events faster, or watch a smaller tree"
    ))
}

fn change_type(mask: AddWatchFlags) -> Option<WatchEventType> {
    if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        Some(WatchEventType::Create)
    } else if mask.contains(AddWatchFlags::IN_MODIFY) {
        Some(WatchEventType::Write)
    } else if mask.contains(AddWatchFlags::IN_DELETE) {
        Some(WatchEventType::Remove)
    } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
        Some(WatchEventType::Rename)
    } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
        Some(WatchEventType::Chmod)
    } else {
        None
    }
}

fn display(path: &Path) -> String {
    let text = path.as_os_str();
    if text.is_empty() { ".".to_string() } else { OsStr::to_string_lossy(text).into_owned() }
}
