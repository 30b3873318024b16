//! The 8250 UART at 0x3f8 (COM1, IRQ 4), through vm-superio.

use std::io::Write;

use tracing::warn;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOut>,
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(interrupt: EventFdTrigger, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(interrupt, out),
            output_failed: false,
        }
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
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
        let mut s = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(sink.clone()));
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
    fn odd_sized_accesses_are_ignored() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFdTrigger(irq), Box::new(sink.clone()));
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
        let mut s = SerialDevice::new(EventFdTrigger(irq), Box::new(Broken));
        s.write(0, b"x");
        s.write(0, b"y");
        assert!(s.output_failed);
    }
}
