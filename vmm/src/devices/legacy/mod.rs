//! Legacy PC devices: the 8250 UART console and the i8042 reset line.

pub mod console_file;
pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Adapts an `EventFd` (an irqfd, or an exit notification) to vm-superio.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
