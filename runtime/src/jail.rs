//! The runtime's half of the VMM's jail (the VMM's half is its `jail`
//! module): a uid and gid of its own per sandbox, and images bound into a
//! running VMM's jail, inside its mount namespace only.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Jailed VMMs run as uid = gid = `ID_BASE + n`, `n < ID_COUNT`: far above
/// the ranges distributions give users, systemd's dynamic users and
/// `/etc/subuid`'s usual 100000-range.
pub const ID_BASE: u32 = 1_900_000_000;
pub const ID_COUNT: u32 = 65_536;
/// Byte `n` of this file, locked, holds identity `n` for the lock's owner.
pub const REGISTRY: &str = "/run/bulkhead/jail-ids";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail identities: {path}: {source}")]
    Registry { path: PathBuf, source: io::Error },
    #[error("jail identities: all {ID_COUNT} are in use")]
    Exhausted,
    #[error(
        "jail identities: ids {ID_BASE}..{} are not all mapped in this user namespace ({map}); \
         run the runtime in the host's user namespace, or map that range into this one",
        ID_BASE + ID_COUNT
    )]
    Unmapped { map: &'static str },
    #[error("cannot show {image} to the VMM at {target}: {why}")]
    Bind {
        image: PathBuf,
        target: PathBuf,
        why: String,
    },
}

/// A uid and gid no other live sandbox holds (across every runtime
/// process: the hold is an open-file-description lock, released when this
/// value drops or its process dies).
#[derive(Debug)]
pub struct JailId {
    n: u32,
    _hold: File,
}

impl JailId {
    pub fn allocate() -> Result<JailId, JailError> {
        for map in ["/proc/self/uid_map", "/proc/self/gid_map"] {
            let text = std::fs::read_to_string(map).map_err(|source| JailError::Registry {
                path: map.into(),
                source,
            })?;
            if !maps_range(&text, ID_BASE, ID_COUNT) {
                return Err(JailError::Unmapped { map });
            }
        }
        let registry = Path::new(REGISTRY);
        let err = |source| JailError::Registry {
            path: registry.to_path_buf(),
            source,
        };
        if let Some(dir) = registry.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(registry)
            .map_err(err)?;
        for n in 0..ID_COUNT {
            // SAFETY: an all-zero flock is valid; the fields are set below.
            let mut lock: libc::flock = unsafe { std::mem::zeroed() };
            lock.l_type = libc::F_WRLCK as libc::c_short;
            lock.l_whence = libc::SEEK_SET as libc::c_short;
            lock.l_start = libc::off_t::from(n as i32);
            lock.l_len = 1;
            // SAFETY: F_OFD_SETLK reads the flock we own.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
                return Ok(JailId { n, _hold: file });
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(err(e));
            }
        }
        Err(JailError::Exhausted)
    }

    pub fn uid(&self) -> u32 {
        ID_BASE + self.n
    }

    pub fn gid(&self) -> u32 {
        ID_BASE + self.n
    }
}

/// Whether one line of a `/proc/PID/uid_map` (inside, outside, count)
/// holds every id in `first..first + count`.
fn maps_range(map: &str, first: u32, count: u32) -> bool {
    let last = u64::from(first) + u64::from(count);
    map.lines().any(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        matches!(f[..], [inside, _, n] if inside <= u64::from(first) && last <= inside + n)
    })
}

/// Takes back a directory lent to a jailed VMM, once that VMM is gone:
/// it must hold only regular files named in `expected`, each with one
/// link, and it and they become root's again (mode 0700 and 0600). A link,
/// a FIFO or a stray name is refused, so the caller never follows or
/// keeps anything the VMM planted.
pub fn reclaim(dir: &Path, expected: &[&str]) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let planted = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", dir.display()));
    if !std::fs::symlink_metadata(dir)?.is_dir() {
        return Err(planted("not a directory".into()));
    }
    std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if !expected.iter().any(|x| name == *x) {
            return Err(planted(format!("unexpected entry {name:?} left by the VMM")));
        }
        // Checked and changed through one descriptor: never a link's
        // target, never a FIFO waited on.
        let file = crate::util::open_vmm_file(&e.path()).map_err(|err| match (err.raw_os_error(), err.kind()) {
            (Some(libc::ELOOP), _) | (_, io::ErrorKind::InvalidInput) => {
                planted(format!("{name:?} is not a plain file"))
            }
            _ => planted(format!("{name:?}: {err}")),
        })?;
        if file.metadata()?.nlink() != 1 {
            return Err(planted(format!("{name:?} is not a plain file")));
        }
        std::os::unix::fs::fchown(&file, Some(0), Some(0))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Binds the file `source` read-only over `target`, an existing file in
/// the jail of the VMM `pid`, in that VMM's mount namespace only: the host
/// sees no mount, and the mount goes with the VMM (or with `target`: a
/// mount point unlinked on the host is detached in every namespace).
pub fn bind_into(pid: u32, source: &Path, target: &Path) -> Result<(), JailError> {
    let fail = |why: String| JailError::Bind {
        image: source.to_path_buf(),
        target: target.to_path_buf(),
        why,
    };
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| fail("a NUL in the path".into()));
    let (source_c, target_c) = (c(source)?, c(target)?);
    if !std::fs::metadata(source).map_err(|e| fail(e.to_string()))?.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let ns = File::open(format!("/proc/{pid}/ns/mnt")).map_err(|e| fail(format!("the VMM's namespace: {e}")))?;
    // SAFETY: open_tree reads a NUL-terminated path; its result is a new
    // descriptor we own, or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(fail(format!("open_tree: {}", io::Error::last_os_error())));
    }
    // SAFETY: tree is a descriptor open_tree just returned.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let empty = c"";
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail(format!("pipe: {}", io::Error::last_os_error())));
    }
    // SAFETY: pipe2 just returned these; each is owned once.
    let (report_rx, report_tx) = unsafe { (File::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    // SAFETY: the child makes raw system calls only, on memory prepared
    // before the fork, and leaves with _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(fail(format!("fork: {}", io::Error::last_os_error())));
    }
    if child == 0 {
        // SAFETY: as above; a single-threaded child may change its mount
        // namespace. On failure it reports the step and errno, then exits.
        unsafe {
            let step = |ok: bool, step: u8| {
                if !ok {
                    let errno = *libc::__errno_location();
                    let mut report = [step, 0, 0, 0, 0];
                    report[1..].copy_from_slice(&errno.to_ne_bytes());
                    libc::write(report_tx.as_raw_fd(), report.as_ptr().cast(), report.len());
                    libc::_exit(1);
                }
            };
            step(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) == 0, 1);
            step(
                libc::syscall(
                    libc::SYS_move_mount,
                    tree.as_raw_fd(),
                    empty.as_ptr(),
                    libc::AT_FDCWD,
                    target_c.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ) == 0,
                2,
            );
            let flags =
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            step(
                libc::mount(
                    std::ptr::null(),
                    target_c.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) == 0,
                3,
            );
            libc::_exit(0);
        }
    }
    drop(report_tx);
    let mut report = Vec::new();
    let _ = io::Read::read_to_end(&mut &report_rx, &mut report);
    let mut status = 0;
    loop {
        // SAFETY: waits for the child we forked; status is ours.
        if unsafe { libc::waitpid(child, &mut status, 0) } == child {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(fail(format!("waitpid: {e}")));
        }
    }
    if let [step, a, b, c, d] = report[..] {
        let errno = io::Error::from_raw_os_error(i32::from_ne_bytes([a, b, c, d]));
        let what = match step {
            1 => "entering the VMM's mount namespace",
            2 => "mounting there",
            _ => "making the mount read-only",
        };
        return Err(fail(format!("{what}: {errno}")));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(fail(format!("the helper ended with status {status:#x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identities are distinct while held and come back when dropped.
    #[test]
    fn identities_are_distinct_and_released() {
        if !crate::vmm_process::can_make_namespaces() {
            eprintln!("skipped: needs root");
            return;
        }
        let a = JailId::allocate().unwrap();
        let b = JailId::allocate().unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(a.uid() >= ID_BASE && b.gid() >= ID_BASE);
        let freed = a.uid();
        drop(a);
        // Another holder may take it first; ours must be free to take.
        let held: Vec<JailId> = (0..4).map(|_| JailId::allocate().unwrap()).collect();
        assert!(held.iter().all(|h| h.uid() != b.uid()));
        assert!(held.iter().any(|h| h.uid() == freed) || held.iter().all(|h| h.uid() > freed));
    }

    #[test]
    fn the_id_range_must_be_mapped() {
        assert!(maps_range("         0          0 4294967295\n", ID_BASE, ID_COUNT));
        assert!(!maps_range("0 100000 65536\n", ID_BASE, ID_COUNT));
        assert!(maps_range("0 1000 1\n1900000000 5000000 65536\n", ID_BASE, ID_COUNT));
        assert!(!maps_range("1900000000 5000000 65535\n", ID_BASE, ID_COUNT));
        assert!(!maps_range("garbage\n", ID_BASE, ID_COUNT));
    }

    #[test]
    fn a_lent_directory_comes_back_only_with_plain_expected_files() {
        if !crate::vmm_process::can_make_namespaces() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("state"), b"s").unwrap();
        reclaim(&out, &["state", "memory"]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", out.join("memory")).unwrap();
        let e = reclaim(&out, &["state", "memory"]).unwrap_err();
        assert!(e.to_string().contains("not a plain file"), "{e}");
        std::fs::remove_file(out.join("memory")).unwrap();
        std::fs::write(out.join("meta.json"), b"{}").unwrap();
        let e = reclaim(&out, &["state", "memory"]).unwrap_err();
        assert!(e.to_string().contains("unexpected entry \"meta.json\""), "{e}");
        std::fs::remove_file(out.join("meta.json")).unwrap();
        std::fs::hard_link(out.join("state"), out.join("memory")).unwrap();
        let e = reclaim(&out, &["state", "memory"]).unwrap_err();
        assert!(e.to_string().contains("not a plain file"), "{e}");
    }

    #[test]
    fn only_regular_files_are_shown() {
        let d = tempfile::tempdir().unwrap();
        let e = bind_into(std::process::id(), d.path(), &d.path().join("t")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = bind_into(std::process::id(), &d.path().join("none"), &d.path().join("t")).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
