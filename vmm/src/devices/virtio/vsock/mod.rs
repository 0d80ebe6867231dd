//! virtio-vsock: stream sockets between the guest and host processes.
//! The host side is a unix socket at `uds_path`. A host process connects
//! to it and writes `CONNECT <port>\n`; once the guest accepts, it reads
//! `OK <host port>\n` and the stream carries the connection's bytes. A
//! guest connecting to host port P reaches whoever listens on
//! `<uds_path>_<P>`. Credit-based flow control follows the virtio spec.

mod muxer;
pub mod packet;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, VirtioError, TYPE_VSOCK};
use crate::vstate::memory::GuestMemory;
use muxer::Muxer;

const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// The vsock device.
pub struct Vsock {
    /// The config space: the guest's context id.
    config: [u8; 8],
    muxer: Arc<Mutex<Muxer>>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Vsock {
    /// Listens on `uds_path` for host connections to guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VirtioError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let muxer = Arc::new(Mutex::new(Muxer::new(guest_cid, uds_path)?));
        let thread = muxer::spawn_event_loop(Arc::clone(&muxer), stop.try_clone()?)?;
        Ok(Self { config: guest_cid.to_le_bytes(), muxer, stop, thread: Some(thread) })
    }

    /// A handle that outlives handing the device to its transport.
    pub fn control(&self) -> VsockControl {
        VsockControl(Arc::clone(&self.muxer))
    }
}

/// Host-side control of a vsock device.
#[derive(Clone)]
pub struct VsockControl(Arc<Mutex<Muxer>>);

impl VsockControl {
    /// Drops every connection and tells the guest its transport was reset
    /// (after a snapshot restore, old connections cannot continue).
    pub fn reset_connections(&self) {
        lock(&self.0).reset_connections();
    }
}

fn lock(muxer: &Mutex<Muxer>) -> std::sync::MutexGuard<'_, Muxer> {
    muxer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, memory: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), VirtioError> {
        if queues.len() != 3 {
            return Err(VirtioError::QueueCount(queues.len(), 3));
        }
        lock(&self.muxer).activate(memory, queues, interrupt);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let mut muxer = lock(&self.muxer);
        match index {
            TX_QUEUE => muxer.process_tx(),
            EVENT_QUEUE => muxer.event_buffers_returned(),
            _ => {}
        }
        muxer.fill_rx();
    }

    fn reset(&mut self) {
        lock(&self.muxer).deactivate();
    }

    fn queue_states(&self) -> Vec<QueueState> {
        lock(&self.muxer).queue_states()
    }

    fn set_paused(&mut self, paused: bool) {
        lock(&self.muxer).set_paused(paused);
    }

    /// Connections from before the snapshot cannot continue: the guest
    /// hears of a transport reset and drops them.
    fn restored(&mut self) {
        lock(&self.muxer).reset_connections();
    }
}

/// How long the event loop may take to see its stop signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for Vsock {
    /// Stops the event loop; one that does not stop in time (asleep on a
    /// guest page that will never be served) is left to die with the
    /// process rather than joined forever.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let Some(thread) = self.thread.take() else { return };
        let started = Instant::now();
        while !thread.is_finished() && started.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            eprintln!("sandbox-vmm: the vsock thread did not stop within {STOP_TIMEOUT:?}");
        }
    }
}
