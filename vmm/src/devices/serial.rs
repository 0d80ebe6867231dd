//! The 8250 UART console on COM1 (port 0x3f8, IRQ 4), emulated by
//! vm-superio; what the guest prints goes to a writer (a log file).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::{
    serial::{NoEvents, SerialState},
    Serial, Trigger,
};
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

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("the saved serial input ({0} bytes) does not fit the UART's FIFO: the snapshot is corrupt")]
    FullFifo(usize),
}

/// The UART's registers and pending input, as snapshots keep them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialConsoleState {
    fn from(s: SerialState) -> Self {
        let registers = [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        Self { registers, in_buffer: s.in_buffer }
    }
}

impl From<&SerialConsoleState> for SerialState {
    fn from(s: &SerialConsoleState) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl<W: Write + Send> SerialConsole<W> {
    pub fn new(interrupt: EventFd, out: W) -> Self {
        Self { uart: Serial::new(IrqTrigger(interrupt), out) }
    }

    /// A UART continuing from `state` (after a snapshot restore).
    pub fn from_state(state: &SerialConsoleState, interrupt: EventFd, out: W) -> Result<Self, SerialError> {
        let uart = Serial::from_state(&SerialState::from(state), IrqTrigger(interrupt), NoEvents, out)
            .map_err(|_| SerialError::FullFifo(state.in_buffer.len()))?;
        Ok(Self { uart })
    }

    /// Raises the interrupt again if the UART has one pending (a restored
    /// UART's last interrupt may have been raised before the vCPUs existed,
    /// and a guest waiting for "transmitter empty" would wait forever).
    pub fn raise_pending(&self) {
        const NO_INTERRUPT_PENDING: u8 = 1;
        if self.uart.state().interrupt_identification & NO_INTERRUPT_PENDING == 0 {
            let _ = self.uart.interrupt_evt().trigger();
        }
    }

    pub fn state(&self) -> SerialConsoleState {
        self.uart.state().into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_survive_a_state_round_trip() {
        let event = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut console = SerialConsole::new(event(), Vec::new());
        console.write(3, &[0x1b]); // LCR: 8 data bits, 1 stop bit, even parity
        console.write(7, &[0x5a]); // SCR
        console.write(1, &[0x01]); // IER: received-data interrupt
        let state = console.state();
        let mut restored = SerialConsole::from_state(&state, event(), Vec::new()).unwrap();
        for (offset, expected) in [(3u64, 0x1bu8), (7, 0x5a), (1, 0x01)] {
            let mut byte = [0u8];
            restored.read(offset, &mut byte);
            assert_eq!(byte[0], expected, "register {offset}");
        }
        let oversized = SerialConsoleState { in_buffer: vec![0; 4096], ..state };
        assert!(SerialConsole::from_state(&oversized, event(), Vec::new()).is_err());
    }
}
