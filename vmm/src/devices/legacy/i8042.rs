//! The i8042 keyboard controller at 0x60/0x64: only its CPU reset command
//! matters. With `reboot=k` a guest reboot writes 0xfe to port 0x64, which
//! ends the VMM cleanly.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const I8042_BASE: u64 = 0x60;
/// Covers the data port (0x60) and the command/status port (0x64).
pub const I8042_LEN: u64 = 5;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.0.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // The only error is a failed eventfd write, which the main
            // loop would see as a missing reset; log it.
            if let Err(e) = self.0.write(off, *value) {
                tracing::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        dev.write(4, &[0x01]);
        assert!(evt.read().is_err(), "no reset for other commands");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status[0] & 0x02, 0, "input buffer reads empty, so kb_wait finishes");
    }
}
