//! Termination signals (SIGINT, SIGTERM, SIGHUP) as an event source, so
//! the VMM stops through the same path as a guest shutdown and cleans up
//! (sockets, files) instead of dying where it stands.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

pub const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

pub struct TerminationSignals {
    fd: SignalFd,
}

impl TerminationSignals {
    /// Blocks the signals in the calling thread (threads it starts later
    /// inherit the mask) and returns a signalfd that reports them.
    pub fn block() -> io::Result<Self> {
        let mut set = SigSet::empty();
        for sig in HANDLED {
            set.add(Signal::try_from(sig).map_err(io::Error::from)?);
        }
        set.thread_block().map_err(io::Error::from)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(io::Error::from)?;
        Ok(TerminationSignals { fd })
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<i32> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Some(info.ssi_signo as i32),
            _ => None,
        }
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

pub fn name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("signal", Signal::as_str)
}
