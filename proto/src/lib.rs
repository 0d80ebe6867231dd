//! Generated types and gRPC stubs for `sandbox.v1` (the public API) and
//! `sandbox.agent.v1` (the host ↔ guest agent API).

/// The public API, plus the process and file messages both APIs share.
pub mod sandbox {
    pub mod v1 {
        tonic::include_proto!("sandbox.v1");
    }
    /// The guest agent API.
    pub mod agent {
        pub mod v1 {
            tonic::include_proto!("sandbox.agent.v1");
        }
    }
}

pub use sandbox::agent::v1 as agent;
pub use sandbox::v1 as api;

/// Encoded `FileDescriptorSet` of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
