//! virtio-blk over a copy-on-write disk: a read-only base image shared by
//! every sandbox of a template, and a per-sandbox sparse overlay that takes
//! every write. A cluster written once is read from the overlay from then
//! on; the base file is never opened for writing. A snapshot keeps a copy
//! of the overlay, and every clone starts from its own copy of that.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use virtio_queue::{Queue, QueueState, QueueT};

use super::{Interrupt, VirtioDevice, VirtioError, TYPE_BLOCK};
use crate::vstate::memory::GuestMemory;

const SECTOR: u64 = 512;
/// Copy-on-write granularity.
const CLUSTER: u64 = 4096;
const QUEUE_SIZE: u16 = 256;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const REQUEST_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPPORTED: u8 = 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
const FEATURE_READ_ONLY: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device takes flush requests.
const FEATURE_FLUSH: u64 = 1 << 9;
const ID_LEN: usize = 20;

/// A disk whose writes land in an overlay file, cluster by cluster.
pub struct CowDisk {
    base: File,
    overlay: File,
    /// Persisted copy of `written`, rewritten on flush.
    bitmap: File,
    /// One bit per cluster: set when the overlay holds the cluster.
    written: Vec<u64>,
    size: u64,
}

impl CowDisk {
    /// Opens `base` read-only and `overlay` (created sparse if missing);
    /// the written-cluster bitmap is kept next to the overlay.
    pub fn open(base: &Path, overlay: &Path) -> std::io::Result<Self> {
        let base_file = File::open(base)?;
        let size = base_file.metadata()?.len() / SECTOR * SECTOR;
        let overlay_file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(overlay)?;
        overlay_file.set_len(size)?;
        let written = read_bitmap(overlay, size).unwrap_or_else(|| vec![0; bitmap_words(size)]);
        let bitmap = OpenOptions::new().write(true).create(true).truncate(false).open(bitmap_path(overlay))?;
        Ok(Self { base: base_file, overlay: overlay_file, bitmap, written, size })
    }

    /// Makes the disk durable and copies its overlay (written clusters and
    /// bitmap) to `to`.
    pub fn export_overlay(&self, to: &Path) -> std::io::Result<()> {
        self.flush()?;
        write_overlay_copy(&self.overlay, self.size, &self.written, to)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn is_written(&self, cluster: u64) -> bool {
        cluster_written(&self.written, cluster)
    }

    fn mark_written(&mut self, cluster: u64) {
        self.written[(cluster / 64) as usize] |= 1 << (cluster % 64);
    }

    /// Reads `buf.len()` bytes at `offset`, from the overlay where written.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let len = ((CLUSTER - at % CLUSTER) as usize).min(buf.len() - done);
            let file = if self.is_written(at / CLUSTER) { &self.overlay } else { &self.base };
            file.read_exact_at(&mut buf[done..done + len], at)?;
            done += len;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay, copying up partially
    /// written clusters from the base first.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.check_range(offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let cluster = at / CLUSTER;
            let within = (at % CLUSTER) as usize;
            let len = (CLUSTER as usize - within).min(data.len() - done);
            if !self.is_written(cluster) && len < CLUSTER as usize {
                let mut whole = vec![0u8; CLUSTER as usize];
                self.base.read_exact_at(&mut whole, cluster * CLUSTER)?;
                whole[within..within + len].copy_from_slice(&data[done..done + len]);
                self.overlay.write_all_at(&whole, cluster * CLUSTER)?;
            } else {
                self.overlay.write_all_at(&data[done..done + len], at)?;
            }
            self.mark_written(cluster);
            done += len;
        }
        Ok(())
    }

    /// Makes the overlay and its bitmap durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.overlay.sync_data()?;
        self.bitmap.write_all_at(&bitmap_bytes(&self.written), 0)?;
        self.bitmap.sync_data()
    }

    fn check_range(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "request beyond the end of the disk")),
        }
    }
}

/// Where the written-cluster bitmap of `overlay` is kept.
fn bitmap_path(overlay: &Path) -> PathBuf {
    overlay.with_extension("bitmap")
}

/// Whether the bitmap `written` marks `cluster` as held by the overlay.
fn cluster_written(written: &[u64], cluster: u64) -> bool {
    written[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
}

/// Words of the written-cluster bitmap of a disk of `size` bytes.
fn bitmap_words(size: u64) -> usize {
    size.div_ceil(CLUSTER).div_ceil(64) as usize
}

/// The bitmap as it is persisted (little-endian words).
fn bitmap_bytes(written: &[u64]) -> Vec<u8> {
    written.iter().flat_map(|word| word.to_le_bytes()).collect()
}

/// The persisted bitmap of `overlay`; `None` if it is missing or does not
/// fit a disk of `size` bytes.
fn read_bitmap(overlay: &Path, size: u64) -> Option<Vec<u64>> {
    let bytes = std::fs::read(bitmap_path(overlay)).ok()?;
    (bytes.len() == bitmap_words(size) * 8)
        .then(|| bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Copies an overlay to `to`: only its written clusters (the copy stays
/// sparse) and its bitmap. A clone of a snapshot starts from such a copy.
pub fn copy_overlay(from: &Path, to: &Path) -> std::io::Result<()> {
    let source = File::open(from)?;
    let size = source.metadata()?.len();
    // Without its bitmap an overlay reads as the bare base image: refuse.
    let written = read_bitmap(from, size).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} does not fit its overlay", bitmap_path(from).display()))
    })?;
    write_overlay_copy(&source, size, &written, to)
}

/// Writes the clusters `written` marks, from `source`, and that bitmap as
/// the overlay `to` of a disk of `size` bytes.
fn write_overlay_copy(source: &File, size: u64, written: &[u64], to: &Path) -> std::io::Result<()> {
    let target = OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    target.set_len(size)?;
    let mut cluster = vec![0u8; CLUSTER as usize];
    for index in 0..size.div_ceil(CLUSTER) {
        if cluster_written(written, index) {
            let offset = index * CLUSTER;
            let len = CLUSTER.min(size - offset) as usize;
            source.read_exact_at(&mut cluster[..len], offset)?;
            target.write_all_at(&cluster[..len], offset)?;
        }
    }
    target.sync_data()?;
    std::fs::write(bitmap_path(to), bitmap_bytes(written))
}

/// The overlay of the disk on virtio slot `slot` inside snapshot directory `dir`.
pub fn snapshot_overlay(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("disk{slot}.overlay"))
}

/// The virtio-blk device.
pub struct Block {
    disk: CowDisk,
    read_only: bool,
    id: [u8; ID_LEN],
    config: [u8; 8],
    active: Option<(GuestMemory, Vec<Queue>, Arc<Interrupt>)>,
}

impl Block {
    pub fn new(disk: CowDisk, read_only: bool, id: &str) -> Self {
        let mut serial = [0u8; ID_LEN];
        for (slot, byte) in serial.iter_mut().zip(id.bytes()) {
            *slot = byte;
        }
        let config = (disk.size() / SECTOR).to_le_bytes();
        Self { disk, read_only, id: serial, config, active: None }
    }

    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    /// Serves one request chain; returns the bytes written to the driver.
    fn serve(&mut self, memory: &GuestMemory, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(memory), chain.writer(memory)) else {
            return 0;
        };
        // The status byte is the last writable byte of the chain.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else { return 0 };
        let Ok(mut status_writer) = writer.split_at(data_len) else { return 0 };
        let status = match (reader.read_obj::<u32>(), reader.read_obj::<u32>(), reader.read_obj::<u64>()) {
            (Ok(kind), Ok(_reserved), Ok(sector)) => self.execute(kind, sector, &mut reader, &mut writer, data_len),
            _ => STATUS_IOERR,
        };
        let _ = status_writer.write_obj(status);
        (writer.bytes_written() + status_writer.bytes_written()) as u32
    }

    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
        data_len: usize,
    ) -> u8 {
        let Some(offset) = sector.checked_mul(SECTOR) else { return STATUS_IOERR };
        let result = match kind {
            REQUEST_IN => {
                let mut data = vec![0u8; data_len];
                self.disk.read_at(&mut data, offset).and_then(|()| std::io::Write::write_all(writer, &data))
            }
            REQUEST_OUT if self.read_only => return STATUS_IOERR,
            REQUEST_OUT => {
                let mut data = vec![0u8; reader.available_bytes()];
                std::io::Read::read_exact(reader, &mut data).and_then(|()| self.disk.write_at(&data, offset))
            }
            REQUEST_FLUSH => self.disk.flush(),
            REQUEST_GET_ID => std::io::Write::write_all(writer, &self.id[..data_len.min(ID_LEN)]),
            _ => return STATUS_UNSUPPORTED,
        };
        if result.is_ok() { STATUS_OK } else { STATUS_IOERR }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        FEATURE_FLUSH | if self.read_only { FEATURE_READ_ONLY } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, memory: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), VirtioError> {
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount(queues.len(), 1));
        }
        self.active = Some((memory, queues, interrupt));
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some((memory, mut queues, interrupt)) = self.active.take() else { return };
        let mut used_any = false;
        if let Some(queue) = queues.get_mut(index) {
            while let Some(chain) = queue.pop_descriptor_chain(&memory) {
                let head = chain.head_index();
                let written = self.serve(&memory, chain);
                if queue.add_used(&memory, head, written).is_ok() {
                    used_any = true;
                }
            }
        }
        if used_any {
            interrupt.signal_used_queue();
        }
        self.active = Some((memory, queues, interrupt));
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |(_, queues, _)| queues.iter().map(Queue::state).collect())
    }

    fn save_backing(&mut self, dir: &Path, slot: usize) -> Result<(), VirtioError> {
        Ok(self.disk.export_overlay(&snapshot_overlay(dir, slot))?)
    }
}
