//! The host side of the device: the listening Unix socket, the connection
//! table, and the order in which connections get the guest's rx buffers.
//!
//! Nothing here touches epoll directly. Handlers only change state and note
//! the fds whose watched events may have changed; `sync_interest` applies
//! that at the end of each event-loop callback, and closed streams are kept
//! until then so that an fd is always unregistered before it is closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};

use super::connection::{ConnKey, Connection, Verdict};
use super::packet::{Op, PacketHeader, HOST_CID};
use super::unix::{connect_nonblocking, read_connect_line, LineRead};
use super::VsockError;
use crate::socket_file::SocketFile;

/// Live connections at most, host streams still sending their CONNECT line
/// included.
pub const MAX_CONNECTIONS: usize = 1024;
/// Guest bytes held for host peers that do not read, summed over the VM's
/// connections. Each connection may hold its credit (`CONN_BUF_ALLOC`),
/// but a guest must not make the VMM hold that for every connection at
/// once: past this, the connection whose bytes crossed it is reset.
pub const MAX_VM_BUFFERED: usize = 32 << 20;
/// RSTs waiting for rx buffers at most; beyond that they are dropped (a
/// guest that floods bad packets without reading loses replies).
const MAX_QUEUED_RST: usize = 2 * MAX_CONNECTIONS;
/// Host-side ports for host-initiated connections come from here up.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Where this VMM starts handing out host ports: a random point in the
/// upper range. A guest restored from a snapshot may still hold sockets
/// for host ports an earlier VMM of the same snapshot used; starting at a
/// fixed port would hand those out again, and the guest would reset them.
fn first_host_port() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == 4 { u32::from_ne_bytes(b) } else { 0 };
    // The top half of the range is left for the counter to run into.
    FIRST_HOST_PORT + r % (1 << 30)
}

enum Owner {
    /// Accepted, waiting for `CONNECT <port>\n`.
    Pending,
    Conn(ConnKey),
}

struct PendingStream {
    stream: UnixStream,
    line: Vec<u8>,
    registered: Option<EventSet>,
    accepted: Instant,
}

/// A host process has this long to send its `CONNECT` line once other
/// connections need the slot; a client that connects and stays silent
/// must not hold connection slots forever.
pub const PENDING_DEADLINE: Duration = Duration::from_secs(5);

pub struct Muxer {
    guest_cid: u64,
    listener: UnixListener,
    socket_file: SocketFile,
    max_connections: usize,
    max_buffered: usize,
    /// The sum of the connections' buffered guest bytes.
    buffered: usize,
    pending_deadline: Duration,
    conns: HashMap<ConnKey, Connection>,
    pending: HashMap<RawFd, PendingStream>,
    by_fd: HashMap<RawFd, Owner>,
    /// Connections with something for the guest, served round-robin.
    rx_ready: VecDeque<ConnKey>,
    /// Connections whose next packet opens them: served before data, so a
    /// connection is answered however much bulk data is waiting.
    rx_setup: VecDeque<ConnKey>,
    /// RSTs owed for connections already freed or never known.
    rst_queue: VecDeque<PacketHeader>,
    /// Closed streams, with what they are registered for, until unregistered.
    graveyard: Vec<(UnixStream, Option<EventSet>)>,
    /// Fds whose watched events may have changed.
    dirty: Vec<RawFd>,
    host_ports: HashSet<u32>,
    next_port: u32,
    /// Host connections wait here, REQUEST unsent, while the guest has not
    /// yet handled a transport reset: its handler resets every connected
    /// socket, a new one included, and tells the host nothing.
    held: Option<Vec<ConnKey>>,
}

impl Muxer {
    /// Closes every connection and removes the socket file, for a VMM that
    /// is ending while other threads still hold the device.
    pub fn release(&mut self) {
        self.socket_file.remove();
        self.conns.clear();
        self.buffered = 0;
        self.pending.clear();
        self.by_fd.clear();
        self.graveyard.clear();
    }

    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        let shown = uds_path.display().to_string();
        let bind_err = |source| VsockError::Bind {
            path: shown.clone(),
            source,
        };
        let (listener, socket_file) = SocketFile::bind(uds_path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => VsockError::PathExists(shown.clone()),
            _ => bind_err(e),
        })?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Muxer {
            guest_cid: u64::from(guest_cid),
            listener,
            socket_file,
            max_connections: MAX_CONNECTIONS,
            max_buffered: MAX_VM_BUFFERED,
            buffered: 0,
            pending_deadline: PENDING_DEADLINE,
            conns: HashMap::new(),
            pending: HashMap::new(),
            by_fd: HashMap::new(),
            rx_ready: VecDeque::new(),
            rx_setup: VecDeque::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            dirty: Vec::new(),
            host_ports: HashSet::new(),
            next_port: first_host_port(),
            held: None,
        })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    #[cfg(test)]
    pub fn set_max_buffered(&mut self, bytes: usize) {
        self.max_buffered = bytes;
    }

    /// Guest bytes held for host peers, over all connections.
    #[cfg(test)]
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    #[cfg(test)]
    pub fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }

    #[cfg(test)]
    pub fn set_pending_deadline(&mut self, d: Duration) {
        self.pending_deadline = d;
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    fn live(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Whether a guest rx buffer could be filled now.
    pub fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_setup.is_empty() || !self.rx_ready.is_empty()
    }

    /// Accepts every waiting host connection.
    pub fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: cannot accept a host connection: {e}");
                    return;
                }
            };
            if self.live() >= self.max_connections {
                self.evict_stale_pending();
            }
            if self.live() >= self.max_connections {
                warn!(
                    "vsock: {} connections open; closing a new host connection",
                    self.max_connections
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("vsock: cannot make a host connection non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            self.pending.insert(
                fd,
                PendingStream {
                    stream,
                    line: Vec::new(),
                    registered: None,
                    accepted: Instant::now(),
                },
            );
            self.by_fd.insert(fd, Owner::Pending);
            // The line often arrives with the connection.
            self.read_pending(fd);
        }
    }

    fn read_pending(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let port = match read_connect_line(&mut p.stream, &mut p.line) {
            LineRead::Incomplete => {
                self.dirty.push(fd);
                return;
            }
            LineRead::Reject(why) => {
                debug!("vsock: dropping a host connection: {why}");
                self.drop_pending(fd);
                return;
            }
            LineRead::Port(port) => port,
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        self.by_fd.remove(&fd);
        // Still counted while pending, so the limit was checked at accept.
        let local_port = self.alloc_port(port);
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        debug!("vsock: host connects to guest port {port} from {local_port}");
        let conn = Connection::new_local(p.stream, key, self.guest_cid, p.registered);
        self.insert(conn);
    }

    /// Closes host streams that never sent their CONNECT line in time.
    fn evict_stale_pending(&mut self) {
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.accepted.elapsed() >= self.pending_deadline)
            .map(|(fd, _)| *fd)
            .collect();
        if !stale.is_empty() {
            warn!(
                "vsock: closing {} host connections that sent no CONNECT line",
                stale.len()
            );
        }
        for fd in stale {
            self.drop_pending(fd);
        }
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            self.by_fd.remove(&fd);
            self.graveyard.push((p.stream, p.registered));
        }
    }

    /// A free local port for a connection to guest port `peer`: not handed
    /// out already, and not the local end of a guest-initiated connection
    /// from that same guest port (the two would share a key).
    fn alloc_port(&mut self, peer: u32) -> u32 {
        // At most max_connections ports are taken, so this ends quickly.
        loop {
            let p = self.next_port;
            self.next_port = if p >= u32::MAX - 1 { FIRST_HOST_PORT } else { p + 1 };
            let key = ConnKey {
                local_port: p,
                peer_port: peer,
            };
            if !self.conns.contains_key(&key) && self.host_ports.insert(p) {
                return p;
            }
        }
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key;
        let fd = conn.fd();
        self.by_fd.insert(fd, Owner::Conn(key));
        self.conns.insert(key, conn);
        self.dirty.push(fd);
        self.schedule(key);
    }

    /// Holds new host connections until [`Muxer::release_host_connections`]
    /// (the guest re-posted its event buffer after a transport reset).
    pub fn hold_host_connections(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// The guest handled the transport reset: held connections go ahead.
    pub fn release_host_connections(&mut self) {
        for key in self.held.take().unwrap_or_default() {
            self.schedule(key);
        }
    }

    pub fn holds_host_connections(&self) -> bool {
        self.held.is_some()
    }

    fn schedule(&mut self, key: ConnKey) {
        if let (Some(held), Some(c)) = (&mut self.held, self.conns.get(&key)) {
            if c.owes_request() {
                held.push(key);
                return;
            }
        }
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_queue && c.wants_rx() {
                c.in_rx_queue = true;
                if c.owes_setup() {
                    self.rx_setup.push_back(key);
                } else {
                    self.rx_ready.push_back(key);
                }
            }
        }
    }

    /// Frees a connection; its stream closes at the next `sync_interest`.
    fn close(&mut self, key: ConnKey, rst: bool) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        self.buffered -= c.buffered();
        self.by_fd.remove(&c.fd());
        if c.host_initiated {
            self.host_ports.remove(&key.local_port);
        }
        if rst {
            let h = c.rst_header();
            self.push_rst(h);
        }
        self.graveyard.push((c.stream, c.registered));
    }

    fn push_rst(&mut self, h: PacketHeader) {
        if self.rst_queue.len() >= MAX_QUEUED_RST {
            debug!("vsock: RST queue full; dropping one");
            return;
        }
        self.rst_queue.push_back(h);
    }

    /// Answers a packet that has no connection (or a bad one) with a RST.
    fn reply_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op == Op::Rst {
            return;
        }
        self.push_rst(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn addressed_to_us(&self, hdr: &PacketHeader) -> bool {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            debug!(
                "vsock: dropping a packet from CID {} to CID {}",
                hdr.src_cid, hdr.dst_cid
            );
            return false;
        }
        true
    }

    fn key_of(hdr: &PacketHeader) -> ConnKey {
        ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }

    /// A packet the guest sent, header already validated; `payload` is the
    /// RW data (empty for other operations).
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if !self.addressed_to_us(hdr) {
            return;
        }
        let key = Self::key_of(hdr);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                Op::Request => self.connect_to_host(hdr, key),
                _ => self.reply_rst(hdr),
            }
            return;
        };
        let before = conn.buffered();
        let verdict = conn.on_guest_packet(hdr, payload);
        self.buffered = self.buffered - before + conn.buffered();
        match verdict {
            Verdict::Close { rst } => self.close(key, rst),
            Verdict::Keep if self.buffered > self.max_buffered => {
                warn!(
                    "vsock: the guest's unread bytes passed {} MiB; resetting guest port {}",
                    self.max_buffered >> 20,
                    hdr.src_port
                );
                self.close(key, true);
            }
            Verdict::Keep => {
                self.dirty.push(conn.fd());
                self.schedule(key);
            }
        }
    }

    /// A packet whose payload could not be read as its header says.
    pub fn on_invalid_packet(&mut self, hdr: &PacketHeader) {
        if !self.addressed_to_us(hdr) {
            return;
        }
        let key = Self::key_of(hdr);
        if self.conns.contains_key(&key) {
            // Bytes were lost; the stream cannot go on.
            self.close(key, true);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// The guest connects to host port `dst_port`: `<uds_path>_<port>`.
    fn connect_to_host(&mut self, hdr: &PacketHeader, key: ConnKey) {
        if self.live() >= self.max_connections {
            warn!(
                "vsock: {} connections open; refusing guest port {}",
                self.max_connections, hdr.src_port
            );
            self.reply_rst(hdr);
            return;
        }
        let mut path = self.socket_file.path().as_os_str().to_owned();
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                debug!("vsock: guest connects to host port {}", hdr.dst_port);
                self.insert(Connection::new_peer(stream, key, self.guest_cid, hdr));
            }
            Err(e) => {
                debug!("vsock: no host listener for port {}: {e}", hdr.dst_port);
                self.reply_rst(hdr);
            }
        }
    }

    /// Readiness on a stream fd we own.
    pub fn on_stream_event(&mut self, fd: RawFd, set: EventSet) {
        let key = match self.by_fd.get(&fd) {
            Some(Owner::Pending) => return self.read_pending(fd),
            Some(Owner::Conn(key)) => *key,
            None => {
                debug!("vsock: event for unknown fd {fd}");
                return;
            }
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let before = conn.buffered();
        let verdict = conn.on_stream_event(set);
        self.buffered = self.buffered - before + conn.buffered();
        match verdict {
            Verdict::Close { rst } => self.close(key, rst),
            Verdict::Keep => {
                self.dirty.push(fd);
                self.schedule(key);
            }
        }
    }

    /// The next packet for the guest, its payload in `buf[..len]`; `buf`
    /// bounds the payload. RSTs first, then connections being opened, then
    /// the others in turn.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some(h);
        }
        for _ in 0..self.rx_setup.len() + self.rx_ready.len() {
            let key = match self.rx_setup.pop_front() {
                Some(k) => k,
                None => self.rx_ready.pop_front()?,
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            let (pkt, verdict) = conn.next_rx_packet(buf);
            self.dirty.push(conn.fd());
            if let Verdict::Close { rst } = verdict {
                self.close(key, rst);
                if let Some(h) = self.rst_queue.pop_front() {
                    return Some(h);
                }
                continue;
            }
            self.schedule(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// A packet could not be written to the guest's buffer.
    pub fn rx_delivery_failed(&mut self, hdr: &PacketHeader) {
        let key = ConnKey {
            local_port: hdr.src_port,
            peer_port: hdr.dst_port,
        };
        if hdr.op != Op::Rst {
            self.close(key, true);
        }
    }

    /// Closes every connection (device reset); the guest has forgotten them.
    pub fn close_all(&mut self) {
        for (_, c) in self.conns.drain() {
            self.graveyard.push((c.stream, c.registered));
        }
        self.buffered = 0;
        for (_, p) in self.pending.drain() {
            self.graveyard.push((p.stream, p.registered));
        }
        self.by_fd.clear();
        self.host_ports.clear();
        self.rx_ready.clear();
        self.rx_setup.clear();
        self.rst_queue.clear();
        self.dirty.clear();
    }

    /// Whether `sync_interest` has work.
    pub fn needs_sync(&self) -> bool {
        !self.dirty.is_empty() || !self.graveyard.is_empty()
    }

    /// Brings the event loop's watch list in line with the connections, and
    /// closes the streams freed since the last call.
    pub fn sync_interest(&mut self, ops: &mut EventOps) {
        let mut failed = Vec::new();
        for fd in std::mem::take(&mut self.dirty) {
            let (registered, want) = match self.by_fd.get(&fd) {
                Some(Owner::Pending) => match self.pending.get_mut(&fd) {
                    Some(p) => (&mut p.registered, Some(EventSet::IN)),
                    None => continue,
                },
                Some(Owner::Conn(key)) => match self.conns.get_mut(key) {
                    Some(c) => {
                        let want = c.desired_interest();
                        (&mut c.registered, want)
                    }
                    None => continue,
                },
                None => continue,
            };
            if *registered == want {
                continue;
            }
            let res = match (*registered, want) {
                (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
                (Some(_), Some(set)) => ops.modify(Events::new_raw(fd, set)),
                (Some(set), None) => ops.remove(Events::new_raw(fd, set)),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => *registered = want,
                Err(e) => {
                    warn!("vsock: cannot watch a connection: {e}");
                    failed.push(fd);
                }
            }
        }
        for fd in failed {
            match self.by_fd.get(&fd) {
                Some(Owner::Pending) => self.drop_pending(fd),
                Some(Owner::Conn(key)) => {
                    let key = *key;
                    self.close(key, true);
                }
                None => {}
            }
        }
        for (stream, registered) in self.graveyard.drain(..) {
            if let Some(set) = registered {
                if let Err(e) = ops.remove(Events::new(&stream, set)) {
                    debug!("vsock: cannot unwatch a closed connection: {e}");
                }
            }
        }
    }
}
