//! Checks a VM configuration against what this VMM can do before any VM
//! exists; every error names the field. The configuration types
//! themselves are the VMM's interface (`bulkhead_vmm_api::config`).

use std::path::Path;

pub use bulkhead_vmm_api::config::*;

use crate::arch::layout::CMDLINE_MAX_SIZE;
use crate::arch::mptable;

/// Upper bound from the MP table, which must describe every vCPU.
pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEM_MIB: u32 = 16;
pub const MAX_MEM_MIB: u32 = 256 * 1024;

const _: () = assert!(MAX_VCPUS <= mptable::MAX_CPUS);

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, message)
}

/// Checks every value; files must exist and be regular files.
pub fn validate(c: &VmConfig) -> Result<(), ConfigError> {
    check_file("kernel", &c.kernel)?;
    if let Some(initrd) = &c.initrd {
        check_file("initrd", initrd)?;
    }
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        return Err(invalid(
            "vcpus",
            format!("{} is out of range (1 to {MAX_VCPUS})", c.vcpus),
        ));
    }
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&c.mem_mib) {
        return Err(invalid(
            "mem_mib",
            format!("{} is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB})", c.mem_mib),
        ));
    }
    if let Some(cmdline) = &c.cmdline {
        if cmdline.bytes().any(|b| b == 0 || !(b.is_ascii_graphic() || b == b' ')) {
            return Err(invalid("cmdline", "only printable ASCII and spaces are allowed"));
        }
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(invalid(
                "cmdline",
                format!(
                    "{} bytes is too long (the limit is {})",
                    cmdline.len(),
                    CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
    }
    if let SerialOutput::File(p) = &c.serial {
        if p.is_dir() {
            return Err(invalid("serial", format!("{} is a directory", p.display())));
        }
    }
    if c.timeout_secs == Some(0) {
        return Err(invalid("timeout_secs", "must be at least 1 second"));
    }
    for disk in &c.disks {
        match std::fs::metadata(&disk.path) {
            Ok(m) if m.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
            Ok(_) => {
                return Err(invalid(
                    "disks",
                    format!("{} is not a file or block device", disk.path.display()),
                ))
            }
            Err(e) => return Err(invalid("disks", format!("{}: {e}", disk.path.display()))),
        }
    }
    let devices = c.devices().count();
    if devices > MAX_VIRTIO_DEVICES {
        return Err(invalid(
            "disks",
            format!("{devices} virtio devices; at most {MAX_VIRTIO_DEVICES}"),
        ));
    }
    if let Some(v) = &c.vsock {
        if v.guest_cid < 3 || v.guest_cid == u32::MAX {
            return Err(invalid(
                "vsock",
                format!("guest CID {} is reserved (use 3 to {})", v.guest_cid, u32::MAX - 1),
            ));
        }
        check_socket_path("vsock", &v.uds_path)?;
    }
    if let Some(api) = &c.api_socket {
        check_socket_path("api_socket", api)?;
        if c.vsock.as_ref().is_some_and(|v| v.uds_path == *api) {
            return Err(invalid("api_socket", "the vsock device already uses this path"));
        }
    }
    Ok(())
}

/// A socket path the VMM will create: it must not exist (not even as a
/// stale socket, which may belong to another VMM), in a directory that does.
fn check_socket_path(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(invalid(field, format!("{} already exists", path.display())));
    }
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => Ok(()),
        _ => Err(invalid(
            field,
            format!("the directory of {} does not exist", path.display()),
        )),
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a regular file", path.display()))),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn kernel_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF").unwrap();
        f
    }

    #[test]
    fn validation_names_the_field() {
        let k = kernel_file();
        let ok = VmConfig::new(k.path());
        validate(&ok).unwrap();
        let cases: Vec<(VmConfig, &str)> = vec![
            (VmConfig { vcpus: 0, ..ok.clone() }, "`vcpus`"),
            (
                VmConfig {
                    vcpus: 33,
                    ..ok.clone()
                },
                "`vcpus`",
            ),
            (
                VmConfig {
                    mem_mib: 1,
                    ..ok.clone()
                },
                "`mem_mib`",
            ),
            (
                VmConfig {
                    kernel: "/nonexistent/k".into(),
                    ..ok.clone()
                },
                "`kernel`",
            ),
            (
                VmConfig {
                    kernel: "/".into(),
                    ..ok.clone()
                },
                "`kernel`",
            ),
            (
                VmConfig {
                    initrd: Some("/nonexistent".into()),
                    ..ok.clone()
                },
                "`initrd`",
            ),
            (
                VmConfig {
                    cmdline: Some("a\nb".into()),
                    ..ok.clone()
                },
                "`cmdline`",
            ),
            (
                VmConfig {
                    cmdline: Some("x".repeat(4096)),
                    ..ok.clone()
                },
                "`cmdline`",
            ),
            (
                VmConfig {
                    timeout_secs: Some(0),
                    ..ok.clone()
                },
                "`timeout_secs`",
            ),
            (
                VmConfig {
                    serial: SerialOutput::File("/".into()),
                    ..ok.clone()
                },
                "`serial`",
            ),
        ];
        for (c, field) in cases {
            let err = validate(&c).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn device_validation_names_the_field() {
        let k = kernel_file();
        let disk = kernel_file();
        let ok = VmConfig {
            disks: vec![BlockConfig {
                path: disk.path().into(),
                read_only: true,
            }],
            ..VmConfig::new(k.path())
        };
        validate(&ok).unwrap();
        let missing = VmConfig {
            disks: vec![BlockConfig {
                path: "/nonexistent".into(),
                read_only: false,
            }],
            ..ok.clone()
        };
        assert!(validate(&missing).unwrap_err().to_string().contains("`disks`"));
        let too_many = VmConfig {
            disks: vec![ok.disks[0].clone(); 19],
            ..ok.clone()
        };
        assert!(validate(&too_many).unwrap_err().to_string().contains("at most"));
        for cid in [0, 1, 2, u32::MAX] {
            let c = VmConfig {
                vsock: Some(VsockConfig {
                    guest_cid: cid,
                    uds_path: "/tmp/bh-x.sock".into(),
                }),
                ..ok.clone()
            };
            assert!(validate(&c).unwrap_err().to_string().contains("`vsock`"), "cid {cid}");
        }
        let exists = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: disk.path().into(),
            }),
            ..ok.clone()
        };
        assert!(validate(&exists).unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn api_socket_is_validated() {
        let k = kernel_file();
        let dir = tempfile::tempdir().unwrap();
        let ok = VmConfig {
            api_socket: Some(dir.path().join("api.sock")),
            ..VmConfig::new(k.path())
        };
        validate(&ok).unwrap();
        for (path, says) in [
            (k.path().to_path_buf(), "already exists"),
            (dir.path().join("none/api.sock"), "does not exist"),
        ] {
            let c = VmConfig {
                api_socket: Some(path),
                ..ok.clone()
            };
            let err = validate(&c).unwrap_err().to_string();
            assert!(err.contains("`api_socket`") && err.contains(says), "{err}");
        }
        let clash = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.path().join("api.sock"),
            }),
            ..ok.clone()
        };
        assert!(validate(&clash)
            .unwrap_err()
            .to_string()
            .contains("vsock device already uses"));
    }
}
