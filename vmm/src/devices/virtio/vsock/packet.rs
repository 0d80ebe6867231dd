//! The virtio-vsock packet header and the operations of stream sockets.

use vm_memory::ByteValued;

/// The host's context id.
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: no more receiving / no more sending.
pub const SHUTDOWN_BOTH: u32 = 3;

/// struct virtio_vsock_hdr, little-endian and packed.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: PacketHeader is plain old data (integers only, packed, no padding),
// so any byte pattern is a valid value.
unsafe impl ByteValued for PacketHeader {}

pub const HEADER_LEN: usize = std::mem::size_of::<PacketHeader>();

#[cfg(test)]
mod tests {
    #[test]
    fn header_matches_the_virtio_layout() {
        assert_eq!(super::HEADER_LEN, 44);
    }
}
