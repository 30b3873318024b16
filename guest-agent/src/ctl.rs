//! The agent's end of a child's control socket: fixed-size records from
//! `child.rs`, possibly carrying a descriptor.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::child::{Stage, RECORD_LEN, TAG_ERROR};

/// A SOCK_SEQPACKET pair (record boundaries kept), both ends close-on-exec.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two new descriptors.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[derive(Debug)]
pub enum Record {
    /// The child exited or exec'd: every copy of its end is closed.
    Closed,
    Ok {
        tag: u8,
        value: i32,
        fd: Option<OwnedFd>,
    },
    Failed {
        stage: Option<Stage>,
        error: io::Error,
    },
}

impl Record {
    /// The child's failure as a sentence, e.g. "mounting: No such file".
    pub fn describe(&self) -> String {
        match self {
            Record::Failed { stage, error } => {
                format!("{}: {error}", stage.map_or("an unknown step", |s| s.describe()))
            }
            Record::Closed => "the process ended before reporting".into(),
            Record::Ok { tag, .. } => format!("unexpected report {:?}", *tag as char),
        }
    }
}

pub fn recv(ctl: &OwnedFd) -> io::Result<Record> {
    let mut rec = [0u8; RECORD_LEN];
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr points at the stack buffers above; CMSG_* compute
    // addresses inside cbuf, bounded by msg_controllen the kernel set.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: rec.as_mut_ptr().cast(),
            iov_len: RECORD_LEN,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = loop {
            let n = libc::recvmsg(ctl.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(Record::Closed);
        }
        if n as usize != RECORD_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short record from a child"));
        }
        let mut fd = None;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null() && (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
            let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>());
            fd = Some(OwnedFd::from_raw_fd(raw));
        }
        let value = i32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        if rec[0] == TAG_ERROR {
            return Ok(Record::Failed {
                stage: Stage::from_u8(rec[1]),
                error: io::Error::from_raw_os_error(value),
            });
        }
        Ok(Record::Ok { tag: rec[0], value, fd })
    }
}

pub fn send_byte(ctl: &OwnedFd, b: u8) -> io::Result<()> {
    // SAFETY: writes one byte from the stack.
    if unsafe { libc::write(ctl.as_raw_fd(), [b].as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
