//! One vsock stream connection bridged to one Unix stream: its state
//! machine, its buffered guest bytes and the credit accounting both ways.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{Op, PacketHeader, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Guest bytes we buffer per connection; advertised to the guest as
/// buf_alloc, so a guest that honours its credit never overruns it.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which the guest hears of its new credit unasked.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;

/// Control packets a connection still owes the guest.
const OWE_REQUEST: u8 = 1;
const OWE_RESPONSE: u8 = 2;
const OWE_CREDIT_UPDATE: u8 = 4;
const OWE_CREDIT_REQUEST: u8 = 8;

/// (host port, guest port): a connection's identity on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or owed), the guest's answer awaited.
    LocalInit,
    Established,
    /// The guest shut down both ways; flushing buffered bytes, then RST.
    PeerClosing,
    /// The host stream ended; SHUTDOWN sent, the guest's RST awaited.
    LocalClosed,
}

/// What the muxer must do with the connection next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Free it; `rst` tells the guest with a RST.
    Close {
        rst: bool,
    },
}

const CLOSE_RST: Verdict = Verdict::Close { rst: true };

pub struct Connection {
    pub stream: UnixStream,
    /// The events the event loop watches for it now, None if unregistered.
    pub registered: Option<EventSet>,
    pub key: ConnKey,
    pub host_initiated: bool,
    /// Whether `key` sits in the muxer's rx queue.
    pub in_rx_queue: bool,
    guest_cid: u64,
    state: State,
    owed: u8,
    /// SHUTDOWN flags the guest has sent so far.
    peer_shutdown: u32,
    /// Guest bytes the Unix stream has not taken yet.
    tx_buf: VecDeque<u8>,
    wrote_eof: bool,
    /// Guest bytes handed to the Unix stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The stream may have bytes (or an EOF) for the guest; reading
    /// interest is off meanwhile, so level-triggered epoll stays quiet.
    readable: bool,
    /// The stream hung up or failed: unregister it, read to the end.
    hup: bool,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State, owed: u8) -> Self {
        Connection {
            stream,
            registered: None,
            key,
            host_initiated: state == State::LocalInit,
            in_rx_queue: false,
            guest_cid,
            state,
            owed,
            peer_shutdown: 0,
            tx_buf: VecDeque::new(),
            wrote_eof: false,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            hup: false,
            credit_requested: false,
        }
    }

    /// A host process asked for guest port `key.peer_port`.
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64, registered: Option<EventSet>) -> Self {
        let mut c = Self::new(stream, key, guest_cid, State::LocalInit, OWE_REQUEST);
        c.registered = registered;
        c
    }

    /// The guest's REQUEST reached a host listener.
    pub fn new_peer(stream: UnixStream, key: ConnKey, guest_cid: u64, req: &PacketHeader) -> Self {
        let mut c = Self::new(stream, key, guest_cid, State::Established, OWE_RESPONSE);
        c.update_peer_credit(req);
        c
    }

    /// Guest bytes waiting for the host peer to read.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes the guest may still receive: its buffer less what is in flight.
    /// A bogus fwd_cnt can only shrink the guest's own credit.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// The events to watch on the stream now.
    pub fn desired_interest(&self) -> Option<EventSet> {
        if self.hup {
            // HUP/ERR cannot be masked; unregistering is the only way to
            // stop a level-triggered storm while the rest is read out.
            return None;
        }
        let mut set = EventSet::empty();
        if self.state == State::Established && !self.readable && self.peer_shutdown & SHUTDOWN_RCV == 0 {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        // An empty set still reports a hang-up (e.g. during LocalInit).
        Some(set)
    }

    /// A host-initiated connection whose REQUEST has not gone out yet.
    pub fn owes_request(&self) -> bool {
        self.owed & OWE_REQUEST != 0
    }

    /// Its next packet opens the connection (REQUEST or RESPONSE).
    pub fn owes_setup(&self) -> bool {
        self.owed & (OWE_REQUEST | OWE_RESPONSE) != 0
    }

    /// Whether `next_rx_packet` can make progress given a buffer.
    pub fn wants_rx(&self) -> bool {
        if self.owed != 0 {
            return true;
        }
        if !self.readable || self.state != State::Established {
            return false;
        }
        if self.peer_shutdown & SHUTDOWN_RCV != 0 {
            return true;
        }
        self.peer_credit() > 0 || !self.credit_requested
    }

    fn header(&mut self, op: Op, flags: u32, len: u32) -> PacketHeader {
        // Every packet carries our credit, so an owed update is settled.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owed &= !OWE_CREDIT_UPDATE;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    pub fn rst_header(&mut self) -> PacketHeader {
        self.header(Op::Rst, 0, 0)
    }

    /// Handles a packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) -> Verdict {
        self.update_peer_credit(hdr);
        match hdr.op {
            Op::Request => CLOSE_RST,
            Op::Rst => Verdict::Close { rst: false },
            Op::Response => {
                if self.state != State::LocalInit {
                    return Verdict::Keep;
                }
                // The stream is fresh and we never wrote to it, so a short
                // write means it is gone.
                let line = format!("OK {}\n", self.key.local_port);
                match self.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {
                        self.state = State::Established;
                        Verdict::Keep
                    }
                    _ => CLOSE_RST,
                }
            }
            Op::Shutdown => self.on_shutdown(hdr.flags),
            Op::Rw => self.on_data(payload),
            Op::CreditUpdate => Verdict::Keep,
            Op::CreditRequest => {
                self.owed |= OWE_CREDIT_UPDATE;
                Verdict::Keep
            }
        }
    }

    fn on_shutdown(&mut self, flags: u32) -> Verdict {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        match self.state {
            State::LocalInit => return CLOSE_RST,
            // Both sides are done; Linux expects our RST to finish.
            State::LocalClosed => return CLOSE_RST,
            State::Established | State::PeerClosing => {}
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            if self.tx_buf.is_empty() {
                return CLOSE_RST;
            }
            self.state = State::PeerClosing;
            self.readable = false;
            return Verdict::Keep;
        }
        self.maybe_write_eof();
        Verdict::Keep
    }

    fn on_data(&mut self, payload: &[u8]) -> Verdict {
        match self.state {
            // The host stream is gone; the guest has not seen our SHUTDOWN yet.
            State::LocalClosed => return Verdict::Keep,
            State::LocalInit | State::PeerClosing => return CLOSE_RST,
            State::Established => {}
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return CLOSE_RST;
        }
        if self.tx_buf.len() + payload.len() > CONN_BUF_ALLOC as usize {
            tracing::debug!("vsock: guest port {} overran its credit", self.key.peer_port);
            return CLOSE_RST;
        }
        let mut rest = payload;
        if self.tx_buf.is_empty() {
            match write_some(&mut self.stream, rest) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    rest = &rest[n..];
                }
                Err(_) => return CLOSE_RST,
            }
        }
        self.tx_buf.extend(rest);
        self.note_forwarded();
        Verdict::Keep
    }

    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed |= OWE_CREDIT_UPDATE;
        }
    }

    fn maybe_write_eof(&mut self) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() && !self.wrote_eof {
            self.wrote_eof = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Writes buffered guest bytes until the stream would block.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.note_forwarded();
        self.maybe_write_eof();
        Ok(())
    }

    /// Handles readiness of the Unix stream.
    pub fn on_stream_event(&mut self, set: EventSet) -> Verdict {
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.hup = true;
            self.readable = true;
        }
        if set.contains(EventSet::IN) {
            self.readable = true;
        }
        if (set.contains(EventSet::OUT) || self.hup) && self.flush().is_err() {
            return CLOSE_RST;
        }
        match self.state {
            State::PeerClosing if self.tx_buf.is_empty() => CLOSE_RST,
            // The host gave up before the guest answered.
            State::LocalInit if self.hup => CLOSE_RST,
            _ => Verdict::Keep,
        }
    }

    /// The next packet for the guest, its payload read into `buf` (at most
    /// `buf.len()` bytes). Control packets go first.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> (Option<PacketHeader>, Verdict) {
        for (bit, op) in [
            (OWE_REQUEST, Op::Request),
            (OWE_RESPONSE, Op::Response),
            (OWE_CREDIT_UPDATE, Op::CreditUpdate),
            (OWE_CREDIT_REQUEST, Op::CreditRequest),
        ] {
            if self.owed & bit != 0 {
                self.owed &= !bit;
                return (Some(self.header(op, 0, 0)), Verdict::Keep);
            }
        }
        if !self.readable || self.state != State::Established {
            return (None, Verdict::Keep);
        }
        if self.peer_shutdown & SHUTDOWN_RCV != 0 {
            // The guest takes no more data; only the stream's end matters.
            self.readable = false;
            if self.hup {
                return (Some(self.end_of_stream()), Verdict::Keep);
            }
            return (None, Verdict::Keep);
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if self.credit_requested {
                return (None, Verdict::Keep);
            }
            self.credit_requested = true;
            return (Some(self.header(Op::CreditRequest, 0, 0)), Verdict::Keep);
        }
        let want = buf.len().min(credit);
        if want == 0 {
            return (None, Verdict::Keep);
        }
        match self.stream.read(&mut buf[..want]) {
            Ok(0) => (Some(self.end_of_stream()), Verdict::Keep),
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                (Some(self.header(Op::Rw, 0, n as u32)), Verdict::Keep)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                (None, Verdict::Keep)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (None, Verdict::Keep),
            Err(_) => (None, CLOSE_RST),
        }
    }

    fn end_of_stream(&mut self) -> PacketHeader {
        self.readable = false;
        self.state = State::LocalClosed;
        self.header(Op::Shutdown, SHUTDOWN_BOTH, 0)
    }
}

/// Writes as much of `data` as the stream takes without blocking.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
