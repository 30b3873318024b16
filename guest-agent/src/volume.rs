//! Copied-in volumes: each a tmpfs of its own under the agent's state
//! directory, filled from the host's `volume` messages, then remounted
//! read-only. Containers bind it read-only at their mount's destination.
//! The content lives in guest memory only: no disk, no host file system.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{lchown, symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bulkhead_protocol::volume::{decode_hex, VolumeEntry, MAX_VOLUME_BYTES};

/// The tmpfs holds the files plus room for directories and inodes.
const TMPFS_SLACK_BYTES: u64 = 1 << 20;
const MAX_INODES: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0:?} is sealed: it can no longer change")]
    Sealed(String),
    #[error("no sealed volume {0:?}")]
    NotReady(String),
    #[error("volume {id:?} would hold more than {MAX_VOLUME_BYTES} bytes")]
    TooLarge { id: String },
    #[error("volume {id:?}: {what} {path:?}: {source}")]
    Io {
        id: String,
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

struct Volume {
    root: PathBuf,
    bytes: u64,
    sealed: bool,
}

pub struct Volumes {
    dir: PathBuf,
    by_id: HashMap<String, Volume>,
}

impl Volumes {
    pub fn new(state_dir: &Path) -> Volumes {
        Volumes {
            // Container ids never start with '.', so none is this.
            dir: state_dir.join(".volumes"),
            by_id: HashMap::new(),
        }
    }

    /// Applies `entries` (already validated) to volume `id`, making it on
    /// first use; `seal` makes it read-only. A failure removes the volume,
    /// so the host may start it over.
    pub fn fill(&mut self, id: &str, entries: &[VolumeEntry], seal: bool) -> Result<(), VolumeError> {
        if self.by_id.get(id).is_some_and(|v| v.sealed) {
            return Err(VolumeError::Sealed(id.into()));
        }
        if !self.by_id.contains_key(id) {
            let v = self.make(id)?;
            self.by_id.insert(id.into(), v);
        }
        let result = self.apply(id, entries, seal);
        if result.is_err() {
            self.remove(id);
        }
        result
    }

    fn apply(&mut self, id: &str, entries: &[VolumeEntry], seal: bool) -> Result<(), VolumeError> {
        let Some(v) = self.by_id.get_mut(id) else {
            return Err(VolumeError::NotReady(id.into()));
        };
        for e in entries {
            v.bytes = v.bytes.saturating_add(e.data_len());
            if v.bytes > MAX_VOLUME_BYTES {
                return Err(VolumeError::TooLarge { id: id.into() });
            }
            write_entry(&v.root, e).map_err(|(what, source)| VolumeError::Io {
                id: id.into(),
                what,
                path: e.path().into(),
                source,
            })?;
        }
        if seal {
            crate::agent::remount_read_only(&v.root).map_err(|source| VolumeError::Io {
                id: id.into(),
                what: "sealing",
                path: String::new(),
                source,
            })?;
            v.sealed = true;
        }
        Ok(())
    }

    fn make(&self, id: &str) -> Result<Volume, VolumeError> {
        let root = self.dir.join(id);
        let io_err = |what| {
            let id = id.to_string();
            move |source| VolumeError::Io {
                id,
                what,
                path: String::new(),
                source,
            }
        };
        fs::create_dir_all(&root).map_err(io_err("making its directory"))?;
        let data = format!(
            "size={},nr_inodes={MAX_INODES},mode=755",
            MAX_VOLUME_BYTES + TMPFS_SLACK_BYTES
        );
        crate::agent::mount_tmpfs(&root, &data).map_err(io_err("mounting its tmpfs"))?;
        Ok(Volume {
            root,
            bytes: 0,
            sealed: false,
        })
    }

    /// Where a sealed volume is, in the agent's view, to bind from.
    pub fn source(&self, id: &str) -> Result<&Path, VolumeError> {
        match self.by_id.get(id) {
            Some(v) if v.sealed => Ok(&v.root),
            _ => Err(VolumeError::NotReady(id.into())),
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(v) = self.by_id.remove(id) {
            crate::agent::unmount(&v.root);
            let _ = fs::remove_dir(&v.root);
        }
    }
}

type EntryError = (&'static str, io::Error);

fn write_entry(root: &Path, e: &VolumeEntry) -> Result<(), EntryError> {
    let path = root.join(e.path());
    match e {
        VolumeEntry::Dir { mode, uid, gid, .. } => {
            match fs::DirBuilder::new().mode(*mode).create(&path) {
                Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(("making directory", err)),
                _ => {}
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(|err| ("setting mode", err))?;
            lchown(&path, Some(*uid), Some(*gid)).map_err(|err| ("setting owner", err))
        }
        VolumeEntry::File {
            mode,
            uid,
            gid,
            offset,
            data,
            ..
        } => {
            let bytes = decode_hex(data).ok_or(("decoding", io::Error::from(io::ErrorKind::InvalidData)))?;
            let file = OpenOptions::new()
                .write(true)
                .create(*offset == 0)
                .truncate(*offset == 0)
                .mode(*mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|err| ("opening file", err))?;
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes, *offset).map_err(|err| ("writing file", err))?;
            file.set_permissions(fs::Permissions::from_mode(*mode))
                .map_err(|err| ("setting mode", err))?;
            std::os::unix::fs::fchown(&file, Some(*uid), Some(*gid)).map_err(|err| ("setting owner", err))
        }
        VolumeEntry::Symlink { target, .. } => symlink(target, &path).map_err(|err| ("making symlink", err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::volume::encode_hex;

    #[test]
    fn entries_land_with_their_modes_and_links() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: owners and 0400 files need root, as the agent has");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let entries = [
            VolumeEntry::Dir {
                path: "..2026".into(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            VolumeEntry::File {
                path: "..2026/token".into(),
                mode: 0o400,
                uid: 0,
                gid: 0,
                offset: 0,
                data: encode_hex(b"sec"),
            },
            VolumeEntry::File {
                path: "..2026/token".into(),
                mode: 0o400,
                uid: 0,
                gid: 0,
                offset: 3,
                data: encode_hex(b"ret"),
            },
            VolumeEntry::Symlink {
                path: "..data".into(),
                target: "..2026".into(),
            },
            VolumeEntry::Symlink {
                path: "token".into(),
                target: "..data/token".into(),
            },
        ];
        for e in &entries {
            write_entry(root, e).unwrap();
        }
        assert_eq!(fs::read_to_string(root.join("token")).unwrap(), "secret");
        let meta = fs::metadata(root.join("..2026/token")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o400);
        // A file entry never writes through a symlink at its own path.
        let through = VolumeEntry::File {
            path: "token".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            offset: 0,
            data: encode_hex(b"x"),
        };
        assert!(write_entry(root, &through).is_err());
        assert_eq!(fs::read_to_string(root.join("token")).unwrap(), "secret");
    }
}
