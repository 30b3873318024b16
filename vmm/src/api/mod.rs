//! The VMM's control API on a Unix socket (`--api-sock`).
//!
//! The protocol is HTTP/1.1 with JSON bodies, in the style of Firecracker's
//! API: `curl --unix-socket` works, and people who drive Firecracker find
//! the same shapes (`PATCH /vm {"state":"Paused"}`, errors as
//! `{"fault_message": "..."}`). The parser is our own, small and strict
//! (see [`http`]), rather than a general HTTP stack: the socket is the
//! VMM's only way in from the host, and the API needs a handful of
//! fixed-size requests.
//!
//! The API has its own thread, so a slow or stalled client never holds up
//! the vCPUs or the device event loop. It serves one connection at a time,
//! requests in order on each (keep-alive and pipelining work); a client
//! gets [`REQUEST_TIMEOUT`] to send each whole request, after which the
//! connection is closed, so nobody can hold the API by staying silent or
//! trickling bytes.
//!
//! Endpoints: `GET /` (state, size, version), `PATCH /vm` (pause/resume),
//! `GET /metrics`, and `PUT /snapshot/create` (a paused VM to a directory).

pub mod http;
pub mod routes;

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{self, Filters, SeccompError, ThreadKind};
use crate::socket_file::SocketFile;
use http::{Parsed, Response};
pub use routes::ApiContext;

/// Time a client has to send each whole request (from when the server
/// starts waiting for it), and to take each response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API socket path {0} already exists")]
    PathExists(String),
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind { path: String, source: io::Error },
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("the API thread ended before serving")]
    ThreadEnded,
}

/// The bound API socket, not served yet: bound early so that a bad path
/// fails before the VM boots; served once the vCPUs exist.
pub struct ApiListener {
    listener: UnixListener,
    socket_file: SocketFile,
}

impl ApiListener {
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let shown = path.display().to_string();
        let bind_err = |source| ApiError::Bind {
            path: shown.clone(),
            source,
        };
        let (listener, socket_file) = SocketFile::bind(path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ApiError::PathExists(shown.clone()),
            _ => bind_err(e),
        })?;
        // Accepting waits in poll, next to the stop event.
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiListener { listener, socket_file })
    }

    /// Starts the API thread, which serves under its own seccomp filter.
    pub fn serve(self, filters: Option<Arc<Filters>>, ctx: ApiContext) -> Result<ApiServer, ApiError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Thread)?;
        let thread_stop = stop.try_clone().map_err(ApiError::Thread)?;
        let listener = self.listener;
        let (sealed_tx, sealed) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let result = seccomp::apply(filters.as_deref(), ThreadKind::Api);
                let ok = result.is_ok();
                let _ = sealed_tx.send(result);
                if ok {
                    accept_loop(&listener, &thread_stop, &ctx);
                }
            })
            .map_err(ApiError::Thread)?;
        sealed.recv().map_err(|_| ApiError::ThreadEnded)??;
        info!(path = %self.socket_file.path().display(), "control API listening");
        Ok(ApiServer {
            socket_file: self.socket_file,
            stop,
            _thread: thread,
        })
    }
}

/// The running API. Dropping it removes the socket file and tells the
/// thread to stop (it does once the connection in hand, if any, ends; the
/// thread is not joined, so a stalled client cannot delay the VMM's exit).
pub struct ApiServer {
    socket_file: SocketFile,
    stop: EventFd,
    _thread: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.socket_file.remove();
        let _ = self.stop.write(1);
    }
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, ctx: &ApiContext) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("control API stops: poll failed: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_connection(stream, ctx, REQUEST_TIMEOUT) {
                    debug!("control API connection ended: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                warn!("control API cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves requests on one connection until the client closes it, a request
/// cannot be parsed, a response asks to close, or the client takes longer
/// than `timeout` to send a request.
pub fn serve_connection(mut stream: UnixStream, ctx: &ApiContext, timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(timeout))?;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let deadline = Instant::now() + timeout;
        let (request, used) = loop {
            match http::parse(&buf) {
                Ok(Parsed::Complete(request, used)) => break (request, used),
                Ok(Parsed::Incomplete) => {}
                Err(e) => {
                    debug!("control API: refusing a request: {e}");
                    return Response::from_error(&e).write_to(&mut stream);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if !buf.is_empty() {
                    let timeout = Response {
                        close: true,
                        ..Response::fault(408, "the request did not arrive in time")
                    };
                    // The client is slow already; it may not read this either.
                    let _ = timeout.write_to(&mut stream);
                }
                return Ok(());
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        };
        buf.drain(..used);
        let mut response = routes::handle(ctx, &request);
        response.close |= !request.keep_alive;
        debug!(method = %request.method, target = %request.target, status = response.status, "control API");
        response.write_to(&mut stream)?;
        if response.close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::control::VcpuControl;
    use std::io::Write;
    use std::sync::Arc;

    fn ctx() -> ApiContext {
        ApiContext {
            control: Arc::new(VcpuControl::new(0)),
            vcpus: 1,
            mem_mib: 32,
            started: Instant::now(),
            drives: None,
            snapshot: None,
        }
    }

    /// Sends `input` on a fresh connection, then half-closes, and returns
    /// everything the server wrote back.
    fn exchange(input: &[u8]) -> String {
        let (mut client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection(server, &ctx(), REQUEST_TIMEOUT));
        client.write_all(input).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        t.join().unwrap().unwrap();
        out
    }

    #[test]
    fn keep_alive_serves_requests_in_order() {
        let out = exchange(
            b"GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}GET / HTTP/1.1\r\n\r\n",
        );
        let statuses: Vec<&str> = out.matches("HTTP/1.1 ").map(|_| "").collect();
        assert_eq!(statuses.len(), 3, "{out}");
        let first = out.find("\"state\":\"Running\"").unwrap();
        let no_content = out.find("204 No Content").unwrap();
        let paused = out.find("\"state\":\"Paused\"").unwrap();
        assert!(first < no_content && no_content < paused, "{out}");
    }

    #[test]
    fn garbage_gets_400_and_the_connection_ends() {
        let out = exchange(b"\x00\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(out.contains("\"fault_message\":\"malformed request"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "nothing served after: {out}");
    }

    #[test]
    fn a_stalled_client_is_dropped() {
        for partial in [&b""[..], b"GET / HT"] {
            let (mut client, server) = UnixStream::pair().unwrap();
            client.write_all(partial).unwrap();
            // The client never finishes and never closes; the server gives up.
            serve_connection(server, &ctx(), Duration::from_millis(50)).unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).unwrap();
            if partial.is_empty() {
                assert_eq!(out, "", "an idle connection is just closed");
            } else {
                assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
            }
        }
    }

    #[test]
    fn connection_close_is_honoured() {
        let out = exchange(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
    }

    #[test]
    fn listener_refuses_an_existing_path_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(ApiListener::bind(&path), Err(ApiError::PathExists(_))));
        std::fs::remove_file(&path).unwrap();

        let server = ApiListener::bind(&path).unwrap().serve(None, ctx()).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        drop(server);
        assert!(!path.exists());
        assert!(matches!(
            ApiListener::bind(&dir.path().join("no/such/dir/api.sock")),
            Err(ApiError::Bind { .. })
        ));
    }
}
