//! Guest memory restored lazily through userfaultfd. The memory is an
//! anonymous private mapping registered for missing-page faults; a handler
//! thread serves each fault from the snapshot's memory file with
//! UFFDIO_COPY (or UFFDIO_ZEROPAGE for zero pages), and can record the
//! order in which the guest touched pages. Replaying such a record copies
//! the working set in bulk before the guest runs (prefetch).
//!
//! A fault that cannot be served is never answered with a page the guest
//! never had: the handler records why ([`UffdMemory::failure`]) and the
//! VMM stops the VM with that reason, leaving the faulting thread asleep
//! until the process exits. No non-cooperative events are enabled (nothing
//! drops or remaps guest pages), so a fill never meets `EAGAIN` from a
//! layout change in flight.

use std::{
    fs::File,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::{ram_ranges, GuestMemory};

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0}; the kernel needs CONFIG_USERFAULTFD and the daemon CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1")]
    Create(userfaultfd::Error),
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(userfaultfd::Error),
    #[error("cannot map memory: {0}")]
    Map(String),
    #[error("cannot start the fault handler: {0}")]
    Thread(std::io::Error),
    #[error("prefetch failed at offset {offset:#x}: {reason}")]
    Prefetch { offset: u64, reason: String },
}

/// What the handler did.
#[derive(Default, Debug)]
pub struct UffdStats {
    /// Page faults served (one per page first touched by the guest).
    pub faults: AtomicU64,
    /// Pages filled from the memory file.
    pub pages_copied: AtomicU64,
    /// Pages filled with zeros (zero in the file).
    pub pages_zeroed: AtomicU64,
    /// Pages copied ahead of the guest by [`UffdMemory::prefetch`].
    pub pages_prefetched: AtomicU64,
}

/// The snapshot's memory file, mapped read-only, and where each RAM range
/// of the guest starts in it.
struct Source {
    base: *const u8,
    len: usize,
    /// (host address of the guest range, its length, its offset in the file)
    ranges: Vec<(u64, u64, u64)>,
    /// The memory file itself, for snapshots of pages not served yet.
    file: File,
}

// SAFETY: the source mapping is read-only and lives as long as the Arc that
// shares it; reading it from several threads is sound.
unsafe impl Send for Source {}
// SAFETY: as above.
unsafe impl Sync for Source {}

impl Source {
    fn file_offset(&self, host_address: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(start, len, _)| (*start..start + len).contains(&host_address))
            .map(|(start, _, offset)| offset + (host_address - start))
    }

    fn host_address(&self, file_offset: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(_, len, offset)| (*offset..offset + len).contains(&file_offset))
            .map(|(start, _, offset)| start + (file_offset - offset))
    }

    fn page(&self, file_offset: u64) -> &[u8] {
        // SAFETY: file_offset is a page inside the mapping (callers get it
        // from file_offset()), and the mapping outlives &self.
        unsafe { std::slice::from_raw_parts(self.base.add(file_offset as usize), PAGE_SIZE as usize) }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: base/len describe the mapping made in `map_source`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Guest memory served by a userfaultfd handler thread.
pub struct UffdMemory {
    memory: GuestMemory,
    uffd: Arc<Uffd>,
    source: Arc<Source>,
    stats: Arc<UffdStats>,
    record: Arc<Mutex<Option<Vec<u64>>>>,
    failure: Arc<Mutex<Option<String>>>,
    stop: EventFd,
    handler: Option<JoinHandle<()>>,
}

impl UffdMemory {
    /// Maps `size` bytes of guest memory whose content comes from `file` on
    /// first touch. With `record`, the handler keeps the order of faults.
    pub fn new(file: &File, size: u64, record: bool) -> Result<Self, UffdError> {
        let mut regions = Vec::new();
        let mut offset = 0;
        let mut ranges = Vec::new();
        for (base, len) in ram_ranges(size) {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let mapping = MmapRegion::build(None, len as usize, libc::PROT_READ | libc::PROT_WRITE, flags)
                .map_err(|e| UffdError::Map(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, base).ok_or_else(|| UffdError::Map("region overflows".into()))?;
            ranges.push((region.as_ptr() as u64, len, offset));
            regions.push(region);
            offset += len;
        }
        let memory = GuestMemory::from_regions(regions).map_err(|e| UffdError::Map(e.to_string()))?;
        let source = Arc::new(map_source(file, size, ranges)?);
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        for region in memory.iter() {
            uffd.register(region.as_ptr().cast(), region.len() as usize).map_err(UffdError::Register)?;
        }
        let mut this = Self {
            memory,
            uffd: Arc::new(uffd),
            source,
            stats: Arc::new(UffdStats::default()),
            record: Arc::new(Mutex::new(record.then(Vec::new))),
            failure: Arc::new(Mutex::new(None)),
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::Thread)?,
            handler: None,
        };
        this.handler = Some(this.spawn_handler()?);
        Ok(this)
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The memory file the guest's pages are served from.
    pub fn source_file(&self) -> &File {
        &self.source.file
    }

    pub fn stats(&self) -> &UffdStats {
        &self.stats
    }

    /// Why serving a fault failed, if it did (the VM must stop: the faulting
    /// thread is left waiting).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The file offsets of the pages the guest faulted on, in order.
    pub fn recorded_working_set(&self) -> Vec<u64> {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    /// Copies the pages at `offsets` (file offsets, any order) into guest
    /// memory in contiguous runs, ahead of the guest.
    pub fn prefetch(&self, offsets: &[u64]) -> Result<(), UffdError> {
        let mut pages: Vec<u64> = offsets.iter().map(|o| o / PAGE_SIZE * PAGE_SIZE).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut run_start = 0;
        while run_start < pages.len() {
            let mut run_end = run_start + 1;
            while run_end < pages.len() && pages[run_end] == pages[run_end - 1] + PAGE_SIZE && self.same_range(pages[run_start], pages[run_end]) {
                run_end += 1;
            }
            self.copy_run(pages[run_start], (run_end - run_start) as u64)?;
            run_start = run_end;
        }
        Ok(())
    }

    fn same_range(&self, a: u64, b: u64) -> bool {
        self.source.host_address(b).zip(self.source.host_address(a)).is_some_and(|(hb, ha)| hb - ha == b - a)
    }

    fn copy_run(&self, offset: u64, pages: u64) -> Result<(), UffdError> {
        let fail = |reason: String| UffdError::Prefetch { offset, reason };
        let dst = self.source.host_address(offset).ok_or_else(|| fail("outside guest memory".into()))?;
        let len = pages * PAGE_SIZE;
        let src = self.source.page(offset).as_ptr();
        // SAFETY: src..src+len lies in the source mapping and dst..dst+len
        // in a registered guest range (both checked through `Source`).
        match unsafe { self.uffd.copy(src.cast(), dst as *mut libc::c_void, len as usize, true) } {
            Ok(_) => {
                self.stats.pages_prefetched.fetch_add(pages, Ordering::Relaxed);
                Ok(())
            }
            // Some pages were already there: fill the rest one by one.
            Err(_) if pages > 1 => (0..pages).try_for_each(|i| self.copy_run(offset + i * PAGE_SIZE, 1)),
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => Ok(()),
            Err(error) => Err(fail(error.to_string())),
        }
    }

    fn spawn_handler(&self) -> Result<JoinHandle<()>, UffdError> {
        let handler = Handler {
            uffd: Arc::clone(&self.uffd),
            source: Arc::clone(&self.source),
            stats: Arc::clone(&self.stats),
            record: Arc::clone(&self.record),
            failure: Arc::clone(&self.failure),
            stop_fd: self.stop.as_raw_fd(),
        };
        std::thread::Builder::new().name("uffd".into()).spawn(move || handler.run()).map_err(UffdError::Thread)
    }
}

impl Drop for UffdMemory {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

fn map_source(file: &File, size: u64, ranges: Vec<(u64, u64, u64)>) -> Result<Source, UffdError> {
    let file = file.try_clone().map_err(|e| UffdError::Map(e.to_string()))?;
    // SAFETY: a fresh read-only shared mapping of `size` bytes of `file`;
    // the result is checked and owned by the returned Source.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_NORESERVE, file.as_raw_fd(), 0)
    };
    if base == libc::MAP_FAILED {
        return Err(UffdError::Map(std::io::Error::last_os_error().to_string()));
    }
    Ok(Source { base: base as *const u8, len: size as usize, ranges, file })
}

/// The fault-serving loop, on its own thread.
struct Handler {
    uffd: Arc<Uffd>,
    source: Arc<Source>,
    stats: Arc<UffdStats>,
    record: Arc<Mutex<Option<Vec<u64>>>>,
    failure: Arc<Mutex<Option<String>>>,
    stop_fd: i32,
}

impl Handler {
    fn run(mut self) {
        let confined = crate::seccomp::filter(crate::seccomp::ThreadKind::Uffd).and_then(|p| crate::seccomp::apply(&p));
        if let Err(error) = confined {
            self.fail(format!("cannot confine the fault handler: {error}"));
        }
        let mut watched = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: poll on two pollfds of a live array.
            let ready = unsafe { libc::poll(watched.as_mut_ptr(), 2, -1) };
            if ready < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                self.fail(format!("poll failed: {}", std::io::Error::last_os_error()));
                return;
            }
            if watched[1].revents != 0 {
                return;
            }
            while let Ok(Some(event)) = self.uffd.read_event() {
                self.handle(event);
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Pagefault { addr, .. } => self.serve(addr as u64 & !(PAGE_SIZE - 1)),
            other => self.fail(format!("unexpected userfaultfd event {other:?}")),
        }
    }

    fn serve(&mut self, page: u64) {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let Some(offset) = self.source.file_offset(page) else {
            self.fail(format!("fault at {page:#x} outside guest memory"));
            return;
        };
        if let Some(record) = self.record.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            record.push(offset);
        }
        if let Err(error) = self.fill(page, offset) {
            self.fail(format!("cannot fill the page at file offset {offset:#x}: {error}"));
        }
    }

    /// Copies the page at file `offset` into guest memory at `page` (or
    /// zeroes it when the file holds zeros) and wakes the faulting thread.
    fn fill(&self, page: u64, offset: u64) -> Result<(), userfaultfd::Error> {
        let data = self.source.page(offset);
        let dst = page as *mut libc::c_void;
        // SAFETY: dst is a page of a registered guest range (file_offset
        // found it), and data is a page of the source mapping.
        let result = if data.iter().all(|&b| b == 0) {
            unsafe { self.uffd.zeropage(dst, PAGE_SIZE as usize, true) }.map(|_| &self.stats.pages_zeroed)
        } else {
            unsafe { self.uffd.copy(data.as_ptr().cast(), dst, PAGE_SIZE as usize, true) }.map(|_| &self.stats.pages_copied)
        };
        match result {
            Ok(counter) => {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Another fault or a prefetch filled it first: wake the waiter.
            Err(userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                self.uffd.wake(dst, PAGE_SIZE as usize)
            }
            Err(error) => Err(error),
        }
    }

    /// Records the first failure; the VMM's control loop stops the VM on it.
    fn fail(&self, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            eprintln!("sandbox-vmm: guest memory fault not served: {reason}");
            *failure = Some(reason);
        }
    }
}
