//! Owns the port I/O and MMIO buses and puts devices on them: the legacy
//! serial console and i8042 on fixed ports, virtio devices on MMIO ranges
//! and interrupt lines it hands out.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{lock, Bus, BusError};
use super::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use super::legacy::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use super::legacy::EventFdTrigger;
use super::virtio::mmio::{MmioTransport, MMIO_SIZE};
use super::virtio::{Interrupt, VirtioDevice};
use crate::arch::layout::{IOAPIC_START, MMIO_DEVICES_START};
use crate::arch::mptable::IOAPIC_PINS;

/// Offset of QueueNotify in the virtio-mmio register block.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// GSIs 0-4 belong to the PIT, keyboard, cascade, COM2 and COM1.
const FIRST_DEVICE_IRQ: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register an interrupt with KVM: {0}")]
    Irqfd(kvm_ioctls::Error),
    #[error("cannot register a queue notification with KVM: {0}")]
    Ioeventfd(kvm_ioctls::Error),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
    #[error("no interrupt lines left for another device (at most {} virtio devices)", IOAPIC_PINS as u32 - FIRST_DEVICE_IRQ)]
    OutOfIrqs,
    #[error("no MMIO space left for another device")]
    OutOfMmio,
    #[error("devices cannot be added once vCPUs run")]
    BusesInUse,
}

pub struct DeviceManager {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The virtio transports in the order added, for snapshots.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Signalled by the i8042 when the guest asks for a CPU reset.
    pub reset_evt: EventFd,
    next_mmio: u64,
    next_irq: u32,
    /// `virtio_mmio.device=` entries for the kernel command line.
    cmdline_entries: Vec<String>,
}

impl DeviceManager {
    /// Creates the serial console (output to `serial_out`, or dropped when
    /// `None`) and the i8042, and wires the UART's interrupt to GSI 4.
    pub fn new(vm: &VmFd, serial_out: Option<SerialOut>) -> Result<Self, DeviceError> {
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(DeviceError::Irqfd)?;
        let out = serial_out.unwrap_or_else(|| Box::new(std::io::sink()));
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(EventFdTrigger(serial_irq), out).map_err(DeviceError::EventFd)?,
        ));

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let i8042 = I8042::new(EventFdTrigger(reset_evt.try_clone().map_err(DeviceError::EventFd)?));

        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;
        Ok(DeviceManager {
            pio_bus: Arc::new(pio),
            mmio_bus: Arc::new(Bus::new()),
            serial,
            transports: Vec::new(),
            reset_evt,
            next_mmio: MMIO_DEVICES_START,
            next_irq: FIRST_DEVICE_IRQ,
            cmdline_entries: Vec::new(),
        })
    }

    /// Puts a virtio device on the MMIO bus behind its own transport, with an
    /// irqfd for its interrupt and an ioeventfd per queue, so that queue
    /// notifications reach the event loop without a trip through a vCPU thread.
    /// Returns the device's transport.
    pub fn add_virtio_device<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<D>>,
    ) -> Result<Arc<Mutex<MmioTransport>>, DeviceError> {
        if self.next_irq >= u32::from(IOAPIC_PINS) {
            return Err(DeviceError::OutOfIrqs);
        }
        let base = self.next_mmio;
        if base + MMIO_SIZE > IOAPIC_START {
            return Err(DeviceError::OutOfMmio);
        }
        let irq = self.next_irq;
        let bus = Arc::get_mut(&mut self.mmio_bus).ok_or(DeviceError::BusesInUse)?;

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irqfd, irq).map_err(DeviceError::Irqfd)?;
        for (index, evt) in lock(&device).queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), index as u32)
                .map_err(DeviceError::Ioeventfd)?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
        )));
        bus.insert(transport.clone(), base, MMIO_SIZE)?;
        self.transports.push(transport.clone());

        self.cmdline_entries
            .push(format!("virtio_mmio.device={}K@{:#x}:{}", MMIO_SIZE / 1024, base, irq));
        self.next_mmio += MMIO_SIZE;
        self.next_irq += 1;
        Ok(transport)
    }

    /// Kernel parameters announcing the virtio devices, in the order added
    /// (so the first disk is /dev/vda).
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline_entries
    }

    /// Pushes buffered console output out before the process ends.
    pub fn flush_serial(&self) {
        lock(&self.serial).flush();
    }
}
