//! `--secret`, `--volume` and `--tmpfs`: content copied into the guest's
//! memory (there is no shared file system), and the mounts that show it to
//! the container. Host directories are read without following symlinks;
//! a symlink that could lead out of its volume is refused.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bulkhead_protocol::frame::MAX_FRAME_BYTES;
use bulkhead_protocol::messages::{Mount, Request};
use bulkhead_protocol::volume::{
    encode_hex, VolumeEntry, MAX_CHUNK_BYTES, MAX_ENTRIES, MAX_VOLUME_BYTES, VOLUME_MOUNT_TYPE,
};

/// Where `--secret NAME=FILE` puts NAME.
pub const SECRETS_DIR: &str = "/run/secrets";
const SECRETS_VOLUME: &str = "secrets";
/// Entries in one volume: the guest's tmpfs has 4096 inodes.
const MAX_VOLUME_ENTRIES: usize = 4000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyInError {
    #[error("--secret {0:?}: want NAME=FILE, NAME of letters, digits, '.', '_', '-' (not leading '.')")]
    SecretSyntax(String),
    #[error("--volume {0:?}: want HOSTDIR:GUESTPATH:ro, GUESTPATH absolute without '..'")]
    VolumeSyntax(String),
    #[error(
        "--volume {0:?}: only read-only volumes (HOSTDIR:GUESTPATH:ro) are supported: content is copied into the \
         guest, so writes would never reach the host"
    )]
    WritableVolume(String),
    #[error("--tmpfs {0:?}: want PATH[:SIZE], PATH absolute without '..', SIZE a number with k, m or g")]
    TmpfsSyntax(String),
    #[error("{path}: {reason}")]
    Source { path: String, reason: String },
    #[error("{what} holds more than {MAX_VOLUME_BYTES} bytes, the limit of one copied-in volume")]
    TooLarge { what: String },
    #[error(
        "{what} holds more than {MAX_VOLUME_ENTRIES} files, directories and links, the limit of one copied-in volume"
    )]
    TooMany { what: String },
}

/// One volume to send, its entries in order, then its mount. Its file
/// content is overwritten when it is dropped.
#[derive(Debug)]
pub struct PlannedVolume {
    pub id: String,
    pub entries: Vec<VolumeEntry>,
    pub destination: String,
}

impl PlannedVolume {
    /// The mount that shows this volume in the container.
    pub fn mount(&self) -> Mount {
        Mount {
            destination: self.destination.clone(),
            kind: VOLUME_MOUNT_TYPE.into(),
            source: self.id.clone(),
            options: Vec::new(),
        }
    }

    /// The messages that fill and seal it, each well inside a frame and
    /// the agent's entry count; the entries move into them (wipe them with
    /// [`wipe_requests`] once sent).
    pub fn take_requests(&mut self) -> Vec<Request> {
        let budget = MAX_FRAME_BYTES as usize - 4096;
        let mut out = Vec::new();
        let mut batch = Vec::new();
        let mut size = 0;
        for e in std::mem::take(&mut self.entries) {
            // A chunk's hex is at most half a frame; names may need escaping.
            let n = serde_json::to_vec(&e).map_or(budget, |v| v.len()) + 1;
            if !batch.is_empty() && (size + n > budget || batch.len() == MAX_ENTRIES) {
                out.push(std::mem::take(&mut batch));
                size = 0;
            }
            batch.push(e);
            size += n;
        }
        out.push(batch);
        let last = out.len() - 1;
        out.into_iter()
            .enumerate()
            .map(|(i, entries)| Request::Volume {
                volume_id: self.id.clone(),
                entries,
                seal: i == last,
            })
            .collect()
    }
}

impl Drop for PlannedVolume {
    fn drop(&mut self) {
        wipe_entries(&mut self.entries);
    }
}

fn wipe_entries(entries: &mut [VolumeEntry]) {
    for e in entries {
        if let VolumeEntry::File { data, .. } = e {
            wipe_string(data);
        }
    }
}

/// Overwrites secret content we held, so it does not linger in freed memory.
pub fn wipe_requests(requests: &mut [Request]) {
    for r in requests {
        if let Request::Volume { entries, .. } = r {
            wipe_entries(entries);
        }
    }
}

fn wipe_string(s: &mut String) {
    // SAFETY: NUL bytes keep the string valid UTF-8.
    for b in unsafe { s.as_mut_vec() }.iter_mut() {
        // SAFETY: a valid, aligned byte of the string's buffer; volatile so
        // the write is not elided as dead.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

fn wipe_bytes(v: &mut [u8]) {
    for b in v.iter_mut() {
        // SAFETY: as in `wipe_string`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn guest_path(p: &str) -> bool {
    p.starts_with('/') && p.len() > 1 && !p.contains('\0') && !p.split('/').any(|c| c == "..")
}

/// `--secret NAME=FILE` flags as one volume at [`SECRETS_DIR`], each file
/// mode 0400 owned by the workload's user.
pub fn secrets(flags: &[String], uid: u32, gid: u32) -> Result<Option<PlannedVolume>, CopyInError> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut planned = PlannedVolume {
        id: SECRETS_VOLUME.into(),
        entries: Vec::new(),
        destination: SECRETS_DIR.into(),
    };
    let mut total = 0u64;
    let mut names = std::collections::HashSet::new();
    for f in flags {
        let (name, file) = f
            .split_once('=')
            .filter(|(n, p)| plain_name(n) && !p.is_empty())
            .ok_or_else(|| CopyInError::SecretSyntax(f.clone()))?;
        if !names.insert(name) {
            return Err(CopyInError::SecretSyntax(format!("{f} (NAME given twice)")));
        }
        let mut content = read_file(Path::new(file))?;
        total += content.len() as u64;
        if total > MAX_VOLUME_BYTES {
            wipe_bytes(&mut content);
            return Err(CopyInError::TooLarge {
                what: "--secret".into(),
            });
        }
        push_file(&mut planned.entries, name, &content, 0o400, uid, gid);
        wipe_bytes(&mut content);
    }
    Ok(Some(planned))
}

/// `--volume HOSTDIR:GUESTPATH:ro`, the `index`th.
pub fn volume(flag: &str, index: usize) -> Result<PlannedVolume, CopyInError> {
    let parts: Vec<&str> = flag.rsplitn(3, ':').collect();
    let (host, guest, mode) = match parts[..] {
        [mode, guest, host] => (host, guest, mode),
        [guest, host] => (host, guest, "rw"),
        _ => return Err(CopyInError::VolumeSyntax(flag.into())),
    };
    if host.is_empty() || !guest_path(guest) || !["ro", "rw"].contains(&mode) {
        return Err(CopyInError::VolumeSyntax(flag.into()));
    }
    if mode != "ro" {
        return Err(CopyInError::WritableVolume(flag.into()));
    }
    let mut planned = PlannedVolume {
        id: format!("volume{index}"),
        entries: Vec::new(),
        destination: guest.into(),
    };
    let mut total = 0u64;
    walk(Path::new(host), "", &mut planned.entries, &mut total, flag)?;
    Ok(planned)
}

/// `--tmpfs PATH[:SIZE]`: a fresh tmpfs in the guest.
pub fn tmpfs(flag: &str) -> Result<Mount, CopyInError> {
    let (path, size) = match flag.split_once(':') {
        Some((p, s)) => (p, Some(s)),
        None => (flag, None),
    };
    let size_ok = |s: &str| {
        let digits = s.trim_end_matches(['k', 'm', 'g', 'K', 'M', 'G']);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && s.len() - digits.len() <= 1
    };
    if !guest_path(path) || size.is_some_and(|s| !size_ok(s)) {
        return Err(CopyInError::TmpfsSyntax(flag.into()));
    }
    let mut options: Vec<String> = ["nosuid", "nodev", "mode=1777"].map(String::from).to_vec();
    if let Some(s) = size {
        options.push(format!("size={s}"));
    }
    Ok(Mount {
        destination: path.into(),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options,
    })
}

fn source_err(path: &Path, reason: impl Into<String>) -> CopyInError {
    CopyInError::Source {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A regular file's content, opened without following a symlink.
fn read_file(path: &Path) -> Result<Vec<u8>, CopyInError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| source_err(path, e.to_string()))?;
    let meta = f.metadata().map_err(|e| source_err(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(source_err(path, "not a regular file"));
    }
    if meta.len() > MAX_VOLUME_BYTES {
        return Err(CopyInError::TooLarge {
            what: path.display().to_string(),
        });
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    (&mut f as &mut File)
        .take(MAX_VOLUME_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(|e| source_err(path, e.to_string()))?;
    Ok(content)
}

fn push_file(entries: &mut Vec<VolumeEntry>, path: &str, content: &[u8], mode: u32, uid: u32, gid: u32) {
    let mut offset = 0u64;
    let mut chunks = content.chunks(MAX_CHUNK_BYTES).peekable();
    if chunks.peek().is_none() {
        entries.push(VolumeEntry::File {
            path: path.into(),
            mode,
            uid,
            gid,
            offset: 0,
            data: String::new(),
        });
    }
    for chunk in chunks {
        entries.push(VolumeEntry::File {
            path: path.into(),
            mode,
            uid,
            gid,
            offset,
            data: encode_hex(chunk),
        });
        offset += chunk.len() as u64;
    }
}

/// Adds `dir`'s contents (as `rel` inside the volume) to `entries`.
fn walk(dir: &Path, rel: &str, entries: &mut Vec<VolumeEntry>, total: &mut u64, flag: &str) -> Result<(), CopyInError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| source_err(dir, e.to_string()))?;
    if !meta.is_dir() {
        return Err(source_err(dir, "not a directory"));
    }
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| source_err(dir, e.to_string()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| source_err(dir, e.to_string()))?;
    names.sort();
    for path in names {
        if entries.len() >= MAX_VOLUME_ENTRIES {
            return Err(CopyInError::TooMany {
                what: format!("--volume {flag}"),
            });
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| source_err(&path, "a name that is not UTF-8"))?;
        let inside = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(|e| source_err(&path, e.to_string()))?;
        let mode = meta.mode() & 0o777;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| source_err(&path, e.to_string()))?;
            let target = target
                .to_str()
                .filter(|t| !t.starts_with('/') && !t.split('/').any(|c| c == ".." || c == "." || c.is_empty()))
                .ok_or_else(|| source_err(&path, format!("a symlink to {target:?} could lead out of the volume")))?;
            entries.push(VolumeEntry::Symlink {
                path: inside,
                target: target.into(),
            });
        } else if kind.is_dir() {
            entries.push(VolumeEntry::Dir {
                path: inside.clone(),
                mode,
                uid: meta.uid(),
                gid: meta.gid(),
            });
            walk(&path, &inside, entries, total, flag)?;
        } else if kind.is_file() {
            let mut content = read_file(&path)?;
            *total += content.len() as u64;
            if *total > MAX_VOLUME_BYTES {
                return Err(CopyInError::TooLarge {
                    what: format!("--volume {flag}"),
                });
            }
            push_file(entries, &inside, &content, mode, meta.uid(), meta.gid());
            wipe_bytes(&mut content);
        } else {
            return Err(source_err(&path, "neither a file, a directory nor a symlink"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_becomes_entries_with_kubelets_layout() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("..2026_12_02");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("game.properties"), b"lives=3\n").unwrap();
        std::os::unix::fs::symlink("..2026_12_02", d.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/game.properties", d.path().join("game.properties")).unwrap();
        let v = volume(&format!("{}:/etc/game:ro", d.path().display()), 3).unwrap();
        assert_eq!(v.id, "volume3");
        assert_eq!(v.mount().kind, "volume");
        let paths: Vec<&str> = v.entries.iter().map(VolumeEntry::path).collect();
        assert_eq!(
            paths,
            [
                "..2026_12_02",
                "..2026_12_02/game.properties",
                "..data",
                "game.properties"
            ]
        );
        for e in &v.entries {
            e.validate().unwrap();
        }
        let mut v = v;
        let reqs = v.take_requests();
        assert_eq!(reqs.len(), 1);
        assert!(matches!(&reqs[0], Request::Volume { seal: true, .. }));
    }

    #[test]
    fn many_small_files_go_in_several_messages_up_to_a_bound() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..1500 {
            fs::write(d.path().join(format!("f{i}")), b"x").unwrap();
        }
        let mut v = volume(&format!("{}:/v:ro", d.path().display()), 0).unwrap();
        let reqs = v.take_requests();
        assert!(reqs.len() >= 2, "{} messages", reqs.len());
        for r in &reqs {
            r.validate().unwrap();
        }
        for i in 1500..=MAX_VOLUME_ENTRIES {
            fs::write(d.path().join(format!("f{i}")), b"x").unwrap();
        }
        let e = volume(&format!("{}:/v:ro", d.path().display()), 0).unwrap_err();
        assert!(matches!(e, CopyInError::TooMany { .. }), "{e}");
    }

    #[test]
    fn escaping_links_writable_volumes_and_bad_flags_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("x")).unwrap();
        let e = volume(&format!("{}:/v:ro", d.path().display()), 0).unwrap_err();
        assert!(e.to_string().contains("could lead out of the volume"), "{e}");
        let e = volume(&format!("{}:/v", d.path().display()), 0).unwrap_err();
        assert!(matches!(e, CopyInError::WritableVolume(_)), "{e}");
        for bad in ["/a", "/a:rel:ro", "/a:/b/../c:ro", ":/b:ro"] {
            assert!(volume(bad, 0).is_err(), "{bad}");
        }
        assert!(secrets(&["=x".into()], 0, 0).is_err());
        assert!(secrets(&["../x=/etc/passwd".into()], 0, 0).is_err());
        assert!(tmpfs("/scratch:10x").is_err());
        assert!(tmpfs("rel").is_err());
        assert_eq!(tmpfs("/scratch:64m").unwrap().options.last().unwrap(), "size=64m");
    }

    #[test]
    fn large_files_go_in_chunks_and_secrets_are_the_users() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        fs::write(&big, vec![7u8; MAX_CHUNK_BYTES * 2 + 5]).unwrap();
        let v = secrets(&[format!("blob={}", big.display())], 1000, 1001)
            .unwrap()
            .unwrap();
        assert_eq!(v.destination, SECRETS_DIR);
        let offsets: Vec<u64> = v
            .entries
            .iter()
            .map(|e| match e {
                VolumeEntry::File {
                    offset, mode, uid, gid, ..
                } => {
                    assert_eq!((*mode, *uid, *gid), (0o400, 1000, 1001));
                    *offset
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [0, MAX_CHUNK_BYTES as u64, 2 * MAX_CHUNK_BYTES as u64]);
        let mut v = v;
        let mut reqs = v.take_requests();
        // Two full chunks never share a frame; the short tail joins one.
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            r.validate().unwrap();
            let wire = serde_json::to_vec(r).unwrap();
            assert!(wire.len() < bulkhead_protocol::frame::MAX_FRAME_BYTES as usize);
        }
        wipe_requests(&mut reqs);
        let Request::Volume { entries, .. } = &reqs[0] else {
            panic!()
        };
        let VolumeEntry::File { data, .. } = &entries[0] else {
            panic!()
        };
        assert!(data.bytes().all(|b| b == 0));
        let big_file = d.path().join("huge");
        fs::write(&big_file, vec![0u8; MAX_VOLUME_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            secrets(&[format!("h={}", big_file.display())], 0, 0),
            Err(CopyInError::TooLarge { .. })
        ));
    }
}
