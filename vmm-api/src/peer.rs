//! Who may answer on a VMM's socket: whoever owns the directory it is in
//! (root for a jailed VMM's, which binds its sockets before it gives up
//! root; the user for an unprivileged run). Whoever could swap the socket
//! for a link to another socket on the host must be able to write to that
//! directory, so a client checks, once connected and before it writes,
//! that the peer listened as the directory's owner.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is served by uid {found}, not by the owner of its directory (uid {wanted}): refused")]
    Stranger { path: String, found: u32, wanted: u32 },
}

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    // SAFETY: an all-zero ucred is valid; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, ours.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Refuses `stream`, connected through `path`, unless its peer runs as
/// the owner of `path`'s directory.
pub fn check_owner_serves(stream: &UnixStream, path: &Path) -> Result<(), PeerError> {
    let shown = || path.display().to_string();
    let io_err = |source| PeerError::Io { path: shown(), source };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let wanted = std::fs::symlink_metadata(dir).map_err(io_err)?.uid();
    let found = peer_uid(stream).map_err(io_err)?;
    if found != wanted {
        return Err(PeerError::Stranger {
            path: shown(),
            found,
            wanted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_directory_owner_is_accepted_and_a_stranger_refused() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        let s = UnixStream::connect(&sock).unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&s).unwrap(), me);
        check_owner_serves(&s, &sock).unwrap();
        if me != 0 {
            eprintln!("skipped the refusal: needs root to chown");
            return;
        }
        std::os::unix::fs::chown(d.path(), Some(4242), None).unwrap();
        let e = check_owner_serves(&s, &sock).unwrap_err();
        assert!(
            matches!(
                e,
                PeerError::Stranger {
                    found: 0,
                    wanted: 4242,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
