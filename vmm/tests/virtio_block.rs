//! virtio-blk over virtio-mmio, driven from the host side the way a guest
//! driver would: feature negotiation, queue setup, descriptor chains,
//! malformed descriptors that must fail without harming the VMM, and
//! copy-on-write writes that never touch the base image, and a snapshot of
//! a live device restored as a clone that carries on with the same queue.

#[path = "support/virtq.rs"]
mod virtq;

use std::path::{Path, PathBuf};

use sandbox_vmm::{
    devices::{
        bus::BusDevice,
        virtio::{
            block::{self, Block, CowDisk},
            mmio::{MmioError, MmioTransport},
        },
    },
    snapshot::persist::Persist,
};
use vm_memory::{Bytes, GuestAddress};
use virtq::{Driver, QUEUE_LEN, VERSION_1};

const DISK_BYTES: u64 = 1 << 20;
const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const OK: u8 = 0;
const IOERR: u8 = 1;

fn block_driver(block: Block) -> Driver {
    Driver::new(Box::new(block), Driver::memory(16 << 20))
}

/// A block request: header, optional data, status byte. Returns the status
/// and the data buffer's address.
fn request(driver: &mut Driver, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u64) {
    let mut header = Vec::new();
    header.extend_from_slice(&kind.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&sector.to_le_bytes());
    let header = driver.buffer(&header);
    let status = driver.buffer(&[0xff]);
    let mut parts = vec![(header, 16, false)];
    if let Some((bytes, device_writes)) = data {
        parts.push((driver.buffer(bytes), bytes.len() as u32, device_writes));
    }
    parts.push((status, 1, true));
    let data_address = parts[1].0;
    let used_before = driver.used_idx(0);
    driver.submit(0, &parts);
    assert_eq!(driver.used_idx(0), used_before.wrapping_add(1), "the request was completed");
    (driver.memory.read_obj(GuestAddress(status)).unwrap(), data_address)
}

fn read_sectors(driver: &mut Driver, sector: u64, len: usize) -> Vec<u8> {
    let (status, address) = request(driver, IN, sector, Some((&vec![0u8; len], true)));
    assert_eq!(status, OK);
    let mut data = vec![0u8; len];
    driver.memory.read_slice(&mut data, GuestAddress(address)).unwrap();
    data
}

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
    let mut driver = block_driver(device(&dir, &base, "a.overlay"));
    assert_eq!(driver.read(0x000), 0x7472_6976, "virtio magic");
    assert_eq!(driver.read(0x004), 2, "modern virtio-mmio");
    assert_eq!(driver.read(0x008), 2, "a block device");
    driver.write(0x14, 1);
    assert_eq!(driver.read(0x010) & 1, 1, "VERSION_1 is offered");
    let mut legacy = block_driver(device(&dir, &base, "b.overlay"));
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
    let mut driver = block_driver(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(request(&mut driver, OUT, 8, Some((&block, false))).0, OK);
    assert_eq!(read_sectors(&mut driver, 8, 4096), block, "reads after a write return the new data");
    // A partial cluster: sector 1 only; sectors 0 and 2..8 still read as the base.
    assert_eq!(request(&mut driver, OUT, 1, Some((&[0xee; 512], false))).0, OK);
    let cluster = read_sectors(&mut driver, 0, 4096);
    assert_eq!(&cluster[..512], &before[..512]);
    assert_eq!(&cluster[512..1024], &[0xee; 512][..]);
    assert_eq!(&cluster[1024..], &before[1024..4096]);
    assert_eq!(request(&mut driver, FLUSH, 0, None).0, OK);
    assert_eq!(driver.interrupt.status() & 1, 1, "the driver was interrupted for used buffers");

    assert_eq!(std::fs::read(&base).unwrap(), before, "the base image is untouched");
    assert_eq!(std::fs::metadata(&base).unwrap().modified().unwrap(), modified);
    let mut neighbour = block_driver(device(&dir, &base, "b.overlay"));
    neighbour.initialize(VERSION_1);
    assert_eq!(read_sectors(&mut neighbour, 8, 4096), before[4096..8192], "another sandbox sees the base");
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
    let mut driver = block_driver(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    assert_eq!(request(&mut driver, IN, DISK_BYTES / 512, Some((&[0u8; 512], true))).0, IOERR, "past the end");
    assert_eq!(request(&mut driver, IN, u64::MAX / 2, Some((&[0u8; 512], true))).0, IOERR, "overflowing sector");

    // Out of bounds: a data buffer beyond guest memory.
    let header = driver.buffer(&[0u8; 16]);
    let status = driver.buffer(&[0xff]);
    let used = driver.used_idx(0);
    driver.submit(0, &[(header, 16, false), (1 << 40, 512, true), (status, 1, true)]);
    assert_eq!(driver.used_idx(0), used.wrapping_add(1), "the bad chain is returned, not hung");

    // A loop: a descriptor whose next is itself.
    let used = driver.used_idx(0);
    let head = driver.queues[0].next_desc;
    driver.descriptor(0, head, header, 16, virtq::NEXT, head);
    driver.queues[0].next_desc = (head + 1) % QUEUE_LEN;
    driver.make_available(0, head);
    assert_eq!(driver.used_idx(0), used.wrapping_add(1));

    // Wrong direction: the status byte is not device-writable.
    let used = driver.used_idx(0);
    driver.submit(0, &[(header, 16, false), (status, 1, false)]);
    assert_eq!(driver.used_idx(0), used.wrapping_add(1));
    assert_eq!(driver.memory.read_obj::<u8>(GuestAddress(status)).unwrap(), 0xff, "nothing was written into a readable buffer");

    // The device still serves good requests.
    assert_eq!(read_sectors(&mut driver, 2, 512), vec![2u8; 512]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_restored_clone_continues_the_queue_on_its_own_copy_of_the_disk() {
    let dir = temp_dir("snapshot");
    let base = base_image(&dir);
    let mut driver = block_driver(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    let written = vec![0x5a; 4096];
    assert_eq!(request(&mut driver, OUT, 16, Some((&written, false))).0, OK);

    // Snapshot: transport state, and the overlay saved beside it.
    let snapshot = dir.join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    driver.transport.save_backing(&snapshot, 0).unwrap();
    let state = driver.transport.save();
    assert!(state.activated);
    assert_eq!(state.queues[0].next_avail, 1, "one request was taken from the queue");
    let clone_memory = driver.memory_copy();

    // The original keeps writing after the snapshot; the clone must not see it.
    assert_eq!(request(&mut driver, OUT, 16, Some((&[0x11; 4096], false))).0, OK);

    let clone_overlay = dir.join("clone.overlay");
    block::copy_overlay(&block::snapshot_overlay(&snapshot, 0), &clone_overlay).unwrap();
    let clone_device = Block::new(CowDisk::open(&base, &clone_overlay).unwrap(), false, "sandbox-disk");
    let args = Driver::restore_args(Box::new(clone_device), &clone_memory);
    let mut clone = block_driver(device(&dir, &base, "unused.overlay"));
    clone.transport = MmioTransport::restore(args, &state).unwrap();
    clone.memory = clone_memory;
    clone.queues = std::mem::take(&mut driver.queues);
    // The driver's view of the queue as it was at the snapshot (one
    // three-part request); no setup: the next request goes through the
    // restored queue.
    clone.queues[0].avail_idx = 1;
    clone.queues[0].next_desc = 3;
    assert_eq!(clone.read(0x70) & 4, 4, "the device is live (DRIVER_OK) without a new handshake");
    assert_eq!(read_sectors(&mut clone, 16, 4096), written, "the clone reads what was on disk at the snapshot");
    assert_eq!(read_sectors(&mut clone, 2, 512), vec![2u8; 512], "and the base where nothing was written");
    assert_eq!(clone.used_idx(0), 3, "the used ring continues from the snapshot's index");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restore_refuses_a_device_that_differs_from_the_snapshot() {
    let dir = temp_dir("mismatch");
    let base = base_image(&dir);
    let mut driver = block_driver(device(&dir, &base, "a.overlay"));
    driver.initialize(VERSION_1);
    let state = driver.transport.save();
    let memory = Driver::memory(16 << 20);

    let vsock = sandbox_vmm::devices::virtio::vsock::Vsock::new(3, dir.join("v.sock")).unwrap();
    let error = MmioTransport::restore(Driver::restore_args(Box::new(vsock), &memory), &state).err().unwrap();
    assert!(matches!(error, MmioError::DeviceType { saved: 2, given: 19 }), "{error}");

    let smaller = dir.join("small.img");
    std::fs::write(&smaller, vec![0u8; 4096]).unwrap();
    let other_disk = Block::new(CowDisk::open(&smaller, &dir.join("s.overlay")).unwrap(), false, "sandbox-disk");
    let error = MmioTransport::restore(Driver::restore_args(Box::new(other_disk), &memory), &state).err().unwrap();
    assert!(matches!(error, MmioError::Config(2)), "{error}");
    assert!(error.to_string().contains("restore with the same images"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}
