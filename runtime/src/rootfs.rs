//! The container's root filesystem as a block-device image: an ext4 or
//! erofs image file is used as it is; a directory becomes a reproducible
//! ext4 image, cached by a hash of the tree so the next run with the same
//! tree boots at once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::util;

const EXT4_MAGIC_OFFSET: usize = 1080;
const EXT4_MAGIC: u16 = 0xEF53;
const EROFS_MAGIC_OFFSET: usize = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
/// mkfs.ext4 keeps a symlink target of up to 59 bytes in the inode.
const FAST_SYMLINK_MAX: usize = 59;
/// Any fixed time: mkfs.ext4 treats 0 as "not set" and uses the clock.
const FAKE_TIME: &str = "1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Erofs,
}

impl FsType {
    /// The name the agent's `root.fstype` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        }
    }
}

/// An image ready to be the guest's first disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsImage {
    pub path: PathBuf,
    pub fstype: FsType,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is neither an ext4 nor an erofs image (no superblock magic); give an image or a directory")]
    UnknownImage { path: PathBuf },
    #[error("{path} is not a directory, a regular file or a block device")]
    Unsupported { path: PathBuf },
    #[error("no cache directory: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("cannot run {tool}: {source} (install e2fsprogs)")]
    Spawn { tool: &'static str, source: io::Error },
    #[error("{tool} failed ({status}) making an image of {dir}: {stderr}")]
    Tool {
        tool: &'static str,
        dir: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The filesystem type from a superblock's first bytes (at least 1084).
pub fn detect_bytes(head: &[u8]) -> Option<FsType> {
    let ext4 = head
        .get(EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    let erofs = head
        .get(EROFS_MAGIC_OFFSET..EROFS_MAGIC_OFFSET + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if ext4 == Some(EXT4_MAGIC) {
        Some(FsType::Ext4)
    } else if erofs == Some(EROFS_MAGIC) {
        Some(FsType::Erofs)
    } else {
        None
    }
}

/// Reads an image's superblock magic.
pub fn detect_image(path: &Path) -> Result<FsType, RootfsError> {
    let mut head = Vec::with_capacity(EXT4_MAGIC_OFFSET + 2);
    File::open(path)
        .and_then(|f| f.take(EXT4_MAGIC_OFFSET as u64 + 2).read_to_end(&mut head))
        .map_err(io_err(path))?;
    detect_bytes(&head).ok_or_else(|| RootfsError::UnknownImage {
        path: path.to_path_buf(),
    })
}

/// One entry of a scanned tree, as the image build needs it afterwards.
#[derive(Clone, Debug)]
pub struct TreeEntry {
    /// Relative to the tree's root; empty for the root itself.
    pub rel: PathBuf,
    pub mtime: i64,
}

/// A directory tree's identity and size.
#[derive(Clone, Debug)]
pub struct Tree {
    /// SHA-256 over every entry's relative path, type, mode, owner, mtime,
    /// symlink target, device number, hard-link identity and file content,
    /// in sorted order: the same tree gives the same hash on any host.
    pub hash: [u8; 32],
    pub entries: Vec<TreeEntry>,
    /// Bytes the content takes in 4 KiB blocks.
    pub content_bytes: u64,
}

impl Tree {
    pub fn hash_hex(&self) -> String {
        util::hex(&self.hash)
    }
}

fn put_bytes(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

fn kind_byte(m: &Metadata) -> Option<u8> {
    let t = m.file_type();
    Some(if t.is_dir() {
        b'd'
    } else if t.is_file() {
        b'f'
    } else if t.is_symlink() {
        b'l'
    } else if t.is_char_device() {
        b'c'
    } else if t.is_block_device() {
        b'b'
    } else if t.is_fifo() {
        b'p'
    } else if t.is_socket() {
        b's'
    } else {
        return None;
    })
}

/// Walks `root` (symlinks inside are not followed) in byte-sorted order and
/// hashes it. The mtime is part of the hash because the image records it:
/// two trees that differ only there must not share a cached image.
pub fn scan_tree(root: &Path) -> Result<Tree, RootfsError> {
    let mut h = Sha256::new();
    h.update(b"bulkhead rootfs tree v1\0");
    let mut entries = Vec::new();
    let mut content_bytes = 0u64;
    let mut links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        // The root itself may be reached through a symlink.
        let meta = if rel.as_os_str().is_empty() {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(io_err(&path))?;
        let kind = kind_byte(&meta).ok_or_else(|| RootfsError::Unsupported { path: path.clone() })?;
        h.update(b"E");
        put_bytes(&mut h, rel.as_os_str().as_bytes());
        h.update([kind]);
        h.update((meta.mode() & 0o7777).to_le_bytes());
        h.update(meta.uid().to_le_bytes());
        h.update(meta.gid().to_le_bytes());
        h.update(meta.mtime().to_le_bytes());
        match kind {
            b'd' => {
                content_bytes += BLOCK;
                let mut names: Vec<OsString> = std::fs::read_dir(&path)
                    .map_err(io_err(&path))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(io_err(&path))?;
                names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                // Reversed onto the stack, so they come off in order.
                stack.extend(names.into_iter().rev().map(|n| rel.join(n)));
            }
            b'f' => {
                let id = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&id) {
                        h.update(b"H");
                        h.update((*first as u64).to_le_bytes());
                        entries.push(TreeEntry {
                            rel,
                            mtime: meta.mtime(),
                        });
                        continue;
                    }
                    links.insert(id, entries.len());
                }
                let n = hash_file(&mut h, &path)?;
                content_bytes += n.div_ceil(BLOCK) * BLOCK;
            }
            b'l' => {
                let target = std::fs::read_link(&path).map_err(io_err(&path))?;
                put_bytes(&mut h, target.as_os_str().as_bytes());
                if target.as_os_str().len() > FAST_SYMLINK_MAX {
                    content_bytes += BLOCK;
                }
            }
            b'c' | b'b' => h.update(meta.rdev().to_le_bytes()),
            _ => {}
        }
        entries.push(TreeEntry {
            rel,
            mtime: meta.mtime(),
        });
    }
    Ok(Tree {
        hash: h.finalize().into(),
        entries,
        content_bytes,
    })
}

/// Hashes the file's length, then its bytes; returns the length read.
fn hash_file(h: &mut Sha256, path: &Path) -> Result<u64, RootfsError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut content = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        content.update(&buf[..n]);
        total += n as u64;
    }
    h.update(total.to_le_bytes());
    h.update(content.finalize());
    Ok(total)
}

/// The image size for a tree: content plus 30 %, plus 16 MiB for metadata,
/// rounded up to a MiB.
pub fn image_size(content_bytes: u64) -> u64 {
    let raw = content_bytes + content_bytes.div_ceil(10) * 3 + 16 * MIB;
    raw.div_ceil(MIB) * MIB
}

/// A UUID (RFC 9562 version 8, "custom") made from the tree hash, so the
/// image's UUID and directory hash seed are reproducible too.
pub fn uuid_from_hash(hash: &[u8; 32]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&hash[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = util::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Where directory images are kept: `$BULKHEAD_CACHE/rootfs` (as for the
/// kernel build), else `$XDG_CACHE_HOME/bulkhead/rootfs`, else
/// `~/.cache/bulkhead/rootfs`.
#[derive(Clone, Debug)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageCache { dir: dir.into() }
    }

    pub fn default_location() -> Result<Self, RootfsError> {
        let base = util::cache_base().ok_or(RootfsError::NoCacheDir)?;
        Ok(ImageCache::new(base.join("rootfs")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached (ext4) image of `dir`, built first when missing.
    /// `on_build` is told before a (slow) build starts.
    pub fn image_for_dir(&self, dir: &Path, on_build: &mut dyn FnMut(&Path)) -> Result<RootfsImage, RootfsError> {
        let tree = scan_tree(dir)?;
        let image = self.dir.join(format!("{}.ext4", tree.hash_hex()));
        let found = |path: PathBuf| RootfsImage {
            path,
            fstype: FsType::Ext4,
        };
        if image.is_file() {
            tracing::debug!("rootfs image cached: {}", image.display());
            return Ok(found(image));
        }
        on_build(&image);
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp_name = format!(
            ".{}.ext4.tmp-{}-{}",
            tree.hash_hex(),
            std::process::id(),
            util::random_hex(4).map_err(io_err(&self.dir))?
        );
        let tmp = self.dir.join(tmp_name);
        let built = build_ext4(dir, &tree, &tmp).and_then(|()| {
            // Renaming over an image a concurrent run just made is fine:
            // the two are the same bytes.
            std::fs::rename(&tmp, &image).map_err(io_err(&image))
        });
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built.map(|()| found(image))
    }
}

/// Makes a read-only-use ext4 image of `dir` at `out` (which must not
/// exist): no journal, no reserved blocks, a fixed UUID, hash seed and
/// clock, then every inode's atime and ctime (which mkfs copies from the
/// host, where they change on every read and chmod) set to its mtime.
pub fn build_ext4(dir: &Path, tree: &Tree, out: &Path) -> Result<(), RootfsError> {
    let size = image_size(tree.content_bytes);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io_err(out))?;
    f.set_len(size).map_err(io_err(out))?;
    drop(f);
    let uuid = uuid_from_hash(&tree.hash);
    let inodes = tree.entries.len() as u64 + 1024;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0", "-O", "^has_journal"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-U")
        .arg(&uuid)
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={uuid}"))
        .arg("-d")
        .arg(dir)
        .arg(out);
    run_tool("mkfs.ext4", mkfs, dir, None)?;

    let mut script = Vec::new();
    for e in &tree.entries {
        let rel = e.rel.as_os_str().as_bytes();
        if rel.is_empty() {
            continue; // the root's times come from the fixed clock
        }
        if rel.iter().any(|&b| b == b'"' || b == b'\n' || b == b'\r') {
            tracing::warn!(
                "{}: name cannot be quoted for debugfs; its atime/ctime keep the host's",
                e.rel.display()
            );
            continue;
        }
        for field in ["atime", "ctime"] {
            script.extend_from_slice(b"sif \"/");
            script.extend_from_slice(rel);
            script.extend_from_slice(format!("\" {field} @{}\n", e.mtime).as_bytes());
        }
    }
    if !script.is_empty() {
        let mut debugfs = Command::new("debugfs");
        debugfs.arg("-w").arg("-f").arg("-").arg(out);
        run_tool("debugfs", debugfs, dir, Some(&script))?;
    }
    File::open(out).and_then(|f| f.sync_all()).map_err(io_err(out))
}

fn run_tool(tool: &'static str, mut cmd: Command, dir: &Path, stdin: Option<&[u8]>) -> Result<(), RootfsError> {
    cmd.env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| RootfsError::Spawn { tool, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A failed write shows up as the tool's own error below.
        let _ = pipe.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RootfsError::Spawn { tool, source })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs exits 0 even when a command fails; it prints why, after its
    // version banner.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || (tool == "debugfs" && !complaints.is_empty()) {
        return Err(RootfsError::Tool {
            tool,
            dir: dir.to_path_buf(),
            status: out.status,
            stderr: complaints.join("\n"),
        });
    }
    Ok(())
}

/// `--rootfs`: an image file or block device as it is, or a directory
/// through the image cache.
pub fn resolve(spec: &Path, cache: &ImageCache, on_build: &mut dyn FnMut(&Path)) -> Result<RootfsImage, RootfsError> {
    let meta = std::fs::metadata(spec).map_err(io_err(spec))?;
    if meta.is_dir() {
        return cache.image_for_dir(spec, on_build);
    }
    if meta.is_file() || meta.file_type().is_block_device() {
        let fstype = detect_image(spec)?;
        // The VMM gets an absolute path: it may not share our cwd forever.
        let path = std::fs::canonicalize(spec).map_err(io_err(spec))?;
        return Ok(RootfsImage { path, fstype });
    }
    Err(RootfsError::Unsupported {
        path: spec.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn superblock(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[offset..offset + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn image_types_by_magic() {
        assert_eq!(detect_bytes(&superblock(1080, &[0x53, 0xEF])), Some(FsType::Ext4));
        assert_eq!(
            detect_bytes(&superblock(1024, &[0xE2, 0xE1, 0xF5, 0xE0])),
            Some(FsType::Erofs)
        );
        assert_eq!(detect_bytes(&superblock(1080, &[0xEF, 0x53])), None);
        assert_eq!(detect_bytes(&[0u8; 100]), None);

        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        std::fs::write(&img, superblock(1024, &[0xE2, 0xE1, 0xF5, 0xE0])).unwrap();
        let cache = ImageCache::new(d.path().join("cache"));
        let r = resolve(&img, &cache, &mut |_| panic!("no build for an image")).unwrap();
        assert_eq!(r.fstype, FsType::Erofs);
        std::fs::write(&img, b"short").unwrap();
        let e = resolve(&img, &cache, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("neither an ext4 nor an erofs image"), "{e}");
    }

    fn sample_tree(root: &Path) {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/alias")).unwrap();
        std::fs::write(root.join("data"), vec![7u8; 10_000]).unwrap();
    }

    #[test]
    fn tree_hash_follows_content_and_mode_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        sample_tree(&root);
        let a = scan_tree(&root).unwrap();
        assert_eq!(a.hash, scan_tree(&root).unwrap().hash, "stable");
        assert_eq!(a.entries.len(), 5);
        assert_eq!(a.content_bytes, 2 * BLOCK + BLOCK + 3 * BLOCK);

        // Reading a file (atime) changes nothing.
        std::fs::read(root.join("data")).unwrap();
        assert_eq!(scan_tree(&root).unwrap().hash, a.hash);

        let mtime = std::fs::metadata(root.join("data")).unwrap().modified().unwrap();
        let mut bytes = vec![7u8; 10_000];
        bytes[5000] = 8;
        std::fs::write(root.join("data"), &bytes).unwrap();
        File::options()
            .write(true)
            .open(root.join("data"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let b = scan_tree(&root).unwrap();
        assert_ne!(b.hash, a.hash, "content");

        std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let c = scan_tree(&root).unwrap();
        assert_ne!(c.hash, b.hash, "mode");

        std::fs::remove_file(root.join("bin/alias")).unwrap();
        std::os::unix::fs::symlink("other", root.join("bin/alias")).unwrap();
        assert_ne!(scan_tree(&root).unwrap().hash, c.hash, "symlink target");
    }

    #[test]
    fn sizes_and_uuid() {
        assert_eq!(image_size(0), 16 * MIB);
        assert_eq!(image_size(100 * MIB), 146 * MIB);
        let u = uuid_from_hash(&[0xff; 32]);
        assert_eq!(u, "ffffffff-ffff-8fff-bfff-ffffffffffff");
    }

    #[test]
    fn directory_images_are_cached_and_reproducible() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        sample_tree(&root);
        let cache = ImageCache::new(d.path().join("cache"));
        let mut builds = 0;
        let img = cache.image_for_dir(&root, &mut |_| builds += 1).unwrap().path;
        assert_eq!(detect_image(&img).unwrap(), FsType::Ext4);
        let again = cache.image_for_dir(&root, &mut |_| builds += 1).unwrap().path;
        assert_eq!((img.clone(), builds), (again, 1));

        // A fresh build from a copy with other atimes and ctimes is the
        // same bytes.
        let bytes = std::fs::read(&img).unwrap();
        std::fs::remove_file(&img).unwrap();
        // The image holds whole seconds.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::read(root.join("data")).unwrap();
        std::fs::set_permissions(root.join("data"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let tree = scan_tree(&root).unwrap();
        let img2 = cache.image_for_dir(&root, &mut |_| builds += 1).unwrap().path;
        assert_eq!(
            img2.file_name().unwrap().to_string_lossy(),
            format!("{}.ext4", tree.hash_hex())
        );
        assert!(
            std::fs::read(&img2).unwrap() == bytes,
            "image bytes differ between builds"
        );
        let leftovers: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left");
    }
}
