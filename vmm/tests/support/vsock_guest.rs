//! A guest-side vsock driver for tests: the device driven from the host
//! the way a guest driver would, over the virtq test driver.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use sandbox_vmm::devices::virtio::vsock::{packet::*, Vsock, VsockControl, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::virtq::{Driver, VERSION_1};

pub const GUEST_CID: u64 = 3;
pub const RX_BUFFER: u32 = (HEADER_LEN + 4096) as u32;

pub fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sandboxd-vsock-{name}-{}.sock", std::process::id()))
}

pub struct Guest {
    pub driver: Driver,
    pub control: VsockControl,
    pub uds: PathBuf,
}

impl Guest {
    pub fn new(name: &str) -> Guest {
        Guest::with_memory(name, Driver::memory(32 << 20))
    }

    /// A live device whose queues and buffers live in `memory`.
    pub fn with_memory(name: &str, memory: GuestMemoryMmap) -> Guest {
        let uds = socket_path(name);
        let vsock = Vsock::new(GUEST_CID, uds.clone()).unwrap();
        let control = vsock.control();
        let mut driver = Driver::new(Box::new(vsock), memory);
        assert_eq!(driver.initialize(VERSION_1), 15, "the device is live");
        let mut guest = Guest { driver, control, uds };
        for _ in 0..8 {
            guest.post_rx_buffer();
        }
        let event = guest.driver.buffer(&[0xff; 8]);
        guest.driver.submit(EVENT_QUEUE, &[(event, 8, true)]);
        guest
    }

    pub fn post_rx_buffer(&mut self) {
        let buffer = self.driver.buffer(&vec![0u8; RX_BUFFER as usize]);
        self.driver.submit(RX_QUEUE, &[(buffer, RX_BUFFER, true)]);
    }

    pub fn send(&mut self, op: u16, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32, payload: &[u8]) {
        let header = PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags: if op == OP_SHUTDOWN { SHUTDOWN_BOTH } else { 0 },
            buf_alloc,
            fwd_cnt,
        };
        let mut bytes = vec![0u8; HEADER_LEN];
        self.driver.memory.write_obj(header, GuestAddress(0x0f_0000)).unwrap();
        self.driver.memory.read_slice(&mut bytes, GuestAddress(0x0f_0000)).unwrap();
        bytes.extend_from_slice(payload);
        let address = self.driver.buffer(&bytes);
        self.driver.submit(TX_QUEUE, &[(address, bytes.len() as u32, false)]);
    }

    /// Waits for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue.
    pub fn expect_transport_reset(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let event = loop {
            if let Some(used) = self.driver.pop_used(EVENT_QUEUE) {
                break used;
            }
            assert!(Instant::now() < deadline, "no transport reset event");
            std::thread::sleep(Duration::from_millis(2));
        };
        let address = self.driver.descriptor_address(EVENT_QUEUE, event.0);
        assert_eq!(self.driver.memory.read_obj::<u32>(GuestAddress(address)).unwrap(), 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    }

    /// Waits for the next packet the device delivered to the guest.
    pub fn receive(&mut self) -> (PacketHeader, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((head, len)) = self.driver.pop_used(RX_QUEUE) {
                let address = self.driver.descriptor_address(RX_QUEUE, head);
                let header: PacketHeader = self.driver.memory.read_obj(GuestAddress(address)).unwrap();
                let mut payload = vec![0u8; len as usize - HEADER_LEN];
                self.driver.memory.read_slice(&mut payload, GuestAddress(address + HEADER_LEN as u64)).unwrap();
                self.post_rx_buffer();
                return (header, payload);
            }
            assert!(Instant::now() < deadline, "no packet reached the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Connects from the host and returns the stream and the host port.
pub fn host_connect(guest: &mut Guest, port: u32) -> (UnixStream, u32) {
    let mut stream = UnixStream::connect(&guest.uds).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (request, _) = guest.receive();
    let (op, dst, host_port) = (request.op, request.dst_port, request.src_port);
    assert_eq!((op, dst), (OP_REQUEST, port), "the guest is asked to accept");
    guest.send(OP_RESPONSE, port, host_port, 65536, 0, &[]);
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    (stream, host_port)
}
