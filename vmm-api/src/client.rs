//! A client for the control API: one request per connection (HTTP/1.1 with
//! JSON bodies on the VMM's Unix socket), typed calls for each endpoint,
//! and the raw exchange for tests that look at statuses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::control::{DriveUpdate, Fault, Metrics, SnapshotCreate, TargetState, VmInfo, VmStateChange};

/// An answer is a status line, a few headers and a small JSON body.
const MAX_ANSWER: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("control API {request}: {message}")]
pub struct ApiCallError {
    /// Method and target.
    pub request: String,
    /// What went wrong, in the VMM's words where it answered.
    pub message: String,
    /// The HTTP status, where the VMM answered.
    pub status: Option<u16>,
}

/// One answer: its status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// `timeout` bounds each request's connection, writing and reading.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns whatever the VMM answered.
    pub fn request(&self, method: &str, target: &str, body: Option<&str>) -> Result<Answer, ApiCallError> {
        let err = |message: String| ApiCallError {
            request: format!("{method} {target}"),
            message,
            status: None,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(|e| err(format!("{}: {e}", self.socket.display())))?;
        crate::peer::check_owner_serves(&s, &self.socket).map_err(|e| err(e.to_string()))?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| err(e.to_string()))?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| err(e.to_string()))?;
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes()).map_err(|e| err(e.to_string()))?;
        let mut answer = Vec::new();
        (&mut s)
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(|e| err(e.to_string()))?;
        parse_answer(&answer).map_err(err)
    }

    /// A request whose good answers are 2xx; anything else is an error
    /// carrying the VMM's fault message. Returns the body.
    fn call<B: Serialize>(&self, method: &str, target: &str, body: Option<&B>) -> Result<String, ApiCallError> {
        let json = body.map(serde_json::to_string).transpose().map_err(|e| ApiCallError {
            request: format!("{method} {target}"),
            message: e.to_string(),
            status: None,
        })?;
        let a = self.request(method, target, json.as_deref())?;
        if (200..300).contains(&a.status) {
            return Ok(a.body);
        }
        let message = serde_json::from_str::<Fault>(&a.body)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| a.body.trim().to_string());
        Err(ApiCallError {
            request: format!("{method} {target}"),
            message: format!("{}: {message}", a.status),
            status: Some(a.status),
        })
    }

    fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ApiCallError> {
        let body = self.call::<()>("GET", target, None)?;
        serde_json::from_str(&body).map_err(|e| ApiCallError {
            request: format!("GET {target}"),
            message: format!("unexpected answer {body:?}: {e}"),
            status: None,
        })
    }

    pub fn info(&self) -> Result<VmInfo, ApiCallError> {
        self.get("/")
    }

    pub fn metrics(&self) -> Result<Metrics, ApiCallError> {
        self.get("/metrics")
    }

    /// Pauses or resumes every vCPU.
    pub fn set_state(&self, state: TargetState) -> Result<(), ApiCallError> {
        self.call("PATCH", "/vm", Some(&VmStateChange { state })).map(drop)
    }

    pub fn pause(&self) -> Result<(), ApiCallError> {
        self.set_state(TargetState::Paused)
    }

    pub fn resume(&self) -> Result<(), ApiCallError> {
        self.set_state(TargetState::Resumed)
    }

    /// Writes a snapshot of the paused VM into `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<(), ApiCallError> {
        let body = SnapshotCreate {
            snapshot_path: dir.to_path_buf(),
        };
        self.call("PUT", "/snapshot/create", Some(&body)).map(drop)
    }

    /// Gives disk `index` the image at `path`.
    pub fn replace_drive(&self, index: u8, path: &Path) -> Result<(), ApiCallError> {
        let body = DriveUpdate {
            path_on_host: path.to_path_buf(),
        };
        self.call("PATCH", &format!("/drives/{index}"), Some(&body)).map(drop)
    }
}

/// Splits an HTTP/1.1 answer into its status and body.
fn parse_answer(answer: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(answer);
    let status: u16 = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", text.lines().next().unwrap_or("")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(Answer {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn typed_calls_and_faults_in_the_vmm_words() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 40\r\n\r\n{\"fault_message\":\"the VM is not paused\"}",
                "HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n{\"state\":\"Paused\",\"vcpus\":2,\"mem_mib\":256,\"version\":\"0.1.0\"}",
            ] {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        let c = ApiClient::new(&sock, T);
        c.pause().unwrap();
        let e = c.snapshot(Path::new("/snap")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "control API PUT /snapshot/create: 400: the VM is not paused"
        );
        assert_eq!(e.status, Some(400));
        let info = c.info().unwrap();
        assert_eq!((info.vcpus, info.state), (2, crate::control::RunState::Paused));
        let seen = t.join().unwrap();
        assert!(seen[0].starts_with("PATCH /vm HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(seen[0].ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{}", seen[0]);
        assert!(seen[1].ends_with("{\"snapshot_path\":\"/snap\"}"), "{}", seen[1]);
        assert!(!seen[2].contains("Content-Length"), "{}", seen[2]);
    }

    #[test]
    fn garbage_is_not_an_answer() {
        assert!(parse_answer(b"SSH-2.0\r\n").is_err());
        assert_eq!(
            parse_answer(b"HTTP/1.1 404 Not Found\r\n\r\n{}").unwrap(),
            Answer {
                status: 404,
                body: "{}".into()
            }
        );
    }
}
