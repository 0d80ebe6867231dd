//! Guest memory backed by a memfd, so that snapshot code can write out or
//! map the very same pages.

use std::{ffi::CString, fs::File, os::fd::FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory of a microVM.
pub type GuestMemory = GuestMemoryMmap;

/// Start of the hole below 4 GiB kept free for device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of that hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("guest memory of {0} bytes is not a whole number of 4 KiB pages")]
    Unaligned(u64),
}

/// The guest-physical ranges of `size` bytes of RAM, skipping the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)]
    }
}

/// Creates `size_bytes` of guest memory in a fresh memfd and returns the
/// memory and the file (laid out as the ranges of [`ram_ranges`], back to back).
pub fn create_guest_memory(size_bytes: u64) -> Result<(GuestMemory, File), MemoryError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size_bytes));
    }
    let name = CString::new("sandboxd-guest-memory").expect("no NUL in a literal");
    // SAFETY: memfd_create with a valid C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size_bytes).map_err(|source| MemoryError::Truncate { size: size_bytes, source })?;
    let memory = map_file(&file, size_bytes, libc::MAP_SHARED)?;
    Ok((memory, file))
}

/// Maps `file` as guest memory of `size_bytes` with the given mmap flags
/// (MAP_SHARED for a live VM, MAP_PRIVATE for a copy-on-write clone).
pub fn map_file(file: &File, size_bytes: u64, flags: i32) -> Result<GuestMemory, MemoryError> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size_bytes) {
        let file = file.try_clone().map_err(|e| MemoryError::Map(e.to_string()))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        regions.push(GuestRegionMmap::new(mapping, base).ok_or_else(|| MemoryError::Map("region overflows".into()))?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn memory_writes_land_in_the_memfd() {
        let (memory, mut file) = create_guest_memory(4 << 20).unwrap();
        memory.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        let mut word = [0u8; 4];
        file.seek(SeekFrom::Start(0x1000)).unwrap();
        file.read_exact(&mut word).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let ranges = ram_ranges(MMIO_GAP_START + (1 << 30));
        assert_eq!(ranges[1], (GuestAddress(MMIO_GAP_END), 1 << 30));
        assert!(create_guest_memory(4097).is_err());
    }
}
