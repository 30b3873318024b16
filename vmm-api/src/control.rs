//! The control API's request and response bodies (`--api-sock`: HTTP/1.1
//! with JSON bodies on a Unix socket):
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /` | | 200 [`VmInfo`] |
//! | `PATCH /vm` | [`VmStateChange`] | 204 |
//! | `GET /metrics` | | 200 [`Metrics`] |
//! | `PUT /snapshot/create` | [`SnapshotCreate`] (the VM must be paused) | 204 |
//! | `PATCH /drives/{index}` | [`DriveUpdate`] | 204 |
//!
//! Refusals answer 4xx or 5xx with a [`Fault`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The body of `PATCH /drives/{index}`: a running VM's disk gets a new
/// image, as a drive gets a new medium.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The new image; the drive keeps its read-only mode.
    pub path_on_host: PathBuf,
}

/// The body of `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The directory to write the snapshot files into (created if missing).
    pub snapshot_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
}

/// The answer to `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: RunState,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub version: String,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    pub state: TargetState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetState {
    Paused,
    Resumed,
}

/// `KVM_RUN` returns by kind, summed over the vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    /// Everything else, interruptions for pauses included.
    pub other: u64,
}

/// The answer to `GET /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub uptime_ms: u64,
    pub paused: bool,
    pub vcpu_exits: ExitCounts,
    /// The VMM's resident set (guest memory it has touched included);
    /// `null` where /proc cannot say.
    pub rss_bytes: Option<u64>,
}

/// The body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}
