//! A process's stdio over dedicated vsock streams. The host opens each
//! stream to the agent's stdio port before it sends `create` or `exec`,
//! names it with a fresh random token, and waits until the agent has kept
//! it; the request then names the tokens. Then threads copy the bytes.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_protocol::frame::{self, FrameError};
use bulkhead_protocol::messages::StdioTokens;
use bulkhead_protocol::stdio::{Attach, Attached, STDIO_PORT, TOKEN_HEX_LEN};

use crate::agent_conn::{self, ConnError, TimedOut, WaitError};

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("opening the {name} stream: {source}")]
    Connect { name: &'static str, source: ConnError },
    #[error("attaching the {name} stream: {source}")]
    Attach { name: &'static str, source: FrameError },
    #[error("the agent refused the {name} stream: {message}")]
    Refused { name: &'static str, message: String },
    #[error("cannot make a stream token: {0}")]
    Token(io::Error),
    #[error("setting the stdio streams' timeouts: {0}")]
    Timeouts(io::Error),
}

/// Which streams a process gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioPlan {
    /// Forward our input (otherwise the process reads /dev/null).
    pub stdin: bool,
    /// A terminal: one stream, stdout, both ways.
    pub tty: bool,
}

impl StdioPlan {
    fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.stdin && !self.tty {
            names.push("stdin");
        }
        names.push("stdout");
        if !self.tty {
            names.push("stderr");
        }
        names
    }
}

/// The attached streams; `None` where the plan has no such stream.
#[derive(Debug, Default)]
pub struct StdioStreams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

/// Opens the streams of `plan` through the VMM's vsock socket `uds` and
/// attaches them; returns the tokens to name in the request. Each
/// connection and answer is bounded by `limit`; `None` waits as long as
/// the VMM holds the connections.
pub fn open_streams(
    uds: &Path,
    plan: StdioPlan,
    limit: Option<Duration>,
) -> Result<(StdioTokens, StdioStreams), StdioError> {
    let (tokens, streams) = attach_all(plan, |name| {
        let mut in_time = |elapsed: Duration| match limit {
            Some(l) if elapsed >= l => Err(TimedOut(l)),
            _ => Ok(()),
        };
        let s = agent_conn::vsock_connect(uds, STDIO_PORT, Instant::now(), &mut in_time).map_err(|e| {
            let source = match e {
                WaitError::Conn(c) => c,
                WaitError::Check(t) => ConnError::TimedOut(t.0),
            };
            StdioError::Connect { name, source }
        })?;
        set_timeouts(&s, limit).map_err(StdioError::Timeouts)?;
        Ok(s)
    })?;
    // Output may pause for as long as the process likes.
    for s in [&streams.stdin, &streams.stdout, &streams.stderr].into_iter().flatten() {
        set_timeouts(s, None).map_err(StdioError::Timeouts)?;
    }
    Ok((tokens, streams))
}

fn set_timeouts(s: &UnixStream, limit: Option<Duration>) -> io::Result<()> {
    s.set_read_timeout(limit)?;
    s.set_write_timeout(limit)
}

/// Attaches the streams of `plan`, opened by `open`: every `Attach` is
/// sent before any answer is read, so the round trips overlap.
pub fn attach_all(
    plan: StdioPlan,
    mut open: impl FnMut(&'static str) -> Result<UnixStream, StdioError>,
) -> Result<(StdioTokens, StdioStreams), StdioError> {
    let mut opened = Vec::new();
    for name in plan.names() {
        let mut s = open(name)?;
        let token = crate::util::random_hex(TOKEN_HEX_LEN / 2).map_err(StdioError::Token)?;
        frame::send(&mut s, &Attach { token: token.clone() }).map_err(|source| StdioError::Attach { name, source })?;
        opened.push((name, token, s));
    }
    let mut tokens = StdioTokens::default();
    let mut streams = StdioStreams::default();
    for (name, token, mut s) in opened {
        match frame::recv(&mut s).map_err(|source| StdioError::Attach { name, source })? {
            Attached::Ok => {}
            Attached::Error { message } => return Err(StdioError::Refused { name, message }),
        }
        let (t, st) = match name {
            "stdin" => (&mut tokens.stdin, &mut streams.stdin),
            "stdout" => (&mut tokens.stdout, &mut streams.stdout),
            _ => (&mut tokens.stderr, &mut streams.stderr),
        };
        *t = Some(token);
        *st = Some(s);
    }
    Ok((tokens, streams))
}

/// Reads `from` to its end (or an error) in chunks, handing each to `f`;
/// stops early, returning false, when `f` does.
fn for_each_chunk(from: &mut impl Read, name: &str, mut f: impl FnMut(&[u8]) -> bool) -> bool {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("{name}: {e}");
                return true;
            }
        };
        if !f(&buf[..n]) {
            return false;
        }
    }
}

/// Copies `from` into `to`, flushing each chunk (a prompt without a
/// newline must show). After `to` fails (our stdout was closed) the rest is
/// read and dropped, so the guest process is never blocked on a full pipe.
pub fn copy_out<W: Write + Send + 'static>(
    mut from: UnixStream,
    mut to: W,
    name: &'static str,
) -> io::Result<JoinHandle<u64>> {
    std::thread::Builder::new().name(format!("copy-{name}")).spawn(move || {
        let mut total = 0u64;
        let mut sink_ok = true;
        for_each_chunk(&mut from, name, |chunk| {
            total += chunk.len() as u64;
            if sink_ok {
                if let Err(e) = to.write_all(chunk).and_then(|()| to.flush()) {
                    tracing::debug!("{name}: cannot write: {e}; discarding the rest");
                    sink_ok = false;
                }
            }
            true
        });
        total
    })
}

/// Copies `from` into the guest stream; at EOF shuts down the stream's
/// write half, which closes the process's stdin.
pub fn copy_in<R: Read + Send + 'static>(mut from: R, mut to: UnixStream) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("copy-stdin".into()).spawn(move || {
        let delivered = for_each_chunk(&mut from, "stdin", |chunk| match to.write_all(chunk) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("stdin: the guest stream is gone: {e}");
                false
            }
        });
        if delivered {
            let _ = to.shutdown(Shutdown::Write);
        }
    })
}

/// Reads a stream to its end on a thread.
pub fn collect(mut from: UnixStream) -> io::Result<JoinHandle<io::Result<Vec<u8>>>> {
    std::thread::Builder::new().name("collect".into()).spawn(move || {
        let mut out = Vec::new();
        from.read_to_end(&mut out)?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the agent's stdio port for `n` streams: reads each Attach,
    /// answers, and returns the streams by token.
    fn fake_agent(n: usize, refuse: bool) -> (Vec<UnixStream>, std::thread::JoinHandle<Vec<(String, UnixStream)>>) {
        let mut host_ends = Vec::new();
        let mut agent_ends = Vec::new();
        for _ in 0..n {
            let (h, a) = UnixStream::pair().unwrap();
            host_ends.push(h);
            agent_ends.push(a);
        }
        let t = std::thread::spawn(move || {
            // Every Attach arrives before the first answer goes out.
            let attaches: Vec<Attach> = agent_ends.iter_mut().map(|a| frame::recv(a).unwrap()).collect();
            let mut out = Vec::new();
            for (mut a, at) in agent_ends.into_iter().zip(attaches) {
                at.validate().unwrap();
                let answer = if refuse {
                    Attached::Error { message: "full".into() }
                } else {
                    Attached::Ok
                };
                // The host may have given up on an earlier refusal and
                // closed this stream already.
                let _ = frame::send(&mut a, &answer);
                out.push((at.token, a));
            }
            out
        });
        (host_ends, t)
    }

    #[test]
    fn streams_are_attached_under_fresh_tokens_before_the_request() {
        let (mut ends, agent) = fake_agent(3, false);
        ends.reverse();
        let (tokens, streams) = attach_all(
            StdioPlan {
                stdin: true,
                tty: false,
            },
            |_| Ok(ends.pop().unwrap()),
        )
        .unwrap();
        tokens.validate(false).unwrap();
        let kept = agent.join().unwrap();
        let by_token = |t: &Option<String>| kept.iter().find(|(k, _)| Some(k) == t.as_ref()).map(|(_, s)| s);
        // Bytes after the answer are the stream's own.
        let t = copy_in(&b"hello"[..], streams.stdin.unwrap()).unwrap();
        let mut got = String::new();
        by_token(&tokens.stdin).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        t.join().unwrap();
        by_token(&tokens.stdout).unwrap().write_all(b"out").unwrap();
        let out = collect(streams.stdout.unwrap()).unwrap();
        drop(kept);
        assert_eq!(out.join().unwrap().unwrap(), b"out");
        assert_ne!(tokens.stdout, tokens.stderr);
    }

    #[test]
    fn a_terminal_gets_one_stream_and_refusals_are_reported() {
        let (mut ends, agent) = fake_agent(1, false);
        let (tokens, streams) = attach_all(StdioPlan { stdin: true, tty: true }, |_| Ok(ends.pop().unwrap())).unwrap();
        assert!(tokens.stdout.is_some() && tokens.stdin.is_none() && tokens.stderr.is_none());
        assert!(streams.stdout.is_some());
        agent.join().unwrap();
        let (mut ends, agent) = fake_agent(2, true);
        ends.reverse();
        let e = attach_all(StdioPlan::default(), |_| Ok(ends.pop().unwrap())).unwrap_err();
        assert!(e.to_string().contains("refused the stdout stream: full"), "{e}");
        agent.join().unwrap();
    }

    #[test]
    fn copy_out_keeps_reading_after_the_sink_fails() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = copy_out(a, Broken, "stdout").unwrap();
        b.write_all(&vec![1u8; 300_000]).unwrap();
        drop(b);
        assert_eq!(t.join().unwrap(), 300_000);
    }
}
