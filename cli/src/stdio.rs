//! A process's stdio over dedicated vsock streams. The agent connects to
//! host ports while it handles `create`/`exec`, before it answers, so the
//! host listens on `<uds>_<port>` first and accepts in the background
//! while the request is in flight. Then threads copy the bytes.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use bulkhead_protocol::messages::StdioPorts;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("waiting for the agent's stdio connections: {0}")]
    Accept(io::Error),
    #[error("the agent did not open its {0} stream")]
    Missing(&'static str),
}

/// Which streams a process gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioPlan {
    /// Forward our input (otherwise the process reads /dev/null).
    pub stdin: bool,
    /// A terminal: one stream, the stdout port, both ways.
    pub tty: bool,
}

struct Listening {
    name: &'static str,
    port: u32,
    path: PathBuf,
    listener: UnixListener,
}

/// Bound listeners, ready to be named in a request.
pub struct StdioListeners {
    slots: Vec<Listening>,
}

/// The accepted streams; `None` where the plan has no such stream.
#[derive(Debug, Default)]
pub struct StdioStreams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

impl StdioListeners {
    /// Listens on `<uds>_<port>` for each stream of `plan`, taking ports
    /// from `next_port`.
    pub fn bind(uds: &Path, plan: StdioPlan, mut next_port: impl FnMut() -> u32) -> Result<Self, StdioError> {
        let mut names = Vec::new();
        if plan.stdin && !plan.tty {
            names.push("stdin");
        }
        names.push("stdout");
        if !plan.tty {
            names.push("stderr");
        }
        let mut slots = Vec::new();
        for name in names {
            let port = next_port();
            let mut p = uds.as_os_str().to_owned();
            p.push(format!("_{port}"));
            let path = PathBuf::from(p);
            let listen_err = |source| StdioError::Listen {
                path: path.clone(),
                source,
            };
            let listener = UnixListener::bind(&path).map_err(listen_err)?;
            listener.set_nonblocking(true).map_err(listen_err)?;
            slots.push(Listening {
                name,
                port,
                path,
                listener,
            });
        }
        Ok(StdioListeners { slots })
    }

    /// The ports to put in the request.
    pub fn ports(&self) -> StdioPorts {
        let port = |n: &str| self.slots.iter().find(|s| s.name == n).map(|s| s.port);
        StdioPorts {
            stdin: port("stdin"),
            stdout: port("stdout"),
            stderr: port("stderr"),
        }
    }

    /// Accepts one connection per listener on a thread, until all came or
    /// the result is given up.
    pub fn accept_in_background(self) -> PendingStdio {
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = cancel.clone();
        let handle = std::thread::Builder::new().name("stdio-accept".into()).spawn(move || {
            let _ = tx.send(self.accept_all(&flag));
        });
        match handle {
            Ok(h) => PendingStdio {
                cancel,
                rx,
                handle: Some(h),
            },
            Err(e) => {
                let (tx, rx) = mpsc::channel();
                let _ = tx.send(Err(StdioError::Accept(e)));
                PendingStdio {
                    cancel,
                    rx,
                    handle: None,
                }
            }
        }
    }

    fn accept_all(self, cancel: &AtomicBool) -> Result<StdioStreams, StdioError> {
        let mut out = StdioStreams::default();
        let mut waiting: Vec<&Listening> = self.slots.iter().collect();
        while !waiting.is_empty() {
            if cancel.load(Ordering::Relaxed) {
                return Err(StdioError::Accept(io::Error::from(io::ErrorKind::Interrupted)));
            }
            let mut fds: Vec<libc::pollfd> = waiting
                .iter()
                .map(|l| libc::pollfd {
                    fd: l.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StdioError::Accept(e));
            }
            let mut still = Vec::new();
            for l in waiting {
                match l.listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).map_err(StdioError::Accept)?;
                        tracing::debug!(port = l.port, "agent opened {}", l.name);
                        let slot = match l.name {
                            "stdin" => &mut out.stdin,
                            "stdout" => &mut out.stdout,
                            _ => &mut out.stderr,
                        };
                        *slot = Some(s);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => still.push(l),
                    Err(e) => return Err(StdioError::Accept(e)),
                }
            }
            waiting = still;
        }
        Ok(out)
    }
}

impl Drop for StdioListeners {
    fn drop(&mut self) {
        for s in &self.slots {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

/// Streams being accepted while a request is in flight.
pub struct PendingStdio {
    cancel: Arc<AtomicBool>,
    rx: mpsc::Receiver<Result<StdioStreams, StdioError>>,
    handle: Option<JoinHandle<()>>,
}

impl PendingStdio {
    /// The streams, once the request succeeded: the agent connected before
    /// answering, so they are at most a moment away.
    pub fn finish(mut self, timeout: Duration) -> Result<StdioStreams, StdioError> {
        let r = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(StdioError::Missing("stdio")),
        };
        self.stop();
        let streams = r?;
        Ok(streams)
    }

    fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PendingStdio {
    /// Giving up (the request failed): stop accepting.
    fn drop(&mut self) {
        self.stop();
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
        let mut buf = vec![0u8; 32 * 1024];
        let mut total = 0u64;
        let mut sink_ok = true;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("{name}: {e}");
                    break;
                }
            };
            total += n as u64;
            if sink_ok {
                if let Err(e) = to.write_all(&buf[..n]).and_then(|()| to.flush()) {
                    tracing::debug!("{name}: cannot write: {e}; discarding the rest");
                    sink_ok = false;
                }
            }
        }
        total
    })
}

/// Copies `from` into the guest stream; at EOF shuts down the stream's
/// write half, which closes the process's stdin.
pub fn copy_in<R: Read + Send + 'static>(mut from: R, mut to: UnixStream) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("copy-stdin".into()).spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("stdin: {e}");
                    break;
                }
            };
            if let Err(e) = to.write_all(&buf[..n]) {
                tracing::debug!("stdin: the guest stream is gone: {e}");
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
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

    #[test]
    fn listeners_accept_while_a_request_is_in_flight() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let mut port = 1024;
        let l = StdioListeners::bind(
            &uds,
            StdioPlan {
                stdin: true,
                tty: false,
            },
            || {
                port += 1;
                port
            },
        )
        .unwrap();
        let ports = l.ports();
        assert_eq!(
            (ports.stdin, ports.stdout, ports.stderr),
            (Some(1025), Some(1026), Some(1027))
        );
        let pending = l.accept_in_background();
        // The "agent" connects to each port, as the VMM would for it.
        let mut agent: Vec<UnixStream> = [1025, 1026, 1027]
            .iter()
            .map(|p| UnixStream::connect(d.path().join(format!("v.sock_{p}"))).unwrap())
            .collect();
        let s = pending.finish(Duration::from_secs(5)).unwrap();
        let (stdin, stdout) = (s.stdin.unwrap(), s.stdout.unwrap());
        assert!(!d.path().join("v.sock_1025").exists(), "socket files are removed");

        let t = copy_in(&b"hello"[..], stdin).unwrap();
        let mut got = String::new();
        agent[0].read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        t.join().unwrap();

        agent[1].write_all(b"out").unwrap();
        drop(agent.remove(1));
        assert_eq!(collect(stdout).unwrap().join().unwrap().unwrap(), b"out");
    }

    #[test]
    fn tty_plan_uses_one_port_and_giving_up_stops_the_thread() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let l = StdioListeners::bind(&uds, StdioPlan { stdin: true, tty: true }, || 2000).unwrap();
        let p = l.ports();
        assert_eq!((p.stdin, p.stdout, p.stderr), (None, Some(2000), None));
        let pending = l.accept_in_background();
        drop(pending); // returns: the accept thread saw the cancel flag
        let mut port = 2000;
        let l = StdioListeners::bind(&uds, StdioPlan::default(), || {
            port += 1;
            port
        })
        .unwrap();
        assert_eq!((l.ports().stdout, l.ports().stderr), (Some(2001), Some(2002)));
        assert!(matches!(
            l.accept_in_background().finish(Duration::from_millis(100)),
            Err(StdioError::Missing(_))
        ));
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
