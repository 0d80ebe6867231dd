//! Admission control: before a sandbox is launched, its limits are
//! reserved against the caller's key quotas (sandboxes, memory, vCPUs), the
//! daemon's cap on sandboxes, and the host's budgets (the sum of memory
//! limits within the host's memory, the sum of pids limits well below
//! `pid_max`). Checking and reserving happen under one lock, so concurrent
//! Creates never overshoot; a [`Reservation`] gives its share back when it
//! is dropped (a failed launch) or released (a deleted or stopped sandbox).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{backend::ResourceLimits, metrics};

/// What this host has, read from /proc at start.
#[derive(Clone, Copy, Debug)]
pub struct HostFacts {
    /// MemTotal of /proc/meminfo.
    pub memory_mib: u64,
    /// /proc/sys/kernel/pid_max.
    pub pid_max: u64,
    pub cpus: u32,
}

impl HostFacts {
    pub fn probe() -> Result<Self, AdmissionError> {
        let meminfo = read_proc("/proc/meminfo")?;
        let memory_kib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| AdmissionError::HostFacts("/proc/meminfo has no readable MemTotal line".to_string()))?;
        let pid_max = read_proc("/proc/sys/kernel/pid_max")?
            .trim()
            .parse()
            .map_err(|_| AdmissionError::HostFacts("/proc/sys/kernel/pid_max is not a number".to_string()))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(Self { memory_mib: memory_kib / 1024, pid_max, cpus })
    }
}

fn read_proc(path: &str) -> Result<String, AdmissionError> {
    std::fs::read_to_string(path).map_err(|error| AdmissionError::HostFacts(format!("cannot read {path}: {error}")))
}

/// The caps a Create is admitted against.
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    /// Live sandboxes of the whole daemon (--max-sandboxes).
    pub max_sandboxes: usize,
    /// Live sandboxes of one API key (--key-max-sandboxes).
    pub key_max_sandboxes: usize,
    /// Sum of the memory limits of one key's sandboxes (--key-max-memory-mib).
    pub key_max_memory_mib: u64,
    /// Sum of the vCPU limits of one key's sandboxes (--key-max-vcpus).
    pub key_max_vcpus: u64,
    /// Sum of the memory limits of all sandboxes (--host-memory-budget-mib).
    pub host_memory_budget_mib: u64,
    /// Sum of the pids limits of all sandboxes (--host-pids-budget).
    pub host_pids_budget: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("cannot learn the host's resources: {0}; sandboxd needs a Linux /proc")]
    HostFacts(String),
    #[error("the daemon already holds {0} sandboxes, its maximum (--max-sandboxes {0}): delete sandboxes you no longer need, or restart the daemon with a higher --max-sandboxes")]
    DaemonFull(usize),
    #[error("API key {key} already holds {quota} sandboxes, its quota (--key-max-sandboxes {quota}): delete some of them first")]
    KeySandboxes { key: String, quota: usize },
    #[error("the memory limits of API key {key}'s sandboxes would sum to {wanted} MiB, over its quota of {quota} MiB (--key-max-memory-mib): delete some of them or ask for less memory")]
    KeyMemory { key: String, wanted: u64, quota: u64 },
    #[error("the vCPU limits of API key {key}'s sandboxes would sum to {wanted}, over its quota of {quota} (--key-max-vcpus): delete some of them or ask for fewer vCPUs")]
    KeyVcpus { key: String, wanted: u64, quota: u64 },
    #[error("the host's memory budget is taken: the sandboxes' memory limits would sum to {wanted} MiB, over {budget} MiB (--host-memory-budget-mib): delete sandboxes or ask for less memory")]
    HostMemory { wanted: u64, budget: u64 },
    #[error("the host's pids budget is taken: the sandboxes' max_processes would sum to {wanted}, over {budget} (--host-pids-budget, below the kernel's pid_max): delete sandboxes or ask for a lower max_processes")]
    HostPids { wanted: u64, budget: u64 },
}

/// What the sandboxes of one key hold.
#[derive(Default, Debug)]
struct KeyUsage {
    sandboxes: usize,
    memory_mib: u64,
    vcpus: u64,
}

/// What all sandboxes hold.
#[derive(Default, Debug)]
struct Usage {
    sandboxes: usize,
    memory_mib: u64,
    pids: u64,
    keys: HashMap<String, KeyUsage>,
}

/// The admission controller of one daemon.
pub struct Admission {
    quotas: Quotas,
    usage: Mutex<Usage>,
}

impl Admission {
    pub fn new(quotas: Quotas) -> Arc<Self> {
        Arc::new(Self { quotas, usage: Mutex::new(Usage::default()) })
    }

    /// Reserves room for one sandbox of `key` with `limits`, or says which
    /// quota, cap or budget it would break (the key's quotas first).
    pub fn reserve(self: &Arc<Self>, key: &str, limits: ResourceLimits) -> Result<Reservation, AdmissionError> {
        let mut usage = self.lock();
        let quotas = &self.quotas;
        let (memory, vcpus, pids) = (u64::from(limits.memory_mib), u64::from(limits.vcpus), u64::from(limits.max_processes));
        let key_usage = usage.keys.get(key);
        let (key_sandboxes, key_memory, key_vcpus) =
            key_usage.map_or((0, 0, 0), |held| (held.sandboxes, held.memory_mib, held.vcpus));
        if key_sandboxes >= quotas.key_max_sandboxes {
            return Err(AdmissionError::KeySandboxes { key: key.to_string(), quota: quotas.key_max_sandboxes });
        }
        if key_memory + memory > quotas.key_max_memory_mib {
            return Err(AdmissionError::KeyMemory { key: key.to_string(), wanted: key_memory + memory, quota: quotas.key_max_memory_mib });
        }
        if key_vcpus + vcpus > quotas.key_max_vcpus {
            return Err(AdmissionError::KeyVcpus { key: key.to_string(), wanted: key_vcpus + vcpus, quota: quotas.key_max_vcpus });
        }
        if usage.sandboxes >= quotas.max_sandboxes {
            return Err(AdmissionError::DaemonFull(quotas.max_sandboxes));
        }
        if usage.memory_mib + memory > quotas.host_memory_budget_mib {
            return Err(AdmissionError::HostMemory { wanted: usage.memory_mib + memory, budget: quotas.host_memory_budget_mib });
        }
        if usage.pids + pids > quotas.host_pids_budget {
            return Err(AdmissionError::HostPids { wanted: usage.pids + pids, budget: quotas.host_pids_budget });
        }
        usage.sandboxes += 1;
        usage.memory_mib += memory;
        usage.pids += pids;
        let held = usage.keys.entry(key.to_string()).or_default();
        held.sandboxes += 1;
        held.memory_mib += memory;
        held.vcpus += vcpus;
        ::metrics::gauge!(metrics::SANDBOXES_ACTIVE).set(usage.sandboxes as f64);
        Ok(Reservation { admission: Arc::clone(self), key: key.to_string(), limits })
    }

    fn release(&self, key: &str, limits: ResourceLimits) {
        let mut usage = self.lock();
        usage.sandboxes = usage.sandboxes.saturating_sub(1);
        usage.memory_mib = usage.memory_mib.saturating_sub(limits.memory_mib.into());
        usage.pids = usage.pids.saturating_sub(limits.max_processes.into());
        if let Some(held) = usage.keys.get_mut(key) {
            held.sandboxes = held.sandboxes.saturating_sub(1);
            held.memory_mib = held.memory_mib.saturating_sub(limits.memory_mib.into());
            held.vcpus = held.vcpus.saturating_sub(limits.vcpus.into());
            if held.sandboxes == 0 {
                usage.keys.remove(key);
            }
        }
        ::metrics::gauge!(metrics::SANDBOXES_ACTIVE).set(usage.sandboxes as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One sandbox's share of the quotas; given back when dropped.
pub struct Reservation {
    admission: Arc<Admission>,
    key: String,
    limits: ResourceLimits,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.admission.release(&self.key, self.limits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ResourceLimits = ResourceLimits { memory_mib: 100, vcpus: 1, max_processes: 10, disk_mib: 100 };

    fn quotas() -> Quotas {
        Quotas {
            max_sandboxes: 3,
            key_max_sandboxes: 2,
            key_max_memory_mib: 1000,
            key_max_vcpus: 10,
            host_memory_budget_mib: 1000,
            host_pids_budget: 1000,
        }
    }

    #[test]
    fn keys_hit_their_quota_before_the_daemon_cap() {
        let admission = Admission::new(quotas());
        let held: Vec<_> = (0..2).map(|_| admission.reserve("a", LIMITS).unwrap()).collect();
        assert!(matches!(admission.reserve("a", LIMITS), Err(AdmissionError::KeySandboxes { .. })));
        let third = admission.reserve("b", LIMITS).unwrap();
        assert!(matches!(admission.reserve("b", LIMITS), Err(AdmissionError::DaemonFull(3))));
        drop(held);
        drop(third);
        assert_eq!(admission.lock().sandboxes, 0, "dropped reservations give their share back");
        assert!(admission.lock().keys.is_empty());
    }

    #[test]
    fn budgets_sum_the_limits() {
        let admission = Admission::new(Quotas { host_memory_budget_mib: 150, ..quotas() });
        let first = admission.reserve("a", LIMITS).unwrap();
        let error = admission.reserve("b", LIMITS).err().unwrap();
        assert!(matches!(error, AdmissionError::HostMemory { wanted: 200, budget: 150 }), "{error}");
        assert!(error.to_string().contains("--host-memory-budget-mib"));
        drop(first);
        let pids = Admission::new(Quotas { host_pids_budget: 15, ..quotas() });
        let _first = pids.reserve("a", LIMITS).unwrap();
        assert!(matches!(pids.reserve("b", LIMITS), Err(AdmissionError::HostPids { .. })));
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let admission = Admission::new(Quotas { max_sandboxes: 64, key_max_sandboxes: 1000, key_max_memory_mib: u64::MAX, key_max_vcpus: u64::MAX, host_memory_budget_mib: u64::MAX, host_pids_budget: u64::MAX });
        let granted: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..100).map(|_| scope.spawn(|| admission.reserve("a", LIMITS).ok())).collect();
            threads.into_iter().filter_map(|thread| thread.join().unwrap()).collect()
        });
        assert_eq!(granted.len(), 64);
    }

    #[test]
    fn this_host_can_be_probed() {
        let host = HostFacts::probe().unwrap();
        assert!(host.memory_mib > 0 && host.pid_max > 0 && host.cpus > 0, "{host:?}");
    }
}
