//! A jail's console: whatever its init prints reaches the launcher through
//! a pipe, never a host file the guest can write. The launcher keeps it in
//! a file it alone writes, capped: past [`CAP`] bytes the file starts over
//! with a note. The daemon only ever reads a bounded, sanitised tail.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// Most bytes the console file holds before it starts over.
pub const CAP: u64 = 256 * 1024;
/// Most bytes of the console the daemon reads for a diagnostic.
pub const TAIL: u64 = 4 * 1024;

/// Creates the console file (mode 0600), open for appending.
pub fn create(path: &Path) -> std::io::Result<File> {
    File::options().create(true).append(true).mode(0o600).open(path)
}

/// Appends to the console file, starting it over when it would pass [`CAP`].
pub struct CappedLog {
    file: File,
    written: u64,
}

impl CappedLog {
    pub fn new(file: File) -> Self {
        Self { file, written: 0 }
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.written + data.len() as u64 > CAP {
            let _ = self.file.set_len(0);
            let _ = self.file.seek(SeekFrom::Start(0));
            self.written = 0;
            self.append(b"[sandboxd: earlier console output was cut]\n");
        }
        let data = &data[..data.len().min(CAP as usize / 2)];
        self.append(data);
    }

    fn append(&mut self, data: &[u8]) {
        if self.file.write_all(data).is_ok() {
            self.written += data.len() as u64;
        }
    }
}

/// The last [`TAIL`] bytes of the console file at `path`, as printable text
/// (control characters other than newlines and tabs become `?`). Blocking:
/// call it off the async runtime.
pub fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else { return String::new() };
    let length = file.metadata().map_or(0, |m| m.len());
    let mut bytes = Vec::with_capacity(TAIL as usize);
    if file.seek(SeekFrom::Start(length.saturating_sub(TAIL))).is_err() || file.take(TAIL).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    sanitise(&String::from_utf8_lossy(&bytes))
}

fn sanitise(text: &str) -> String {
    text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_under_its_cap_and_the_tail_is_bounded_and_printable() {
        let path = std::env::temp_dir().join(format!("sandboxd-console-test-{}", std::process::id()));
        let mut log = CappedLog::new(File::create(&path).unwrap());
        for _ in 0..100 {
            log.write(&[b'x'; 10_000]);
        }
        log.write(b"last line \x1b[31m\n");
        assert!(std::fs::metadata(&path).unwrap().len() <= CAP);
        let tail = tail(&path);
        assert!(tail.len() <= TAIL as usize);
        assert!(tail.ends_with("last line ?[31m\n"), "{tail:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
