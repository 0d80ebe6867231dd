//! An address bus: non-overlapping ranges, each owned by one device. The
//! same type routes port I/O (16-bit ports) and MMIO (guest addresses).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// A device reached through the bus. Offsets are relative to the base of
/// the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("the range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("a bus range cannot be empty")]
    Empty,
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes accesses to the device whose range holds the address.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty);
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(start, entry)| start + entry.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, address: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, entry) = self.devices.range(..=address).next_back()?;
        (address - base < entry.len).then_some((address - base, &entry.device))
    }

    /// Reads from the device at `address`; returns false (and leaves
    /// `data` as it was) when no device is there.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        let Some((offset, device)) = self.find(address) else { return false };
        device.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).read(offset, data);
        true
    }

    /// Writes to the device at `address`; returns false when no device is there.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        let Some((offset, device)) = self.find(address) else { return false };
        device.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::default();
        let device = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, device.clone()).unwrap();
        assert_eq!(bus.insert(0x10f, 1, device.clone()), Err(BusError::Overlap { base: 0x10f, len: 1 }));
        assert_eq!(bus.insert(0xf8, 0x10, device.clone()), Err(BusError::Overlap { base: 0xf8, len: 0x10 }));
        bus.insert(0x110, 1, device.clone()).unwrap();
        assert!(bus.write(0x104, &[7]));
        assert!(!bus.write(0x111, &[7]));
        let mut data = [0u8; 2];
        assert!(bus.read(0x103, &mut data));
        assert_eq!(data, [3, 3]);
        assert_eq!(device.lock().unwrap().0, vec![(4, vec![7])]);
    }
}
