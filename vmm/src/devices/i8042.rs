//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine (writing 0xfe to port 0x64), which shuts the microVM down.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::vstate::vcpu::{ExitSignal, VmExit};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const RESET_COMMAND: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&RESET_COMMAND) {
            self.exit.report(VmExit::Reset);
        }
    }
}
