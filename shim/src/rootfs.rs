//! The container's root filesystem as a guest block device: the mounts the
//! snapshotter handed containerd are mounted read-only in a private
//! directory, turned into an ext4 image cached by content (so a second
//! container from the same image reuses it), and unmounted again. The
//! writable layer lives in the guest (tmpfs overlay) and dies with the VM.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bulkhead_runtime::rootfs::{ImageCache, RootfsError, RootfsImage};

/// Where the rootfs is mounted while its image is built; `delete` looks
/// here after a shim that died mid-build.
pub const BUILD_MOUNT_DIR: &str = "bulkhead-rootfs";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount the container's {kind} root filesystem at {target}: {source}")]
    Mount {
        kind: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot prepare {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("the root filesystem has {0} mounts; only one is supported")]
    TooMany(usize),
    #[error("a path contains a NUL byte")]
    Nul,
    #[error(transparent)]
    Image(#[from] RootfsError),
}

/// One mount from the create request.
#[derive(Clone, Debug)]
pub struct RootMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Splits mount(8)-style options into flags and the data string.
fn split_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags = libc::MS_RDONLY;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            // We always mount read-only: the image is a copy.
            "ro" | "rw" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

fn cstr(p: &[u8]) -> Result<CString, MountError> {
    CString::new(p).map_err(|_| MountError::Nul)
}

fn mount_one(m: &RootMount, target: &Path) -> Result<(), MountError> {
    let (flags, data) = split_options(&m.options);
    let err = |source| MountError::Mount {
        kind: m.kind.clone(),
        target: target.to_owned(),
        source,
    };
    let src = cstr(m.source.as_bytes())?;
    let tgt = cstr(target.as_os_str().as_bytes())?;
    let fstype = cstr(m.kind.as_bytes())?;
    let data = cstr(data.as_bytes())?;
    let bind = flags & libc::MS_BIND != 0;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            if bind { flags & !libc::MS_RDONLY } else { flags },
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    if bind {
        // A bind mount takes MS_RDONLY only on a remount.
        // SAFETY: as above; null source/type/data are allowed for a remount.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                tgt.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            unmount(target);
            return Err(err(e));
        }
    }
    Ok(())
}

/// Detaches whatever is mounted at `target` (nothing mounted is fine).
pub fn unmount(target: &Path) {
    let Ok(t) = CString::new(target.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `t` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
            tracing::warn!("cannot unmount {}: {e}", target.display());
        }
    }
}

/// Removes the build mount point under `bundle` if a dead shim left it.
pub fn cleanup_build_mount(bundle: &Path) {
    let dir = bundle.join(BUILD_MOUNT_DIR);
    if dir.exists() {
        unmount(&dir);
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// The image layers alone: a fresh container's upper dir is empty, and
/// its (new, per-container) directory times would change the content hash
/// and defeat the cache.
fn lower_layers_only(m: &RootMount) -> RootMount {
    if m.kind != "overlay" {
        return m.clone();
    }
    let lower: Vec<&str> = m
        .options
        .iter()
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|l| l.split(':'))
        .collect();
    match lower.as_slice() {
        [one] => RootMount {
            kind: "bind".into(),
            source: one.to_string(),
            options: vec!["rbind".into(), "ro".into()],
        },
        _ => RootMount {
            kind: m.kind.clone(),
            source: m.source.clone(),
            options: m
                .options
                .iter()
                .filter(|o| !o.starts_with("upperdir=") && !o.starts_with("workdir="))
                .cloned()
                .collect(),
        },
    }
}

/// The ext4 image of the container's root filesystem, built (or found in
/// `cache`) from the create request's `mounts`; with no mounts, from the
/// bundle's `rootfs` directory.
pub fn image_for(bundle: &Path, mounts: &[RootMount], cache: &ImageCache) -> Result<RootfsImage, MountError> {
    let log_build = &mut |p: &Path| tracing::info!("building the root filesystem image {}", p.display());
    match mounts {
        [] => Ok(cache.image_for_dir(&bundle.join("rootfs"), log_build)?),
        [m] => {
            let target = bundle.join(BUILD_MOUNT_DIR);
            std::fs::create_dir_all(&target).map_err(|source| MountError::Dir {
                path: target.clone(),
                source,
            })?;
            let m = &lower_layers_only(m);
            let built = mount_one(m, &target).and_then(|()| {
                let r = cache.image_for_dir(&target, log_build).map_err(MountError::from);
                unmount(&target);
                r
            });
            cleanup_build_mount(bundle);
            built
        }
        more => Err(MountError::TooMany(more.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["index=off", "lowerdir=/a:/b", "rw", "nosuid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = split_options(&opts);
        assert_eq!(flags, libc::MS_RDONLY | libc::MS_NOSUID);
        assert_eq!(data, "index=off,lowerdir=/a:/b");
        let (flags, data) = split_options(&["rbind".to_string(), "ro".to_string()]);
        assert_eq!(flags & libc::MS_BIND, libc::MS_BIND);
        assert!(data.is_empty());
    }
}
