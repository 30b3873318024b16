//! The jail a runtime puts `bulkhead-vmm` in (`--jail FILE`): a root of its
//! own that holds only the files it names, and an unprivileged identity
//! the VMM takes before any guest code runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// One host file or directory the jailed VMM sees, at the same absolute
/// path, so the VM configuration needs no rewriting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailPath {
    pub path: PathBuf,
    #[serde(default)]
    pub writable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An empty directory; the jail's root (a tmpfs private to the VMM's
    /// mount namespace) is mounted over it, so nothing shows on the host.
    pub root: PathBuf,
    /// The identity the VMM runs the guest under; a distinct one per
    /// sandbox keeps VMMs from signalling or tracing each other.
    pub uid: u32,
    pub gid: u32,
    /// Everything of the host's file system the VMM may reach, besides
    /// `/dev/kvm`.
    pub paths: Vec<JailPath>,
    /// A pipe's read end whose write end the runtime holds for the VMM's
    /// life. Taking the jail's uid clears the parent-death signal; the VMM
    /// sets it again, and this tells it whether the runtime died first.
    #[serde(default)]
    pub parent_fd: Option<i32>,
    /// The largest file the VMM may write (`RLIMIT_FSIZE`), so that one
    /// that broke out of its device models cannot fill the host's disk
    /// or tmpfs through its console, its log or a snapshot. `None`: as
    /// inherited.
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
}

impl JailConfig {
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        crate::config::from_json_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let j = JailConfig {
            root: "/run/x/root".into(),
            uid: 1_900_000_001,
            gid: 1_900_000_001,
            paths: vec![JailPath {
                path: "/run/x/vm".into(),
                writable: true,
            }],
            parent_fd: Some(3),
            max_file_bytes: Some(8 << 20),
        };
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("jail.json");
        std::fs::write(&f, serde_json::to_vec(&j).unwrap()).unwrap();
        assert_eq!(JailConfig::from_json_file(&f).unwrap(), j);
        std::fs::write(
            &f,
            r#"{"root":"/r","uid":5,"gid":5,"paths":[{"path":"/p","dev":true}]}"#,
        )
        .unwrap();
        let e = JailConfig::from_json_file(&f).unwrap_err().to_string();
        assert!(e.contains("paths[0]") && e.contains("dev"), "{e}");
    }
}
