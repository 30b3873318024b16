//! The VMM jails itself as its first act, before it opens anything a
//! configuration names and long before guest code runs: a mount namespace
//! of its own whose root is a read-only tmpfs holding only the files the
//! runtime lists (bound at their host paths) and `/dev/kvm`; then, at
//! lock-down, an unprivileged identity of its own.
//!
//! It is done here, not before exec, because the VMM is linked against
//! the host's C library: a root without it could not start the binary.
//! Every mount lives in the VMM's own namespace and goes when it ends.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bulkhead_vmm_api::jail::JailConfig;

const KVM: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("jail: {path} must be an absolute path without `..`")]
    BadPath { path: PathBuf },
    #[error("jail: uid and gid must not be 0 (root)")]
    RootIdentity,
}

/// The identity [`enter`] recorded for [`crate::harden::lock_down`], and
/// the runtime's pipe ([`JailConfig::parent_fd`]).
static IDENTITY: OnceLock<(u32, u32, Option<i32>)> = OnceLock::new();

/// [`JailConfig::max_file_bytes`], for [`crate::harden::lock_down`].
static MAX_FILE_BYTES: OnceLock<u64> = OnceLock::new();

/// The largest file the jailed VMM may write, when its runtime set one.
pub fn max_file_bytes() -> Option<u64> {
    MAX_FILE_BYTES.get().copied()
}

/// The uid and gid the VMM takes at lock-down, when it is jailed.
pub fn identity() -> Option<(u32, u32)> {
    IDENTITY.get().map(|&(u, g, _)| (u, g))
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::BadPath {
        path: path.to_path_buf(),
    })
}

fn check(what: &'static str, path: &Path, ret: libc::c_int) -> Result<(), JailError> {
    if ret != 0 {
        return Err(JailError::Mount {
            what,
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn mount(
    what: &'static str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    let ret = unsafe { libc::mount(ptr(&source), target_c.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    check(what, target, ret)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `host` bound at the same path under `root`, read-only unless asked.
fn bind(root: &Path, host: &Path, writable: bool) -> Result<(), JailError> {
    let rel = host
        .strip_prefix("/")
        .map_err(|_| JailError::BadPath { path: host.into() })?;
    if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(JailError::BadPath { path: host.into() });
    }
    let target = root.join(rel);
    let meta = std::fs::metadata(host).map_err(io_err("cannot find", host))?;
    // Inside a directory bound before, it is there already (and is the
    // host's own file: never create or truncate it).
    if !target.exists() {
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_err("cannot make", &target))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("cannot make", parent))?;
            }
            std::fs::File::create(&target).map_err(io_err("cannot make", &target))?;
        }
    }
    mount("cannot bind", Some(host), &target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    // /dev/kvm is the one device node the VMM may open.
    if host != Path::new(KVM) {
        flags |= libc::MS_NODEV;
    }
    mount("cannot restrict", None, &target, None, flags, None)
}

/// Enters the jail: a private mount namespace whose root holds only
/// `cfg.paths` and `/dev/kvm`. Must run before any other thread exists.
pub fn enter(cfg: &JailConfig) -> Result<(), JailError> {
    if cfg.uid == 0 || cfg.gid == 0 {
        return Err(JailError::RootIdentity);
    }
    let root = cfg.root.as_path();
    // SAFETY: unshare takes flags only.
    check("cannot unshare the mount namespace for", root, unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    })?;
    // Nothing done below may reach the host's mounts.
    mount(
        "cannot make mounts private at",
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        "cannot mount the jail root at",
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    let mut paths: Vec<_> = cfg.paths.iter().collect();
    // Parents before what they hold.
    paths.sort_by_key(|p| p.path.components().count());
    for p in paths {
        bind(root, &p.path, p.writable)?;
    }
    bind(root, Path::new(KVM), false)?;
    mount(
        "cannot make the jail root read-only at",
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        None,
    )?;
    pivot(root)?;
    let _ = IDENTITY.set((cfg.uid, cfg.gid, cfg.parent_fd));
    if let Some(max) = cfg.max_file_bytes {
        let _ = MAX_FILE_BYTES.set(max);
    }
    tracing::debug!(uid = cfg.uid, gid = cfg.gid, "jailed in {}", root.display());
    Ok(())
}

/// Makes `root` the root, and lets go of the old one entirely.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(io_err("cannot enter", root))?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one;
    // both arguments are NUL-terminated literals.
    check("cannot pivot_root into", root, unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
    })?;
    // SAFETY: as above; detaches the old root stacked on ".".
    check("cannot detach the old root from", root, unsafe {
        libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
    })?;
    std::env::set_current_dir("/").map_err(io_err("cannot enter", Path::new("/")))
}

/// Takes the jail's identity: no supplementary groups, then the gid, then
/// the uid (which empties the permitted and effective capability sets).
/// The change clears the parent-death signal: it is set again, and if the
/// runtime's end of [`JailConfig::parent_fd`] closed before that, the
/// runtime is gone and so must the VMM be.
pub(crate) fn take_identity(uid: u32, gid: u32) -> io::Result<()> {
    let mut death_signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int we own.
    if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut death_signal as *mut libc::c_int) } != 0 {
        return Err(io::Error::last_os_error());
    }
    change_ids(uid, gid)?;
    // SAFETY: prctl with integer arguments only.
    if death_signal != 0 && unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(fd) = IDENTITY.get().and_then(|&(_, _, fd)| fd) {
        let mut watch = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ready = loop {
            // SAFETY: poll reads and writes one pollfd we own.
            let r = unsafe { libc::poll(&mut watch, 1, 0) };
            let e = io::Error::last_os_error();
            if r >= 0 || e.kind() != io::ErrorKind::Interrupted {
                break if r < 0 { Err(e) } else { Ok(r) };
            }
        };
        // SAFETY: close takes an integer; the descriptor is ours alone.
        unsafe { libc::close(fd) };
        if ready? > 0 {
            return Err(io::Error::other("the runtime that started the VMM is gone"));
        }
    }
    Ok(())
}

fn change_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with a zero count reads nothing.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
