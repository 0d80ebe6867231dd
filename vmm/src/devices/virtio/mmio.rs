//! The virtio-mmio transport (version 2, the modern layout): the register
//! window a driver uses to discover a device, negotiate features, set up
//! queues, notify and acknowledge interrupts. Its state (registers, queue
//! positions, whether the device is live) is saved in snapshots; restoring
//! re-activates the device on the saved queues, so a guest driver carries
//! on where it stopped.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::{devices::bus::BusDevice, snapshot::persist::Persist, vstate::memory::GuestMemory};

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5344_4258; // "XBDS"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// The kernel command-line fragment that announces a device at `base` on `irq`.
pub fn cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("the snapshot has a virtio device of type {saved} on this slot, the VM was given type {given}: restore with the devices the snapshot was taken with")]
    DeviceType { saved: u32, given: u32 },
    #[error("the virtio device of type {0} differs from the snapshot's (its configuration, such as a disk's size, changed): restore with the same images")]
    Config(u32),
    #[error("queue {index} of the snapshot is not valid: {reason}; the snapshot is corrupt, rebuild it")]
    Queue { index: usize, reason: String },
    #[error("the snapshot has {saved} queues for a device with {given}: rebuild the snapshot")]
    QueueCount { saved: usize, given: usize },
    #[error("cannot re-activate the virtio device of type {device_type}: {source}")]
    Activate { device_type: u32, source: VirtioError },
}

/// One split queue as a snapshot keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl SavedQueue {
    fn to_queue(&self, index: usize) -> Result<Queue, MmioError> {
        let state = QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
        };
        Queue::try_from(state).map_err(|error| MmioError::Queue { index, reason: error.to_string() })
    }
}

/// The transport's registers, its queues and the device's identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    /// The device's config space when saved; a restore must match it.
    pub config: Vec<u8>,
    pub queues: Vec<SavedQueue>,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
}

/// What restoring a transport needs: the device (built from the VM's
/// configuration), guest memory and the slot's interrupt.
pub struct MmioTransportArgs {
    pub device: Box<dyn VirtioDevice>,
    pub memory: GuestMemory,
    pub interrupt: Arc<Interrupt>,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, memory: GuestMemory, interrupt: Arc<Interrupt>) -> Self {
        let queues = fresh_queues(device.as_ref());
        Self {
            device,
            memory,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue setup is only allowed before the driver is done.
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_select = value,
            0x020 => self.accept_driver_features(value),
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_size(value as u16);
                }
            }
            0x044 => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            0x050 if self.activated && (value as usize) < self.device.queue_max_sizes().len() => {
                self.device.process_queue(value as usize);
            }
            0x064 => self.interrupt.acknowledge(value),
            0x070 => self.set_status(value),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.set_queue_address(offset, value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, offset: u64, value: u32) {
        let Some(queue) = self.selected_queue() else { return };
        let (low, high) = if offset & 4 == 0 { (Some(value), None) } else { (None, Some(value)) };
        match offset & !4 {
            0x080 => queue.set_desc_table_address(low, high),
            0x090 => queue.set_avail_ring_address(low, high),
            _ => queue.set_used_ring_address(low, high),
        }
    }

    fn accept_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features = (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        let valid = self.status & ready == ready && self.queues.iter().all(|q| q.ready() && q.is_valid(&self.memory));
        if !valid {
            self.status |= STATUS_FAILED;
            return;
        }
        // The device owns the queues while active; a reset sets up new ones.
        let queues = std::mem::take(&mut self.queues);
        match self.device.activate(self.memory.clone(), queues, Arc::clone(&self.interrupt)) {
            Ok(()) => self.activated = true,
            Err(_) => self.status |= STATUS_FAILED,
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.acknowledge(u32::MAX);
        self.queues = fresh_queues(self.device.as_ref());
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device.queue_max_sizes().iter().map(|&max| Queue::new(max).expect("device queue sizes are powers of two")).collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            read_config_bytes(self.device.config_space(), offset - 0x100, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 0x100 && data.len() == 4 {
            self.write_register(offset, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
        }
    }
}

impl MmioTransport {
    /// Stops or restarts the device's work on guest memory outside vCPU
    /// exits; on restart, raises any interrupt the guest has not seen.
    pub fn set_paused(&mut self, paused: bool) {
        self.device.set_paused(paused);
        if !paused {
            self.interrupt.raise_pending();
        }
    }

    /// Lets the device write its host-side data into a snapshot directory.
    pub fn save_backing(&mut self, dir: &std::path::Path, slot: usize) -> Result<(), VirtioError> {
        self.device.save_backing(dir, slot)
    }
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioError;

    fn save(&self) -> MmioTransportState {
        // An active device owns its queues; otherwise the transport does.
        let queues = if self.activated { self.device.queue_states() } else { self.queues.iter().map(Queue::state).collect() };
        MmioTransportState {
            device_type: self.device.device_type(),
            config: self.device.config_space().to_vec(),
            queues: queues.into_iter().map(SavedQueue::from).collect(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
        }
    }

    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let given = args.device.device_type();
        if given != state.device_type {
            return Err(MmioError::DeviceType { saved: state.device_type, given });
        }
        if args.device.config_space() != state.config.as_slice() {
            return Err(MmioError::Config(given));
        }
        let queue_count = args.device.queue_max_sizes().len();
        if state.queues.len() != queue_count {
            return Err(MmioError::QueueCount { saved: state.queues.len(), given: queue_count });
        }
        let queues = state.queues.iter().enumerate().map(|(index, q)| q.to_queue(index)).collect::<Result<Vec<_>, _>>()?;
        let mut transport = Self::new(args.device, args.memory, args.interrupt);
        transport.queue_select = state.queue_select;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.driver_features = state.driver_features;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        // Before re-activation, which may already raise the interrupt.
        transport.interrupt.restore_status(state.interrupt_status);
        if state.activated {
            transport
                .device
                .activate(transport.memory.clone(), queues, Arc::clone(&transport.interrupt))
                .map_err(|source| MmioError::Activate { device_type: given, source })?;
            transport.activated = true;
            transport.device.restored();
        } else {
            transport.queues = queues;
        }
        Ok(transport)
    }
}
