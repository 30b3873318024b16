//! The device end to end: mock guest queues in mock guest memory, real Unix
//! sockets, and a real `EventManager` driven until it has nothing to do.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventManager, SubscriberId, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::{ConnKey, State, CONN_BUF_ALLOC};
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::{guest_memory, queue_with_chains, WRITE};
use crate::devices::virtio::{Interrupt, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};

const CID: u32 = 3;
const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const RX_BUF: u32 = 4096;
const RX_BUFS: u64 = 0x10_0000;
const TX_HDRS: u64 = 0x40_0000;
const TX_DATA: u64 = 0x80_0000;

/// A split queue the test plays the driver of, wrapping its rings properly
/// (the mock queue's `add_desc_chains` does not wrap).
struct TestQueue {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    fn new(base: u64) -> Self {
        TestQueue {
            base,
            size: 256,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size) + 3) & !3
    }
    fn queue(&self, mem: &GuestMemoryMmap) -> Queue {
        mem.write_obj(0u16, GuestAddress(self.avail() + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(self.used() + 2)).unwrap();
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_ready(true);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(self.base);
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.avail());
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.used());
        q.set_used_ring_address(l, h);
        q
    }
    /// Makes a chain of (address, length, flags) available; returns its head.
    fn push(&mut self, mem: &GuestMemoryMmap, parts: &[(u64, u32, u16)]) -> u16 {
        if usize::from(self.next_desc) + parts.len() > usize::from(self.size) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, (addr, len, flags)) in parts.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == parts.len();
            let flags = if last { *flags } else { *flags | NEXT };
            let next = if last { 0 } else { idx + 1 };
            let at = self.base + 16 * u64::from(idx);
            mem.write_obj(*addr, GuestAddress(at)).unwrap();
            mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc += parts.len() as u16;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2)).unwrap();
        head
    }
    /// Used elements (head, length) not seen yet.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Rig {
    dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    em: EventManager<Vsock>,
    id: SubscriberId,
    rxq: TestQueue,
    txq: TestQueue,
    irq: EventFd,
    tx_slot: u64,
}

fn gh(op: Op, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: u64::from(CID),
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// The stream was closed by the device: EOF, or a reset where the device
/// closed with unread bytes.
fn assert_closed(s: &mut UnixStream) {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "unexpected {got:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

impl Rig {
    fn new() -> Rig {
        Self::with_limit(MAX_CONNECTIONS)
    }

    fn with_limit(limit: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = guest_memory();
        let mut dev = Vsock::new(&VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        dev.muxer_mut().set_max_connections(limit);
        let rxq = TestQueue::new(0);
        let txq = TestQueue::new(0x1_0000);
        dev.queues_mut()[0] = rxq.queue(&mem);
        dev.queues_mut()[1] = txq.queue(&mem);
        dev.queues_mut()[2] = TestQueue::new(0x2_0000).queue(&mem);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(
            mem.clone(),
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            VIRTIO_F_VERSION_1,
        )
        .unwrap();
        let mut em = EventManager::new().unwrap();
        let id = em.add_subscriber(dev);
        let mut r = Rig {
            dir,
            uds,
            mem,
            em,
            id,
            rxq,
            txq,
            irq,
            tx_slot: 0,
        };
        r.pump();
        r
    }

    fn dev(&mut self) -> &mut Vsock {
        self.em.subscriber_mut(self.id).unwrap()
    }

    /// Runs the event loop until nothing is ready: a loop that never goes
    /// idle (an unmasked, level-triggered fd) fails the test.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    fn notify(&mut self, q: usize) {
        self.dev().queue_events()[q].write(1).unwrap();
        self.pump();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let slot = u64::from(self.rxq.next_desc % 256);
            let addr = RX_BUFS + slot * 0x2000;
            self.rxq.push(&self.mem, &[(addr, RX_BUF, WRITE)]);
        }
        self.notify(0);
    }

    /// Queues a tx chain without telling the device.
    fn queue_tx(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let slot = self.tx_slot % 64;
        self.tx_slot += 1;
        let h = TX_HDRS + slot * 0x100;
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
        if data.is_empty() {
            self.txq.push(&self.mem, &[(h, HDR_LEN as u32, 0)]);
        } else {
            let d = TX_DATA + (slot % 8) * 0x1_0000;
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.txq
                .push(&self.mem, &[(h, HDR_LEN as u32, 0), (d, data.len() as u32, 0)]);
        }
    }

    fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let hdr = PacketHeader {
            len: data.len() as u32,
            ..hdr
        };
        self.queue_tx(&hdr, data);
        self.notify(1);
    }

    /// Packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let used = self.rxq.take_used(&self.mem);
        used.into_iter()
            .map(|(head, len)| {
                let addr = RX_BUFS + u64::from(head) * 0x2000;
                let mut raw = vec![0u8; len as usize];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = parse_header(&raw).unwrap();
                assert_eq!(h.src_cid, HOST_CID);
                assert_eq!(h.dst_cid, u64::from(CID));
                assert_eq!(h.len as usize, raw.len() - HDR_LEN);
                (h, raw[HDR_LEN..].to_vec())
            })
            .collect()
    }

    fn recv_one(&mut self) -> (PacketHeader, Vec<u8>) {
        let mut p = self.recv();
        assert_eq!(p.len(), 1, "{p:?}");
        p.remove(0)
    }

    /// All RW bytes among the received packets, and the other packets.
    fn recv_data(&mut self) -> (Vec<u8>, Vec<PacketHeader>) {
        let mut data = Vec::new();
        let mut other = Vec::new();
        for (h, d) in self.recv() {
            if h.op == Op::Rw {
                data.extend(d);
            } else {
                other.push(h);
            }
        }
        (data, other)
    }

    fn host_connect(&mut self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        self.pump();
        s
    }

    /// A host-initiated connection the guest accepted: (stream, host port).
    fn established(&mut self, guest_port: u32, guest_buf: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect(guest_port);
        self.post_rx(1);
        let (req, _) = self.recv_one();
        assert_eq!(req.op, Op::Request);
        let mut resp = gh(Op::Response, guest_port, req.src_port);
        resp.buf_alloc = guest_buf;
        self.send(resp, &[]);
        let want = format!("OK {}\n", req.src_port);
        assert_eq!(read_n(&mut s, want.len()), want.as_bytes());
        (s, req.src_port)
    }

    fn conns(&mut self) -> usize {
        self.dev().muxer().connection_count()
    }

    fn state(&mut self, local_port: u32, peer_port: u32) -> Option<State> {
        self.dev()
            .muxer()
            .connection(ConnKey { local_port, peer_port })
            .map(|c| c.state())
    }
}

#[test]
fn config_features_and_type() {
    let r = Rig::new();
    let dev = Vsock::new(&VsockConfig {
        guest_cid: 0x1_2345,
        uds_path: r.dir.path().join("other.sock"),
    })
    .unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queues().len(), 3);
    assert_eq!(dev.queue_events().len(), 3);
    assert!(dev.queues().iter().all(|q| q.max_size() == 256));
    let mut b = [0xffu8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_2345);
    let mut b = [0xffu8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn host_initiated_connection_end_to_end() {
    let mut r = Rig::new();
    // The REQUEST waits for the guest's first rx buffer.
    let mut host = r.host_connect(1234);
    assert!(r.recv().is_empty());
    r.post_rx(8);
    let irq_before = r.irq.read().unwrap();
    assert!(irq_before >= 1);
    let (req, _) = r.recv_one();
    assert_eq!(req.op, Op::Request);
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    let local = req.src_port;

    r.send(gh(Op::Response, 1234, local), &[]);
    let ok = format!("OK {local}\n");
    assert_eq!(read_n(&mut host, ok.len()), ok.as_bytes());
    assert_eq!(r.state(local, 1234), Some(State::Established));

    // Host to guest.
    host.write_all(b"hello").unwrap();
    r.pump();
    let (h, d) = r.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rw, local, 1234));
    assert_eq!(d, b"hello");

    // Guest to host.
    r.send(gh(Op::Rw, 1234, local), b"world");
    assert_eq!(read_n(&mut host, 5), b"world");

    // A credit request is answered with our fwd_cnt.
    r.send(gh(Op::CreditRequest, 1234, local), &[]);
    let (h, _) = r.recv_one();
    assert_eq!(h.op, Op::CreditUpdate);
    assert_eq!((h.fwd_cnt, h.buf_alloc), (5, CONN_BUF_ALLOC));

    // Guest shuts down: RST back, host sees EOF, the connection is gone.
    let mut sd = gh(Op::Shutdown, 1234, local);
    sd.flags = SHUTDOWN_BOTH;
    r.send(sd, &[]);
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rst, local, 1234));
    assert_closed(&mut host);
    assert_eq!(r.conns(), 0);
}

#[test]
fn data_sent_with_the_connect_line_is_kept() {
    let mut r = Rig::new();
    let mut host = UnixStream::connect(&r.uds).unwrap();
    host.write_all(b"CONNECT 7\nearly").unwrap();
    r.pump();
    r.post_rx(4);
    let (req, _) = r.recv_one();
    r.send(gh(Op::Response, 7, req.src_port), &[]);
    let (h, d) = r.recv_one();
    assert_eq!(h.op, Op::Rw);
    assert_eq!(d, b"early");
    drop(host);
}

#[test]
fn guest_refusal_and_host_eof() {
    let mut r = Rig::new();
    // No guest listener: RST closes the host stream without an OK.
    let mut host = r.host_connect(99);
    r.post_rx(4);
    let (req, _) = r.recv_one();
    r.send(gh(Op::Rst, 99, req.src_port), &[]);
    assert_closed(&mut host);
    assert_eq!(r.conns(), 0);

    // Host closes an established stream: SHUTDOWN, then the guest's RST.
    let (host, local) = r.established(100, CONN_BUF_ALLOC);
    r.post_rx(2);
    drop(host);
    r.pump();
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.flags), (Op::Shutdown, SHUTDOWN_BOTH));
    assert_eq!(r.state(local, 100), Some(State::LocalClosed));
    r.send(gh(Op::Rst, 100, local), &[]);
    assert_eq!(r.conns(), 0);
    assert!(r.recv().is_empty(), "no reply to a RST");
}

#[test]
fn malformed_connect_lines_are_closed() {
    let mut r = Rig::new();
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'7'; 40]] {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(line).unwrap();
        r.pump();
        assert_closed(&mut s);
    }
    // Closed before the newline.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 1").unwrap();
    r.pump();
    drop(s);
    r.pump();
    r.post_rx(2);
    assert!(r.recv().is_empty());
    assert_eq!(r.conns(), 0);
}

#[test]
fn guest_initiated_connections() {
    let mut r = Rig::new();
    let listener = UnixListener::bind(format!("{}_52", r.uds.display())).unwrap();
    r.post_rx(8);
    let mut req = gh(Op::Request, 5000, 52);
    req.buf_alloc = 8192;
    r.send(req, &[]);
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Response, 52, 5000));
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    r.send(gh(Op::Rw, 5000, 52), b"ping");
    assert_eq!(read_n(&mut peer, 4), b"ping");
    peer.write_all(b"pong").unwrap();
    r.pump();
    let (h, d) = r.recv_one();
    assert_eq!((h.op, h.fwd_cnt), (Op::Rw, 4));
    assert_eq!(d, b"pong");

    // Nobody listens on port 53.
    r.send(gh(Op::Request, 5001, 53), &[]);
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rst, 53, 5001));
    assert_eq!(r.conns(), 1);

    // Half close from the guest: the host reads EOF but can still write.
    let mut sd = gh(Op::Shutdown, 5000, 52);
    sd.flags = SHUTDOWN_SEND;
    r.send(sd, &[]);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    peer.write_all(b"late").unwrap();
    r.pump();
    let (h, d) = r.recv_one();
    assert_eq!(h.op, Op::Rw);
    assert_eq!(d, b"late");
}

#[test]
fn unknown_and_misaddressed_packets() {
    let mut r = Rig::new();
    r.post_rx(8);
    // Unknown connection: RST, except for a RST.
    r.send(gh(Op::Rw, 1, 2), b"x");
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rst, 2, 1));
    r.send(gh(Op::Rst, 1, 2), &[]);
    r.send(gh(Op::CreditUpdate, 1, 2), &[]);
    let (h, _) = r.recv_one();
    assert_eq!(h.op, Op::Rst);
    // Wrong source or destination CID: dropped.
    let mut bad = gh(Op::Request, 1, 2);
    bad.src_cid = 4;
    r.send(bad, &[]);
    let mut bad = gh(Op::Request, 1, 2);
    bad.dst_cid = 5;
    r.send(bad, &[]);
    assert!(r.recv().is_empty());
}

#[test]
fn guest_credit_bounds_host_to_guest_data() {
    let mut r = Rig::new();
    let (mut host, local) = r.established(10, 1000);
    r.post_rx(16);
    host.write_all(&[0xab; 5000]).unwrap();
    r.pump();
    let (data, other) = r.recv_data();
    assert_eq!(data.len(), 1000, "no more than the guest's buf_alloc");
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].op, Op::CreditRequest);
    // Stalled, and quiet: nothing more however often the loop runs.
    r.notify(0);
    assert!(r.recv().is_empty());

    // The guest read it all.
    let mut up = gh(Op::CreditUpdate, 10, local);
    up.buf_alloc = 1000;
    up.fwd_cnt = 1000;
    r.send(up, &[]);
    let (data, _) = r.recv_data();
    assert_eq!(data.len(), 1000);

    // A bigger buffer lets the rest through.
    up.buf_alloc = 64 * 1024;
    up.fwd_cnt = 2000;
    r.send(up, &[]);
    let (data, _) = r.recv_data();
    assert_eq!(data.len(), 3000);
    assert!(data.iter().all(|b| *b == 0xab));
}

#[test]
fn a_stalled_connection_does_not_block_others() {
    let mut r = Rig::new();
    // A: the guest has no credit left for host data.
    let (mut host_a, _) = r.established(20, 100);
    r.post_rx(8);
    host_a.write_all(&[1; 1000]).unwrap();
    r.pump();
    let (data, _) = r.recv_data();
    assert_eq!(data.len(), 100);

    // B: its host peer does not read, so guest data piles up in our buffer.
    let (mut host_b, local_b) = r.established(21, CONN_BUF_ALLOC);
    let mut b_fwd_seen = 0;
    let mut note_b = |pkts: &[(PacketHeader, Vec<u8>)]| {
        for (h, _) in pkts.iter().filter(|(h, _)| h.src_port == local_b) {
            b_fwd_seen = b_fwd_seen.max(h.fwd_cnt);
        }
    };
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    for _ in 0..(CONN_BUF_ALLOC as usize / MAX_PKT_PAYLOAD) {
        r.send(gh(Op::Rw, 21, local_b), &chunk);
    }
    note_b(&r.recv());
    assert_eq!(r.conns(), 2);

    // C still works both ways.
    let (mut host_c, local_c) = r.established(22, CONN_BUF_ALLOC);
    r.post_rx(4);
    r.send(gh(Op::Rw, 22, local_c), b"abc");
    assert_eq!(read_n(&mut host_c, 3), b"abc");
    host_c.write_all(b"xyz").unwrap();
    r.pump();
    let pkts = r.recv();
    note_b(&pkts);
    let data: Vec<u8> = pkts
        .iter()
        .filter(|(h, _)| h.op == Op::Rw)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(data, b"xyz");

    // B's peer drains everything, in order.
    r.post_rx(4);
    host_b.set_nonblocking(true).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        match host_b.read(&mut buf) {
            Ok(n) => {
                assert!(buf[..n].iter().all(|b| *b == 7));
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        r.pump();
        if got == CONN_BUF_ALLOC as usize {
            break;
        }
    }
    assert_eq!(got, CONN_BUF_ALLOC as usize);
    // The guest heard of enough forwarded bytes to keep sending.
    note_b(&r.recv());
    assert!(b_fwd_seen > CONN_BUF_ALLOC / 2, "{b_fwd_seen}");
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut r = Rig::new();
    let (host, local) = r.established(30, CONN_BUF_ALLOC);
    r.post_rx(4);
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    for _ in 0..(CONN_BUF_ALLOC as usize / MAX_PKT_PAYLOAD) + 4 {
        r.queue_tx(
            &PacketHeader {
                len: chunk.len() as u32,
                ..gh(Op::Rw, 30, local)
            },
            &chunk,
        );
    }
    r.notify(1);
    let pkts = r.recv();
    assert!(pkts.iter().any(|(h, _)| h.op == Op::Rst));
    assert_eq!(r.conns(), 0);
    drop(host);
}

/// Connections whose host peers never read may each hold their credit,
/// but not past the VM's cap: the one that crosses it is reset, the bytes
/// it held are released, and other connections go on.
#[test]
fn unread_guest_bytes_are_capped_per_vm() {
    let mut r = Rig::new();
    let cap = 64 * 1024;
    r.dev().muxer_mut().set_max_buffered(cap);
    let chunk = vec![3u8; MAX_PKT_PAYLOAD];
    let mut stalled = Vec::new();
    let mut reset = None;
    'conns: for port in 100..110 {
        let (host, local) = r.established(port, CONN_BUF_ALLOC);
        stalled.push(host);
        for _ in 0..(CONN_BUF_ALLOC as usize / MAX_PKT_PAYLOAD) {
            r.send(gh(Op::Rw, port, local), &chunk);
            if r.state(local, port).is_none() {
                reset = Some(port);
                break 'conns;
            }
            assert!(r.dev().muxer().buffered_bytes() <= cap);
        }
    }
    let port = reset.expect("no connection was reset at the VM's cap");
    r.post_rx(4);
    assert!(r.recv().iter().any(|(h, _)| h.op == Op::Rst && h.dst_port == port));
    assert!(r.dev().muxer().buffered_bytes() <= cap);
    // A fresh connection still carries data.
    let (mut host, local) = r.established(200, CONN_BUF_ALLOC);
    r.send(gh(Op::Rw, 200, local), b"still here");
    assert_eq!(read_n(&mut host, 10), b"still here");
    drop(stalled);
    r.pump();
}

#[test]
fn guest_shutdown_with_buffered_bytes_flushes_first() {
    let mut r = Rig::new();
    let (mut host, local) = r.established(40, CONN_BUF_ALLOC);
    r.post_rx(4);
    let chunk = vec![9u8; MAX_PKT_PAYLOAD];
    for _ in 0..4 {
        r.send(gh(Op::Rw, 40, local), &chunk);
    }
    let mut sd = gh(Op::Shutdown, 40, local);
    sd.flags = SHUTDOWN_BOTH;
    r.send(sd, &[]);
    let mut all = Vec::new();
    host.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        match host.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        r.pump();
    }
    assert_eq!(all.len(), 4 * MAX_PKT_PAYLOAD);
    assert!(r.recv().iter().any(|(h, _)| h.op == Op::Rst));
    assert_eq!(r.conns(), 0);
}

#[test]
fn malformed_tx_chains_never_panic_and_the_queue_moves_on() {
    let mut r = Rig::new();
    let (mut host, local) = r.established(60, CONN_BUF_ALLOC);
    r.post_rx(8);
    let good = gh(Op::Rw, 60, local);
    let h = TX_HDRS + 0x8000;
    r.mem
        .write_slice(&PacketHeader { len: 100, ..good }.to_bytes(), GuestAddress(h))
        .unwrap();
    let chains: Vec<Vec<(u64, u32, u16)>> = vec![
        // Header outside guest memory.
        vec![(0xffff_ffff_0000, 44, 0)],
        // Header too short.
        vec![(h, 20, 0)],
        // Header in a device-writable descriptor (wrong direction).
        vec![(h, 44, WRITE)],
    ];
    r.txq.take_used(&r.mem);
    for c in &chains {
        r.txq.push(&r.mem, c);
    }
    r.notify(1);
    assert_eq!(r.txq.take_used(&r.mem).len(), chains.len());
    assert!(r.recv().is_empty(), "nothing to answer");
    assert_eq!(r.conns(), 1);

    // len larger than the data descriptor, or a data descriptor past the
    // end of memory: bytes lost, the stream is reset.
    r.txq.push(&r.mem, &[(h, 44, 0), (TX_DATA, 10, 0)]);
    r.notify(1);
    assert_eq!(r.txq.take_used(&r.mem).len(), 1);
    let (rst, _) = r.recv_one();
    assert_eq!((rst.op, rst.src_port), (Op::Rst, local));
    assert_eq!(r.conns(), 0);
    assert_closed(&mut host);

    let (mut host, local) = r.established(62, CONN_BUF_ALLOC);
    r.mem
        .write_slice(
            &PacketHeader {
                len: 100,
                ..gh(Op::Rw, 62, local)
            }
            .to_bytes(),
            GuestAddress(h),
        )
        .unwrap();
    r.txq.push(&r.mem, &[(h, 44, 0), (TX_DATA, u32::MAX, 0)]);
    r.notify(1);
    let (rst, _) = r.recv_one();
    assert_eq!((rst.op, rst.src_port), (Op::Rst, local));
    assert_closed(&mut host);
    r.txq.take_used(&r.mem);

    // Bad type and oversized len in otherwise readable headers.
    let mut raw = gh(Op::Request, 1, 2).to_bytes();
    raw[28] = 2;
    r.mem.write_slice(&raw, GuestAddress(h)).unwrap();
    r.txq.push(&r.mem, &[(h, 44, 0)]);
    let mut raw = gh(Op::Rw, 1, 2).to_bytes();
    raw[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
    r.mem.write_slice(&raw, GuestAddress(h + 0x100)).unwrap();
    r.txq.push(&r.mem, &[(h + 0x100, 44, 0)]);
    r.notify(1);
    assert_eq!(r.txq.take_used(&r.mem).len(), 2);
    assert!(r.recv().is_empty());

    // The device still works.
    let (_host, local) = r.established(61, CONN_BUF_ALLOC);
    assert_eq!(r.state(local, 61), Some(State::Established));
}

#[test]
fn tiny_and_bad_rx_buffers_are_returned_empty() {
    let mut r = Rig::new();
    let _host = r.host_connect(70);
    let mem = r.mem.clone();
    r.rxq.push(&mem, &[(RX_BUFS, 10, WRITE)]);
    r.rxq.push(&mem, &[(0xffff_ffff_0000, 4096, WRITE)]);
    r.rxq.push(&mem, &[(RX_BUFS + 0x2000 * 2, 4096, 0)]);
    r.post_rx(1);
    let used = r.rxq.take_used(&r.mem);
    assert_eq!(used.len(), 4);
    assert_eq!(&used[..3].iter().map(|u| u.1).collect::<Vec<_>>(), &[0, 0, 0]);
    assert_eq!(used[3].1, HDR_LEN as u32, "the REQUEST got the good one");

    // A good buffer behind an indirect table (never offered) is refused;
    // the next packet goes to the next direct buffer.
    let _second = r.host_connect(71);
    const TABLE: u64 = 0x30_0000;
    let good = RX_BUFS + 0x2000 * 5;
    use virtio_queue::desc::split::Descriptor as D;
    mem.write_obj(D::new(good, RX_BUF, WRITE, 0), GuestAddress(TABLE))
        .unwrap();
    let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    r.rxq.push(&mem, &[(TABLE, 16, indirect)]);
    r.post_rx(1);
    let used = r.rxq.take_used(&r.mem);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [0, HDR_LEN as u32],
        "{used:?}"
    );
}

#[test]
fn connection_limit() {
    let mut r = Rig::with_limit(2);
    let (_a, _) = r.established(80, CONN_BUF_ALLOC);
    let _b = r.host_connect(81);
    assert_eq!(r.conns(), 2);
    // A third host connection is closed at once.
    let mut c = r.host_connect(82);
    assert_closed(&mut c);
    // A guest REQUEST is refused too, even with a listener.
    let _l = UnixListener::bind(format!("{}_83", r.uds.display())).unwrap();
    r.post_rx(4);
    let _ = r.recv();
    r.send(gh(Op::Request, 9000, 83), &[]);
    let (h, _) = r.recv_one();
    assert_eq!(h.op, Op::Rst);
    assert_eq!(r.conns(), 2);
}

#[test]
fn silent_host_connections_give_way_when_slots_run_out() {
    let mut r = Rig::with_limit(2);
    // Two host processes connect and never send their CONNECT line.
    let mut silent: Vec<UnixStream> = (0..2).map(|_| UnixStream::connect(&r.uds).unwrap()).collect();
    r.pump();
    // Within the deadline they keep their slots.
    let mut early = r.host_connect(90);
    assert_closed(&mut early);
    // Past it, a new connection evicts them instead of being refused.
    r.dev().muxer_mut().set_pending_deadline(Duration::ZERO);
    let _late = r.host_connect(91);
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_closed(s);
    }
    assert_eq!(r.conns(), 1, "the new connection took a slot");
}

#[test]
fn reset_closes_everything_and_the_loop_stays_sound() {
    let mut r = Rig::new();
    let (mut host, _) = r.established(90, CONN_BUF_ALLOC);
    r.dev().reset();
    r.pump();
    assert_closed(&mut host);
    assert_eq!(r.conns(), 0);
    assert!(!r.dev().is_activated());
    // New host connections are still accepted and their fds reusable.
    let _h = r.host_connect(91);
    assert_eq!(r.conns(), 1);
}

#[test]
fn socket_file_lifecycle_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let cfg = |cid, p: &Path| VsockConfig {
        guest_cid: cid,
        uds_path: p.into(),
    };
    for cid in [0, 1, 2, u32::MAX] {
        assert!(matches!(
            Vsock::new(&cfg(cid, &path)),
            Err(VsockError::ReservedCid(c)) if c == cid
        ));
    }
    assert!(!path.exists());
    let dev = Vsock::new(&cfg(u32::MAX - 1, &path)).unwrap();
    assert!(path.exists());
    assert!(matches!(Vsock::new(&cfg(3, &path)), Err(VsockError::PathExists(_))));
    drop(dev);
    assert!(!path.exists(), "Drop removes the socket");
    assert!(matches!(
        Vsock::new(&cfg(3, &dir.path().join("no/such/dir"))),
        Err(VsockError::Bind { .. })
    ));
}

#[test]
fn activation_needs_all_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory();
    let mut dev = Vsock::new(&VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v"),
    })
    .unwrap();
    dev.queues_mut()[0] = queue_with_chains(&mem, 16, &[]);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = dev
        .activate(mem, Arc::new(Interrupt::new(irq)), VIRTIO_F_VERSION_1)
        .unwrap_err();
    assert_eq!(err, crate::devices::virtio::ActivateError::BadQueue(1));
}

fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A benchmark, not a check: bytes per CPU-second through the device and
/// its Unix-socket side, with this test playing both the guest driver (mock
/// queues, 4 KiB rx buffers as Linux posts them, 64 KiB tx packets) and the
/// host peer. The CPU time is the whole process's, so it includes both.
///   cargo test --release -p bulkhead-vmm --lib vsock_throughput -- --ignored --nocapture
#[test]
#[ignore]
fn vsock_throughput() {
    const TOTAL: usize = 256 << 20;
    // Host to guest.
    let mut r = Rig::new();
    let (mut s, host_port) = r.established(1024, u32::MAX / 2);
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0xabu8; 64 * 1024];
    let (mut sent, mut got) = (0usize, 0usize);
    let start = cpu_time();
    // Keep 128 rx buffers posted, re-posting as many as come back.
    let mut repost = 128;
    while got < TOTAL {
        while sent < TOTAL {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        r.post_rx(repost);
        let packets = r.recv();
        repost = packets.len();
        got += packets
            .iter()
            .filter(|(h, _)| h.op == Op::Rw)
            .map(|(_, d)| d.len())
            .sum::<usize>();
    }
    let h2g = cpu_time() - start;
    println!(
        "vsock host->guest: {:.0} MiB/CPU-s ({} MiB)",
        (got >> 20) as f64 / h2g.as_secs_f64(),
        got >> 20
    );
    drop(s);

    // Guest to host, staying inside the device's advertised credit.
    let mut r = Rig::new();
    let (mut s, host_port2) = r.established(1025, CONN_BUF_ALLOC);
    let _ = host_port;
    s.set_nonblocking(true).unwrap();
    let payload = vec![0x5au8; 64 * 1024];
    let (mut sent, mut got) = (0usize, 0usize);
    let mut buf = vec![0u8; 256 * 1024];
    let start = cpu_time();
    while got < TOTAL {
        // Two packets (128 KiB) in flight, then drain the host side.
        for _ in 0..2 {
            let mut h = gh(Op::Rw, 1025, host_port2);
            h.len = payload.len() as u32;
            h.fwd_cnt = 0;
            r.queue_tx(&h, &payload);
            sent += payload.len();
        }
        r.notify(1);
        while got < sent {
            match s.read(&mut buf) {
                Ok(0) => panic!("host stream closed"),
                Ok(n) => got += n,
                Err(_) => r.pump(),
            }
        }
        r.post_rx(8);
        let _ = r.recv();
    }
    let g2h = cpu_time() - start;
    println!(
        "vsock guest->host: {:.0} MiB/CPU-s ({} MiB)",
        (got >> 20) as f64 / g2h.as_secs_f64(),
        got >> 20
    );
}

/// After a restore the device writes `virtio_vsock_event { id: 0 }` into
/// a buffer the driver posted on the event queue and signals it.
#[test]
fn transport_reset_event_lands_in_an_event_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory();
    let mut dev = Vsock::new(&VsockConfig {
        guest_cid: CID,
        uds_path: dir.path().join("v.sock"),
    })
    .unwrap();
    let mut evq = TestQueue::new(0x2_0000);
    dev.queues_mut()[0] = TestQueue::new(0).queue(&mem);
    dev.queues_mut()[1] = TestQueue::new(0x1_0000).queue(&mem);
    dev.queues_mut()[2] = evq.queue(&mem);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    dev.activate(mem.clone(), interrupt.clone(), VIRTIO_F_VERSION_1)
        .unwrap();
    let _ = irq.read();

    assert!(!dev.send_transport_reset(), "no event buffer posted yet");
    assert!(irq.read().is_err(), "nothing to signal without a buffer");

    const EVT_BUF: u64 = 0x30_0000;
    mem.write_slice(&[0xff; 8], GuestAddress(EVT_BUF)).unwrap();
    let head = evq.push(&mem, &[(EVT_BUF, 8, WRITE)]);
    assert!(dev.send_transport_reset());
    assert_eq!(evq.take_used(&mem), vec![(u32::from(head), 4)]);
    let mut got = [0u8; 8];
    mem.read_slice(&mut got, GuestAddress(EVT_BUF)).unwrap();
    assert_eq!(
        got,
        [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        "id = TRANSPORT_RESET (0), le32"
    );
    assert_eq!(irq.read().unwrap(), 1);
    assert_ne!(interrupt.status() & crate::devices::virtio::INTERRUPT_USED_BUFFER, 0);

    // A read-only buffer cannot take the event: it goes back unused.
    let head = evq.push(&mem, &[(EVT_BUF, 8, 0)]);
    assert!(!dev.send_transport_reset());
    assert_eq!(evq.take_used(&mem), vec![(u32::from(head), 0)]);
}

/// After a restore's transport reset, a host connection gets no REQUEST
/// until the driver has handled the event (it re-posts its event buffer
/// and notifies the event queue): the guest would reset a connection it
/// accepted before that without telling the host. Guest traffic is not
/// held, and a device without an event buffer holds nothing.
#[test]
fn host_connections_wait_for_the_guest_to_handle_a_transport_reset() {
    let mut r = Rig::new();
    let mut evq = TestQueue::new(0x2_0000);
    r.dev().queues_mut()[2] = evq.queue(&r.mem);
    const EVT_BUF: u64 = 0x30_0000;
    evq.push(&r.mem, &[(EVT_BUF, 8, WRITE)]);
    // A restore activates the device again, which signals its queues for
    // the event loop, then says it was restored: the event loop's turn
    // after that is not the guest's answer.
    r.dev().activated(VIRTIO_F_VERSION_1);
    r.dev().restored();
    assert!(r.dev().muxer().holds_host_connections());
    r.pump();
    assert!(
        r.dev().muxer().holds_host_connections(),
        "released before the guest answered"
    );
    r.post_rx(4);

    let mut held = r.host_connect(1024);
    assert!(r.recv().is_empty(), "a REQUEST went out before the reset was handled");
    // The guest may still connect out meanwhile.
    let listener = UnixListener::bind(format!("{}_77", r.uds.display())).unwrap();
    r.send(gh(Op::Request, 6000, 77), &[]);
    let (resp, _) = r.recv_one();
    assert_eq!(resp.op, Op::Response);

    // The driver handled the event and put its buffer back.
    evq.push(&r.mem, &[(EVT_BUF, 8, WRITE)]);
    r.notify(2);
    assert!(!r.dev().muxer().holds_host_connections());
    let (req, _) = r.recv_one();
    assert_eq!((req.op, req.dst_port), (Op::Request, 1024));
    r.send(gh(Op::Response, 1024, req.src_port), &[]);
    let want = format!("OK {}\n", req.src_port);
    assert_eq!(read_n(&mut held, want.len()), want.as_bytes());
    drop(listener);

    // Without an event buffer there is no reset to wait for.
    let mut r = Rig::new();
    r.dev().restored();
    assert!(!r.dev().muxer().holds_host_connections());
}

/// A new connection's REQUEST takes the next rx buffer ahead of another
/// connection's waiting bulk data, however much of it there is.
#[test]
fn connection_requests_go_ahead_of_bulk_data() {
    let mut r = Rig::new();
    let (mut bulk, _) = r.established(40, CONN_BUF_ALLOC);
    bulk.write_all(&vec![9u8; 64 * 1024]).unwrap();
    r.pump();
    assert!(r.recv().is_empty(), "no rx buffers posted yet");
    let _new = r.host_connect(41);
    r.post_rx(1);
    let (h, _) = r.recv_one();
    assert_eq!((h.op, h.dst_port), (Op::Request, 41));
    r.post_rx(1);
    let (h, d) = r.recv_one();
    assert_eq!((h.op, h.dst_port, d.len()), (Op::Rw, 40, RX_BUF as usize - HDR_LEN));
}
