//! A private directory per sandbox for its sockets and logs:
//! `<root>/<pid>-<random>`, mode 0700, with a `pid` file naming the owner.
//! Directories left by a run that was killed (SIGKILL leaves no chance to
//! clean up) are pruned when the next run starts.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::util;

/// `sun_path` holds 108 bytes with the NUL; leave room for
/// `/vm/v.sock_<port>`.
const MAX_DIR_LEN: usize = 107 - "/vm/v.sock_4294967295".len();

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create the run directory under {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "run directory {path} is too long for Unix socket paths ({len} bytes, at most {MAX_DIR_LEN}); \
         set XDG_RUNTIME_DIR to a shorter directory"
    )]
    TooLong { path: PathBuf, len: usize },
    #[error(
        "run directory root {path} is not safe: {why}; it must be a directory (not a link) owned by this user \
         and writable by nobody else"
    )]
    Unsafe { path: PathBuf, why: String },
}

/// The root holds every run's sockets: another user who owns it, or can
/// write to it, could swap a run directory for one of theirs.
fn check_root(root: &Path) -> Result<(), RunDirError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_root = |why: String| RunDirError::Unsafe {
        path: root.to_path_buf(),
        why,
    };
    let md = std::fs::symlink_metadata(root).map_err(|e| unsafe_root(e.to_string()))?;
    if !md.file_type().is_dir() {
        return Err(unsafe_root("not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if md.uid() != uid {
        return Err(unsafe_root(format!("owned by uid {}, not {uid}", md.uid())));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unsafe_root(format!("mode {:o}", md.mode() & 0o7777)));
    }
    Ok(())
}

/// `$XDG_RUNTIME_DIR/bulkhead`, `/run/bulkhead` for root, or a per-user
/// directory under /tmp as the last resort.
pub fn default_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("bulkhead");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/bulkhead")
    } else {
        std::env::temp_dir().join(format!("bulkhead-{uid}"))
    }
}

/// The start time (clock ticks since boot) of a process, which tells a
/// live owner from an unrelated process that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume
    // after the last ')'. starttime is field 22, the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

/// Parses `<pid>-<hex>`.
fn pid_from_name(name: &[u8]) -> Option<u32> {
    let name = std::str::from_utf8(name).ok()?;
    let (pid, rand) = name.split_once('-')?;
    if rand.is_empty() || !rand.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes run directories under `root` whose owner is gone; returns them.
pub fn prune_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return removed;
    };
    for entry in entries.flatten() {
        let Some(name_pid) = pid_from_name(entry.file_name().as_bytes()) else {
            continue;
        };
        if name_pid == std::process::id() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let recorded = std::fs::read_to_string(path.join("pid")).ok();
        let mut fields = recorded.as_deref().unwrap_or("").split_whitespace();
        let pid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(name_pid);
        let started = fields.next().and_then(|s| s.parse().ok());
        if owner_alive(pid, started) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::debug!("removed stale run directory {}", path.display());
                removed.push(path);
            }
            Err(e) => tracing::debug!("cannot remove stale run directory {}: {e}", path.display()),
        }
    }
    removed
}

/// One sandbox's directory; removed on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create(root: &Path) -> Result<RunDir, RunDirError> {
        let create_err = |source| RunDirError::Create {
            path: root.to_path_buf(),
            source,
        };
        let pid = std::process::id();
        let path = root.join(format!("{pid}-{}", util::random_hex(4).map_err(create_err)?));
        let len = path.as_os_str().len();
        if len > MAX_DIR_LEN {
            return Err(RunDirError::TooLong { path, len });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(create_err)?;
        check_root(root)?;
        prune_stale(root);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(create_err)?;
        let dir = RunDir { path };
        let record = match start_time(pid) {
            Some(t) => format!("{pid} {t}\n"),
            None => format!("{pid}\n"),
        };
        std::fs::write(dir.path.join("pid"), record).map_err(create_err)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_or_linked_root_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = RunDir::create(&shared).unwrap_err().to_string();
        assert!(e.contains("mode 777"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        let e = RunDir::create(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let ok = d.path().join("ok");
        RunDir::create(&ok).unwrap();
    }

    #[test]
    fn dead_owners_are_pruned_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let mine = RunDir::create(root.path()).unwrap();
        let mine_path = mine.path().to_path_buf();
        assert!(mine_path.join("pid").is_file());

        // A process that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = root.path().join(format!("{dead}-abcd"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("pid"), format!("{dead} 1\n")).unwrap();
        std::fs::write(stale.join("console.log"), b"x").unwrap();
        // A live pid (init) whose start time does not match: pid reuse.
        let reused = root.path().join("1-beef");
        std::fs::create_dir(&reused).unwrap();
        std::fs::write(reused.join("pid"), "1 999999999999\n").unwrap();
        // A live owner: this process, as another run would record it.
        let live = root.path().join("1-0123");
        std::fs::create_dir(&live).unwrap();
        let me = std::process::id();
        std::fs::write(live.join("pid"), format!("{me} {}\n", start_time(me).unwrap())).unwrap();
        // Not ours at all.
        let other = root.path().join("not-a-run");
        std::fs::create_dir(&other).unwrap();

        let mut removed = prune_stale(root.path());
        removed.sort();
        let mut want = vec![stale.clone(), reused.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(live.is_dir() && other.is_dir() && mine_path.is_dir());
        drop(mine);
        assert!(!mine_path.exists());
    }

    #[test]
    fn names_and_lengths() {
        assert_eq!(pid_from_name(b"123-0af"), Some(123));
        assert_eq!(pid_from_name(b"123-"), None);
        assert_eq!(pid_from_name(b"x-12"), None);
        let long = std::env::temp_dir().join("d".repeat(100));
        assert!(matches!(RunDir::create(&long), Err(RunDirError::TooLong { .. })));
        assert!(!long.exists());
    }
}
