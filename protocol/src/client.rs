//! The host's side of one request stream: send our hello, check the agent's,
//! then one response per request. Used by the CLI, the shim and the tests.

use std::io::{Read, Write};

use crate::frame::{self, FrameError};
use crate::handshake::{self, HandshakeError, Hello};
use crate::messages::{ErrorKind, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent stream: {0}")]
    Frame(#[from] FrameError),
    #[error("agent handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("agent refused {op}: {message} ({kind:?})")]
    Agent {
        op: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("agent answered {op} with an unexpected {got:?}")]
    Unexpected { op: String, got: Box<Response> },
}

/// Why [`Client::handshake_with`] failed: its wait, or the exchange.
#[derive(Debug)]
pub enum HandshakeWait<W> {
    Wait(W),
    Client(ClientError),
}

pub struct Client<S> {
    stream: S,
}

impl<S: Read + Write> Client<S> {
    /// Exchanges hellos; the host speaks first.
    pub fn handshake(mut stream: S, software: &str) -> Result<Self, ClientError> {
        frame::send(&mut stream, &Hello::ours(software))?;
        let theirs: Hello = frame::recv(&mut stream)?;
        handshake::check(&theirs)?;
        Ok(Client { stream })
    }

    /// [`Client::handshake`], with `wait` run between sending our hello and
    /// reading the agent's (the caller's chance to wait for the answer in
    /// its own way, e.g. polling while it checks on the peer).
    pub fn handshake_with<W>(
        mut stream: S,
        software: &str,
        wait: impl FnOnce(&S) -> Result<(), W>,
    ) -> Result<Self, HandshakeWait<W>> {
        frame::send(&mut stream, &Hello::ours(software)).map_err(|e| HandshakeWait::Client(e.into()))?;
        wait(&stream).map_err(HandshakeWait::Wait)?;
        let theirs: Hello = frame::recv(&mut stream).map_err(|e| HandshakeWait::Client(e.into()))?;
        handshake::check(&theirs).map_err(|e| HandshakeWait::Client(e.into()))?;
        Ok(Client { stream })
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Sends one request and returns the agent's answer; an `Error` answer
    /// becomes [`ClientError::Agent`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        frame::send(&mut self.stream, req)?;
        match frame::recv(&mut self.stream)? {
            Response::Error { kind, message } => Err(ClientError::Agent {
                op: op_name(req).into(),
                kind,
                message,
            }),
            r => Ok(r),
        }
    }

    /// A request whose only good answer is `Ok`.
    pub fn call_ok(&mut self, req: &Request) -> Result<(), ClientError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            got => Err(unexpected(req, got)),
        }
    }

    /// `Wait`, returning the exit status.
    pub fn wait(&mut self, container_id: &str, exec_id: Option<&str>) -> Result<i32, ClientError> {
        let req = Request::Wait {
            container_id: container_id.into(),
            exec_id: exec_id.map(Into::into),
        };
        match self.call(&req)? {
            Response::Exited { status } => Ok(status),
            got => Err(unexpected(&req, got)),
        }
    }

    /// `Start` or `Exec`, returning the process's pid in the guest.
    pub fn call_started(&mut self, req: &Request) -> Result<u32, ClientError> {
        match self.call(req)? {
            Response::Started { pid } => Ok(pid),
            got => Err(unexpected(req, got)),
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

fn unexpected(req: &Request, got: Response) -> ClientError {
    ClientError::Unexpected {
        op: op_name(req).into(),
        got: Box::new(got),
    }
}

pub fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Create { .. } => "create",
        Request::Start { .. } => "start",
        Request::Exec { .. } => "exec",
        Request::Signal { .. } => "signal",
        Request::Wait { .. } => "wait",
        Request::ResizeTty { .. } => "resize_tty",
        Request::CloseStdin { .. } => "close_stdin",
        Request::Stats { .. } => "stats",
        Request::Update { .. } => "update",
        Request::ListProcesses { .. } => "list_processes",
        Request::Delete { .. } => "delete",
        Request::Reseed { .. } => "reseed",
        Request::Volume { .. } => "volume",
        Request::NextOomEvent => "next_oom_event",
        Request::Shutdown => "shutdown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn handshake_then_call_and_agent_errors() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _: Hello = frame::recv(&mut agent).unwrap();
            frame::send(&mut agent, &Hello::ours("agent")).unwrap();
            let _: Request = frame::recv(&mut agent).unwrap();
            frame::send(&mut agent, &Response::Exited { status: 3 }).unwrap();
            let _: Request = frame::recv(&mut agent).unwrap();
            frame::send(
                &mut agent,
                &Response::Error {
                    kind: ErrorKind::NotFound,
                    message: "no container x".into(),
                },
            )
            .unwrap();
        });
        let mut c = Client::handshake(host, "test").unwrap();
        assert_eq!(c.wait("c", None).unwrap(), 3);
        let e = c
            .call_ok(&Request::Start {
                container_id: "x".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("refused start: no container x"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn mismatched_agent_is_refused() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _: Hello = frame::recv(&mut agent).unwrap();
            let old = Hello {
                version: 0,
                ..Hello::ours("agent 0.0")
            };
            frame::send(&mut agent, &old).unwrap();
        });
        let e = Client::handshake(host, "test").err().unwrap();
        assert!(e.to_string().contains("version mismatch"), "{e}");
        t.join().unwrap();
    }
}
