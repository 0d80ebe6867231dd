//! The snapshot's memory file: guest RAM written sparse (pages that hold
//! nothing are holes), found without touching the memory the guest never
//! used, so that a snapshot's time and memory grow with what the guest
//! touched, not with its size. Where a page's bytes are depends on how the
//! memory is held:
//! - a freshly booted VM maps its memfd shared: the memfd's data extents
//!   (`SEEK_DATA`/`SEEK_HOLE`; its holes are pages never allocated) are the
//!   pages that exist, read through the mapping;
//! - a clone maps a snapshot's memory file privately, or (userfaultfd) gets
//!   its pages served from that file into anonymous memory: the pages it
//!   wrote or was served are private (present or swapped and not file pages,
//!   says `/proc/self/pagemap`) and are read through the mapping; every other
//!   page still reads through to that file, so its data extents there are
//!   copied with `pread`, never faulting the clone's mapping in.
//!
//! Zero pages among those are left as holes too. A jailed VMM has no
//! `/proc`: it calls [`keep_page_map`] while entering its jail, once it has
//! closed inherited descriptors and before it pivots away from `/proc`.
//! Pages a userfaultfd guest's memory dropped (EVENT_REMOVE, which would
//! read back as zeros) are not tracked here: nothing drops guest pages.

use std::{
    fs::{File, OpenOptions},
    ops::Range,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion, GuestRegionMmap};

use crate::{uffd::PAGE_SIZE, vstate::memory::GuestMemory};

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;
/// pagemap entries read per pread (256 KiB of entries, 128 MiB of memory).
const PAGEMAP_BATCH: u64 = 32 * 1024;
/// Bytes copied from a backing file per pread.
const COPY_CHUNK: u64 = 1 << 20;

const PAGE_MAP_PATH: &str = "/proc/self/pagemap";

static PAGE_MAP: OnceLock<File> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot {action} {path}: {source}")]
    Output { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot find the data extents of guest memory's backing file: {0}")]
    Seek(std::io::Error),
    #[error("cannot read guest memory's backing file at offset {offset:#x}: {source}")]
    Backing { offset: u64, source: std::io::Error },
    #[error(
        "cannot read /proc/self/pagemap to find the pages a restored VM holds: {0}; \
         a VMM without /proc (jailed) must call snapshot::keep_page_map() while entering its jail, before it pivots"
    )]
    PageMap(std::io::Error),
    #[error("cannot lower CAP_SYS_ADMIN to open pagemap without physical frame numbers: {0}")]
    Capabilities(std::io::Error),
}

/// Opens this process's `/proc/self/pagemap` and keeps it for every later
/// snapshot: a VMM calls it while entering a jail without `/proc` (after the
/// jail closed inherited descriptors, before it pivots), before any seccomp
/// filter is on. It is opened with CAP_SYS_ADMIN out of the effective set,
/// so that the kept descriptor never shows physical frame numbers, even to
/// a VMM that later turns hostile.
pub fn keep_page_map() -> Result<(), MemoryFileError> {
    if PAGE_MAP.get().is_none() {
        let file = without_sys_admin(|| File::open(PAGE_MAP_PATH))?.map_err(MemoryFileError::PageMap)?;
        let _ = PAGE_MAP.set(file);
    }
    Ok(())
}

/// The kept pagemap, or (a VMM that is not jailed, which can open it
/// anyway) a fresh one.
fn page_map() -> Result<&'static File, MemoryFileError> {
    if let Some(file) = PAGE_MAP.get() {
        return Ok(file);
    }
    let file = File::open(PAGE_MAP_PATH).map_err(MemoryFileError::PageMap)?;
    Ok(PAGE_MAP.get_or_init(|| file))
}

/// capget/capset's header and per-32-capabilities data (version 3).
#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapabilitySet {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The capability whose holder reads physical frame numbers in pagemap.
const CAP_SYS_ADMIN: u32 = 21;

/// Runs `open` with CAP_SYS_ADMIN out of this thread's effective set (a
/// file keeps its opener's credentials), then puts it back.
fn without_sys_admin<T>(open: impl FnOnce() -> T) -> Result<T, MemoryFileError> {
    let mut held = [CapabilitySet::default(); 2];
    capabilities(libc::SYS_capget, &mut held)?;
    if held[0].effective & (1 << CAP_SYS_ADMIN) == 0 {
        return Ok(open());
    }
    let mut lowered = held;
    lowered[0].effective &= !(1 << CAP_SYS_ADMIN);
    capabilities(libc::SYS_capset, &mut lowered)?;
    let opened = open();
    capabilities(libc::SYS_capset, &mut held)?;
    Ok(opened)
}

/// capget or capset of the calling thread.
fn capabilities(call: libc::c_long, sets: &mut [CapabilitySet; 2]) -> Result<(), MemoryFileError> {
    let mut header = CapabilityHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: a version-3 header and two capability sets, both alive on
    // this stack, are what capget fills and capset reads.
    let result = unsafe { libc::syscall(call, &mut header as *mut CapabilityHeader, sets.as_mut_ptr()) };
    if result == 0 {
        Ok(())
    } else {
        Err(MemoryFileError::Capabilities(std::io::Error::last_os_error()))
    }
}

/// Writes guest RAM to `path` and returns its size. `source` is the file
/// whose pages anonymous (userfaultfd-served) memory has not been served
/// yet. The file is written under another name and renamed into place: a
/// VM restored from a snapshot in the same place still maps the old file,
/// which must not change under it.
pub fn write(memory: &GuestMemory, source: Option<&File>, path: &Path) -> Result<u64, MemoryFileError> {
    let partial = path.with_extension("partial");
    let file = OpenOptions::new().create(true).write(true).truncate(true).open(&partial).map_err(output_error("create", &partial))?;
    let mut offset = 0u64;
    for region in memory.iter() {
        write_region(region, Backing::of(region, source, offset), &file, offset).map_err(|e| e.or_output(&partial))?;
        offset += region.len();
    }
    file.set_len(offset).map_err(output_error("size", &partial))?;
    file.sync_all().map_err(output_error("sync", &partial))?;
    std::fs::rename(&partial, path).map_err(output_error("rename", path))?;
    Ok(offset)
}

fn output_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError::Output { action, path: path.to_path_buf(), source }
}

/// Writes the pages of `region` that hold data to `output` at `offset`.
fn write_region(region: &GuestRegionMmap, backing: Backing, output: &File, offset: u64) -> Result<(), RegionError> {
    let plan = backing.plan(region).map_err(RegionError::Find)?;
    for range in &plan.from_memory {
        // SAFETY: the range lies inside the region's mapping (plans are
        // clipped to its length); the VM is paused, so nothing writes these
        // pages while they are read, and they exist (memfd data or private
        // pages), so reading them faults nothing new in.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().add(range.start as usize), (range.end - range.start) as usize) };
        write_nonzero_pages(output, bytes, offset + range.start).map_err(RegionError::Write)?;
    }
    match backing {
        Backing::Private { file: Some((file, file_offset)) } => copy_from_file(file, file_offset, &plan.from_file, output, offset),
        _ => Ok(()),
    }
}

/// How one region of guest memory is held.
#[derive(Clone, Copy)]
enum Backing<'a> {
    /// MAP_SHARED over a file (a fresh VM's memfd): memory and file are the
    /// same pages.
    Shared { file: &'a File, offset: u64 },
    /// MAP_PRIVATE: the pages the VM wrote or was served are private; every
    /// other page reads through to `file` at `offset` (the snapshot the VM
    /// came from), or is zero without one.
    Private { file: Option<(&'a File, u64)> },
}

/// The pages of one region to write, as byte ranges from its start.
struct Plan {
    from_memory: Vec<Range<u64>>,
    from_file: Vec<Range<u64>>,
}

impl<'a> Backing<'a> {
    /// `offset` is where the region starts in the memory file, which is
    /// also where it starts in a userfaultfd `source` (same layout).
    fn of(region: &'a GuestRegionMmap, source: Option<&'a File>, offset: u64) -> Self {
        match region.file_offset() {
            Some(mapped) if region.flags() & libc::MAP_SHARED != 0 => Backing::Shared { file: mapped.file(), offset: mapped.start() },
            Some(mapped) => Backing::Private { file: Some((mapped.file(), mapped.start())) },
            None => Backing::Private { file: source.map(|file| (file, offset)) },
        }
    }

    fn plan(self, region: &GuestRegionMmap) -> Result<Plan, MemoryFileError> {
        let len = region.len();
        match self {
            Backing::Shared { file, offset } => Ok(Plan { from_memory: data_extents(file, offset, len)?, from_file: Vec::new() }),
            Backing::Private { file } => {
                let private = private_pages(page_map()?, region.as_ptr() as u64, len)?;
                let in_file = file.map(|(file, offset)| data_extents(file, offset, len)).transpose()?.unwrap_or_default();
                Ok(Plan { from_file: subtract(&in_file, &private), from_memory: private })
            }
        }
    }
}

/// Where `file` holds data in [start, start + len), as page-aligned byte
/// ranges from `start`.
fn data_extents(file: &File, start: u64, len: u64) -> Result<Vec<Range<u64>>, MemoryFileError> {
    let end = start + len;
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(file, at, libc::SEEK_DATA)?.filter(|&data| data < end) else { break };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let page_start = (data - start) / PAGE_SIZE * PAGE_SIZE;
        push_merged(&mut extents, page_start..(hole - start).next_multiple_of(PAGE_SIZE).min(len));
        at = hole;
    }
    Ok(extents)
}

/// lseek; None when there is no data at or after `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> Result<Option<u64>, MemoryFileError> {
    let offset = i64::try_from(offset).map_err(|_| MemoryFileError::Seek(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: lseek on a descriptor `file` keeps open; it takes no pointers.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    match std::io::Error::last_os_error() {
        error if error.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        error => Err(MemoryFileError::Seek(error)),
    }
}

/// The private pages (present or swapped, not file pages) of the `len`
/// bytes mapped at `address`, as byte ranges from `address`.
fn private_pages(page_map: &File, address: u64, len: u64) -> Result<Vec<Range<u64>>, MemoryFileError> {
    let (first, pages) = (address / PAGE_SIZE, len / PAGE_SIZE);
    let mut entries = vec![0u8; (PAGEMAP_BATCH.min(pages) * 8) as usize];
    let mut private = Vec::new();
    let mut page = 0;
    while page < pages {
        let count = (pages - page).min(PAGEMAP_BATCH);
        let batch = &mut entries[..(count * 8) as usize];
        page_map.read_exact_at(batch, (first + page) * 8).map_err(MemoryFileError::PageMap)?;
        for (index, entry) in batch.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(entry.try_into().expect("chunks of 8 bytes"));
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 && entry & PAGEMAP_FILE_OR_SHARED == 0 {
                let at = (page + index as u64) * PAGE_SIZE;
                push_merged(&mut private, at..at + PAGE_SIZE);
            }
        }
        page += count;
    }
    Ok(private)
}

/// Appends `range` to sorted ranges, joining it to the last one it touches.
fn push_merged(ranges: &mut Vec<Range<u64>>, range: Range<u64>) {
    match ranges.last_mut() {
        Some(last) if last.end >= range.start => last.end = last.end.max(range.end),
        _ => ranges.push(range),
    }
}

/// `ranges` without `cut` (both sorted, each without overlaps).
fn subtract(ranges: &[Range<u64>], cut: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut left = Vec::new();
    let mut next_cut = 0;
    for range in ranges {
        let mut start = range.start;
        while let Some(hole) = cut.get(next_cut) {
            if hole.end <= start {
                next_cut += 1;
                continue;
            }
            if hole.start >= range.end {
                break;
            }
            if hole.start > start {
                left.push(start..hole.start);
            }
            start = hole.end;
            if start >= range.end {
                break;
            }
            next_cut += 1;
        }
        if start < range.end {
            left.push(start..range.end);
        }
    }
    left
}

/// Why writing a region failed: finding its pages, reading its backing
/// file, or writing the output.
enum RegionError {
    Find(MemoryFileError),
    Read { offset: u64, source: std::io::Error },
    Write(std::io::Error),
}

impl RegionError {
    fn or_output(self, partial: &Path) -> MemoryFileError {
        match self {
            RegionError::Find(error) => error,
            RegionError::Read { offset, source } => MemoryFileError::Backing { offset, source },
            RegionError::Write(source) => MemoryFileError::Output { action: "write", path: partial.to_path_buf(), source },
        }
    }
}

/// Copies `ranges` (from the region's start) of the backing file, which
/// holds the region from `backing_offset`, to `output` at `output_offset`.
fn copy_from_file(backing: &File, backing_offset: u64, ranges: &[Range<u64>], output: &File, output_offset: u64) -> Result<(), RegionError> {
    let mut buffer = vec![0u8; COPY_CHUNK as usize];
    for range in ranges {
        for start in (range.start..range.end).step_by(COPY_CHUNK as usize) {
            let chunk = &mut buffer[..(range.end - start).min(COPY_CHUNK) as usize];
            let offset = backing_offset + start;
            backing.read_exact_at(chunk, offset).map_err(|source| RegionError::Read { offset, source })?;
            write_nonzero_pages(output, chunk, output_offset + start).map_err(RegionError::Write)?;
        }
    }
    Ok(())
}

/// Writes the pages of `bytes` that are not all zeros to `output` at `at`,
/// one write per run of them.
fn write_nonzero_pages(output: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut run_start = None;
    for (index, content) in bytes.chunks(page).enumerate() {
        match (is_zero(content), run_start) {
            (false, None) => run_start = Some(index * page),
            (true, Some(start)) => {
                output.write_all_at(&bytes[start..index * page], at + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    match run_start {
        Some(start) => output.write_all_at(&bytes[start..], at + start as u64),
        None => Ok(()),
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    words.all(|word| u64::from_ne_bytes(word.try_into().expect("chunks of 8 bytes")) == 0) && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::vstate::memory::{create_guest_memory, map_file};

    /// Physical frame number bits of a present page's pagemap entry.
    const PAGEMAP_FRAME: u64 = (1 << 55) - 1;

    #[test]
    fn subtract_cuts_ranges_across_and_inside() {
        let ranges = [0..10, 20..30, 40..50];
        let cut = [5..25, 27..28, 45..60];
        assert_eq!(subtract(&ranges, &cut), vec![0..5, 25..27, 28..30, 40..45]);
        assert_eq!(subtract(&ranges, &[]), ranges.to_vec());
        let whole = [0..10, 10..20];
        assert_eq!(subtract(&whole, &[0..20, 30..40]), Vec::<Range<u64>>::new());
    }

    #[test]
    fn data_extents_of_a_memfd_are_its_allocated_pages() {
        let (memory, file) = create_guest_memory(16 << 20).unwrap();
        let region = memory.iter().next().unwrap();
        for page in [3u64, 4, 9, 4000] {
            // SAFETY: each page lies inside the 16 MiB region.
            unsafe { region.as_ptr().add((page * PAGE_SIZE) as usize).write(1) };
        }
        let extents = data_extents(&file, 0, 16 << 20).unwrap();
        assert_eq!(extents, vec![3 * PAGE_SIZE..5 * PAGE_SIZE, 9 * PAGE_SIZE..10 * PAGE_SIZE, 4000 * PAGE_SIZE..4001 * PAGE_SIZE]);
        assert_eq!(data_extents(&file, 8 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap(), vec![PAGE_SIZE..2 * PAGE_SIZE]);
    }

    #[test]
    fn private_pages_of_a_private_mapping_are_the_written_ones() {
        let backing = tempfile_with_data(&[1u8; 4 * PAGE_SIZE as usize]);
        backing.set_len(16 * PAGE_SIZE).unwrap();
        let memory = map_file(&backing, 16 * PAGE_SIZE, libc::MAP_PRIVATE).unwrap();
        let region = memory.iter().next().unwrap();
        let base = region.as_ptr();
        // SAFETY: pages 1, 2 and 7 lie inside the 16-page region; page 0 is
        // only read, which maps the file's page without copying it.
        unsafe {
            assert_eq!(base.read_volatile(), 1);
            base.add(PAGE_SIZE as usize).write(2);
            base.add(2 * PAGE_SIZE as usize).write(2);
            base.add(7 * PAGE_SIZE as usize).write(2);
        }
        let private = private_pages(page_map().unwrap(), base as u64, 16 * PAGE_SIZE).unwrap();
        assert_eq!(private, vec![PAGE_SIZE..3 * PAGE_SIZE, 7 * PAGE_SIZE..8 * PAGE_SIZE]);
    }

    #[test]
    fn a_kept_page_map_shows_no_physical_frames() {
        let (memory, _file) = create_guest_memory(4 * PAGE_SIZE).unwrap();
        let region = memory.iter().next().unwrap();
        // SAFETY: the first page lies inside the region.
        unsafe { region.as_ptr().write(1) };
        let page_map = without_sys_admin(|| File::open(PAGE_MAP_PATH)).unwrap().unwrap();
        let mut entry = [0u8; 8];
        page_map.read_exact_at(&mut entry, region.as_ptr() as u64 / PAGE_SIZE * 8).unwrap();
        let entry = u64::from_ne_bytes(entry);
        assert_ne!(entry & PAGEMAP_PRESENT, 0, "the written page is present");
        assert_eq!(entry & PAGEMAP_FRAME, 0, "no frame number through the kept descriptor");
    }

    #[test]
    fn only_nonzero_pages_are_written() {
        let mut bytes = vec![0u8; 4 * PAGE_SIZE as usize];
        bytes[PAGE_SIZE as usize + 17] = 9;
        bytes[3 * PAGE_SIZE as usize] = 9;
        let output = tempfile_with_data(&[]);
        write_nonzero_pages(&output, &bytes, 0).unwrap();
        output.set_len(4 * PAGE_SIZE).unwrap();
        let extents = data_extents(&output, 0, 4 * PAGE_SIZE).unwrap();
        assert_eq!(extents, vec![PAGE_SIZE..2 * PAGE_SIZE, 3 * PAGE_SIZE..4 * PAGE_SIZE]);
    }

    fn tempfile_with_data(data: &[u8]) -> File {
        let dir = std::env::temp_dir().join(format!("sandboxd-memory-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}", COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
        file.write_all(data).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
}
