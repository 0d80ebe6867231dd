//! virtio-blk over virtio-mmio, driven from the host side the way a guest
//! driver would: feature negotiation, queue setup, descriptor chains,
//! malformed descriptors that must fail without harming the VMM, and
//! copy-on-write writes that never touch the base image.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use sandbox_vmm::devices::{
    bus::BusDevice,
    virtio::{
        block::{Block, CowDisk},
        mmio::MmioTransport,
        Interrupt,
    },
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_LEN: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const BUFFERS: u64 = 0x10000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DISK_BYTES: u64 = 1 << 20;

/// A minimal split-queue driver over guest memory.
struct Driver {
    memory: GuestMemoryMmap,
    transport: MmioTransport,
    interrupt: Arc<Interrupt>,
    next_desc: u16,
    avail_idx: u16,
    next_buffer: u64,
}

impl Driver {
    fn new(device: Block) -> Driver {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(Box::new(device), memory.clone(), interrupt.clone());
        Driver { memory, transport, interrupt, next_desc: 0, avail_idx: 0, next_buffer: BUFFERS }
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `driver_features` and sets up queue 0; returns the status.
    fn initialize(&mut self, driver_features: u64) -> u32 {
        self.write(0x70, 1 | 2);
        self.write(0x24, 0);
        self.write(0x20, driver_features as u32);
        self.write(0x24, 1);
        self.write(0x20, (driver_features >> 32) as u32);
        self.write(0x70, 1 | 2 | 8);
        self.write(0x30, 0);
        self.write(0x38, u32::from(QUEUE_LEN));
        for (offset, address) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
            self.write(offset, address as u32);
            self.write(offset + 4, (address >> 32) as u32);
        }
        self.write(0x44, 1);
        let status = self.read(0x70);
        self.write(0x70, status | 4);
        self.read(0x70)
    }

    fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let address = self.next_buffer;
        self.memory.write_slice(bytes, GuestAddress(address)).unwrap();
        self.next_buffer += (bytes.len() as u64).next_multiple_of(16).max(16);
        address
    }

    /// Writes a raw descriptor.
    fn descriptor(&mut self, index: u16, address: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
        self.memory.write_obj(address, at).unwrap();
        self.memory.write_obj(len, at.unchecked_add(8)).unwrap();
        self.memory.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.memory.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Chains `parts` (address, len, device-writable) and makes them available.
    fn submit(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(address, len, writable)) in parts.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_LEN;
            let more = i + 1 < parts.len();
            let flags = if more { NEXT } else { 0 } | if writable { WRITE } else { 0 };
            self.descriptor(index, address, len, flags, (index + 1) % QUEUE_LEN);
        }
        self.next_desc = (head + parts.len() as u16) % QUEUE_LEN;
        self.make_available(head);
        head
    }

    fn make_available(&mut self, head: u16) {
        let slot = GuestAddress(AVAIL_RING + 4 + u64::from(self.avail_idx % QUEUE_LEN) * 2);
        self.memory.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        self.write(0x50, 0);
    }

    fn used_idx(&self) -> u16 {
        self.memory.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// A block request: header, optional data, status byte. Returns the
    /// status and the data buffer's address.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u64) {
        let mut header = Vec::new();
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        let header = self.buffer(&header);
        let status = self.buffer(&[0xff]);
        let mut parts = vec![(header, 16, false)];
        if let Some((bytes, device_writes)) = data {
            parts.push((self.buffer(bytes), bytes.len() as u32, device_writes));
        }
        parts.push((status, 1, true));
        let data_address = parts[1].0;
        let used_before = self.used_idx();
        self.submit(&parts);
        assert_eq!(self.used_idx(), used_before.wrapping_add(1), "the request was completed");
        (self.memory.read_obj(GuestAddress(status)).unwrap(), data_address)
    }

    fn read_sectors(&mut self, sector: u64, len: usize) -> Vec<u8> {
        let (status, address) = self.request(IN, sector, Some((&vec![0u8; len], true)));
        assert_eq!(status, OK);
        let mut data = vec![0u8; len];
        self.memory.read_slice(&mut data, GuestAddress(address)).unwrap();
        data
    }
}

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const OK: u8 = 0;
const IOERR: u8 = 1;
const VERSION_1: u64 = 1 << 32;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxd-virtio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn base_image(dir: &Path) -> PathBuf {
    let path = dir.join("base.img");
    let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn device(dir: &Path, base: &Path, name: &str) -> Block {
    Block::new(CowDisk::open(base, &dir.join(name)).unwrap(), false, "sandbox-disk")
}

#[test]
fn negotiation_requires_version_1_and_known_features() {
    let dir = temp_dir("negotiate");
    let base = base_image(&dir);
    let mut driver = Driver::new(device(&dir, &base, "a.overlay"));
    assert_eq!(driver.read(0x000), 0x7472_6976, "virtio magic");
    assert_eq!(driver.read(0x004), 2, "modern virtio-mmio");
    assert_eq!(driver.read(0x008), 2, "a block device");
    driver.write(0x14, 1);
    assert_eq!(driver.read(0x010) & 1, 1, "VERSION_1 is offered");
    let mut legacy = Driver::new(device(&dir, &base, "b.overlay"));
    assert_eq!(legacy.initialize(0) & 8, 0, "FEATURES_OK is refused without VERSION_1");
    assert_eq!(driver.initialize(VERSION_1) & (8 | 4), 8 | 4, "FEATURES_OK and DRIVER_OK");
    let mut capacity = [0u8; 8];
    driver.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_BYTES / 512);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn writes_land_in_the_overlay_and_never_in_the_base() {
    let dir = temp_dir("cow");
    let base = base_image(&dir);
    let before = std::fs::read(&base).unwrap();
    let modified = std::fs::metadata(&base).unwrap().modified().unwrap();
    let mut driver = Driver::new(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(driver.request(OUT, 8, Some((&block, false))).0, OK);
    assert_eq!(driver.read_sectors(8, 4096), block, "reads after a write return the new data");
    // A partial cluster: sector 1 only; sectors 0 and 2..8 still read as the base.
    assert_eq!(driver.request(OUT, 1, Some((&[0xee; 512], false))).0, OK);
    let cluster = driver.read_sectors(0, 4096);
    assert_eq!(&cluster[..512], &before[..512]);
    assert_eq!(&cluster[512..1024], &[0xee; 512][..]);
    assert_eq!(&cluster[1024..], &before[1024..4096]);
    assert_eq!(driver.request(FLUSH, 0, None).0, OK);
    assert_eq!(driver.interrupt.status() & 1, 1, "the driver was interrupted for used buffers");

    assert_eq!(std::fs::read(&base).unwrap(), before, "the base image is untouched");
    assert_eq!(std::fs::metadata(&base).unwrap().modified().unwrap(), modified);
    let mut neighbour = Driver::new(device(&dir, &base, "b.overlay"));
    neighbour.initialize(VERSION_1);
    assert_eq!(neighbour.read_sectors(8, 4096), before[4096..8192], "another sandbox sees the base");
    let reopened = CowDisk::open(&base, &dir.join("a.overlay")).unwrap();
    let mut again = vec![0u8; 4096];
    reopened.read_at(&mut again, 4096).unwrap();
    assert_eq!(again, block, "the flushed overlay and its bitmap survive a reopen");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_requests_fail_without_harming_the_device() {
    let dir = temp_dir("bad");
    let base = base_image(&dir);
    let mut driver = Driver::new(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    assert_eq!(driver.request(IN, DISK_BYTES / 512, Some((&[0u8; 512], true))).0, IOERR, "past the end");
    assert_eq!(driver.request(IN, u64::MAX / 2, Some((&[0u8; 512], true))).0, IOERR, "overflowing sector");

    // Out of bounds: a data buffer beyond guest memory.
    let header = driver.buffer(&[0u8; 16]);
    let status = driver.buffer(&[0xff]);
    let used = driver.used_idx();
    driver.submit(&[(header, 16, false), (1 << 40, 512, true), (status, 1, true)]);
    assert_eq!(driver.used_idx(), used.wrapping_add(1), "the bad chain is returned, not hung");

    // A loop: a descriptor whose next is itself.
    let used = driver.used_idx();
    let head = driver.next_desc;
    driver.descriptor(head, header, 16, NEXT, head);
    driver.next_desc = (head + 1) % QUEUE_LEN;
    driver.make_available(head);
    assert_eq!(driver.used_idx(), used.wrapping_add(1));

    // Wrong direction: the status byte is not device-writable.
    let used = driver.used_idx();
    driver.submit(&[(header, 16, false), (status, 1, false)]);
    assert_eq!(driver.used_idx(), used.wrapping_add(1));
    assert_eq!(driver.memory.read_obj::<u8>(GuestAddress(status)).unwrap(), 0xff, "nothing was written into a readable buffer");

    // The device still serves good requests.
    assert_eq!(driver.read_sectors(2, 512), vec![2u8; 512]);
    std::fs::remove_dir_all(dir).unwrap();
}
