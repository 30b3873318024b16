//! Signals as readable events (signalfd): the signals `bulkhead run`
//! forwards to the workload, and SIGWINCH for the terminal size. They are
//! blocked before any thread starts so that every thread inherits the mask
//! and none of them is interrupted; the VMM unblocks them for itself.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SfdFlags;

/// Forwarded to the workload as they arrive.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Signals as a readable descriptor: blocked in the calling thread (and
/// the threads it starts later) until dropped, then unblocked again.
pub struct SignalFd {
    fd: nix::sys::signalfd::SignalFd,
    blocked: SigSet,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread (threads it starts later
    /// inherit the mask) and returns a descriptor that reports them.
    pub fn block(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        let mut set = SigSet::empty();
        for &sig in signals {
            set.add(Signal::try_from(sig).map_err(io::Error::from)?);
        }
        // Only what was not blocked already is unblocked again on drop.
        let before = SigSet::thread_get_mask().map_err(io::Error::from)?;
        let mut blocked = SigSet::empty();
        for sig in set.iter() {
            if !before.contains(sig) {
                blocked.add(sig);
            }
        }
        set.thread_block().map_err(io::Error::from)?;
        match nix::sys::signalfd::SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Ok(SignalFd { fd, blocked }),
            Err(e) => {
                let _ = blocked.thread_unblock();
                Err(e.into())
            }
        }
    }

    /// The next pending signal, if any (never blocks).
    pub fn read(&self) -> Option<libc::c_int> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Some(info.ssi_signo as libc::c_int),
            _ => None,
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        let _ = self.blocked.thread_unblock();
    }
}

pub fn name(sig: libc::c_int) -> &'static str {
    Signal::try_from(sig).map_or("signal", Signal::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_becomes_an_event() {
        // Blocked in this test's thread only; raise() targets this thread.
        let s = SignalFd::block(&[libc::SIGUSR2]).unwrap();
        assert_eq!(s.read(), None);
        // SAFETY: raise delivers to the calling thread, where it is blocked.
        unsafe { libc::raise(libc::SIGUSR2) };
        assert_eq!(s.read(), Some(libc::SIGUSR2));
        assert_eq!(s.read(), None);
    }
}
