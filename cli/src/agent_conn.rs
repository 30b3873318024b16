//! Reaching the guest agent through the VMM's vsock Unix socket: connect,
//! `CONNECT <port>\n`, `OK <n>\n`, then the protocol handshake. Until the
//! agent listens the VMM resets such a connection (EOF before `OK`), and
//! before the VMM is up the socket is missing: both mean "retry".

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_protocol::client::{Client, ClientError};
use bulkhead_protocol::AGENT_PORT;

/// How often to try again while the guest boots.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);
/// A live guest answers `CONNECT` and the hello well within this, even
/// under emulation; past it the connection is retried.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
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
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl ConnError {
    pub fn retryable(&self) -> bool {
        matches!(self, ConnError::NotReady(_))
    }
}

/// One attempt at a stream to guest port `port`; `answer_timeout` bounds
/// the wait for the VMM's `OK`.
pub fn vsock_connect(uds: &Path, port: u32, answer_timeout: Duration) -> Result<UnixStream, ConnError> {
    let io_err = |source: io::Error| ConnError::Io {
        path: uds.display().to_string(),
        source,
    };
    let mut s = match UnixStream::connect(uds) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(ConnError::NotReady(format!("{}: {e}", uds.display())))
        }
        Err(e) => return Err(io_err(e)),
    };
    s.set_read_timeout(Some(answer_timeout)).map_err(io_err)?;
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Err(not_ready_or(e, io_err));
    }
    // Byte by byte: whatever follows the line belongs to the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(ConnError::NotReady(
                    "the VMM closed the connection (no listener)".into(),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(ConnError::BadAnswer(String::from_utf8_lossy(&line).into_owned()))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(not_ready_or(e, io_err)),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => {}
        _ => return Err(ConnError::BadAnswer(text.into_owned())),
    }
    s.set_read_timeout(None).map_err(io_err)?;
    Ok(s)
}

/// Resets and timeouts mean the guest side is not there (yet).
fn not_ready_or(e: io::Error, other: impl FnOnce(io::Error) -> ConnError) -> ConnError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::WouldBlock
        | io::ErrorKind::TimedOut => ConnError::NotReady(e.to_string()),
        _ => other(e),
    }
}

/// One attempt at a request stream to the agent, handshake included.
pub fn connect_agent(uds: &Path) -> Result<Client<UnixStream>, ConnError> {
    connect(uds, ANSWER_TIMEOUT, false)
}

/// As [`connect_agent`], but every later answer on the stream is bounded
/// by `timeout` too (an agent that hangs fails the call instead of
/// blocking it): for best-effort requests such as `Shutdown`.
pub fn connect_agent_bounded(uds: &Path, timeout: Duration) -> Result<Client<UnixStream>, ConnError> {
    connect(uds, timeout, true)
}

fn connect(uds: &Path, timeout: Duration, keep_timeout: bool) -> Result<Client<UnixStream>, ConnError> {
    let s = vsock_connect(uds, AGENT_PORT, timeout)?;
    handshake(uds, s, timeout, keep_timeout)
}

fn handshake(
    uds: &Path,
    s: UnixStream,
    timeout: Duration,
    keep_timeout: bool,
) -> Result<Client<UnixStream>, ConnError> {
    let io_err = |source| ConnError::Io {
        path: uds.display().to_string(),
        source,
    };
    // Socket options are shared by every descriptor of the socket: the
    // clone changes the timeout once the client owns the stream.
    let control = s.try_clone().map_err(io_err)?;
    control.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let client = match Client::handshake(s, crate::SOFTWARE) {
        Ok(c) => c,
        // A stream reset during the hello is still a guest coming up.
        Err(ClientError::Frame(bulkhead_protocol::frame::FrameError::Closed)) => {
            return Err(ConnError::NotReady(
                "the agent closed the stream during the hello".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if !keep_timeout {
        control.set_read_timeout(None).map_err(io_err)?;
    }
    Ok(client)
}

/// Why waiting for the agent ended without a connection.
#[derive(Debug, thiserror::Error)]
pub enum WaitError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Check(E),
    #[error(transparent)]
    Conn(ConnError),
}

/// Retries [`connect_agent`] every [`RETRY_EVERY`] while it is not ready;
/// between tries `check(elapsed)` may end the wait (the VMM died, the
/// user gave up, a deadline passed). Each try waits at most
/// `attempt_timeout` for the VMM's `OK`: before the guest's vsock driver
/// is up the VMM holds a connection without answering, and `check` must
/// still run.
pub fn wait_for_agent<E: std::error::Error + 'static>(
    uds: &Path,
    attempt_timeout: Duration,
    check: impl FnMut(Duration) -> Result<(), E>,
) -> Result<Client<UnixStream>, WaitError<E>> {
    wait_for_agent_every(uds, attempt_timeout, RETRY_EVERY, ANSWER_TIMEOUT, check)
}

/// [`wait_for_agent`], trying again every `retry_every` (a guest restored
/// from a snapshot is ready within milliseconds; a cold boot takes long
/// enough for the default), and again when the agent's hello does not
/// come within `hello_timeout`: a stream opened just after a restore can
/// be dropped by the guest's vsock transport reset without the host side
/// hearing of it.
pub fn wait_for_agent_every<E: std::error::Error + 'static>(
    uds: &Path,
    attempt_timeout: Duration,
    retry_every: Duration,
    hello_timeout: Duration,
    mut check: impl FnMut(Duration) -> Result<(), E>,
) -> Result<Client<UnixStream>, WaitError<E>> {
    let start = Instant::now();
    loop {
        let attempt = vsock_connect(uds, AGENT_PORT, attempt_timeout)
            .and_then(|s| handshake(uds, s, hello_timeout, false))
            .map_err(|e| match e {
                ConnError::Client(ClientError::Frame(bulkhead_protocol::frame::FrameError::Io(io)))
                    if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    ConnError::NotReady(format!("no hello from the agent within {hello_timeout:?}"))
                }
                e => e,
            });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if e.retryable() => tracing::trace!("agent not ready: {e}"),
            Err(e) => return Err(WaitError::Conn(e)),
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

    /// Plays the VMM: resets the first `resets` connections, then answers
    /// OK and plays the agent for one request.
    fn fake_vmm(listener: UnixListener, resets: usize) {
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
        s.write_all(b"OK 1073741824\n").unwrap();
        let _: Hello = frame::recv(&mut s).unwrap();
        frame::send(&mut s, &Hello::ours("fake agent")).unwrap();
        let _: Request = frame::recv(&mut s).unwrap();
        frame::send(&mut s, &Response::Ok).unwrap();
    }

    #[test]
    fn retries_until_the_agent_answers() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        // Missing socket: not ready.
        assert!(connect_agent(&uds).err().unwrap().retryable());
        let listener = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || fake_vmm(listener, 2));
        let mut checks = 0;
        let mut c = wait_for_agent::<GaveUp>(&uds, ANSWER_TIMEOUT, |_| {
            checks += 1;
            Ok(())
        })
        .unwrap();
        c.call_ok(&Request::Shutdown).unwrap();
        assert_eq!(checks, 2);
        t.join().unwrap();
    }

    #[test]
    fn check_can_end_the_wait_and_bad_answers_are_fatal() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let r = wait_for_agent(&uds, ANSWER_TIMEOUT, |_| Err(GaveUp));
        assert!(matches!(r, Err(WaitError::Check(GaveUp))));

        let listener = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            s.write_all(b"NO\n").unwrap();
        });
        let e = wait_for_agent::<GaveUp>(&uds, ANSWER_TIMEOUT, |_| Ok(()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("answered CONNECT with \"NO\""), "{e}");
        t.join().unwrap();
    }
}
