//! virtio-vsock driven from the host side the way a guest driver would:
//! host-initiated connections with the CONNECT handshake, guest-initiated
//! connections to host listeners, data both ways, credit flow control,
//! shutdown and reset, malformed packets, the transport-reset event, and a
//! live device restored from a snapshot.

#[path = "support/virtq.rs"]
mod virtq;
#[path = "support/vsock_guest.rs"]
mod vsock_guest;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    time::Duration,
};

use sandbox_vmm::{
    devices::virtio::{
        mmio::MmioTransport,
        vsock::{packet::*, Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE},
    },
    snapshot::persist::Persist,
};
use virtq::Driver;
use vsock_guest::{host_connect, socket_path, Guest, GUEST_CID};

#[test]
fn host_connection_handshake_data_and_shutdown() {
    let mut guest = Guest::new("host");
    let (mut stream, host_port) = host_connect(&mut guest, 1024);
    stream.write_all(b"ping").unwrap();
    let (packet, payload) = guest.receive();
    let op = packet.op;
    assert_eq!((op, payload.as_slice()), (OP_RW, &b"ping"[..]));
    guest.send(OP_RW, 1024, host_port, 65536, 4, b"pong");
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong");
    guest.send(OP_SHUTDOWN, 1024, host_port, 65536, 4, &[]);
    let (packet, _) = guest.receive();
    let op = packet.op;
    assert_eq!(op, OP_RST, "the host side acknowledges with a reset");
    assert_eq!(stream.read(&mut reply).unwrap(), 0, "the host stream is closed");
}

#[test]
fn guest_connections_reach_host_listeners() {
    let mut guest = Guest::new("guest");
    let listener = UnixListener::bind(format!("{}_5000", guest.uds.display())).unwrap();
    guest.send(OP_REQUEST, 777, 5000, 65536, 0, &[]);
    let (packet, _) = guest.receive();
    let (op, src, dst) = (packet.op, packet.src_port, packet.dst_port);
    assert_eq!((op, src, dst), (OP_RESPONSE, 5000, 777));
    let (mut stream, _) = listener.accept().unwrap();
    guest.send(OP_RW, 777, 5000, 65536, 0, b"hello");
    let mut data = [0u8; 5];
    stream.read_exact(&mut data).unwrap();
    assert_eq!(&data, b"hello");
    stream.write_all(b"back").unwrap();
    let (packet, payload) = guest.receive();
    let op = packet.op;
    assert_eq!((op, payload.as_slice()), (OP_RW, &b"back"[..]));

    guest.send(OP_REQUEST, 778, 6000, 65536, 0, &[]);
    let (packet, _) = guest.receive();
    let op = packet.op;
    assert_eq!(op, OP_RST, "nobody listens on host port 6000");
    let _ = std::fs::remove_file(format!("{}_5000", guest.uds.display()));
}

#[test]
fn credit_limits_what_the_host_sends() {
    let mut guest = Guest::new("credit");
    let mut stream = UnixStream::connect(&guest.uds).unwrap();
    stream.write_all(b"CONNECT 2000\n").unwrap();
    let (request, _) = guest.receive();
    let host_port = request.src_port;
    guest.send(OP_RESPONSE, 2000, host_port, 8, 0, &[]);
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
    stream.write_all(&[7u8; 20]).unwrap();
    let (_, first) = guest.receive();
    assert_eq!(first.len(), 8, "no more than the guest's 8-byte buffer");
    guest.send(OP_CREDIT_UPDATE, 2000, host_port, 8, 8, &[]);
    let (_, second) = guest.receive();
    assert_eq!(second.len(), 8, "more after the guest consumed the first 8 bytes");
}

#[test]
fn malformed_packets_and_transport_reset() {
    let mut guest = Guest::new("reset");
    // A packet shorter than its header, and one for an unknown connection.
    let short = guest.driver.buffer(&[1, 2, 3]);
    guest.driver.submit(TX_QUEUE, &[(short, 3, false)]);
    guest.send(OP_RW, 9, 9999, 65536, 0, b"stray");
    let (packet, _) = guest.receive();
    let op = packet.op;
    assert_eq!(op, OP_RST, "data for an unknown connection is refused");

    let (mut stream, _) = host_connect(&mut guest, 1024);
    guest.control.reset_connections();
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).unwrap(), 0, "host connections are dropped");
    guest.expect_transport_reset();
}

#[test]
fn a_restored_device_resets_old_connections_and_takes_new_ones() {
    let mut guest = Guest::new("snapshot");
    let (_old_stream, _) = host_connect(&mut guest, 1024);
    let state = guest.driver.transport.save();
    assert!(state.activated);
    let memory = guest.driver.memory_copy();

    // The clone gets a device of its own, on a new host socket.
    let uds = socket_path("snapshot-clone");
    let vsock = Vsock::new(GUEST_CID, uds.clone()).unwrap();
    let control = vsock.control();
    let transport = MmioTransport::restore(Driver::restore_args(Box::new(vsock), &memory), &state).unwrap();
    let mut driver = Driver::new(Box::new(Vsock::new(GUEST_CID, socket_path("unused")).unwrap()), memory);
    driver.transport = transport;
    driver.queues = std::mem::take(&mut guest.driver.queues);
    let mut clone = Guest { driver, control, uds };
    clone.expect_transport_reset();

    // Until the guest hands its event buffer back (it has then dropped its
    // old connections), a new host connection waits.
    let mut early = UnixStream::connect(&clone.uds).unwrap();
    early.write_all(b"CONNECT 1024\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(clone.driver.pop_used(RX_QUEUE), None, "no connection request before the reset is handled");
    let event = clone.driver.buffer(&[0xff; 8]);
    clone.driver.submit(EVENT_QUEUE, &[(event, 8, true)]);
    let (request, _) = clone.receive();
    let (op, dst) = (request.op, request.dst_port);
    assert_eq!((op, dst), (OP_REQUEST, 1024), "the held connection goes ahead");

    let (mut stream, host_port) = host_connect(&mut clone, 1024);
    stream.write_all(b"after restore").unwrap();
    let (packet, payload) = clone.receive();
    let (op, src) = (packet.op, packet.src_port);
    assert_eq!((op, src, payload.as_slice()), (OP_RW, host_port, &b"after restore"[..]));
}

#[test]
fn a_paused_device_leaves_guest_memory_alone_until_resumed() {
    let mut guest = Guest::new("paused");
    guest.driver.transport.set_paused(true);
    let used = guest.driver.used_idx(RX_QUEUE);
    let mut stream = UnixStream::connect(&guest.uds).unwrap();
    stream.write_all(b"CONNECT 1024\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.driver.used_idx(RX_QUEUE), used, "nothing is written into the paused guest's queues");
    guest.driver.transport.set_paused(false);
    let (request, _) = guest.receive();
    let op = request.op;
    assert_eq!(op, OP_REQUEST, "the connection goes ahead once the VM runs again");
}

#[test]
fn a_host_that_stops_reading_never_stalls_the_guest() {
    let mut guest = Guest::new("backlog");
    let (mut stream, host_port) = host_connect(&mut guest, 3000);
    // The device grants 256 KiB of credit, more than a unix stream buffers:
    // with the host reading nothing, the rest must wait in the device, not
    // block the vCPU that notified the queue.
    let sent: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let data = sent.clone();
    let (done, finished) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        let mut forwarded = 0;
        for part in data.chunks(4096) {
            guest.send(OP_RW, 3000, host_port, 65536, forwarded, part);
            forwarded += part.len() as u32;
        }
        let _ = done.send(());
        guest
    });
    finished.recv_timeout(Duration::from_secs(20)).expect("a guest send blocked while the host was not reading");
    let mut guest = sender.join().unwrap();
    let mut received = vec![0u8; sent.len()];
    stream.read_exact(&mut received).unwrap();
    assert!(received == sent, "the host reads every byte, in order, once it reads again");
    let (packet, _) = guest.receive();
    let (op, fwd_cnt) = (packet.op, packet.fwd_cnt);
    assert_eq!(op, OP_CREDIT_UPDATE, "the guest hears that its bytes were forwarded");
    assert!(fwd_cnt > 0);
}
