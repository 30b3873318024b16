//! Listening Unix sockets whose file the VMM removes when it is done with
//! it (the vsock device's and the control API's), so that no exit path
//! leaves a socket file behind.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The file of a socket this process bound; dropping it removes the file
/// if it is still that socket.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Binds a listener at `path`. A path that exists is refused with
    /// `ErrorKind::AlreadyExists`, stale sockets included: another VMM may
    /// still be serving it, and removing it would cut that VMM off.
    pub fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path already exists"));
        }
        let listener = UnixListener::bind(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        let file = SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok((listener, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one we bound (someone may
    /// have replaced it since).
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_file_is_removed_on_drop_but_never_a_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, file) = SocketFile::bind(&path).unwrap();
        assert!(path.exists());
        let err = SocketFile::bind(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        drop(file);
        assert!(!path.exists());
        drop(listener);

        let (_l, file) = SocketFile::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(file);
        assert!(path.exists(), "a file that replaced the socket is not ours to remove");
    }
}
