//! The root filesystem used when the user gives none: the static busybox
//! embedded at build time with a symlink per applet, a minimal /etc and
//! the usual empty directories. It is written out with fixed times and
//! imaged through the same cache as any directory, so it is built once.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bulkhead_runtime::rootfs::{ImageCache, RootfsError, RootfsImage};
use bulkhead_runtime::util::TempDir;

static BUSYBOX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/busybox"));
static APPLETS: &str = include_str!(concat!(env!("OUT_DIR"), "/busybox-applets.txt"));

/// Every entry's mtime, so the tree (and its image) is the same each run.
const FIXED_MTIME: i64 = 0;

pub const HOSTNAME: &str = "bulkhead";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";

/// Directories and their modes, parents first.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("var", 0o755),
    ("var/tmp", 0o1777),
];

pub fn applets() -> impl Iterator<Item = &'static str> {
    APPLETS
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "." && *a != "..")
}

/// Writes the default tree into the empty directory `root`.
pub fn materialize(root: &Path) -> io::Result<()> {
    let set_mode = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    for (dir, mode) in DIRS {
        let p = root.join(dir);
        std::fs::create_dir(&p)?;
        set_mode(&p, *mode)?;
    }
    set_mode(root, 0o755)?;
    let busybox = root.join("bin/busybox");
    std::fs::write(&busybox, BUSYBOX)?;
    set_mode(&busybox, 0o755)?;
    for applet in applets().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    for (name, text) in [
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("etc/hostname", &format!("{HOSTNAME}\n")),
    ] {
        let p = root.join(name);
        std::fs::write(&p, text)?;
        set_mode(&p, 0o644)?;
    }
    // Directories last: creating their entries changed their mtimes.
    let mut paths = vec![root.join("bin/busybox"), root.join("etc/passwd")];
    paths.extend(applets().filter(|a| *a != "busybox").map(|a| root.join("bin").join(a)));
    paths.extend(["etc/group", "etc/hostname"].map(|f| root.join(f)));
    paths.extend(DIRS.iter().rev().map(|(d, _)| root.join(d)));
    paths.push(root.to_path_buf());
    for p in paths {
        set_mtime_nofollow(&p, FIXED_MTIME)?;
    }
    Ok(())
}

/// Sets atime and mtime without following a symlink.
fn set_mtime_nofollow(path: &Path, secs: i64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` is a NUL-terminated path and `times` two initialised
    // timespecs, both alive for the call.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The default root filesystem's image, built into the cache when missing.
pub fn default_image(cache: &ImageCache, on_build: &mut dyn FnMut(&Path)) -> Result<RootfsImage, RootfsError> {
    let io_err = |source| RootfsError::Io {
        path: cache.dir().to_path_buf(),
        source,
    };
    std::fs::create_dir_all(cache.dir()).map_err(io_err)?;
    let tmp = TempDir::new_in(cache.dir(), ".default-").map_err(io_err)?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).map_err(io_err)?;
    materialize(&root).map_err(io_err)?;
    cache.image_for_dir(&root, on_build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_runtime::rootfs::scan_tree;

    #[test]
    fn default_tree_has_busybox_applets_and_etc() {
        assert!(applets().any(|a| a == "sh"), "busybox without sh?");
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        materialize(&a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        materialize(&b).unwrap();
        assert_eq!(scan_tree(&a).unwrap().hash, scan_tree(&b).unwrap().hash);
        assert_eq!(std::fs::read_link(a.join("bin/sh")).unwrap(), Path::new("busybox"));
        assert_eq!(std::fs::read(a.join("bin/busybox")).unwrap().len(), BUSYBOX.len());
        let tmp = std::fs::metadata(a.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        let passwd = std::fs::read_to_string(a.join("etc/passwd")).unwrap();
        assert!(passwd.contains("nobody:x:65534:65534:"), "{passwd}");
    }
}
