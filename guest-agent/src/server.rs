//! Request streams: one thread each, hellos first, then one response per
//! request. A bad message gets an error answer; nothing a peer sends can
//! stop the agent.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bulkhead_protocol::frame::{self, FrameError};
use bulkhead_protocol::handshake::{self, Hello};
use bulkhead_protocol::messages::{ErrorKind, Request, Response};

use crate::agent::Agent;
use crate::transport::{Listener, MAX_REQUEST_STREAMS};

pub const SOFTWARE: &str = concat!("bulkhead-agent ", env!("CARGO_PKG_VERSION"));

/// Kept in the binary (`#[used]`) for `bulkhead --version`, which reads it
/// out of the initramfs; see `handshake::AGENT_STAMP_PREFIX`.
#[used]
pub static VERSION_STAMP: &str = concat!("bulkhead-agent-version=", env!("CARGO_PKG_VERSION"), ";protocol=2\0");

/// What a stream's thread tells the accept loop when it ends.
pub enum Outcome {
    Closed,
    Shutdown,
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

/// Serves one stream until it closes or asks for shutdown.
pub fn serve_stream(agent: &Agent, mut s: File) -> Outcome {
    let peer: Hello = match frame::recv(&mut s) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("request stream: no hello: {e}");
            return Outcome::Closed;
        }
    };
    if frame::send(&mut s, &Hello::ours(SOFTWARE)).is_err() {
        return Outcome::Closed;
    }
    if let Err(e) = handshake::check(&peer) {
        tracing::warn!("request stream refused: {e}");
        return Outcome::Closed;
    }
    loop {
        let req: Request = match frame::recv(&mut s) {
            Ok(r) => r,
            Err(FrameError::Closed) => return Outcome::Closed,
            // The whole frame was read, so the stream is still in step.
            Err(FrameError::Decode(e)) => {
                if frame::send(&mut s, &error(ErrorKind::Invalid, format!("malformed request: {e}"))).is_err() {
                    return Outcome::Closed;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("request stream dropped: {e}");
                let _ = frame::send(&mut s, &error(ErrorKind::Invalid, e.to_string()));
                return Outcome::Closed;
            }
        };
        if let Err(e) = req.validate() {
            if frame::send(&mut s, &error(ErrorKind::Invalid, e.to_string())).is_err() {
                return Outcome::Closed;
            }
            continue;
        }
        let resp = agent.handle(&req);
        if frame::send(&mut s, &resp).is_err() {
            return Outcome::Closed;
        }
        if req == Request::Shutdown {
            return Outcome::Shutdown;
        }
    }
}

/// Accepts streams until one asks for shutdown, then returns.
pub fn serve(agent: Arc<Agent>, listener: Listener) {
    let active = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_tx = Arc::new(std::sync::Mutex::new(done_tx));
    let accept_agent = agent.clone();
    let accepting = std::thread::Builder::new().name("accept".into()).spawn(move || loop {
        let s = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!("{e}");
                continue;
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_REQUEST_STREAMS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("too many request streams; closing a new one");
            continue;
        }
        let (agent, stream_active, done) = (accept_agent.clone(), active.clone(), done_tx.clone());
        let spawned = std::thread::Builder::new().name("stream".into()).spawn(move || {
            let outcome = serve_stream(&agent, s);
            stream_active.fetch_sub(1, Ordering::SeqCst);
            if let Outcome::Shutdown = outcome {
                if let Ok(tx) = done.lock() {
                    let _ = tx.send(());
                }
            }
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cannot start a thread for a request stream");
        }
    });
    if accepting.is_err() {
        tracing::error!("cannot start the accept thread");
        return;
    }
    let _ = done_rx.recv();
    tracing::info!("shutdown requested");
    agent.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_stamp_names_this_agent_and_its_protocol() {
        let text = VERSION_STAMP
            .strip_prefix(handshake::AGENT_STAMP_PREFIX)
            .and_then(|t| t.strip_suffix('\0'))
            .expect("stamp layout");
        let (version, protocol) = handshake::parse_agent_stamp(text).expect("well formed");
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(protocol, handshake::PROTOCOL_VERSION);
    }
}
