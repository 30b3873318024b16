//! Where the guest kernel, the initramfs (with the agent) and the VMM are:
//! a command-line flag, then an environment variable, then a file next to
//! the running executable (where `scripts/setup` puts them), then the
//! installed layout relative to it (`../lib/bulkhead/`, where the Debian
//! package puts them under `/usr`). Relative, not `/usr/lib/bulkhead`
//! itself, so a package unpacked into any root finds its own files.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    Kernel,
    Initramfs,
    Vmm,
}

impl Artifact {
    pub fn flag(self) -> &'static str {
        match self {
            Artifact::Kernel => "--kernel",
            Artifact::Initramfs => "--initramfs",
            Artifact::Vmm => "--vmm",
        }
    }

    pub fn env_var(self) -> &'static str {
        match self {
            Artifact::Kernel => "BULKHEAD_KERNEL",
            Artifact::Initramfs => "BULKHEAD_INITRAMFS",
            Artifact::Vmm => "BULKHEAD_VMM",
        }
    }

    /// The file name looked for next to the executable.
    pub fn file_name(self) -> &'static str {
        match self {
            Artifact::Kernel => "vmlinux",
            Artifact::Initramfs => "initramfs.cpio",
            Artifact::Vmm => "bulkhead-vmm",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Artifact::Kernel => "guest kernel",
            Artifact::Initramfs => "initramfs (guest agent)",
            Artifact::Vmm => "VMM (bulkhead-vmm)",
        }
    }
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PathError {
    #[error("{what} not found; looked at: {}", looked.join("; "))]
    NotFound { what: Artifact, looked: Vec<String> },
    #[error("{what}: {path} (from {origin}) is not a readable file")]
    Missing {
        what: Artifact,
        path: PathBuf,
        origin: String,
    },
}

/// The installed artifacts, relative to the parent of the executables'
/// directory (`/usr/bin` → `/usr/lib/bulkhead`).
pub const INSTALLED_DIR: &str = "lib/bulkhead";

/// Paths the user gave on the command line; `None` means "look for it".
#[derive(Clone, Debug, Default)]
pub struct ArtifactFlags {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
}

impl ArtifactFlags {
    fn get(&self, what: Artifact) -> Option<&Path> {
        match what {
            Artifact::Kernel => self.kernel.as_deref(),
            Artifact::Initramfs => self.initramfs.as_deref(),
            Artifact::Vmm => self.vmm.as_deref(),
        }
    }
}

/// Everything a sandbox boots from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

impl Artifacts {
    pub fn locate(flags: &ArtifactFlags) -> Result<Artifacts, PathError> {
        Ok(Artifacts {
            kernel: locate(Artifact::Kernel, flags)?,
            initramfs: locate(Artifact::Initramfs, flags)?,
            vmm: locate(Artifact::Vmm, flags)?,
        })
    }
}

/// The directory of the running executable, with symlinks resolved so a
/// `bulkhead` linked into ~/bin still finds its siblings.
fn exe_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    exe.parent().map(Path::to_path_buf)
}

pub fn locate(what: Artifact, flags: &ArtifactFlags) -> Result<PathBuf, PathError> {
    locate_in(
        what,
        flags.get(what),
        std::env::var_os(what.env_var()).map(PathBuf::from),
        exe_dir().as_deref(),
    )
}

/// Where the package keeps its artifacts, for executables in `exe_dir`
/// (canonical, so its parent is the real one).
pub fn installed_dir(exe_dir: &Path) -> PathBuf {
    exe_dir.parent().unwrap_or(exe_dir).join(INSTALLED_DIR)
}

/// The search itself, with its inputs explicit for tests. A flag or
/// variable that names a missing file is an error at once: falling through
/// to another file would boot something the user did not ask for.
pub fn locate_in(
    what: Artifact,
    flag: Option<&Path>,
    env: Option<PathBuf>,
    exe_dir: Option<&Path>,
) -> Result<PathBuf, PathError> {
    let check = |path: &Path, origin: String| {
        if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(PathError::Missing {
                what,
                path: path.to_path_buf(),
                origin,
            })
        }
    };
    if let Some(p) = flag {
        return check(p, what.flag().to_string());
    }
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        return check(&p, format!("${}", what.env_var()));
    }
    let mut looked = vec![
        format!("{} (not given)", what.flag()),
        format!("${} (not set)", what.env_var()),
    ];
    let Some(dir) = exe_dir else {
        looked.push("next to the executable (its location is unknown)".into());
        return Err(PathError::NotFound { what, looked });
    };
    for (p, who) in [
        (dir.join(what.file_name()), "scripts/setup"),
        (installed_dir(dir).join(what.file_name()), "the package"),
    ] {
        if p.is_file() {
            return Ok(p);
        }
        looked.push(format!("{} (missing; {who} puts it there)", p.display()));
    }
    Err(PathError::NotFound { what, looked })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_then_env_then_exe_dir() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("vmlinux"));
        for p in [&a, &b, &c] {
            std::fs::write(p, b"x").unwrap();
        }
        let k = Artifact::Kernel;
        assert_eq!(locate_in(k, Some(&a), Some(b.clone()), Some(d.path())).unwrap(), a);
        assert_eq!(locate_in(k, None, Some(b.clone()), Some(d.path())).unwrap(), b);
        assert_eq!(locate_in(k, None, None, Some(d.path())).unwrap(), c);
        assert_eq!(locate_in(k, None, Some(PathBuf::new()), Some(d.path())).unwrap(), c);
    }

    #[test]
    fn installed_layout_after_the_exe_dir() {
        let d = tempfile::tempdir().unwrap();
        let (bin, lib) = (d.path().join("usr/bin"), d.path().join("usr/lib/bulkhead"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("initramfs.cpio"), b"x").unwrap();
        let got = locate_in(Artifact::Initramfs, None, None, Some(&bin)).unwrap();
        assert_eq!(got, lib.join("initramfs.cpio"));
        std::fs::write(bin.join("initramfs.cpio"), b"x").unwrap();
        assert_eq!(
            locate_in(Artifact::Initramfs, None, None, Some(&bin)).unwrap(),
            bin.join("initramfs.cpio")
        );
        let e = locate_in(Artifact::Kernel, None, None, Some(&bin))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("usr/lib/bulkhead/vmlinux (missing; the package puts it there)"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_every_place() {
        let d = tempfile::tempdir().unwrap();
        let e = locate_in(Artifact::Initramfs, None, None, Some(d.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--initramfs (not given)"), "{e}");
        assert!(e.contains("$BULKHEAD_INITRAMFS (not set)"), "{e}");
        assert!(e.contains("initramfs.cpio (missing"), "{e}");
        let e = locate_in(Artifact::Vmm, None, Some(d.path().join("nope")), Some(d.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("from $BULKHEAD_VMM"), "{e}");
        let e = locate_in(Artifact::Kernel, Some(d.path()), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("from --kernel") && e.contains("not a readable file"), "{e}");
    }
}
