//! virtio-vsock with a Firecracker-compatible Unix-socket host side.
//!
//! Stream sockets only. A host process connects to `uds_path` and writes
//! `CONNECT <port>\n` to reach guest port `<port>` (answered `OK <host
//! port>\n`); a guest connection to host port P is forwarded to the Unix
//! socket `<uds_path>_P`. The device never blocks on a socket: bytes the
//! host cannot take yet stay in a per-connection buffer that the guest's
//! credit bounds, and a stream is only read while the guest has credit.

mod connection;
mod device;
mod muxer;
pub mod packet;
mod unix;

#[cfg(test)]
mod tests;

pub use connection::CONN_BUF_ALLOC;
pub use device::Vsock;
pub use muxer::MAX_CONNECTIONS;
pub use packet::{parse_header, PacketError, PacketHeader};

pub use bulkhead_vmm_api::config::VsockConfig;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (use 3 to 4294967294)")]
    ReservedCid(u32),
    #[error("the vsock socket path {0} already exists")]
    PathExists(String),
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Bind { path: String, source: std::io::Error },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot create a queue: {0}")]
    Queue(String),
}
