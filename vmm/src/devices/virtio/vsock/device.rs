use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{parse_header, Op, PacketHeader, HDR_LEN, MAX_PKT_PAYLOAD};
use super::{VsockConfig, VsockError};
use crate::devices::virtio::indirect::refuse_indirect;
use crate::devices::virtio::{read_config_bytes, DeviceCore, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
const NUM_QUEUES: usize = 3;
/// `virtio_vsock_event.id` for a transport reset (virtio 1.2, 5.10.6.5).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

pub struct Vsock {
    /// `struct virtio_vsock_config`: the guest CID as le64.
    config_space: [u8; 8],
    core: DeviceCore,
    /// Wakes the event loop when state changed outside it (activation,
    /// reset), so that fd registrations are brought up to date.
    kick: EventFd,
    muxer: Muxer,
    tx_payload: Vec<u8>,
    rx_payload: Vec<u8>,
}

/// Why a tx chain carried no usable packet.
enum TxError {
    /// Nothing to answer: no readable header.
    Unreadable(String),
    /// A header whose payload is not there.
    ShortPayload(PacketHeader),
}

impl Vsock {
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.guest_cid <= 2 || cfg.guest_cid == u32::MAX {
            return Err(VsockError::ReservedCid(cfg.guest_cid));
        }
        let core = DeviceCore::new(NUM_QUEUES, QUEUE_SIZE).map_err(|e| VsockError::Queue(e.to_string()))?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let muxer = Muxer::new(cfg.guest_cid, &cfg.uds_path)?;
        Ok(Vsock {
            config_space: u64::from(cfg.guest_cid).to_le_bytes(),
            core,
            kick,
            muxer,
            tx_payload: vec![0; MAX_PKT_PAYLOAD],
            rx_payload: vec![0; MAX_PKT_PAYLOAD],
        })
    }

    /// Consumes every tx chain; returns whether the guest must be told.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = &self.core.active else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut self.core.q.queues[TXQ];
        let mut used_any = false;
        // A guest that keeps refilling the ring must not keep the event loop
        // here: serve one ring's worth, then come back through the eventfd.
        let mut budget = queue.size();
        while budget > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if refuse_indirect(queue, mem, head, "vsock") {
                used_any = true;
                continue;
            }
            match read_tx_packet(mem, chain, &mut self.tx_payload) {
                Ok(hdr) => {
                    let n = if hdr.op == Op::Rw { hdr.len as usize } else { 0 };
                    self.muxer.on_guest_packet(&hdr, &self.tx_payload[..n]);
                }
                Err(TxError::ShortPayload(hdr)) => {
                    debug!("vsock: tx packet shorter than its header says");
                    self.muxer.on_invalid_packet(&hdr);
                }
                Err(TxError::Unreadable(why)) => debug!("vsock: dropping a tx chain: {why}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                debug!("vsock: cannot return a tx buffer: {e}");
            }
            used_any = true;
        }
        if budget == 0 {
            // Possibly more waiting: a spurious wake-up costs nothing.
            let _ = self.core.q.events[TXQ].write(1);
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Fills rx buffers while there is something for the guest; returns
    /// whether the guest must be told.
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = &self.core.active else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut self.core.q.queues[RXQ];
        let mut used_any = false;
        // Host sockets that always have data, and a guest that keeps
        // posting buffers, must not keep the event loop here either.
        let mut budget = queue.size();
        while budget > 0 && self.muxer.has_rx_work() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break; // Retried when the guest posts buffers.
            };
            budget -= 1;
            let head = chain.head_index();
            if refuse_indirect(queue, mem, head, "vsock") {
                used_any = true;
                continue;
            }
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                Ok(_) => {
                    debug!("vsock: rx buffer too small for a header");
                    let _ = queue.add_used(mem, head, 0);
                    used_any = true;
                    continue;
                }
                Err(e) => {
                    debug!("vsock: malformed rx chain: {e}");
                    let _ = queue.add_used(mem, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_PAYLOAD);
            let Some(hdr) = self.muxer.next_rx_packet(&mut self.rx_payload[..room]) else {
                // Nobody could use it after all; leave it to the guest.
                queue.go_to_previous_position();
                break;
            };
            let payload = &self.rx_payload[..hdr.len as usize];
            let written = match writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(payload))
            {
                Ok(()) => (HDR_LEN + payload.len()) as u32,
                Err(e) => {
                    debug!("vsock: cannot write an rx packet: {e}");
                    self.muxer.rx_delivery_failed(&hdr);
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                warn!("vsock: cannot return an rx buffer: {e}");
            }
            used_any = true;
        }
        if budget == 0 {
            // Possibly more to deliver: come back through the rx eventfd.
            let _ = self.core.q.events[RXQ].write(1);
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Tells the driver that the transport was reset (after a restore its
    /// connections' host ends are gone): one `virtio_vsock_event` in a
    /// buffer the driver posted on the event queue. The guest then resets
    /// its connected sockets and re-reads the CID; listeners stay. Returns
    /// whether an event was delivered.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(active) = &self.core.active else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut self.core.q.queues[EVQ];
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            warn!("vsock: the driver posted no event buffer; cannot announce the transport reset");
            return false;
        };
        let head = chain.head_index();
        if refuse_indirect(queue, mem, head, "vsock") {
            active.signal_used();
            return false;
        }
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= event.len() => match w.write_all(&event) {
                Ok(()) => event.len() as u32,
                Err(e) => {
                    debug!("vsock: cannot write the reset event: {e}");
                    0
                }
            },
            Ok(_) => {
                debug!("vsock: event buffer too small for an event");
                0
            }
            Err(e) => {
                debug!("vsock: malformed event chain: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            warn!("vsock: cannot return the event buffer: {e}");
            return false;
        }
        active.signal_used();
        written != 0
    }

    /// Accepts host connections waiting on the Unix socket.
    pub fn handle_listener(&mut self) {
        self.muxer.accept_all();
    }

    /// Readiness of a connection's stream.
    pub fn handle_connection_event(&mut self, fd: RawFd, set: EventSet) {
        self.muxer.on_stream_event(fd, set);
    }

    /// Everything one event-loop wake-up on `fd` does, except applying fd
    /// registrations (`process` does that with its `EventOps`).
    fn dispatch(&mut self, fd: RawFd, set: EventSet) {
        let mut notify = false;
        if fd == self.core.q.events[RXQ].as_raw_fd() {
            let _ = self.core.q.events[RXQ].read();
        } else if fd == self.core.q.events[TXQ].as_raw_fd() {
            let _ = self.core.q.events[TXQ].read();
            notify |= self.process_tx();
        } else if fd == self.core.q.events[EVQ].as_raw_fd() {
            // The driver re-posts its event buffer (and notifies) only after
            // it has handled the event: the transport reset is done.
            let _ = self.core.q.events[EVQ].read();
            if self.muxer.holds_host_connections() {
                tracing::debug!("vsock: the guest handled the transport reset; host connections go ahead");
                self.muxer.release_host_connections();
            }
        } else if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
        } else if fd == self.muxer.listener().as_raw_fd() {
            self.handle_listener();
        } else {
            self.handle_connection_event(fd, set);
        }
        // New rx buffers, replies to tx, fresh host data: all end here.
        notify |= self.process_rx();
        if notify {
            self.signal();
        }
    }

    fn signal(&self) {
        self.core.signal_used();
    }

    fn kick_event_loop(&self) {
        if self.muxer.needs_sync() {
            let _ = self.kick.write(1);
        }
    }

    #[cfg(test)]
    pub(crate) fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    #[cfg(test)]
    pub(crate) fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }
}

/// Reads one packet from a tx chain: the header, then `len` payload bytes
/// for RW (into `payload`).
fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut [u8],
) -> Result<PacketHeader, TxError> {
    let mut reader = chain.reader(mem).map_err(|e| TxError::Unreadable(e.to_string()))?;
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| TxError::Unreadable(format!("{} bytes, no header", reader.bytes_read())))?;
    let hdr = parse_header(&raw).map_err(|e| TxError::Unreadable(e.to_string()))?;
    if hdr.op == Op::Rw {
        let len = hdr.len as usize; // <= MAX_PKT_PAYLOAD, checked by parse_header
        if reader.available_bytes() < len {
            return Err(TxError::ShortPayload(hdr));
        }
        reader
            .read_exact(&mut payload[..len])
            .map_err(|_| TxError::ShortPayload(hdr))?;
    }
    Ok(hdr)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn core(&self) -> &DeviceCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }
    fn activated(&mut self, _features: u64) {
        // Host connections may have queued REQUESTs before the driver
        // came: the event loop sends them. Not the event queue, whose
        // notification means the driver handled a transport reset.
        for q in [RXQ, TXQ] {
            let _ = self.core.q.events[q].write(1);
        }
        self.kick_event_loop();
    }
    fn reset(&mut self) {
        self.core.active = None;
        self.muxer.close_all();
        self.kick_event_loop();
    }

    fn release_host_resources(&mut self) {
        self.core.active = None;
        self.muxer.release();
    }

    fn restored(&mut self) {
        if self.send_transport_reset() {
            // Until the guest has handled it, a connection it accepted
            // would be reset by it without a word to the host.
            self.muxer.hold_host_connections();
            tracing::info!("vsock: sent the guest a transport reset after the restore");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_queues(ops, "vsock");
        for fd in [self.kick.as_raw_fd(), self.muxer.listener().as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                warn!("vsock: cannot watch fd {fd}: {e}");
            }
        }
        // Connections accepted or queued before the loop started.
        self.muxer.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.dispatch(events.fd(), events.event_set());
        self.muxer.sync_interest(ops);
    }
}
