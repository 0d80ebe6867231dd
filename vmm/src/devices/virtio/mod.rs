//! Virtio devices over the virtio-mmio transport: the device trait, the
//! interrupt a device raises, and the devices themselves.

pub mod block;
pub mod mmio;
pub mod vsock;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// VIRTIO_F_VERSION_1: the modern interface, which the transport requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device type of a vsock device.
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 1;

/// The interrupt line of one device: an irqfd plus the InterruptStatus
/// register the driver reads and acknowledges.
pub struct Interrupt {
    event: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    pub fn new(event: EventFd) -> Arc<Self> {
        Arc::new(Self { event, status: AtomicU32::new(0) })
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INTERRUPT_USED_BUFFER, Ordering::SeqCst);
        // A full eventfd counter still raises the interrupt: nothing is lost.
        let _ = self.event.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus as a snapshot recorded it (the line is raised
    /// again by [`Interrupt::raise_pending`] once the vCPUs run).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Raises the line again while InterruptStatus has bits the driver has
    /// not acknowledged: an interrupt raised while the VM had no running
    /// vCPUs (during a restore) may never have reached the guest. A spurious
    /// one costs the driver a status read.
    pub fn raise_pending(&self) {
        if self.status() != 0 {
            let _ = self.event.write(1);
        }
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd (registered with KVM as an irqfd).
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("the driver set up {0} queues; the device has {1}")]
    QueueCount(usize, usize),
    #[error("queue {0} is not valid in guest memory (addresses or size)")]
    InvalidQueue(usize),
    #[error("device I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific configuration space (little-endian).
    fn config_space(&self) -> &[u8];
    /// Starts the device with the driver's queues.
    fn activate(&mut self, memory: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), VirtioError>;
    /// Processes what the driver made available on queue `index`.
    fn process_queue(&mut self, index: usize);
    /// Returns the device to its state before activation.
    fn reset(&mut self);
    /// The state of the queues an active device owns (empty when inactive).
    fn queue_states(&self) -> Vec<QueueState>;
    /// Called once after the device was re-activated from a snapshot, before
    /// the guest runs again.
    fn restored(&mut self) {}
    /// While paused, a device with threads of its own (vsock) must not touch
    /// guest memory; it catches up when unpaused.
    fn set_paused(&mut self, _paused: bool) {}
    /// Writes the host-side data the device keeps outside guest memory (a
    /// disk's overlay) into the snapshot directory `dir`, as slot `slot`.
    fn save_backing(&mut self, _dir: &Path, _slot: usize) -> Result<(), VirtioError> {
        Ok(())
    }
}

/// Reads `data.len()` bytes of a little-endian config space at `offset`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = offset as usize;
    if let Some(source) = config.get(start..start.saturating_add(data.len())) {
        data.copy_from_slice(source);
    } else {
        data.fill(0);
    }
}
