//! The 8250 UART at 0x3f8 (COM1, IRQ 4), through vm-superio.

use std::io::Write;

use tracing::warn;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use serde::{Deserialize, Serialize};

/// vm-superio's `SerialState`, which has no serde of its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSaved {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// vm-superio's receive FIFO size: a saved state with more is corrupt.
const FIFO_SIZE: usize = 64;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOut>,
    /// The interrupt line, kept to rebuild the UART from saved state.
    irq: EventFd,
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(interrupt: EventFdTrigger, out: SerialOut) -> std::io::Result<Self> {
        Ok(SerialDevice {
            irq: interrupt.0.try_clone()?,
            uart: Serial::new(interrupt, out),
            output_failed: false,
        })
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    pub fn save_state(&self) -> SerialSaved {
        let s = self.uart.state();
        SerialSaved {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes the saved registers, keeping this device's interrupt and output.
    pub fn restore_state(&mut self, saved: &SerialSaved) -> Result<(), String> {
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "serial receive buffer of {} bytes (the FIFO holds {FIFO_SIZE})",
                saved.in_buffer.len()
            ));
        }
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let irq = |fd: &EventFd| fd.try_clone().map(EventFdTrigger).map_err(|e| e.to_string());
        let placeholder = Serial::new(irq(&self.irq)?, Box::new(std::io::sink()) as SerialOut);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart =
            Serial::from_state(&state, irq(&self.irq)?, NoEvents, out).map_err(|e| format!("serial state: {e:?}"))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        // A closed console (reader gone, disk full) must not stop the guest;
        // say so once and keep going.
        if let Err(e) = self.uart.write(off, *value) {
            if !self.output_failed {
                warn!("serial console output failed, dropping further output errors: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_output_and_raise_the_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(sink.clone())).unwrap();
        s.write(1, &[0x02]); // IER: transmitter-empty interrupt on
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmit holding register empty");
    }

    #[test]
    fn state_round_trips_and_keeps_the_output() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(sink.clone())).unwrap();
        s.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // DLAB off
        s.write(1, &[0x02]);
        s.write(7, &[0x5a]); // scratch
        let saved = s.save_state();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialSaved = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let other = Sink::default();
        let mut t = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(other.clone())).unwrap();
        t.restore_state(&back).unwrap();
        assert_eq!(t.save_state(), saved);
        let mut scratch = [0u8];
        t.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        t.write(0, b"z");
        assert_eq!(
            &*other.0.lock().unwrap(),
            b"z",
            "output stays where the restored VM sends it"
        );

        let mut too_big = saved.clone();
        too_big.in_buffer = vec![0; 65];
        assert!(t.restore_state(&too_big).unwrap_err().contains("65 bytes"));
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFdTrigger(irq), Box::new(sink.clone())).unwrap();
        s.write(0, &[1, 2]);
        let mut b = [0u8; 4];
        s.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn broken_output_does_not_panic() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(EventFdTrigger(irq), Box::new(Broken)).unwrap();
        s.write(0, b"x");
        s.write(0, b"y");
        assert!(s.output_failed);
    }
}
