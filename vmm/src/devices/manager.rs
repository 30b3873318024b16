//! Owns the port I/O and MMIO buses and the legacy devices on them.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{lock, Bus, BusError};
use super::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use super::legacy::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use super::legacy::EventFdTrigger;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register the serial interrupt with KVM: {0}")]
    Irqfd(kvm_ioctls::Error),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
}

pub struct DeviceManager {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    /// Signalled by the i8042 when the guest asks for a CPU reset.
    pub reset_evt: EventFd,
}

impl DeviceManager {
    /// Creates the serial console (output to `serial_out`, or dropped when
    /// `None`) and the i8042, and wires the UART's interrupt to GSI 4.
    pub fn new(vm: &VmFd, serial_out: Option<SerialOut>) -> Result<Self, DeviceError> {
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let out = serial_out.unwrap_or_else(|| Box::new(std::io::sink()));
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(serial_irq),
            out,
        )));

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let i8042 = I8042::new(EventFdTrigger(
            reset_evt.try_clone().map_err(DeviceError::EventFd)?,
        ));

        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;
        Ok(DeviceManager {
            pio_bus: Arc::new(pio),
            mmio_bus: Arc::new(Bus::new()),
            serial,
            reset_evt,
        })
    }

    /// Pushes buffered console output out before the process ends.
    pub fn flush_serial(&self) {
        lock(&self.serial).flush();
    }
}
