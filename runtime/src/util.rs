//! Small helpers the other modules share: random names and a temporary
//! directory that removes itself.

use std::io;
use std::path::{Path, PathBuf};

/// `n` random bytes from the kernel, as lowercase hex.
/// Bulkhead's cache directory: `$BULKHEAD_CACHE`, else
/// `$XDG_CACHE_HOME/bulkhead`, else `~/.cache/bulkhead` (as the kernel
/// build uses); `None` when none of them is set.
pub fn cache_base() -> Option<std::path::PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    var("BULKHEAD_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("bulkhead")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/bulkhead")))
}

pub fn random_hex(n: usize) -> io::Result<String> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: getrandom writes at most `n - filled` bytes into the
        // unfilled tail of `buf`, which is that long.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += r as usize;
    }
    Ok(hex(&buf))
}

pub use bulkhead_protocol::hex::encode as hex;

/// A directory removed (with its contents) when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<parent>/<prefix><random>` with mode 0700.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = parent.join(format!("{prefix}{}", random_hex(8)?));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::debug!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A new file (never an existing one or a link) with exactly `mode` (not
/// the umask's); where given, handed to that uid and gid.
pub(crate) fn create_new(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    Ok(f)
}

/// Opens a file the VMM may write to, for reading: never through a link,
/// never a FIFO or device (the open would not block on one either).
pub(crate) fn open_vmm_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(f)
}

/// Copies at most the last `max` bytes of `from` to a new file `to`.
pub fn copy_tail(from: &Path, to: &Path, max: u64) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = open_vmm_file(from)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = std::fs::File::create(to)?;
    io::copy(&mut io::Read::take(f, max), &mut out)
}

/// The last `n` lines of a text file (lossy UTF-8); empty when unreadable.
/// Reads only the file's tail, so a long console log costs little.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL_BYTES: u64 = 64 * 1024;
    let Ok(mut f) = open_vmm_file(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .skip(usize::from(start > 0)) // the first line may be cut
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let keep = lines.len().saturating_sub(n);
    lines.drain(..keep);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the VMM writes is read through no link and from no FIFO, and
    /// only its tail is kept.
    #[test]
    fn vmm_files_are_read_safely_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        std::fs::write(&log, b"one\ntwo\nthree\n").unwrap();
        assert_eq!(tail_lines(&log, 2), ["two", "three"]);
        let kept = d.path().join("kept");
        assert_eq!(copy_tail(&log, &kept, 6).unwrap(), 6);
        assert_eq!(std::fs::read(&kept).unwrap(), b"three\n");

        let secret = d.path().join("secret");
        std::fs::write(&secret, b"host secret\n").unwrap();
        let link = d.path().join("link.log");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(tail_lines(&link, 1).is_empty());
        assert!(copy_tail(&link, &d.path().join("k2"), 100).is_err());

        let fifo = d.path().join("fifo.log");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(tail_lines(&fifo, 1).is_empty());
        let e = copy_tail(&fifo, &d.path().join("k3"), 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn random_names_differ_and_temp_dirs_go_away() {
        let a = random_hex(8).unwrap();
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_hex(8).unwrap());
        let parent = tempfile::tempdir().unwrap();
        let path = {
            let t = TempDir::new_in(parent.path(), "x-").unwrap();
            std::fs::write(t.path().join("f"), b"1").unwrap();
            t.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\r\n\nc\n").unwrap();
        assert_eq!(tail_lines(&p, 2), ["b", "c"]);
        assert!(tail_lines(&d.path().join("missing"), 2).is_empty());
    }
}
