//! Counted slots for what the agent bounds by number (forwarded
//! connections, watches): a slot is taken for as long as its guard lives.

use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

/// At most `max` of one kind of thing at once.
pub struct Slots {
    open: AtomicUsize,
    max: usize,
    /// What is counted, for the refusal: "forwarded connections".
    what: &'static str,
}

impl Slots {
    pub const fn new(max: usize, what: &'static str) -> Self {
        Self { open: AtomicUsize::new(0), max, what }
    }

    /// A slot, or RESOURCE_EXHAUSTED when all are taken.
    pub fn take(&'static self) -> Result<Slot, Status> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "{} {} are open in this sandbox: close some first",
                self.max, self.what
            )));
        }
        Ok(Slot(self))
    }
}

/// One taken slot, given back on drop.
pub struct Slot(&'static Slots);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}
