//! Builds and runs a microVM: memory, the KVM VM, the kernel and boot data,
//! the serial console and i8042, extra bus devices, and one thread per vCPU.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use vmm_sys_util::eventfd::EventFd;

use crate::{
    boot::{self, BootError, LoadedKernel},
    snapshot::{persist::Persist, MicroVmState, RestoredMemory, StateError},
    devices::{
        bus::{Bus, BusDevice, BusError},
        i8042::{I8042, I8042_LEN, I8042_PORT},
        serial::{SerialConsole, SerialConsoleState, SerialError, COM1_GSI, COM1_LEN, COM1_PORT},
        virtio::{
            mmio::{self, MmioError, MmioTransport, MmioTransportArgs, MMIO_LEN},
            Interrupt, VirtioDevice,
        },
    },
    vstate::{
        memory::{create_guest_memory, GuestMemory, MemoryError},
        vcpu::{ExitSignal, Vcpu, VcpuError, VcpuHandle, VmExit},
        vm::{Vm, VmError},
    },
};

/// How long a pause may take before the VM is reported stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create a vCPU: {0}")]
    CreateVcpu(kvm_ioctls::Error),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("a microVM needs 1 to 32 vCPUs and at least 16 MiB of memory")]
    Shape,
    #[error("cannot restore the snapshot state: {0}")]
    Restore(#[from] StateError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("the snapshot has {saved} virtio devices but the VM was given {given}: restore with the devices the snapshot was taken with")]
    DeviceCount { saved: usize, given: usize },
    #[error("cannot restore virtio slot {slot}: {source}")]
    RestoreDevice { slot: usize, source: MmioError },
}

/// A virtio-mmio transport as the bus and the snapshot code share it.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// What to boot.
pub struct MicroVmConfig {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// Virtio devices, placed on virtio-mmio slots and announced on the
    /// kernel command line in this order.
    pub virtio: Vec<Box<dyn VirtioDevice>>,
}

/// Guest-physical base of the first virtio-mmio slot (in the MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt line of the first virtio-mmio slot.
pub const VIRTIO_FIRST_IRQ: u32 = 5;

/// The serial console, writing to whatever sink the VM was given.
type Console = SerialConsole<Box<dyn Write + Send>>;

/// How the vCPUs get their first state.
enum VcpuInit {
    /// Boot the kernel; optionally every vCPU at its entry point.
    Boot { kernel: LoadedKernel, count: u8, all_at_entry: bool },
    /// Continue from a snapshot, paused until `resume`.
    Restore(Arc<MicroVmState>),
}

/// A microVM whose devices can still be added before it starts.
pub struct MicroVmBuilder {
    vm: Vm,
    /// Memory restored from a snapshot (its uffd handler runs until drop).
    restored: Option<RestoredMemory>,
    init: VcpuInit,
    vcpu_seccomp: Option<Arc<seccompiler::BpfProgram>>,
    serial: Arc<Mutex<Console>>,
    pio: Bus,
    mmio: Bus,
    virtio: Vec<SharedTransport>,
    exit: Arc<ExitSignal>,
}

impl MicroVmBuilder {
    /// Creates memory and the VM, loads the kernel and writes the boot data.
    pub fn new(config: MicroVmConfig) -> Result<Self, MicroVmError> {
        if config.vcpus == 0 || config.vcpus > 32 || config.memory_mib < 16 {
            return Err(MicroVmError::Shape);
        }
        // The mapping keeps the memfd's pages alive; the fd itself is not needed.
        let (memory, _memfd) = create_guest_memory(u64::from(config.memory_mib) << 20)?;
        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        let mut cmdline = config.cmdline;
        for slot in 0..config.virtio.len() as u64 {
            let irq = VIRTIO_FIRST_IRQ + slot as u32;
            cmdline = format!("{cmdline} {}", mmio::cmdline_fragment(VIRTIO_MMIO_BASE + slot * MMIO_LEN, irq));
        }
        boot::write_boot_data(&memory, &kernel, cmdline.trim())?;
        let init = VcpuInit::Boot { kernel, count: config.vcpus, all_at_entry: false };
        let mut builder = Self::with_devices(Vm::new(memory)?, None, init, config.console, None)?;
        for (slot, device) in config.virtio.into_iter().enumerate() {
            builder.add_virtio_device(slot as u64, device, None)?;
        }
        Ok(builder)
    }

    /// Puts `device` on virtio-mmio slot `slot` with its irqfd, fresh or
    /// continuing from `saved`.
    fn add_virtio_device(
        &mut self,
        slot: u64,
        device: Box<dyn VirtioDevice>,
        saved: Option<&mmio::MmioTransportState>,
    ) -> Result<(), MicroVmError> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(MicroVmError::EventFd)?;
        self.vm.register_irqfd(&event, VIRTIO_FIRST_IRQ + slot as u32)?;
        let args = MmioTransportArgs { device, memory: self.vm.memory().clone(), interrupt: Interrupt::new(event) };
        let transport = match saved {
            Some(state) => MmioTransport::restore(args, state)
                .map_err(|source| MicroVmError::RestoreDevice { slot: slot as usize, source })?,
            None => MmioTransport::new(args.device, args.memory, args.interrupt),
        };
        let transport = Arc::new(Mutex::new(transport));
        self.virtio.push(Arc::clone(&transport));
        self.add_mmio_device(VIRTIO_MMIO_BASE + slot * MMIO_LEN, MMIO_LEN, transport)
    }

    /// Rebuilds a microVM from snapshot state and restored memory; its
    /// vCPUs start paused. `virtio` must be the devices the snapshot was
    /// taken with, in the same order (built anew from the VM's
    /// configuration: their host-side resources are not in the snapshot).
    pub fn restore(
        state: Arc<MicroVmState>,
        memory: RestoredMemory,
        console: Box<dyn Write + Send>,
        virtio: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, MicroVmError> {
        if virtio.len() != state.devices.len() {
            return Err(MicroVmError::DeviceCount { saved: state.devices.len(), given: virtio.len() });
        }
        let vm = Vm::new(memory.memory().clone())?;
        state.vm.restore(vm.fd())?;
        let serial = Some(state.serial.clone());
        let mut builder = Self::with_devices(vm, Some(memory), VcpuInit::Restore(Arc::clone(&state)), console, serial)?;
        for (slot, (device, saved)) in virtio.into_iter().zip(&state.devices).enumerate() {
            builder.add_virtio_device(slot as u64, device, Some(saved))?;
        }
        Ok(builder)
    }

    /// Adds the serial console (continuing from `serial_state` after a
    /// restore) and the i8042.
    fn with_devices(
        vm: Vm,
        restored: Option<RestoredMemory>,
        init: VcpuInit,
        console: Box<dyn Write + Send>,
        serial_state: Option<SerialConsoleState>,
    ) -> Result<Self, MicroVmError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MicroVmError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_GSI)?;
        let serial = match serial_state {
            Some(state) => SerialConsole::from_state(&state, serial_irq, console)?,
            None => SerialConsole::new(serial_irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        let exit = Arc::new(ExitSignal::default());
        let mut builder = Self {
            vm,
            restored,
            init,
            vcpu_seccomp: None,
            serial: Arc::clone(&serial),
            pio: Bus::default(),
            mmio: Bus::default(),
            virtio: Vec::new(),
            exit,
        };
        builder.add_pio_device(COM1_PORT, COM1_LEN, serial)?;
        let i8042 = I8042::new(Arc::clone(&builder.exit));
        builder.add_pio_device(I8042_PORT, I8042_LEN, Arc::new(Mutex::new(i8042)))?;
        Ok(builder)
    }

    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn add_pio_device(&mut self, port: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), MicroVmError> {
        Ok(self.pio.insert(port, len, device)?)
    }

    pub fn add_mmio_device(&mut self, address: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), MicroVmError> {
        Ok(self.mmio.insert(address, len, device)?)
    }

    /// Confines each vCPU thread to the vCPU seccomp allow-list.
    pub fn confine_vcpus(&mut self) -> Result<(), MicroVmError> {
        self.vcpu_seccomp = Some(Arc::new(crate::seccomp::filter(crate::seccomp::ThreadKind::Vcpu)?));
        Ok(())
    }

    /// Starts every vCPU at the kernel entry instead of holding the
    /// application processors until the boot processor sends them SIPIs
    /// (as a Linux guest does). For payloads that run on all vCPUs at once.
    pub fn start_all_vcpus_at_entry(&mut self) {
        if let VcpuInit::Boot { all_at_entry, .. } = &mut self.init {
            *all_at_entry = true;
        }
    }

    /// Creates and configures the vCPUs and starts their threads (paused,
    /// for a restored VM).
    pub fn start(self) -> Result<MicroVm, MicroVmError> {
        let (pio, mmio) = (Arc::new(self.pio), Arc::new(self.mmio));
        let count = match &self.init {
            VcpuInit::Boot { count, .. } => *count,
            VcpuInit::Restore(state) => state.vcpus.len() as u8,
        };
        let mut handles = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let fd = self.vm.fd().create_vcpu(u64::from(id)).map_err(MicroVmError::CreateVcpu)?;
            let paused = match &self.init {
                VcpuInit::Boot { kernel, all_at_entry, .. } => {
                    boot::configure_vcpu(self.vm.kvm(), &fd, id, count, kernel.entry)?;
                    if *all_at_entry {
                        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
                        fd.set_mp_state(runnable).map_err(MicroVmError::CreateVcpu)?;
                    }
                    false
                }
                VcpuInit::Restore(state) => {
                    state.vcpus[usize::from(id)].restore(&fd)?;
                    true
                }
            };
            let vcpu = Vcpu {
                id,
                fd,
                pio: Arc::clone(&pio),
                mmio: Arc::clone(&mmio),
                exit: Arc::clone(&self.exit),
                seccomp: self.vcpu_seccomp.clone(),
            };
            handles.push(vcpu.start(paused)?);
        }
        Ok(MicroVm {
            vcpus: handles,
            virtio: self.virtio,
            serial: self.serial,
            exit: self.exit,
            vm: self.vm,
            restored: self.restored,
        })
    }
}

/// A running microVM. Its fields drop in this order, so that vCPUs and
/// devices have stopped touching guest memory before the memory, and the
/// userfaultfd handler that serves it, go away.
pub struct MicroVm {
    vcpus: Vec<VcpuHandle>,
    virtio: Vec<SharedTransport>,
    serial: Arc<Mutex<Console>>,
    exit: Arc<ExitSignal>,
    vm: Vm,
    restored: Option<RestoredMemory>,
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop_vcpus();
        self.set_devices_paused(true);
    }
}

impl MicroVm {
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The serial console's registers and pending input.
    pub fn serial_state(&self) -> SerialConsoleState {
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    /// The virtio-mmio transports, by slot.
    pub fn virtio_transports(&self) -> &[SharedTransport] {
        &self.virtio
    }

    /// The userfaultfd handler serving this VM's memory, if it has one.
    pub fn uffd(&self) -> Option<&crate::uffd::UffdMemory> {
        match &self.restored {
            Some(RestoredMemory::Uffd(uffd)) => Some(uffd),
            _ => None,
        }
    }

    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Parks every vCPU outside KVM_RUN, then stops the devices' own
    /// threads from touching guest memory, so that a snapshot sees memory
    /// and device state that agree.
    pub fn pause(&self) -> Result<(), MicroVmError> {
        for vcpu in &self.vcpus {
            vcpu.pause(PAUSE_TIMEOUT)?;
        }
        self.set_devices_paused(true);
        Ok(())
    }

    pub fn resume(&self) {
        self.set_devices_paused(false);
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
    }

    fn set_devices_paused(&self, paused: bool) {
        for transport in &self.virtio {
            transport.lock().unwrap_or_else(|p| p.into_inner()).set_paused(paused);
        }
        if !paused {
            self.serial.lock().unwrap_or_else(|p| p.into_inner()).raise_pending();
        }
    }

    /// Waits up to `timeout` for the guest to exit on its own, or for its
    /// memory to fail; stops every vCPU once it has.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<VmExit> {
        if let Some(reason) = self.uffd().and_then(|uffd| uffd.failure()) {
            self.exit.report(VmExit::MemoryUnavailable(reason));
        }
        let exit = self.exit.wait(timeout)?;
        self.stop_vcpus();
        Some(exit)
    }

    /// Stops the VM from the host and returns how it ended.
    pub fn stop(&mut self) -> VmExit {
        self.exit.report(VmExit::Stopped);
        self.stop_vcpus();
        self.exit.current().unwrap_or(VmExit::Stopped)
    }

    fn stop_vcpus(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
    }
}
