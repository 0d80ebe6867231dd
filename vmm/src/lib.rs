//! The sandboxd virtual machine monitor: one KVM microVM per process.
