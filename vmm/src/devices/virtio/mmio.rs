//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! Every register access from the guest lands here on a vCPU thread. The
//! transport validates it, keeps the negotiation state, configures the
//! device's queues, and activates the device on DRIVER_OK. A driver that
//! breaks the protocol gets the device marked as needing reset; it never
//! brings the VMM down.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::debug;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{status, Interrupt, VirtioDevice, INTERRUPT_CONFIG_CHANGE, VIRTIO_F_VERSION_1};
use crate::devices::bus::{lock, BusDevice};

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4b48_4c42; // "BLHK"
/// Bytes of MMIO space each device occupies.
pub const MMIO_SIZE: u64 = 0x1000;
pub const CONFIG_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// One queue as the driver configured it and the device left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSaved {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSaved {
    fn from(q: QueueState) -> Self {
        QueueSaved {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSaved> for QueueState {
    fn from(q: &QueueSaved) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// The transport's registers and its device's queues. Device models keep
/// nothing else worth saving: block and rng hold only their host files,
/// and vsock connections do not survive a restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSaved>,
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        MmioTransport {
            device,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device model behind this transport; a snapshot locks it to keep
    /// the event loop off the queues while guest memory is copied.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Tells the driver that the device's configuration changed (a disk got
    /// a new medium): the generation moves on, so a driver reading the
    /// space across the change retries, and a running driver is interrupted.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
        }
    }

    /// This transport's state; `dev` is its device, locked by the caller.
    pub fn save_state(&self, dev: &dyn VirtioDevice) -> TransportState {
        TransportState {
            device_type: dev.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: dev.queues().iter().map(|q| QueueSaved::from(q.state())).collect(),
        }
    }

    /// Puts saved state on this fresh transport and its device, and, when
    /// the driver had finished set-up, activates the device as DRIVER_OK
    /// would have. Queue notifications and interrupts pending at the
    /// snapshot are raised again: a spurious one costs a driver nothing, a
    /// lost one would hang it.
    pub fn restore_state(&mut self, saved: &TransportState) -> Result<(), String> {
        let device = self.device.clone();
        let mut dev = lock(&device);
        if saved.device_type != dev.device_type() {
            return Err(format!(
                "saved device type {} is restored onto a device of type {}",
                saved.device_type,
                dev.device_type()
            ));
        }
        if saved.queues.len() != dev.queues().len() {
            return Err(format!(
                "device type {} has {} queues, the state has {}",
                saved.device_type,
                dev.queues().len(),
                saved.queues.len()
            ));
        }
        if saved.acked_features & !dev.avail_features() != 0 {
            return Err(format!(
                "device type {}: acknowledged features {:#x} are not all offered",
                saved.device_type, saved.acked_features
            ));
        }
        for (i, (q, s)) in dev.queues_mut().iter_mut().zip(&saved.queues).enumerate() {
            if s.max_size != q.max_size() {
                return Err(format!(
                    "device type {} queue {i}: saved maximum size {} is not the device's {}",
                    saved.device_type,
                    s.max_size,
                    q.max_size()
                ));
            }
            *q = Queue::try_from(QueueState::from(s))
                .map_err(|e| format!("device type {} queue {i}: {e:?}", saved.device_type))?;
        }
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.acked_features = saved.acked_features;
        self.queue_sel = saved.queue_sel;
        self.status = saved.status;
        self.config_generation = saved.config_generation;
        let live = status::DRIVER_OK | status::FEATURES_OK;
        if saved.status & live == live && saved.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0 {
            for (i, q) in dev.queues().iter().enumerate() {
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(format!(
                        "device type {} queue {i} is not valid in the restored memory",
                        saved.device_type
                    ));
                }
            }
            // Activation signals the queues the event loop must look at
            // (vsock: not its event queue, whose notification would end the
            // hold `restored` puts on host connections).
            dev.activate(self.mem.clone(), self.interrupt.clone(), self.acked_features)
                .map_err(|e| format!("device type {}: {e}", saved.device_type))?;
            dev.restored();
        }
        if saved.interrupt_status != 0 {
            self.interrupt.trigger(saved.interrupt_status);
        }
        Ok(())
    }

    fn with_selected_queue<T>(
        &self,
        dev: &mut dyn VirtioDevice,
        f: impl FnOnce(&mut virtio_queue::Queue) -> T,
    ) -> Option<T> {
        dev.queues_mut().get_mut(self.queue_sel as usize).map(f)
    }

    /// Queues may change until DRIVER_OK. (Linux also writes QueueReady=0
    /// after a reset, when tearing queues down, so status 0 is allowed.)
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::DRIVER_OK == 0
    }

    fn needs_reset(&mut self, why: &str) {
        // Guest-triggered, so not above debug: a guest must not flood the log.
        debug!("virtio-mmio: {why}; device needs reset");
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
        }
    }

    fn reset(&mut self, dev: &mut dyn VirtioDevice) {
        dev.reset();
        for q in dev.queues_mut() {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, dev: &mut dyn VirtioDevice, value: u32) {
        if value == 0 {
            self.reset(dev);
            return;
        }
        // Bits may only be added, in the order the spec gives.
        let added = value & !self.status;
        if value & self.status != self.status {
            return self.needs_reset("driver cleared status bits without a reset");
        }
        if added & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Leave FEATURES_OK unset: the driver reads it back and gives up.
            debug!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            self.status = value & !(status::FEATURES_OK | status::DRIVER_OK);
            return;
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                return self.needs_reset("DRIVER_OK before FEATURES_OK");
            }
            self.status = value;
            return self.activate(dev);
        }
        self.status = value;
    }

    fn activate(&mut self, dev: &mut dyn VirtioDevice) {
        for (i, q) in dev.queues().iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.needs_reset(&format!("queue {i} has an invalid size or addresses"));
            }
        }
        if let Err(e) = dev.activate(self.mem.clone(), self.interrupt.clone(), self.acked_features) {
            self.needs_reset(&format!("activation failed: {e}"));
        }
    }

    fn read_reg(&self, dev: &mut dyn VirtioDevice, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => dev.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => dev.avail_features() as u32,
                1 => (dev.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.with_selected_queue(dev, |q| q.max_size()).map_or(0, u32::from),
            reg::QUEUE_READY => self.with_selected_queue(dev, |q| q.ready()).map_or(0, u32::from),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all ones means "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, dev: &mut dyn VirtioDevice, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    return self.needs_reset("features written outside feature negotiation");
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                // Only what the device offers can be acknowledged.
                let accepted = (u64::from(value) << shift) & dev.avail_features();
                self.acked_features = (self.acked_features & !mask) | accepted;
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_setup_allowed() {
                    return self.needs_reset("queue written outside queue set-up");
                }
                let done = self.with_selected_queue(dev, |q| {
                    match offset {
                        // virtio-queue would keep the old size on a bad value;
                        // the driver must learn that it broke the protocol.
                        reg::QUEUE_NUM => {
                            return u16::try_from(value).ok().and_then(|v| q.try_set_size(v).ok()).is_some()
                        }
                        reg::QUEUE_READY => q.set_ready(value == 1),
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                        reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                        reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                        reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                        _ => q.set_used_ring_address(None, Some(value)),
                    }
                    true
                });
                if done == Some(false) {
                    return self.needs_reset(&format!("invalid queue size {value}"));
                }
                if done.is_none() {
                    debug!("virtio-mmio: write to nonexistent queue {}", self.queue_sel);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; reached only without one.
                if let Some(evt) = dev.queue_events().get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(dev, value),
            reg::SHM_SEL => {}
            _ => debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The guest's interrupt handler must not wait for the device's
        // event-loop work; the interrupt state has its own lock-free home.
        if offset == reg::INTERRUPT_STATUS && data.len() == 4 {
            data.copy_from_slice(&self.interrupt.status().to_le_bytes());
            return;
        }
        let device = self.device.clone();
        let mut dev = lock(&device);
        if offset >= CONFIG_OFFSET {
            dev.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide and 32-bit aligned.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(&mut *dev, offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == reg::INTERRUPT_ACK {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.interrupt.ack(u32::from_le_bytes(bytes));
            }
            return;
        }
        let device = self.device.clone();
        let mut dev = lock(&device);
        if offset >= CONFIG_OFFSET {
            dev.write_config(offset - CONFIG_OFFSET, data);
            if self.status & status::DRIVER_OK != 0 {
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(&mut *dev, offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::{ActivateError, DeviceCore, QueueSet};
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use virtio_queue::Queue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dummy {
        core: DeviceCore,
        config: [u8; 8],
        activated: Option<u64>,
        resets: u32,
    }

    impl Dummy {
        fn new() -> Self {
            Dummy {
                core: DeviceCore {
                    q: QueueSet {
                        queues: vec![Queue::new(16).unwrap(), Queue::new(32).unwrap()],
                        events: vec![EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()],
                    },
                    active: None,
                },
                config: *b"config!!",
                activated: None,
                resets: 0,
            }
        }
    }

    impl MutEventSubscriber for Dummy {
        fn init(&mut self, _: &mut EventOps) {}
        fn process(&mut self, _: Events, _: &mut EventOps) {}
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn core(&self) -> &DeviceCore {
            &self.core
        }
        fn core_mut(&mut self) -> &mut DeviceCore {
            &mut self.core
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self.config.get_mut(offset as usize..offset as usize + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, _: GuestMemoryMmap, _: Arc<Interrupt>, features: u64) -> Result<(), ActivateError> {
            self.activated = Some(features);
            // As the trait's activation: the queues are left to the event loop.
            VirtioDevice::activated(self, features);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Dummy>>,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            dev.clone(),
            guest_memory(),
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        );
        Rig { t, dev, irq }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Runs the driver side of negotiation up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, reg::QUEUE_SEL, sel);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, 0);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    const OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn transport_and_queue_state_survive_save_and_restore() {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut x.t, 0, 8, 0x10000);
        setup_queue(&mut x.t, 1, 16, 0x20000);
        w(&mut x.t, reg::STATUS, OK);
        {
            let mut d = x.dev.lock().unwrap();
            d.core.q.queues[0].set_next_avail(3);
            d.core.q.queues[0].set_next_used(2);
        }
        x.t.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
        let saved = x.t.save_state(&*x.dev.lock().unwrap());
        assert_eq!(saved.queues[0].next_avail, 3);
        assert_eq!(saved.queues[1].size, 16);
        assert_eq!(saved.queue_sel, 1);
        let json = serde_json::to_string(&saved).unwrap();
        let back: TransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let mut y = rig();
        let _ = y.irq.read();
        y.t.restore_state(&back).unwrap();
        assert_eq!(y.t.save_state(&*y.dev.lock().unwrap()), saved);
        assert_eq!(y.dev.lock().unwrap().activated, Some(VIRTIO_F_VERSION_1 | 1));
        assert_eq!(r(&mut y.t, reg::STATUS), OK);
        assert_eq!(r(&mut y.t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert!(y.irq.read().is_ok(), "a pending interrupt is raised again");
        for evt in y.dev.lock().unwrap().queue_events() {
            assert_eq!(evt.read().unwrap(), 1, "activation has the queues looked at again");
        }
    }

    #[test]
    fn restore_refuses_state_of_another_device_shape() {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        let saved = x.t.save_state(&*x.dev.lock().unwrap());
        let mut other = saved.clone();
        other.device_type = 2;
        assert!(rig().t.restore_state(&other).unwrap_err().contains("type 2"));
        let mut other = saved.clone();
        other.queues.pop();
        assert!(rig().t.restore_state(&other).unwrap_err().contains("queues"));
        let mut other = saved.clone();
        other.queues[0].max_size = 99;
        assert!(rig().t.restore_state(&other).unwrap_err().contains("maximum size"));
        let mut other = saved.clone();
        other.acked_features |= 1 << 40;
        assert!(rig().t.restore_state(&other).unwrap_err().contains("not all offered"));
        let mut other = saved;
        other.status = OK;
        other.queues[0].ready = true;
        other.queues[0].size = 8;
        other.queues[0].desc_table = u64::MAX - 0x10;
        assert!(
            rig().t.restore_state(&other).is_err(),
            "a queue outside guest memory is refused"
        );
    }

    #[test]
    fn identification_registers() {
        let mut x = rig();
        assert_eq!(r(&mut x.t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut x.t, reg::VERSION), 2);
        assert_eq!(r(&mut x.t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut x.t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut x.t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 1);
        w(&mut x.t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 0b101);
        w(&mut x.t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_negotiation_activates_with_only_offered_features() {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1 | 0b111 | (1 << 40));
        assert_eq!(r(&mut x.t, reg::STATUS) & status::FEATURES_OK, status::FEATURES_OK);
        w(&mut x.t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut x.t, reg::QUEUE_NUM_MAX), 16);
        w(&mut x.t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut x.t, reg::QUEUE_NUM_MAX), 32);
        w(&mut x.t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut x.t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        setup_queue(&mut x.t, 0, 16, 0x10000);
        setup_queue(&mut x.t, 1, 32, 0x20000);
        w(&mut x.t, reg::STATUS, OK);
        assert_eq!(r(&mut x.t, reg::STATUS), OK);
        assert_eq!(x.dev.lock().unwrap().activated, Some(VIRTIO_F_VERSION_1 | 0b101));
    }

    #[test]
    fn driver_without_version_1_cannot_set_features_ok() {
        let mut x = rig();
        negotiate(&mut x.t, 0b1);
        assert_eq!(r(&mut x.t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_marks_device_needing_reset() {
        // A size that is not a power of two is refused when written.
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 3, 0x10000);
        assert_ne!(r(&mut x.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        w(&mut x.t, reg::STATUS, OK);
        assert!(x.dev.lock().unwrap().activated.is_none());
        // A queue past the end of guest memory is refused at DRIVER_OK, and
        // the driver is told through a configuration-change interrupt.
        let mut y = rig();
        negotiate(&mut y.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut y.t, 0, 16, 0xffff_0000);
        w(&mut y.t, reg::STATUS, OK);
        assert_ne!(r(&mut y.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(y.dev.lock().unwrap().activated.is_none());
        assert_ne!(r(&mut y.t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
        assert!(y.irq.read().is_ok());
    }

    #[test]
    fn protocol_violations_need_reset_but_never_panic() {
        let mut x = rig();
        // Queue changes once the device runs.
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 16, 0x10000);
        w(&mut x.t, reg::STATUS, OK);
        w(&mut x.t, reg::QUEUE_NUM, 8);
        assert_ne!(r(&mut x.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // DRIVER_OK without FEATURES_OK.
        let mut y = rig();
        w(
            &mut y.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_ne!(r(&mut y.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(y.dev.lock().unwrap().activated.is_none());
        // Features after FEATURES_OK.
        let mut z = rig();
        negotiate(&mut z.t, VIRTIO_F_VERSION_1);
        w(&mut z.t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_ne!(r(&mut z.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // Garbage everywhere.
        let mut g = rig();
        for off in (0..0x200u64).step_by(4) {
            w(&mut g.t, off, 0xffff_ffff);
            let _ = r(&mut g.t, off);
        }
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 16, 0x10000);
        w(&mut x.t, reg::STATUS, OK);
        w(&mut x.t, reg::STATUS, 0);
        assert_eq!(r(&mut x.t, reg::STATUS), 0);
        let d = x.dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert!(d.activated.is_none());
        assert!(!d.core.q.queues[0].ready());
    }

    #[test]
    fn linux_queue_teardown_after_reset_is_accepted() {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 16, 0x10000);
        w(&mut x.t, reg::STATUS, OK);
        // virtio_reset_device(), then del_vqs: QueueSel + QueueReady=0 at status 0.
        w(&mut x.t, reg::STATUS, 0);
        w(&mut x.t, reg::QUEUE_SEL, 0);
        w(&mut x.t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut x.t, reg::STATUS), 0);
        assert_eq!(r(&mut x.t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn interrupt_registers_do_not_wait_for_the_device() {
        let x = rig();
        let held = x.dev.lock().unwrap();
        x.t.interrupt.trigger(super::super::INTERRUPT_USED_BUFFER);
        let mut t = x.t;
        // The device lock is held (as during queue processing) and yet:
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        drop(held);
    }

    #[test]
    fn features_ok_and_driver_ok_together_without_version_1() {
        let mut x = rig();
        w(&mut x.t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut x.t, reg::STATUS, OK);
        assert_eq!(r(&mut x.t, reg::STATUS) & (status::FEATURES_OK | status::DRIVER_OK), 0);
        assert!(x.dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn config_space_and_generation() {
        let mut x = rig();
        let mut b = [0u8; 2];
        x.t.read(CONFIG_OFFSET + 2, &mut b);
        assert_eq!(&b, b"nf");
        let gen0 = r(&mut x.t, reg::CONFIG_GENERATION);
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 16, 0x10000);
        w(&mut x.t, reg::STATUS, OK);
        x.t.write(CONFIG_OFFSET, b"XY");
        x.t.read(CONFIG_OFFSET, &mut b);
        assert_eq!(&b, b"XY");
        assert_ne!(r(&mut x.t, reg::CONFIG_GENERATION), gen0);
        // Past the end of config space: zeros, no panic.
        let mut big = [0xffu8; 8];
        x.t.read(CONFIG_OFFSET + 0xe00, &mut big);
        assert_eq!(big, [0; 8]);
    }

    #[test]
    fn config_change_notice_waits_for_a_running_driver() {
        let mut x = rig();
        let gen0 = r(&mut x.t, reg::CONFIG_GENERATION);
        x.t.notify_config_change();
        assert_ne!(r(&mut x.t, reg::CONFIG_GENERATION), gen0);
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), 0, "no driver yet: nobody to tell");
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, 16, 0x10000);
        w(&mut x.t, reg::STATUS, OK);
        let gen1 = r(&mut x.t, reg::CONFIG_GENERATION);
        x.t.notify_config_change();
        assert_ne!(r(&mut x.t, reg::CONFIG_GENERATION), gen1);
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert!(x.irq.read().is_ok(), "the guest is interrupted");
    }

    #[test]
    fn odd_accesses_and_notify_without_ioeventfd() {
        let mut x = rig();
        let mut b = [0xffu8; 2];
        x.t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0], "16-bit register read is refused");
        x.t.write(reg::STATUS, &[1, 0]);
        assert_eq!(r(&mut x.t, reg::STATUS), 0, "16-bit register write is ignored");
        w(&mut x.t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(x.dev.lock().unwrap().core.q.events[1].read().unwrap(), 1);
        w(&mut x.t, reg::QUEUE_NOTIFY, 99);
    }

    #[test]
    fn interrupt_ack_clears_status() {
        let x = rig();
        x.t.interrupt.trigger(super::super::INTERRUPT_USED_BUFFER);
        let mut t = x.t;
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }
}
