//! VM configuration: from the command line, from a JSON file, or both
//! (flags override the file). Every value is checked before any VM exists,
//! and an error names the field it is about.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::arch::cpu_template::CpuTemplate;
use crate::arch::layout::CMDLINE_MAX_SIZE;
use crate::arch::mptable;
pub use crate::devices::virtio::block::BlockConfig;
pub use crate::devices::virtio::vsock::VsockConfig;

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u32 = 128;
/// Upper bound from the MP table, which must describe every vCPU.
pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEM_MIB: u32 = 16;
pub const MAX_MEM_MIB: u32 = 256 * 1024;

const _: () = assert!(MAX_VCPUS <= mptable::MAX_CPUS);

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    #[default]
    Stdout,
    File(PathBuf),
    Off,
}

impl FromStr for SerialOutput {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" => SerialOutput::Stdout,
            "off" => SerialOutput::Off,
            path => SerialOutput::File(PathBuf::from(path)),
        })
    }
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => f.write_str("stdout"),
            SerialOutput::Off => f.write_str("off"),
            SerialOutput::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom("expected \"stdout\", \"off\" or a file path"));
        }
        Ok(s.parse().unwrap_or_default())
    }
}

/// Everything needed to boot one VM. The JSON form uses the same names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The user's kernel command line; `None` means the default one.
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u32,
    #[serde(default)]
    pub serial: SerialOutput,
    /// `None`: chosen from the host kind.
    #[serde(default)]
    pub cpu_template: Option<CpuTemplate>,
    /// Ends the VM with an error after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// virtio-blk disks, in order: the first is /dev/vda.
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    /// virtio-vsock with its host-side Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng, fed from the host's getrandom.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// The control API's Unix socket (HTTP with JSON bodies).
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}

/// Virtio devices the VMM can place (I/O APIC pins 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Parses `PATH[,ro]` (the `--disk` syntax).
pub fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    let (path, flags) = match s.rsplit_once(',') {
        Some((p, f)) if f == "ro" || f == "rw" => (p, Some(f)),
        _ => (s, None),
    };
    if path.is_empty() {
        return Err("expected PATH[,ro]".into());
    }
    Ok(BlockConfig {
        path: PathBuf::from(path),
        read_only: flags == Some("ro"),
    })
}

/// Parses `CID,UDS_PATH` (the `--vsock` syntax).
pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (cid, path) = s.split_once(',').ok_or("expected CID,UDS_PATH")?;
    let guest_cid = cid.parse::<u32>().map_err(|e| format!("CID {cid:?}: {e}"))?;
    if path.is_empty() {
        return Err("expected CID,UDS_PATH".into());
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: PathBuf::from(path),
    })
}

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_mem_mib() -> u32 {
    DEFAULT_MEM_MIB
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("invalid `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl VmConfig {
    /// A configuration with defaults around a kernel path.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            serial: SerialOutput::Stdout,
            cpu_template: None,
            timeout_secs: None,
            disks: Vec::new(),
            vsock: None,
            rng: true,
            api_socket: None,
        }
    }

    /// Parses JSON text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Parse {
                path: origin.to_path_buf(),
                field: if field == "." { "(top level)".into() } else { field },
                message: e.into_inner().to_string(),
            }
        })
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Checks every value; files must exist and be regular files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is out of range (1 to {MAX_VCPUS})", self.vcpus),
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(invalid(
                "mem_mib",
                format!("{} is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB})", self.mem_mib),
            ));
        }
        if let Some(cmdline) = &self.cmdline {
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
        if let SerialOutput::File(p) = &self.serial {
            if p.is_dir() {
                return Err(invalid("serial", format!("{} is a directory", p.display())));
            }
        }
        if self.timeout_secs == Some(0) {
            return Err(invalid("timeout_secs", "must be at least 1 second"));
        }
        for disk in &self.disks {
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
        let devices = self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.rng);
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "disks",
                format!("{devices} virtio devices; at most {MAX_VIRTIO_DEVICES}"),
            ));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(invalid(
                    "vsock",
                    format!("guest CID {} is reserved (use 3 to {})", v.guest_cid, u32::MAX - 1),
                ));
            }
            check_socket_path("vsock", &v.uds_path)?;
        }
        if let Some(api) = &self.api_socket {
            check_socket_path("api_socket", api)?;
            if self.vsock.as_ref().is_some_and(|v| v.uds_path == *api) {
                return Err(invalid("api_socket", "the vsock device already uses this path"));
            }
        }
        Ok(())
    }
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
    fn json_with_defaults() {
        let c = VmConfig::from_json(r#"{"kernel": "/k"}"#, Path::new("c.json")).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
    }

    #[test]
    fn json_full() {
        let text = r#"{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","vcpus":2,
            "mem_mib":256,"serial":"/tmp/s.log","cpu_template":"pvm","timeout_secs":30}"#;
        let c = VmConfig::from_json(text, Path::new("c.json")).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.serial, SerialOutput::File("/tmp/s.log".into()));
        assert_eq!(c.cpu_template, Some(CpuTemplate::Pvm));
        assert_eq!(c.timeout_secs, Some(30));
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (r#"{"kernel":"/k","vcpus":"two"}"#, "vcpus"),
            (r#"{"kernel":"/k","vcpus":300}"#, "vcpus"),
            (r#"{"kernel":"/k","cpu_template":"t2"}"#, "cpu_template"),
            (r#"{"kernel":"/k","serial":""}"#, "serial"),
            (r#"{"kernel":"/k","mem_mb":1}"#, "mem_mb"),
        ];
        for (text, field) in cases {
            let err = VmConfig::from_json(text, Path::new("c.json")).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        let err = VmConfig::from_json(r#"{"vcpus":1}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let k = kernel_file();
        let ok = VmConfig::new(k.path());
        ok.validate().unwrap();
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
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn disk_and_vsock_flags() {
        assert_eq!(
            parse_disk("/img").unwrap(),
            BlockConfig {
                path: "/img".into(),
                read_only: false
            }
        );
        assert_eq!(
            parse_disk("/img,ro").unwrap(),
            BlockConfig {
                path: "/img".into(),
                read_only: true
            }
        );
        assert_eq!(parse_disk("/a,b").unwrap().path, PathBuf::from("/a,b"));
        assert!(parse_disk(",ro").is_err());
        let v = parse_vsock("3,/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert!(parse_vsock("x,/tmp/v").is_err());
        assert!(parse_vsock("3").is_err());
        assert!(parse_vsock("3,").is_err());
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
        ok.validate().unwrap();
        let missing = VmConfig {
            disks: vec![BlockConfig {
                path: "/nonexistent".into(),
                read_only: false,
            }],
            ..ok.clone()
        };
        assert!(missing.validate().unwrap_err().to_string().contains("`disks`"));
        let too_many = VmConfig {
            disks: vec![ok.disks[0].clone(); 19],
            ..ok.clone()
        };
        assert!(too_many.validate().unwrap_err().to_string().contains("at most"));
        for cid in [0, 1, 2, u32::MAX] {
            let c = VmConfig {
                vsock: Some(VsockConfig {
                    guest_cid: cid,
                    uds_path: "/tmp/bh-x.sock".into(),
                }),
                ..ok.clone()
            };
            assert!(c.validate().unwrap_err().to_string().contains("`vsock`"), "cid {cid}");
        }
        let exists = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: disk.path().into(),
            }),
            ..ok.clone()
        };
        assert!(exists.validate().unwrap_err().to_string().contains("already exists"));
        let json = r#"{"kernel":"/k","disks":[{"path":"/d","read_only":true}],"vsock":{"guest_cid":3,"uds_path":"/v"},"rng":false}"#;
        let c = VmConfig::from_json(json, Path::new("c.json")).unwrap();
        assert_eq!(c.disks.len(), 1);
        assert!(!c.rng);
        let err = VmConfig::from_json(
            r#"{"kernel":"/k","disks":[{"path":"/d","readonly":true}]}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("disks[0]"), "{err}");
    }

    #[test]
    fn api_socket_is_validated_and_read_from_json() {
        let k = kernel_file();
        let dir = tempfile::tempdir().unwrap();
        let ok = VmConfig {
            api_socket: Some(dir.path().join("api.sock")),
            ..VmConfig::new(k.path())
        };
        ok.validate().unwrap();
        for (path, says) in [
            (k.path().to_path_buf(), "already exists"),
            (dir.path().join("none/api.sock"), "does not exist"),
        ] {
            let c = VmConfig {
                api_socket: Some(path),
                ..ok.clone()
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("`api_socket`") && err.contains(says), "{err}");
        }
        let clash = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.path().join("api.sock"),
            }),
            ..ok.clone()
        };
        assert!(clash
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vsock device already uses"));
        let c = VmConfig::from_json(r#"{"kernel":"/k","api_socket":"/run/a.sock"}"#, Path::new("c.json")).unwrap();
        assert_eq!(c.api_socket, Some(PathBuf::from("/run/a.sock")));
    }

    #[test]
    fn serial_parsing() {
        assert_eq!("stdout".parse::<SerialOutput>().unwrap(), SerialOutput::Stdout);
        assert_eq!("off".parse::<SerialOutput>().unwrap(), SerialOutput::Off);
        assert_eq!(
            "/var/log/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/var/log/x".into())
        );
    }
}
