//! Reaching the guest agent through the VMM's vsock Unix socket: connect,
//! `CONNECT <port>\n`, `OK <n>\n`, then the protocol handshake.
//!
//! No timer gives up on a connection the VMM still holds: until the guest
//! can take it (its vsock driver is not up yet, or a restored guest has
//! not handled its transport reset) the VMM keeps it waiting, and a busy
//! host may take its time. While waiting, a caller's `check` runs every
//! [`POLL_EVERY`] and alone decides to give up (the VMM died, a deadline
//! the caller chose passed). A reset before `OK` means nothing listens
//! on the port yet: retry. A missing socket means the VMM is not up yet.

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_protocol::client::{Client, ClientError};
use bulkhead_protocol::AGENT_PORT;

/// How often to try again while the guest boots.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How often a waiting connection runs its caller's check.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
const MAX_LINE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Nothing listens yet; worth retrying.
    #[error("the guest is not listening yet: {0}")]
    NotReady(String),
    #[error("vsock socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the VMM answered CONNECT with {0:?}")]
    BadAnswer(String),
    /// A bounded connection ([`connect_agent_bounded`]) got no answer.
    #[error("no answer from the agent within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Peer(#[from] bulkhead_vmm_api::peer::PeerError),
}

impl ConnError {
    pub fn retryable(&self) -> bool {
        matches!(self, ConnError::NotReady(_))
    }
}

/// Why waiting ended without a connection.
#[derive(Debug, thiserror::Error)]
pub enum WaitError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Check(E),
    #[error(transparent)]
    Conn(ConnError),
}

impl From<WaitError<Infallible>> for ConnError {
    fn from(e: WaitError<Infallible>) -> Self {
        match e {
            WaitError::Conn(c) => c,
            WaitError::Check(never) => match never {},
        }
    }
}

/// Blocks until `s` is readable (or hung up), running `check(elapsed since
/// start)` every [`POLL_EVERY`].
fn wait_readable<E: std::error::Error>(
    s: &UnixStream,
    start: Instant,
    check: &mut impl FnMut(Duration) -> Result<(), E>,
) -> Result<(), WaitError<E>> {
    loop {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut p, 1, POLL_EVERY.as_millis() as libc::c_int) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(WaitError::Conn(ConnError::Io {
                    path: "vsock stream".into(),
                    source: e,
                }));
            }
        }
        check(start.elapsed()).map_err(WaitError::Check)?;
    }
}

/// One attempt at a stream to guest port `port`: waits for the VMM's
/// `OK` as long as the VMM holds the connection and `check` agrees.
pub fn vsock_connect<E: std::error::Error>(
    uds: &Path,
    port: u32,
    start: Instant,
    check: &mut impl FnMut(Duration) -> Result<(), E>,
) -> Result<UnixStream, WaitError<E>> {
    let io_err = |source: io::Error| {
        WaitError::Conn(ConnError::Io {
            path: uds.display().to_string(),
            source,
        })
    };
    let mut s = match UnixStream::connect(uds) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(WaitError::Conn(ConnError::NotReady(format!("{}: {e}", uds.display()))))
        }
        Err(e) => return Err(io_err(e)),
    };
    bulkhead_vmm_api::peer::check_owner_serves(&s, uds).map_err(|e| WaitError::Conn(ConnError::Peer(e)))?;
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Err(WaitError::Conn(not_ready_or(e, uds)));
    }
    wait_readable(&s, start, check)?;
    // Byte by byte: whatever follows the line belongs to the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(WaitError::Conn(ConnError::NotReady(format!(
                    "the VMM closed the connection to port {port} (no listener)"
                ))))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(WaitError::Conn(ConnError::BadAnswer(
                    String::from_utf8_lossy(&line).into_owned(),
                )))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WaitError::Conn(not_ready_or(e, uds))),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(s),
        _ => Err(WaitError::Conn(ConnError::BadAnswer(text.into_owned()))),
    }
}

/// A reset means the guest side is not there (yet).
fn not_ready_or(e: io::Error, uds: &Path) -> ConnError {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => {
            ConnError::NotReady(e.to_string())
        }
        _ => ConnError::Io {
            path: uds.display().to_string(),
            source: e,
        },
    }
}

/// A request stream: connection and hellos, each waited for with `check`.
fn connect_with<E: std::error::Error>(
    uds: &Path,
    start: Instant,
    check: &mut impl FnMut(Duration) -> Result<(), E>,
) -> Result<Client<UnixStream>, WaitError<E>> {
    let s = vsock_connect(uds, AGENT_PORT, start, check)?;
    Client::handshake_with(s, crate::SOFTWARE, |stream| wait_readable(stream, start, check)).map_err(|e| match e {
        bulkhead_protocol::client::HandshakeWait::Wait(w) => w,
        // A stream reset during the hello is still a guest coming up.
        bulkhead_protocol::client::HandshakeWait::Client(ClientError::Frame(
            bulkhead_protocol::frame::FrameError::Closed,
        )) => WaitError::Conn(ConnError::NotReady(
            "the agent closed the stream during the hello".into(),
        )),
        bulkhead_protocol::client::HandshakeWait::Client(c) => WaitError::Conn(c.into()),
    })
}

/// A request stream to an agent that is up: waits as long as the VMM
/// holds the connection.
pub fn connect_agent(uds: &Path) -> Result<Client<UnixStream>, ConnError> {
    Ok(connect_with(uds, Instant::now(), &mut |_| Ok::<(), Infallible>(()))?)
}

#[derive(Debug, thiserror::Error)]
#[error("no answer from the agent within {0:?}")]
pub struct TimedOut(pub Duration);

/// As [`connect_agent`], but the connection and every later answer on
/// the stream are bounded by `timeout`: for best-effort requests such as
/// `Shutdown`, which the caller follows with a kill anyway.
pub fn connect_agent_bounded(uds: &Path, timeout: Duration) -> Result<Client<UnixStream>, ConnError> {
    let c = connect_with(uds, Instant::now(), &mut |elapsed| {
        if elapsed >= timeout {
            Err(TimedOut(timeout))
        } else {
            Ok(())
        }
    })
    .map_err(|e| match e {
        WaitError::Conn(c) => c,
        WaitError::Check(t) => ConnError::TimedOut(t.0),
    })?;
    c.get_ref()
        .set_read_timeout(Some(timeout))
        .map_err(|source| ConnError::Io {
            path: uds.display().to_string(),
            source,
        })?;
    Ok(c)
}

/// Connects to the agent, trying again every `retry_every` while nothing
/// listens (the VMM is starting, the guest is booting); `check(elapsed)`
/// runs between tries and while a connection waits, and may end the wait
/// (the VMM died, the user gave up, a deadline passed).
pub fn wait_for_agent<E: std::error::Error + 'static>(
    uds: &Path,
    retry_every: Duration,
    mut check: impl FnMut(Duration) -> Result<(), E>,
) -> Result<Client<UnixStream>, WaitError<E>> {
    let start = Instant::now();
    loop {
        match connect_with(uds, start, &mut check) {
            Ok(c) => return Ok(c),
            Err(WaitError::Conn(e)) if e.retryable() => tracing::trace!("agent not ready: {e}"),
            Err(e) => return Err(e),
        }
        check(start.elapsed()).map_err(WaitError::Check)?;
        std::thread::sleep(retry_every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::frame;
    use bulkhead_protocol::handshake::Hello;
    use bulkhead_protocol::messages::{Request, Response};
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[derive(Debug, thiserror::Error)]
    #[error("gave up")]
    struct GaveUp;

    /// Plays the VMM: resets the first `resets` connections, holds the
    /// next one unanswered for `hold`, then answers OK and plays the agent
    /// for one request.
    fn fake_vmm(listener: UnixListener, resets: usize, hold: Duration) {
        for _ in 0..resets {
            let (s, _) = listener.accept().unwrap();
            let mut r = std::io::BufReader::new(&s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
        }
        let (mut s, _) = listener.accept().unwrap();
        let mut line = [0u8; 13];
        s.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"CONNECT 1024\n");
        std::thread::sleep(hold);
        s.write_all(b"OK 1073741824\n").unwrap();
        let _: Hello = frame::recv(&mut s).unwrap();
        std::thread::sleep(hold);
        frame::send(&mut s, &Hello::ours("fake agent")).unwrap();
        let _: Request = frame::recv(&mut s).unwrap();
        frame::send(&mut s, &Response::Ok).unwrap();
    }

    #[test]
    fn retries_resets_and_waits_out_a_slow_answer() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        // Missing socket: not ready.
        assert!(connect_agent(&uds).err().unwrap().retryable());
        let listener = UnixListener::bind(&uds).unwrap();
        // Held for several poll intervals: the connection is kept, and
        // the check runs meanwhile.
        let t = std::thread::spawn(move || fake_vmm(listener, 2, POLL_EVERY * 4));
        let mut checks = 0;
        let mut c = wait_for_agent::<GaveUp>(&uds, Duration::from_millis(1), |_| {
            checks += 1;
            Ok(())
        })
        .unwrap();
        c.call_ok(&Request::Shutdown).unwrap();
        assert!(checks >= 2 + 4, "checks ran {checks} times");
        t.join().unwrap();
    }

    #[test]
    fn check_can_end_the_wait_and_bad_answers_are_fatal() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let r = wait_for_agent(&uds, RETRY_EVERY, |_| Err(GaveUp));
        assert!(matches!(r, Err(WaitError::Check(GaveUp))));

        // A held connection: the check ends the wait.
        let listener = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(POLL_EVERY * 3);
            drop(s);
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            s.write_all(b"NO\n").unwrap();
        });
        let r = wait_for_agent(&uds, RETRY_EVERY, |elapsed| {
            if elapsed > POLL_EVERY {
                Err(GaveUp)
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(WaitError::Check(GaveUp))));
        let e = wait_for_agent::<GaveUp>(&uds, RETRY_EVERY, |_| Ok(())).err().unwrap();
        assert!(e.to_string().contains("answered CONNECT with \"NO\""), "{e}");
        t.join().unwrap();
    }

    /// A socket swapped for a link to someone else's is refused before
    /// a byte is written to it, and not retried.
    #[test]
    fn a_socket_not_served_by_its_directory_owner_is_refused() {
        if !crate::vmm_process::can_make_namespaces() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        std::os::unix::fs::chown(d.path(), Some(4242), None).unwrap();
        let e = connect_agent(&uds).err().unwrap();
        assert!(matches!(e, ConnError::Peer(_)) && !e.retryable(), "{e}");
        listener.set_nonblocking(true).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "the client wrote {got:?}");
    }
}
