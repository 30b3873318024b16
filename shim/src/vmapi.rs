//! Pause and resume through the VMM's control API (`--api-sock`): one
//! `PATCH /vm` over HTTP/1.1 on its Unix socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VmApiError {
    #[error("the VMM's control API at {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the VMM refused `{state}`: {answer}")]
    Refused { state: &'static str, answer: String },
}

/// Sets the VM's run state: `"Paused"` or `"Resumed"`.
pub fn set_state(socket: &Path, state: &'static str) -> Result<(), VmApiError> {
    let io_err = |source| VmApiError::Io {
        path: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io_err)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let body = format!("{{\"state\":\"{state}\"}}");
    let req = format!(
        "PATCH /vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io_err)?;
    let mut answer = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut answer).map_err(io_err)?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("204") {
        return Ok(());
    }
    Err(VmApiError::Refused {
        state,
        answer: text.trim().to_string(),
    })
}
