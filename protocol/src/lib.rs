//! The protocol between the host (the `bulkhead` CLI, the shim) and the
//! guest agent, shared so both sides compile against the same types.
//!
//! Transport: one request/response stream (vsock port [`AGENT_PORT`]),
//! carrying length-prefixed JSON frames ([`frame`]). Every frame is bounded
//! ([`frame::MAX_FRAME_BYTES`]) before anything is allocated, every message
//! is validated ([`messages`]) before use, and the first exchange is a
//! version handshake ([`handshake`]) that refuses a mismatched peer by name.
//! Stdio does not travel here: the host opens dedicated streams to the
//! agent's [`stdio::STDIO_PORT`] and names them in requests ([`stdio`]).
//!
//! JSON keeps the wire format readable in logs and lets serde reject
//! unknown fields; the frames are small and rare (one per operation), so
//! its cost does not matter next to a VM exit.

pub mod client;
pub mod defaults;
pub mod frame;
pub mod guest_env;
pub mod handshake;
pub mod hex;
pub mod messages;
pub mod stdio;
pub mod volume;

/// The vsock port the agent listens on for requests.
pub const AGENT_PORT: u32 = 1024;
