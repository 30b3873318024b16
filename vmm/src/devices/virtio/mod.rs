//! virtio devices over MMIO.
//!
//! Each device keeps its logic apart from the transport: `mmio.rs` is the
//! register interface the guest driver programs, the device modules
//! (`block`, `rng`, `vsock`) only see configured queues, guest memory and an
//! interrupt line. Queue notifications arrive on eventfds (KVM ioeventfds)
//! that the main event loop hands to the device, never on a vCPU thread.

pub mod block;
pub mod indirect;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device IDs (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits shared by all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits of the MMIO transport.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt line: the status bits the driver reads through the
/// transport, and the irqfd that raises the guest interrupt.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A full eventfd counter still means "interrupt pending".
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// A device's queues and the eventfds that the driver's notifications
/// for them arrive on (KVM ioeventfds), one each.
pub struct QueueSet {
    pub queues: Vec<Queue>,
    pub events: Vec<EventFd>,
}

impl QueueSet {
    pub fn new(count: usize, max_size: u16) -> std::io::Result<Self> {
        let mut set = QueueSet {
            queues: Vec::with_capacity(count),
            events: Vec::with_capacity(count),
        };
        for _ in 0..count {
            set.queues
                .push(Queue::new(max_size).map_err(|e| std::io::Error::other(e.to_string()))?);
            set.events.push(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?);
        }
        Ok(set)
    }

    /// Our devices have no optional queues: every one must be ready.
    pub fn check_ready(&self) -> Result<(), ActivateError> {
        match self.queues.iter().position(|q| !q.ready()) {
            Some(i) => Err(ActivateError::BadQueue(i)),
            None => Ok(()),
        }
    }
}

/// What every device model keeps for the transport, so that a device
/// implements only its own logic: its queues and their notification
/// events, and, once the driver activated it, guest memory and the
/// interrupt line.
pub struct DeviceCore {
    pub q: QueueSet,
    pub active: Option<ActiveState>,
}

impl DeviceCore {
    /// `count` queues of at most `max_size` entries.
    pub fn new(count: usize, max_size: u16) -> std::io::Result<Self> {
        Ok(DeviceCore {
            q: QueueSet::new(count, max_size)?,
            active: None,
        })
    }

    /// Every queue must be ready; then the device works with `mem`.
    pub fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Result<(), ActivateError> {
        self.q.check_ready()?;
        self.active = Some(ActiveState { mem, interrupt });
        Ok(())
    }

    /// Tells the driver that buffers came back, if the device is active.
    pub fn signal_used(&self) {
        if let Some(a) = &self.active {
            a.signal_used();
        }
    }

    /// Has the event loop watch every queue's notification event; `name`
    /// is for the log.
    pub fn watch_queues(&self, ops: &mut EventOps, name: &str) {
        for e in &self.q.events {
            if let Err(err) = ops.add(Events::new(e, EventSet::IN)) {
                tracing::warn!("{name}: cannot watch a queue event: {err}");
            }
        }
    }
}

/// What an activated device works with: guest memory and its interrupt.
pub struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
}

impl ActiveState {
    /// Tells the driver that buffers came back in a used ring.
    pub fn signal_used(&self) {
        self.interrupt.trigger(INTERRUPT_USED_BUFFER);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("queue {0} is not ready or not valid in guest memory")]
    BadQueue(usize),
    #[error("device-specific activation failed: {0}")]
    Device(String),
}

/// What the transport needs from a device model. A device provides its
/// identity, features, configuration space and what to do once active;
/// [`DeviceCore`] carries the queues and the activation for all of them.
pub trait VirtioDevice: MutEventSubscriber + Send {
    fn device_type(&self) -> u32;
    /// Features the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    fn core(&self) -> &DeviceCore;
    fn core_mut(&mut self) -> &mut DeviceCore;
    /// The queues, as the transport configures them before activation.
    fn queues(&self) -> &[Queue] {
        &self.core().q.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.core_mut().q.queues
    }
    /// Eventfds signalled when the driver notifies a queue, one per queue.
    fn queue_events(&self) -> &[EventFd] {
        &self.core().q.events
    }
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Most devices have no writable configuration.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing with the negotiated features; queues are valid.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        self.core_mut().activate(mem, interrupt)?;
        self.activated(acked_features);
        Ok(())
    }
    /// Once active: requests the driver queued before its first
    /// notification are left to the event loop, by signalling the queues'
    /// eventfds. Activation runs on a vCPU thread (a status write), or on
    /// a restore before any seccomp filter; neither may do device I/O.
    fn activated(&mut self, _acked_features: u64) {
        for evt in self.queue_events() {
            let _ = evt.write(1);
        }
    }
    fn is_activated(&self) -> bool {
        self.core().active.is_some()
    }
    /// Stops processing and returns the device to its initial state.
    fn reset(&mut self) {
        self.core_mut().active = None;
    }
    /// Gives back host resources (sockets, files) when the VM ends; vCPU
    /// threads may still hold the device, so `Drop` would come too late.
    fn release_host_resources(&mut self) {}
    /// Called once after a restore re-activated the device, before the
    /// guest runs: what the device must tell the driver about the new host
    /// (vsock: its connections are gone).
    fn restored(&mut self) {}
}

/// Reads `data.len()` bytes at `offset` of a byte array (a config space),
/// padding with zeros past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Guest memory and queues for device-model tests, from virtio-queue's
    //! mock split queue.
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    pub const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    /// 16 MiB of guest memory; the mock queue structures sit at address 0.
    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// A queue holding `chains`, each a list of (address, length, flags)
    /// linked with NEXT flags, placed one after another in the table.
    pub fn queue_with_chains(mem: &GuestMemoryMmap, size: u16, chains: &[Vec<(u64, u32, u16)>]) -> Queue {
        let mock = MockSplitQueue::new(mem, size);
        let mut offset = 0u16;
        for parts in chains {
            let descs: Vec<RawDescriptor> = parts
                .iter()
                .enumerate()
                .map(|(i, (addr, len, flags))| {
                    let last = i + 1 == parts.len();
                    let flags = if last {
                        *flags
                    } else {
                        *flags | VRING_DESC_F_NEXT as u16
                    };
                    let next = if last { 0 } else { offset + i as u16 + 1 };
                    RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next))
                })
                .collect();
            mock.add_desc_chains(&descs, offset).unwrap();
            offset += parts.len() as u16;
        }
        mock.create_queue().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut b = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let i = Interrupt::new(fd.try_clone().unwrap());
        i.trigger(INTERRUPT_USED_BUFFER);
        i.trigger(INTERRUPT_CONFIG_CHANGE);
        assert_eq!(i.status(), 3);
        assert_eq!(fd.read().unwrap(), 2);
        i.ack(INTERRUPT_USED_BUFFER);
        assert_eq!(i.status(), INTERRUPT_CONFIG_CHANGE);
    }
}
