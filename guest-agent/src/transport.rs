//! Where requests and stdio streams come from: vsock ports in the VM;
//! Unix sockets in the debug-only listener mode the agent tier uses. The
//! host opens every stream; nothing here connects out.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Request streams served at once; more are closed on arrival. The stdio
/// registry is sized from it.
pub const MAX_REQUEST_STREAMS: usize = 64;

#[derive(Clone, Debug)]
pub enum Transport {
    Vsock,
    #[cfg(debug_assertions)]
    Unix(std::path::PathBuf),
}

pub enum Listener {
    Vsock(OwnedFd),
    #[cfg(debug_assertions)]
    Unix(std::os::unix::net::UnixListener),
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is valid for every field.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl Transport {
    /// True inside a VM; false for the debug listener on a host.
    pub fn is_guest(&self) -> bool {
        matches!(self, Transport::Vsock)
    }

    /// Listens on `port`: `bulkhead_protocol::AGENT_PORT` (requests) or
    /// `bulkhead_protocol::stdio::STDIO_PORT`.
    pub fn listen(&self, port: u32) -> io::Result<Listener> {
        match self {
            Transport::Vsock => {
                let fd = vsock_socket()?;
                let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
                use std::os::fd::AsRawFd;
                // SAFETY: addr is a sockaddr_vm of ADDR_LEN bytes.
                check(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) })?;
                // SAFETY: listen on our socket.
                check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
                Ok(Listener::Vsock(fd))
            }
            #[cfg(debug_assertions)]
            Transport::Unix(dir) => {
                let path = dir.join(unix_socket_name(port));
                let _ = std::fs::remove_file(&path);
                Ok(Listener::Unix(std::os::unix::net::UnixListener::bind(path)?))
            }
        }
    }
}

/// The listener mode's socket for `port`, in its directory.
#[cfg(debug_assertions)]
pub fn unix_socket_name(port: u32) -> String {
    match port {
        bulkhead_protocol::AGENT_PORT => "agent.sock".into(),
        bulkhead_protocol::stdio::STDIO_PORT => "agent-stdio.sock".into(),
        p => format!("agent.sock_{p}"),
    }
}

impl Listener {
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Listener::Vsock(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: sockaddr_vm is plain data.
                let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
                let mut len = ADDR_LEN;
                // SAFETY: accept4 writes at most `len` bytes of the peer's
                // address into `peer`; returns a new fd or -1.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        (&mut peer as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: c is new and ours.
                let stream = File::from(unsafe { OwnedFd::from_raw_fd(c) });
                // Only the host may drive the agent: a process inside the
                // guest could otherwise reach this port and ask for anything.
                if peer.svm_cid != libc::VMADDR_CID_HOST {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("refused a request stream from CID {}", peer.svm_cid),
                    ));
                }
                Ok(stream)
            }
            #[cfg(debug_assertions)]
            Listener::Unix(l) => Ok(File::from(OwnedFd::from(l.accept()?.0))),
        }
    }
}

/// Half-closes a stream's write side, so the host reads EOF.
pub fn shutdown_write(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a socket we hold.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}
