//! Copied-in volumes: files the host sends to the agent, which keeps them
//! on a guest tmpfs and mounts them read-only into containers. There is no
//! shared file system: content crosses as messages and lives only in guest
//! memory.
//!
//! A volume is filled by one or more [`Request::Volume`] messages (a large
//! file comes in chunks, each a `File` entry at its offset) and sealed by
//! the last, after which it is read-only and containers may mount it with a
//! mount of type [`VOLUME_MOUNT_TYPE`] whose source is the volume's id.
//!
//! [`Request::Volume`]: crate::messages::Request::Volume

use serde::{Deserialize, Serialize};

pub use crate::hex::{decode as decode_hex, encode as encode_hex};
use crate::messages::{ValidationError, MAX_PATH_LEN};

/// What one volume may hold, in file bytes.
pub const MAX_VOLUME_BYTES: u64 = 8 << 20;
/// File bytes in one entry; as hex, well inside a frame.
pub const MAX_CHUNK_BYTES: usize = 256 << 10;
/// Entries in one message.
pub const MAX_ENTRIES: usize = 1024;
/// The mount type naming a volume (its id is the mount's source).
pub const VOLUME_MOUNT_TYPE: &str = "volume";

/// One item of a volume, by its path relative to the volume's root.
/// Parents come before their children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeEntry {
    Dir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `data` (hex) written at `offset`; offset 0 creates the file.
    File {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        offset: u64,
        data: String,
    },
    /// A relative target inside the volume, as kubelet's `..data` layout
    /// uses: no `..` component and not absolute.
    Symlink { path: String, target: String },
}

impl VolumeEntry {
    pub fn path(&self) -> &str {
        match self {
            VolumeEntry::Dir { path, .. } | VolumeEntry::File { path, .. } | VolumeEntry::Symlink { path, .. } => path,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        check_relative("volume entry path", self.path())?;
        match self {
            VolumeEntry::Dir { mode, .. } => check_mode(*mode),
            VolumeEntry::File { mode, offset, data, .. } => {
                check_mode(*mode)?;
                if data.len() > MAX_CHUNK_BYTES * 2
                    || data.len() % 2 != 0
                    || !data.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(invalid(
                        "volume file data",
                        format!("must be at most {MAX_CHUNK_BYTES} bytes as hex"),
                    ));
                }
                if offset.saturating_add(data.len() as u64 / 2) > MAX_VOLUME_BYTES {
                    return Err(invalid(
                        "volume file offset",
                        format!("past the volume limit of {MAX_VOLUME_BYTES} bytes"),
                    ));
                }
                Ok(())
            }
            VolumeEntry::Symlink { target, .. } => check_relative("volume symlink target", target),
        }
    }

    /// The file bytes this entry carries.
    pub fn data_len(&self) -> u64 {
        match self {
            VolumeEntry::File { data, .. } => data.len() as u64 / 2,
            _ => 0,
        }
    }
}

/// Permission bits only: no set-user-ID, set-group-ID or sticky bit.
fn check_mode(mode: u32) -> Result<(), ValidationError> {
    if mode > 0o777 {
        return Err(invalid("volume entry mode", format!("{mode:#o}: permission bits only")));
    }
    Ok(())
}

/// A relative path of plain names: not empty, not absolute, no `.` or
/// `..` component, no empty component, no NUL.
fn check_relative(field: &str, p: &str) -> Result<(), ValidationError> {
    if p.is_empty() || p.len() > MAX_PATH_LEN || p.contains('\0') {
        return Err(invalid(field, format!("{p:?}: 1 to {MAX_PATH_LEN} bytes, no NUL")));
    }
    if p.starts_with('/') || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(invalid(
            field,
            format!("{p:?} is not a relative path of plain names (no '.', '..' or '//')"),
        ));
    }
    Ok(())
}

fn invalid(field: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, offset: u64, data: &str) -> VolumeEntry {
        VolumeEntry::File {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            offset,
            data: data.into(),
        }
    }

    #[test]
    fn paths_are_plain_relative_names() {
        for ok in ["a", "a/b", "..data", "..2026_12_02_10_00_00.1/token", "a.b/c-d"] {
            file(ok, 0, "").validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "/etc/passwd", "a/../b", "..", ".", "a//b", "a/", "./a", "a\0b"] {
            assert!(file(bad, 0, "").validate().is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn symlinks_stay_inside_the_volume() {
        let link = |t: &str| VolumeEntry::Symlink {
            path: "token".into(),
            target: t.into(),
        };
        link("..data/token").validate().unwrap();
        for bad in ["/etc/shadow", "../x", "..data/../../x", ""] {
            assert!(link(bad).validate().is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn modes_data_and_offsets_are_bounded() {
        let dir = |mode| VolumeEntry::Dir {
            path: "d".into(),
            mode,
            uid: 0,
            gid: 0,
        };
        dir(0o755).validate().unwrap();
        assert!(dir(0o4755).validate().is_err(), "setuid");
        assert!(file("f", 0, "abc").validate().is_err(), "odd hex");
        assert!(file("f", 0, "zz").validate().is_err(), "not hex");
        assert!(file("f", 0, &"00".repeat(MAX_CHUNK_BYTES + 1)).validate().is_err());
        file("f", MAX_VOLUME_BYTES - 1, "00").validate().unwrap();
        assert!(file("f", MAX_VOLUME_BYTES, "00").validate().is_err());
        assert!(file("f", u64::MAX, "00").validate().is_err(), "offset overflow");
    }
    /// The fuzz target's seed stays a valid request, so fuzzing starts
    /// past the parser's refusals.
    #[test]
    fn the_fuzz_seed_is_a_valid_volume_request() {
        let seed = include_bytes!("../../fuzz/seeds/agent_request/volume");
        let payload = crate::frame::read_frame(&mut &seed[..]).unwrap();
        let req: crate::messages::Request = serde_json::from_slice(&payload).unwrap();
        req.validate().unwrap();
        assert!(matches!(req, crate::messages::Request::Volume { seal: true, .. }));
    }
}
