//! The 8250 UART console on COM1 (port 0x3f8, IRQ 4), emulated by
//! vm-superio; what the guest prints goes to a writer (a log file).

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's first port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ports.
pub const COM1_LEN: u64 = 8;
/// COM1's interrupt line.
pub const COM1_GSI: u32 = 4;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// A UART whose output goes to `W`.
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, W>,
}

impl<W: Write + Send> SerialConsole<W> {
    pub fn new(interrupt: EventFd, out: W) -> Self {
        Self { uart: Serial::new(IrqTrigger(interrupt), out) }
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(byte), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&byte), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // A failed write to the log loses console output, never the guest.
            let _ = self.uart.write(offset, byte);
        }
    }
}
