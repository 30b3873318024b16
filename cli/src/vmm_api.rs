//! Requests to a VMM's control API (`--api-sock`): HTTP/1.1 with JSON on a
//! Unix socket, one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// An answer is a status line, a few headers and at most a fault message.
const MAX_ANSWER: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("control API {request}: {message}")]
pub struct ApiCallError {
    /// Method and target.
    pub request: String,
    /// What went wrong, in the VMM's words where it answered.
    pub message: String,
}

/// Sends one request; a 2xx answer is success, anything else an error
/// carrying the VMM's `fault_message`.
pub fn call(sock: &Path, method: &str, target: &str, body: &str, timeout: Duration) -> Result<(), ApiCallError> {
    let request = format!("{method} {target}");
    let err = |message: String| ApiCallError {
        request: request.clone(),
        message,
    };
    let mut s = UnixStream::connect(sock).map_err(|e| err(format!("{}: {e}", sock.display())))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| err(e.to_string()))?;
    let mut answer = Vec::new();
    (&mut s)
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err(format!("not an HTTP answer: {:?}", text.lines().next().unwrap_or(""))))?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(String::from))
        .unwrap_or_else(|| body.trim().to_string());
    Err(err(format!("{status}: {message}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn api_errors_carry_the_vmm_words() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 40\r\n\r\n{\"fault_message\":\"the VM is not paused\"}",
            ] {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        call(&sock, "PATCH", "/vm", "{}", T).unwrap();
        let e = call(&sock, "PUT", "/snapshot/create", "{}", T).unwrap_err().to_string();
        assert_eq!(e, "control API PUT /snapshot/create: 400: the VM is not paused");
        t.join().unwrap();
    }
}
