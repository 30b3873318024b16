//! The Unix-socket side of the host: the `CONNECT <port>\n` handshake and a
//! connect that cannot stall the event loop.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Longest `CONNECT <port>\n` line we wait for, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// What reading a host stream's first line gave so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// No newline yet and the stream would block.
    Incomplete,
    /// A well-formed line naming this guest port.
    Port(u32),
    /// The stream closed, failed, or sent something else: drop it.
    Reject(&'static str),
}

/// Parses `CONNECT <port>` (without the newline): decimal digits only.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Reads the handshake byte by byte, so that data the host sends right
/// after the newline stays in the socket for the guest.
pub fn read_connect_line(stream: &mut UnixStream, line: &mut Vec<u8>) -> LineRead {
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return LineRead::Reject("closed before the CONNECT line"),
            Ok(_) if byte[0] == b'\n' => {
                return match parse_connect_line(line) {
                    Some(port) => LineRead::Port(port),
                    None => LineRead::Reject("malformed CONNECT line"),
                };
            }
            Ok(_) => {
                line.push(byte[0]);
                if line.len() >= MAX_CONNECT_LINE {
                    return LineRead::Reject("CONNECT line too long");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Incomplete,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return LineRead::Reject("read error before the CONNECT line"),
        }
    }
}

/// Connects to a listening Unix socket without blocking: a full backlog
/// fails with `WouldBlock` instead of stalling every device on this thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // Keep a terminating NUL; reject embedded ones.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "unusable Unix socket path"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a live, initialised sockaddr_un and `len` does not
    // exceed its size (checked against sun_path above).
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 12 ",
            b"connect 12",
            b"CONNECT  12",
            b"",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn line_reader_stops_at_the_newline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut line = Vec::new();
        a.write_all(b"CONNECT 5").unwrap();
        assert_eq!(read_connect_line(&mut b, &mut line), LineRead::Incomplete);
        a.write_all(b"2\nDATA").unwrap();
        assert_eq!(read_connect_line(&mut b, &mut line), LineRead::Port(52));
        let mut rest = [0u8; 4];
        b.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"DATA");

        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        a.write_all(&[b'9'; 40]).unwrap();
        assert!(matches!(
            read_connect_line(&mut b, &mut Vec::new()),
            LineRead::Reject(_)
        ));

        let (a, mut b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(
            read_connect_line(&mut b, &mut Vec::new()),
            LineRead::Reject(_)
        ));
    }

    #[test]
    fn nonblocking_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        assert!(connect_nonblocking(&path).is_err(), "nobody listens");
        let l = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let long = dir.path().join("x".repeat(200));
        assert!(connect_nonblocking(&long).is_err());
    }
}
