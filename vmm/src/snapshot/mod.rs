//! Snapshots of a paused microVM and their restore. A snapshot directory
//! holds `state` (versioned, checksummed: VM, vCPU, serial console and
//! virtio transport state), `memory` (guest RAM, sparse: pages never used
//! or zero are holes; see [`memory_file`]) and each disk's overlay (`diskN.overlay`, whose written clusters
//! every clone copies). Restore maps the memory file
//! privately (copy-on-write, page cache shared by every clone) or serves it
//! lazily through userfaultfd, optionally prefetching a recorded working set.

pub mod format;
pub mod memory_file;
pub mod persist;
pub mod state;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use format::FormatError;
pub use memory_file::{keep_page_map, MemoryFileError};
pub use state::{StateError, VcpuState, VmState};

use crate::{
    builder::MicroVm,
    snapshot::persist::Persist,
    devices::{
        serial::SerialConsoleState,
        virtio::{mmio::MmioTransportState, VirtioError},
    },
    uffd::{UffdError, UffdMemory},
    vstate::{
        memory::{map_file, GuestMemory, MemoryError},
        vcpu::VcpuError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the VM must be paused to be snapshotted: call pause() first")]
    NotPaused,
    #[error("cannot save the data of virtio slot {slot}: {source}")]
    Backing { slot: usize, source: VirtioError },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { action, path: path.to_path_buf(), source }
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct MicroVmState {
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialConsoleState,
    /// The virtio-mmio transports, by slot.
    pub devices: Vec<MmioTransportState>,
}

/// Where a snapshot's files are.
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl SnapshotFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self { state: dir.join("state"), memory: dir.join("memory") }
    }
}

/// Writes a snapshot of the paused `vm` to `files`.
pub fn create(vm: &MicroVm, files: &SnapshotFiles) -> Result<(), SnapshotError> {
    let first = vm.vcpus().first().ok_or(SnapshotError::NotPaused)?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| StateError::Kvm { action: "open /dev/kvm", source })?;
    let msr_indices = first.run_on_vcpu(move |fd| state::saveable_msrs(&kvm, fd)).map_err(not_paused)??;
    let mut vcpus = Vec::with_capacity(vm.vcpus().len());
    for vcpu in vm.vcpus() {
        let indices = msr_indices.clone();
        vcpus.push(vcpu.run_on_vcpu(move |fd| VcpuState::save(fd, &indices)).map_err(not_paused)??);
    }
    let memory_bytes = memory_file::write(vm.memory(), vm.uffd().map(UffdMemory::source_file), &files.memory)?;
    let devices = save_devices(vm, files)?;
    let state = MicroVmState { memory_bytes, vm: VmState::save(vm.vm().fd())?, vcpus, serial: vm.serial_state(), devices };
    let encoded = format::encode(&state)?;
    let partial = files.state.with_extension("partial");
    std::fs::write(&partial, encoded).map_err(io_error("write", &partial))?;
    std::fs::rename(&partial, &files.state).map_err(io_error("rename", &files.state))
}

/// Saves each virtio transport and lets its device write its host-side
/// data (a disk's overlay) next to the state file.
fn save_devices(vm: &MicroVm, files: &SnapshotFiles) -> Result<Vec<MmioTransportState>, SnapshotError> {
    let dir = files.state.parent().unwrap_or(Path::new("."));
    let mut states = Vec::with_capacity(vm.virtio_transports().len());
    for (slot, transport) in vm.virtio_transports().iter().enumerate() {
        let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
        transport.save_backing(dir, slot).map_err(|source| SnapshotError::Backing { slot, source })?;
        states.push(transport.save());
    }
    Ok(states)
}

fn not_paused(error: VcpuError) -> SnapshotError {
    match error {
        VcpuError::NotPaused(_) => SnapshotError::NotPaused,
        other => SnapshotError::Vcpu(other),
    }
}

/// Reads and verifies a snapshot's state file.
pub fn load_state(files: &SnapshotFiles) -> Result<MicroVmState, SnapshotError> {
    let bytes = std::fs::read(&files.state).map_err(io_error("read", &files.state))?;
    Ok(format::decode(&bytes)?)
}

/// How guest memory comes back.
pub enum RestoreMode {
    /// Copy-on-write private mapping of the memory file.
    MapPrivate,
    /// Lazily, through userfaultfd; `prefetch` lists file offsets to copy
    /// before the guest runs; `record` keeps the order of faults.
    Uffd { prefetch: Vec<u64>, record: bool },
}

/// Restored guest memory: a private mapping, or a uffd-served one.
pub enum RestoredMemory {
    Private(GuestMemory),
    Uffd(UffdMemory),
}

impl RestoredMemory {
    pub fn memory(&self) -> &GuestMemory {
        match self {
            RestoredMemory::Private(memory) => memory,
            RestoredMemory::Uffd(uffd) => uffd.memory(),
        }
    }
}

/// Brings back guest memory of `state` from `files` in `mode`.
pub fn restore_memory(files: &SnapshotFiles, state: &MicroVmState, mode: RestoreMode) -> Result<RestoredMemory, SnapshotError> {
    let file = File::open(&files.memory).map_err(io_error("open", &files.memory))?;
    match mode {
        RestoreMode::MapPrivate => Ok(RestoredMemory::Private(map_file(&file, state.memory_bytes, libc::MAP_PRIVATE)?)),
        RestoreMode::Uffd { prefetch, record } => {
            let memory = UffdMemory::new(&file, state.memory_bytes, record)?;
            memory.prefetch(&prefetch)?;
            Ok(RestoredMemory::Uffd(memory))
        }
    }
}
