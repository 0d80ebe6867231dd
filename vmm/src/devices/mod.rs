//! Emulated devices and the buses that route guest port I/O and MMIO to them.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
