//! The runtime's TOML configuration, the runtime options containerd passes
//! (`runtimeoptions.v1.Options`, which names the configuration file), and
//! the per-pod overrides allowed through annotations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/bulkhead/config.toml";
/// Annotation that sets a pod's vCPUs, when the allow-list names it.
pub const ANNOTATION_VCPUS: &str = "io.bulkhead.vcpus";
/// Annotation that sets a pod's memory in MiB, when the allow-list names it.
pub const ANNOTATION_MEMORY_MIB: &str = "io.bulkhead.memory_mib";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bad configuration {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("annotation {key}={value}: {reason}")]
    Annotation { key: String, value: String, reason: String },
    #[error("bad configuration {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("malformed runtime options: {0}")]
    Options(&'static str),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initramfs: PathBuf,
    /// The `bulkhead-vmm` binary.
    pub vmm: PathBuf,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Root filesystem images, cached by content.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Where the sandboxes' run directories (VMM sockets, console) go.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Annotations a pod may use to override the defaults above.
    #[serde(default)]
    pub allowed_annotations: Vec<String>,
    /// How a pod's VM starts: restored from a sandbox template (the
    /// default) or booted cold.
    #[serde(default)]
    pub boot: BootMode,
    /// Sandbox templates, one per (kernel, initramfs, VMM, vCPUs, memory,
    /// spare disks).
    #[serde(default = "default_template_dir")]
    pub template_dir: PathBuf,
    /// Root images a pod's VM can hold beyond its first container's: each
    /// is a read-only disk, attached while the VM runs (a CRI pod's pause
    /// container and its app containers have different images).
    #[serde(default = "default_spare_disks")]
    pub spare_disks: u8,
}

/// Each disk takes one of the VM's interrupt lines.
pub const MAX_SPARE_DISKS: u8 = 15;

pub use bulkhead_runtime::start::BootMode;

fn default_spare_disks() -> u8 {
    7
}
fn default_vcpus() -> u8 {
    bulkhead_runtime::sandbox::DEFAULT_VCPUS
}
fn default_memory_mib() -> u32 {
    bulkhead_runtime::sandbox::DEFAULT_MEM_MIB
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("/var/lib/bulkhead/rootfs")
}
fn default_template_dir() -> PathBuf {
    PathBuf::from("/var/lib/bulkhead/templates")
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/bulkhead")
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if c.spare_disks > MAX_SPARE_DISKS {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                reason: format!("spare_disks = {}: at most {MAX_SPARE_DISKS}", c.spare_disks),
            });
        }
        Ok(c)
    }

    /// vCPUs and memory for a pod, with the allowed annotations applied.
    pub fn sizing(&self, annotations: &HashMap<String, String>) -> Result<(u8, u32), ConfigError> {
        let mut vcpus = self.vcpus;
        let mut mem = self.memory_mib;
        for (key, value) in annotations {
            if !self.allowed_annotations.iter().any(|a| a == key) {
                continue;
            }
            let bad = |reason: &str| ConfigError::Annotation {
                key: key.clone(),
                value: value.clone(),
                reason: reason.into(),
            };
            match key.as_str() {
                ANNOTATION_VCPUS => {
                    vcpus = value
                        .parse()
                        .ok()
                        .filter(|v| (1..=32).contains(v))
                        .ok_or_else(|| bad("want 1 to 32"))?
                }
                ANNOTATION_MEMORY_MIB => {
                    mem = value
                        .parse()
                        .ok()
                        .filter(|v| (64..=65536).contains(v))
                        .ok_or_else(|| bad("want 64 to 65536 MiB"))?
                }
                _ => {}
            }
        }
        Ok((vcpus, mem))
    }
}

/// The `config_path` field (2) of a `runtimeoptions.v1.Options` message:
/// the crates carry no type for it, and one string field needs no codegen.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, ConfigError> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    let mut rest = value;
    while !rest.is_empty() {
        let (key, r) = varint(rest)?;
        rest = r;
        match key & 7 {
            0 => rest = varint(rest)?.1,
            1 => rest = rest.get(8..).ok_or(ConfigError::Options("truncated fixed64"))?,
            5 => rest = rest.get(4..).ok_or(ConfigError::Options("truncated fixed32"))?,
            2 => {
                let (len, r) = varint(rest)?;
                let len = usize::try_from(len).map_err(|_| ConfigError::Options("length"))?;
                let field = r.get(..len).ok_or(ConfigError::Options("truncated field"))?;
                rest = &r[len..];
                if key >> 3 == 2 && !field.is_empty() {
                    let s = std::str::from_utf8(field).map_err(|_| ConfigError::Options("config_path is not UTF-8"))?;
                    return Ok(Some(PathBuf::from(s)));
                }
            }
            _ => return Err(ConfigError::Options("unknown wire type")),
        }
    }
    Ok(None)
}

fn varint(b: &[u8]) -> Result<(u64, &[u8]), ConfigError> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((v, &b[i + 1..]));
        }
    }
    Err(ConfigError::Options("bad varint"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "kernel = \"/k\"\ninitramfs = \"/i\"\nvmm = \"/v\"\n";

    #[test]
    fn defaults_and_allow_list() {
        let c = Config::parse(
            &format!("{MIN}allowed_annotations = [\"io.bulkhead.vcpus\"]\n"),
            Path::new("c"),
        )
        .unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        let ann: HashMap<String, String> = [
            (ANNOTATION_VCPUS.to_string(), "2".to_string()),
            (ANNOTATION_MEMORY_MIB.to_string(), "999".to_string()),
        ]
        .into();
        // memory_mib is not allowed, so it is ignored.
        assert_eq!(c.sizing(&ann).unwrap(), (2, 256));
        let bad: HashMap<String, String> = [(ANNOTATION_VCPUS.to_string(), "0".to_string())].into();
        assert!(c.sizing(&bad).is_err());
        assert!(Config::parse(&format!("{MIN}bogus = 1\n"), Path::new("c")).is_err());
    }

    #[test]
    fn boot_mode_defaults_to_template() {
        let c = Config::parse(MIN, Path::new("c")).unwrap();
        assert_eq!(c.boot, BootMode::Template);
        assert_eq!(c.template_dir, PathBuf::from("/var/lib/bulkhead/templates"));
        let c = Config::parse(
            &format!("{MIN}boot = \"cold\"\ntemplate_dir = \"/t\"\n"),
            Path::new("c"),
        )
        .unwrap();
        assert_eq!((c.boot, c.template_dir), (BootMode::Cold, PathBuf::from("/t")));
        let e = Config::parse(&format!("{MIN}boot = \"warm\"\n"), Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("boot"), "{e}");
    }

    #[test]
    fn spare_disks_default_and_bound() {
        assert_eq!(Config::parse(MIN, Path::new("c")).unwrap().spare_disks, 7);
        let c = Config::parse(&format!("{MIN}spare_disks = 0\n"), Path::new("c")).unwrap();
        assert_eq!(c.spare_disks, 0);
        let e = Config::parse(&format!("{MIN}spare_disks = 16\n"), Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("spare_disks = 16: at most 15"), "{e}");
    }

    #[test]
    fn runtime_options_config_path() {
        // type_url = "x" (field 1), config_path = "/etc/b.toml" (field 2).
        let mut msg = vec![0x0a, 1, b'x', 0x12, 11];
        msg.extend_from_slice(b"/etc/b.toml");
        let got = config_path_from_options("runtimeoptions.v1.Options", &msg).unwrap();
        assert_eq!(got, Some(PathBuf::from("/etc/b.toml")));
        assert_eq!(config_path_from_options("other", &msg).unwrap(), None);
        assert!(config_path_from_options("runtimeoptions.v1.Options", &[0x12, 50, b'a']).is_err());
    }
}
