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
            return Err(serde::de::Error::custom(
                "expected \"stdout\", \"off\" or a file path",
            ));
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
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path}: field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
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
        }
    }

    /// Parses JSON text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Parse {
                path: origin.to_path_buf(),
                field: if field == "." {
                    "(top level)".into()
                } else {
                    field
                },
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
                format!(
                    "{} is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB})",
                    self.mem_mib
                ),
            ));
        }
        if let Some(cmdline) = &self.cmdline {
            if cmdline
                .bytes()
                .any(|b| b == 0 || !(b.is_ascii_graphic() || b == b' '))
            {
                return Err(invalid(
                    "cmdline",
                    "only printable ASCII and spaces are allowed",
                ));
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
        Ok(())
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
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
            let err = VmConfig::from_json(text, Path::new("c.json"))
                .unwrap_err()
                .to_string();
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
            (
                VmConfig {
                    vcpus: 0,
                    ..ok.clone()
                },
                "`vcpus`",
            ),
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
    fn serial_parsing() {
        assert_eq!(
            "stdout".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdout
        );
        assert_eq!("off".parse::<SerialOutput>().unwrap(), SerialOutput::Off);
        assert_eq!(
            "/var/log/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/var/log/x".into())
        );
    }
}
