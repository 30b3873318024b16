//! Snapshots: a VM's guest memory in one file and everything else in a
//! versioned, checksummed state file.
//!
//! `DIR/memory` holds guest RAM, region after region (sparse where the
//! guest's pages are zero). `DIR/state` is a 24-byte header followed by a
//! JSON payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `BLKHDSNP` |
//! | 8..12 | format version, u32 little-endian ([`FORMAT_VERSION`]) |
//! | 12..20 | payload length, u64 little-endian |
//! | 20..24 | CRC-32 (IEEE) of the payload, u32 little-endian |
//!
//! The payload is JSON ([`SnapshotState`]): serde_json is already how the
//! VMM speaks, the state is a few kilobytes per vCPU, and a person can read
//! it with `tail -c +25 state | jq`. KVM's structures travel as hex strings
//! of their raw bytes; they are the kernel's ABI, stable across kernels, and
//! the header's version covers our own layout. The CRC catches torn writes
//! and bit rot, not tampering: whoever can write the snapshot directory can
//! also write the guest's memory.

pub mod create;
pub mod memory;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::cpu_template::CpuTemplate;
use crate::config::DeviceSet;
use crate::devices::legacy::serial::SerialSaved;
use crate::devices::virtio::mmio::TransportState;
pub use crate::kvm_bytes::Hex;
pub use crate::vcpu::state::{MsrValue, VcpuState};
use crate::vm::VmState;

pub const MAGIC: &[u8; 8] = b"BLKHDSNP";
/// Bumped on any change to the payload's meaning or layout: a VMM refuses
/// every other version rather than guess.
pub const FORMAT_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 24;
/// Far above any real state (vCPUs × a few KiB); bounds what a corrupt
/// length field can make the parser allocate.
pub const MAX_PAYLOAD: u64 = 64 << 20;

pub use bulkhead_vmm_api::snapshot::{MEMORY_FILE, STATE_FILE};

/// The header's checksum of the payload: IEEE CRC-32 (as zlib and PNG).
pub fn checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("the state file is truncated: {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("not a Bulkhead snapshot state file (bad magic)")]
    BadMagic,
    #[error("the state file has format version {found}; this bulkhead-vmm reads only version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error(
        "the state file's payload length is {declared} bytes but {actual} follow the header (truncated or padded)"
    )]
    Length { declared: u64, actual: u64 },
    #[error("the state file's payload length {0} is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u64),
    #[error("the state file is corrupt: checksum {computed:#010x} does not match the stored {stored:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("the state file's payload is not valid: {0}")]
    Payload(String),
    #[error("the state file is inconsistent: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize the state: {0}")]
    Serialize(serde_json::Error),
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Control(crate::vcpu::control::ControlError),
    #[error("cannot read the VM's state from KVM: {0}")]
    Kvm(String),
}

/// What a restore needs to rebuild the VM around the saved state. Kernel,
/// initrd and command line are not needed: they are in guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub cpu_template: CpuTemplate,
    pub devices: DeviceSet,
}

/// One guest RAM region and where it sits in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Everything in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The VMM that wrote it, for people; the format version is what counts.
    pub vmm_version: String,
    pub config: SavedConfig,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSaved,
    /// The i8042 model keeps no state beyond its reset line.
    /// One per virtio device, in the order they were added (disks, vsock, rng).
    pub virtio: Vec<TransportState>,
}

impl SnapshotState {
    /// Checks what the file format alone cannot: counts and sizes agree.
    pub fn validate(&self) -> Result<(), StateFileError> {
        let bad = |m: String| Err(StateFileError::Invalid(m));
        if usize::from(self.config.vcpus) != self.vcpus.len() || self.vcpus.is_empty() {
            return bad(format!(
                "{} vCPUs configured but {} saved",
                self.config.vcpus,
                self.vcpus.len()
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return bad(format!("vCPU {i} is saved with id {}", v.id));
            }
        }
        let Some(total) = memory::total_size(&self.memory) else {
            return bad("memory region sizes add up to more than 2^64 bytes".into());
        };
        if total != u64::from(self.config.mem_mib) << 20 {
            return bad(format!(
                "memory regions add up to {total} bytes, not the configured {} MiB",
                self.config.mem_mib
            ));
        }
        let mut expected_offset = 0u64;
        for r in &self.memory {
            let fits = r.guest_addr.checked_add(r.size).is_some();
            if r.file_offset != expected_offset || r.size == 0 || !r.size.is_multiple_of(4096) || !fits {
                return bad(format!(
                    "memory region at {:#x} has size {:#x} and file offset {:#x}",
                    r.guest_addr, r.size, r.file_offset
                ));
            }
            // Cannot overflow: the sizes' sum fitted above.
            expected_offset = r.file_offset + r.size;
        }
        let expected_devices = self.config.devices.count();
        if expected_devices != self.virtio.len() {
            return bad(format!(
                "{expected_devices} virtio devices configured but {} saved",
                self.virtio.len()
            ));
        }
        Ok(())
    }
}

/// The state file's bytes: header then JSON payload.
pub fn encode(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(SnapshotError::Serialize)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Parses and checks a state file's bytes: magic, version, length,
/// checksum, then the payload and its consistency, in that order, so the
/// error names the first thing wrong.
pub fn decode(bytes: &[u8]) -> Result<SnapshotState, StateFileError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::TooShort { len: bytes.len() });
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if &header[0..8] != MAGIC {
        return Err(StateFileError::BadMagic);
    }
    let version = le_u32(&header[8..12]);
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version { found: version });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let declared = u64::from_le_bytes(len);
    if declared > MAX_PAYLOAD {
        return Err(StateFileError::TooLong(declared));
    }
    if declared != payload.len() as u64 {
        return Err(StateFileError::Length {
            declared,
            actual: payload.len() as u64,
        });
    }
    let stored = le_u32(&header[20..24]);
    let computed = checksum(payload);
    if stored != computed {
        return Err(StateFileError::Checksum { stored, computed });
    }
    let state: SnapshotState = serde_json::from_slice(payload).map_err(|e| StateFileError::Payload(e.to_string()))?;
    state.validate()?;
    Ok(state)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the state file durably: to a temporary name, synced, then renamed,
/// so a crash never leaves a half-written file under the real name.
pub fn write_state_file(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let bytes = encode(state)?;
    let tmp = dir.join(".state.tmp");
    let path = dir.join(STATE_FILE);
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    Ok(())
}

pub fn read_state_file(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
    Ok(decode(&bytes)?)
}

#[cfg(test)]
mod tests;
