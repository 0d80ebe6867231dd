//! A minimal virtio driver for host-side device tests: it negotiates
//! features over the MMIO transport and drives split queues in guest
//! memory exactly as a guest driver would.

#![allow(dead_code)]

use std::sync::Arc;

use sandbox_vmm::devices::{
    bus::BusDevice,
    virtio::{
        mmio::{MmioTransport, MmioTransportArgs},
        Interrupt, VirtioDevice,
    },
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_LEN: u16 = 16;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const VERSION_1: u64 = 1 << 32;
const BUFFERS: u64 = 0x100000;

/// One split queue's rings and the driver's positions in them.
pub struct SplitQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub seen_used: u16,
}

pub struct Driver {
    pub memory: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<SplitQueue>,
    next_buffer: u64,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>, memory: GuestMemoryMmap) -> Driver {
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let queue_count = device.queue_max_sizes().len() as u64;
        let transport = MmioTransport::new(device, memory.clone(), interrupt.clone());
        let queues = (0..queue_count)
            .map(|i| {
                let base = 0x10000 + i * 0x4000;
                SplitQueue { desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0, seen_used: 0 }
            })
            .collect();
        Driver { memory, transport, interrupt, queues, next_buffer: BUFFERS }
    }

    pub fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// A copy of this driver's guest memory, as a snapshot restore would
    /// bring it back.
    pub fn memory_copy(&self) -> GuestMemoryMmap {
        let size = self.memory.last_addr().raw_value() as usize + 1;
        let copy = Driver::memory(size);
        let mut bytes = vec![0u8; size];
        self.memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        copy.write_slice(&bytes, GuestAddress(0)).unwrap();
        copy
    }

    /// Arguments to restore a transport for `device` over `memory`.
    pub fn restore_args(device: Box<dyn VirtioDevice>, memory: &GuestMemoryMmap) -> MmioTransportArgs {
        MmioTransportArgs { device, memory: memory.clone(), interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()) }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `driver_features`, sets up every queue, and returns the
    /// final device status.
    pub fn initialize(&mut self, driver_features: u64) -> u32 {
        self.write(0x70, 1 | 2);
        for (select, word) in [(0, driver_features as u32), (1, (driver_features >> 32) as u32)] {
            self.write(0x24, select);
            self.write(0x20, word);
        }
        self.write(0x70, 1 | 2 | 8);
        for index in 0..self.queues.len() {
            let (desc, avail, used) = (self.queues[index].desc, self.queues[index].avail, self.queues[index].used);
            self.write(0x30, index as u32);
            self.write(0x38, u32::from(QUEUE_LEN));
            for (offset, address) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                self.write(offset, address as u32);
                self.write(offset + 4, (address >> 32) as u32);
            }
            self.write(0x44, 1);
        }
        let status = self.read(0x70);
        self.write(0x70, status | 4);
        self.read(0x70)
    }

    /// Copies `bytes` to a fresh buffer in guest memory; returns its address.
    pub fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let address = self.next_buffer;
        self.memory.write_slice(bytes, GuestAddress(address)).unwrap();
        self.next_buffer += (bytes.len() as u64).next_multiple_of(64).max(64);
        address
    }

    /// Writes one raw descriptor of queue `queue`.
    pub fn descriptor(&mut self, queue: usize, index: u16, address: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.queues[queue].desc + u64::from(index) * 16);
        self.memory.write_obj(address, at).unwrap();
        self.memory.write_obj(len, at.unchecked_add(8)).unwrap();
        self.memory.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.memory.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Chains `parts` (address, len, device-writable) on `queue`, makes the
    /// chain available and notifies the device.
    pub fn submit(&mut self, queue: usize, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.queues[queue].next_desc;
        for (i, &(address, len, writable)) in parts.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_LEN;
            let flags = if i + 1 < parts.len() { NEXT } else { 0 } | if writable { WRITE } else { 0 };
            self.descriptor(queue, index, address, len, flags, (index + 1) % QUEUE_LEN);
        }
        self.queues[queue].next_desc = (head + parts.len() as u16) % QUEUE_LEN;
        self.make_available(queue, head);
        head
    }

    pub fn make_available(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = GuestAddress(q.avail + 4 + u64::from(q.avail_idx % QUEUE_LEN) * 2);
        self.memory.write_obj(head, slot).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        let (avail, idx) = (q.avail, q.avail_idx);
        self.memory.write_obj(idx, GuestAddress(avail + 2)).unwrap();
        self.write(0x50, queue as u32);
    }

    pub fn used_idx(&self, queue: usize) -> u16 {
        self.memory.read_obj(GuestAddress(self.queues[queue].used + 2)).unwrap()
    }

    /// The next used element of `queue` (descriptor head, bytes written), if any.
    pub fn pop_used(&mut self, queue: usize) -> Option<(u16, u32)> {
        let used_idx = self.used_idx(queue);
        let q = &mut self.queues[queue];
        if q.seen_used == used_idx {
            return None;
        }
        let at = GuestAddress(q.used + 4 + u64::from(q.seen_used % QUEUE_LEN) * 8);
        q.seen_used = q.seen_used.wrapping_add(1);
        let id: u32 = self.memory.read_obj(at).unwrap();
        let len: u32 = self.memory.read_obj(at.unchecked_add(4)).unwrap();
        Some((id as u16, len))
    }

    /// The address of descriptor `index` of `queue`.
    pub fn descriptor_address(&self, queue: usize, index: u16) -> u64 {
        self.memory.read_obj(GuestAddress(self.queues[queue].desc + u64::from(index) * 16)).unwrap()
    }
}
