//! `bulkhead --version`: this binary's version, and which guest kernel and
//! agent it would start, read from the artifacts themselves so a stale
//! install is seen without booting anything.

use std::fmt::Write as _;
use std::path::Path;

use bulkhead_protocol::handshake::{parse_agent_stamp, AGENT_STAMP_PREFIX, PROTOCOL_VERSION};
use bulkhead_runtime::paths::{self, Artifact, ArtifactFlags};

/// Longest kernel key accepted from a `.key` file.
const MAX_KEY_LEN: usize = 64;

/// The report, one fact per line.
pub fn report(flags: &ArtifactFlags) -> String {
    let mut out = format!("bulkhead {} (protocol {PROTOCOL_VERSION})\n", env!("CARGO_PKG_VERSION"));
    match paths::locate(Artifact::Kernel, flags) {
        Ok(k) => {
            let key = kernel_key(&k).unwrap_or_else(|| "unknown (no vmlinux.key beside it)".into());
            let _ = writeln!(out, "kernel: {key} ({})", k.display());
        }
        Err(e) => {
            let _ = writeln!(out, "kernel: {e}");
        }
    }
    match paths::locate(Artifact::Initramfs, flags) {
        Ok(i) => {
            let agent = match std::fs::read(&i) {
                Ok(bytes) => describe_agent(&bytes),
                Err(e) => format!("unreadable: {e}"),
            };
            let _ = writeln!(out, "agent: {agent} ({})", i.display());
        }
        Err(e) => {
            let _ = writeln!(out, "agent: {e}");
        }
    }
    match paths::locate(Artifact::Vmm, flags) {
        Ok(v) => {
            let _ = writeln!(out, "vmm: {}", v.display());
        }
        Err(e) => {
            let _ = writeln!(out, "vmm: {e}");
        }
    }
    out
}

/// The kernel's build key (the cache key `kernel-config/build.sh` gives
/// it): from `<kernel>.key` beside it, as the package installs it, else
/// from the `kernel-<key>` cache directory it lives in.
pub fn kernel_key(kernel: &Path) -> Option<String> {
    let valid = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.len() <= MAX_KEY_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            .then(|| s.to_string())
    };
    let mut side = kernel.as_os_str().to_owned();
    side.push(".key");
    if let Ok(text) = std::fs::read_to_string(&side) {
        return valid(&text);
    }
    let real = std::fs::canonicalize(kernel).ok()?;
    let dir = real.parent()?.file_name()?.to_str()?;
    valid(dir.strip_prefix("kernel-")?)
}

/// The agent an initramfs holds, from the stamp in its binary.
pub fn describe_agent(initramfs: &[u8]) -> String {
    let prefix = AGENT_STAMP_PREFIX.as_bytes();
    let Some(at) = initramfs.windows(prefix.len()).position(|w| w == prefix) else {
        return "unknown (no version stamp: an agent older than this bulkhead?)".into();
    };
    let rest = &initramfs[at + prefix.len()..];
    let end = rest.iter().take(64).position(|&b| b == 0);
    let parsed = end
        .and_then(|end| std::str::from_utf8(&rest[..end]).ok())
        .and_then(parse_agent_stamp);
    match parsed {
        Some((version, protocol)) if protocol == PROTOCOL_VERSION => {
            format!("bulkhead-agent {version} (protocol {protocol})")
        }
        Some((version, protocol)) => format!(
            "bulkhead-agent {version} (protocol {protocol}; this bulkhead speaks {PROTOCOL_VERSION}: rebuild the initramfs)"
        ),
        None => "unknown (malformed version stamp)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stamp_is_found_and_checked() {
        let mut blob = b"\x7fELF....".to_vec();
        blob.extend_from_slice(format!("{AGENT_STAMP_PREFIX}0.1.0;protocol={PROTOCOL_VERSION}\0tail").as_bytes());
        assert_eq!(
            describe_agent(&blob),
            format!("bulkhead-agent 0.1.0 (protocol {PROTOCOL_VERSION})")
        );
        let other = format!("{AGENT_STAMP_PREFIX}9.9.9;protocol={}\0", PROTOCOL_VERSION + 1);
        assert!(describe_agent(other.as_bytes()).contains("rebuild the initramfs"));
        assert!(describe_agent(b"no stamp here").starts_with("unknown (no version stamp"));
        let unterminated = format!("{AGENT_STAMP_PREFIX}0.1.0;protocol=2");
        assert!(describe_agent(unterminated.as_bytes()).contains("malformed"));
    }

    #[test]
    fn kernel_key_from_a_key_file_or_the_cache_directory() {
        let d = tempfile::tempdir().unwrap();
        let cached = d.path().join("kernel-1a2b3c/vmlinux");
        std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
        std::fs::write(&cached, b"k").unwrap();
        let link = d.path().join("vmlinux");
        std::os::unix::fs::symlink(&cached, &link).unwrap();
        assert_eq!(kernel_key(&link).as_deref(), Some("1a2b3c"));
        let installed = d.path().join("lib/vmlinux");
        std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
        std::fs::write(&installed, b"k").unwrap();
        assert_eq!(kernel_key(&installed), None);
        std::fs::write(d.path().join("lib/vmlinux.key"), "feed42\n").unwrap();
        assert_eq!(kernel_key(&installed).as_deref(), Some("feed42"));
        std::fs::write(d.path().join("lib/vmlinux.key"), "../../etc\n").unwrap();
        assert_eq!(kernel_key(&installed), None);
    }
}
