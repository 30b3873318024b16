//! The runtime's TOML configuration, the runtime options containerd passes
//! (`runtimeoptions.v1.Options`, which names the configuration file), and
//! the per-pod overrides allowed through annotations. Every field has a
//! default: with no file at the default path the shim runs on the
//! defaults, and finds its artifacts the way the CLI does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulkhead_runtime::paths::{self, Artifact, ArtifactFlags, Artifacts, PathError};
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
    #[error("configuration {path}: {field} = {value:?} is not a readable file")]
    MissingArtifact {
        path: PathBuf,
        field: &'static str,
        value: PathBuf,
    },
    #[error(transparent)]
    Artifact(#[from] PathError),
}

/// Where the configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// Named by containerd's runtime options or `BULKHEAD_SHIM_CONFIG`:
    /// it must exist.
    Named(PathBuf),
    /// [`DEFAULT_CONFIG_PATH`], which may be absent.
    Default,
}

impl ConfigSource {
    pub fn path(&self) -> &Path {
        match self {
            ConfigSource::Named(p) => p,
            ConfigSource::Default => Path::new(DEFAULT_CONFIG_PATH),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where this configuration was read from, for messages.
    #[serde(skip)]
    pub origin: PathBuf,
    /// The guest kernel (`vmlinux`); unset: found as the CLI finds it.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The agent's initramfs; unset: found as the CLI finds it.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The `bulkhead-vmm` binary; unset: found as the CLI finds it.
    #[serde(default)]
    pub vmm: Option<PathBuf>,
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
    /// Run containers whose spec asks for an AppArmor profile or SELinux
    /// label (the guest has neither) instead of refusing them.
    #[serde(default)]
    pub ignore_lsm_labels: bool,
    /// How long a control call to the guest (signal, delete, stats...) may
    /// go unanswered; a SIGKILL left unanswered ends the VM.
    #[serde(default = "default_agent_timeout_secs")]
    pub agent_timeout_secs: u32,
    /// How long Create, Start or Exec may go unanswered; then the VM is
    /// ended, since the guest's state is no longer known.
    #[serde(default = "default_create_timeout_secs")]
    pub create_timeout_secs: u32,
}

/// Bounds of `agent_timeout_secs` and `create_timeout_secs`.
pub const AGENT_TIMEOUT_SECS: std::ops::RangeInclusive<u32> = 1..=3600;

/// Each disk takes one of the VM's interrupt lines.
pub const MAX_SPARE_DISKS: u8 = 15;

pub use bulkhead_runtime::start::BootMode;

fn default_agent_timeout_secs() -> u32 {
    30
}
fn default_create_timeout_secs() -> u32 {
    bulkhead_runtime::sandbox::DEFAULT_CALL_TIMEOUT.as_secs() as u32
}
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
    /// Reads the configuration; only an absent default file means "use
    /// the defaults". A file that is there but wrong is an error.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let path = source.path();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && *source == ConfigSource::Default => {
                tracing::info!("no configuration file at {}: using the defaults", path.display());
                Self::parse("", path)
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        c.origin = path.to_owned();
        for (field, value) in [
            ("agent_timeout_secs", c.agent_timeout_secs),
            ("create_timeout_secs", c.create_timeout_secs),
        ] {
            if !AGENT_TIMEOUT_SECS.contains(&value) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    reason: format!("{field} = {value}: want 1 to 3600"),
                });
            }
        }
        if c.spare_disks > MAX_SPARE_DISKS {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                reason: format!("spare_disks = {}: at most {MAX_SPARE_DISKS}", c.spare_disks),
            });
        }
        Ok(c)
    }

    /// The kernel, initramfs and VMM: the configured ones, which must
    /// exist, else found as `bulkhead` finds them (`$BULKHEAD_KERNEL`...,
    /// next to the shim, then the installed `../lib/bulkhead/`).
    pub fn artifacts(&self) -> Result<Artifacts, ConfigError> {
        let pick = |what: Artifact, field: &'static str, set: &Option<PathBuf>| match set {
            Some(p) if p.is_file() => Ok(p.clone()),
            Some(p) => Err(ConfigError::MissingArtifact {
                path: self.origin.clone(),
                field,
                value: p.clone(),
            }),
            None => Ok(paths::locate(what, &ArtifactFlags::default())?),
        };
        Ok(Artifacts {
            kernel: pick(Artifact::Kernel, "kernel", &self.kernel)?,
            initramfs: pick(Artifact::Initramfs, "initramfs", &self.initramfs)?,
            vmm: pick(Artifact::Vmm, "vmm", &self.vmm)?,
        })
    }

    pub fn agent_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.agent_timeout_secs.into())
    }

    pub fn create_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.create_timeout_secs.into())
    }

    pub fn spec_policy(&self) -> crate::spec::SpecPolicy {
        crate::spec::SpecPolicy {
            ignore_lsm_labels: self.ignore_lsm_labels,
        }
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
        let e = Config::parse(&format!("{MIN}agent_timeout_secs = 0\n"), Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("agent_timeout_secs = 0"), "{e}");
        let e = Config::parse(&format!("{MIN}create_timeout_secs = 3601\n"), Path::new("c")).unwrap_err();
        assert!(
            e.to_string().contains("create_timeout_secs = 3601: want 1 to 3600"),
            "{e}"
        );
        let e = Config::parse(&format!("{MIN}spare_disks = 16\n"), Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("spare_disks = 16: at most 15"), "{e}");
    }

    #[test]
    fn every_field_has_a_default() {
        let c = Config::parse("", Path::new("c")).unwrap();
        assert_eq!((c.kernel, c.vcpus, c.memory_mib), (None, 1, 256));
        assert_eq!(c.run_dir, PathBuf::from("/run/bulkhead"));
    }

    #[test]
    fn an_absent_named_file_is_an_error_a_wrong_one_names_its_field() {
        let d = tempfile::tempdir().unwrap();
        let named = ConfigSource::Named(d.path().join("absent.toml"));
        let e = Config::load(&named).unwrap_err().to_string();
        assert!(
            e.contains("cannot read the configuration") && e.contains("absent.toml"),
            "{e}"
        );
        let wrong = d.path().join("wrong.toml");
        std::fs::write(&wrong, "kernal = \"/k\"\n").unwrap();
        let e = Config::load(&ConfigSource::Named(wrong.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernal"), "{e}");
        std::fs::write(&wrong, "vcpus = \"two\"\n").unwrap();
        let e = Config::load(&ConfigSource::Named(wrong)).unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
    }

    #[test]
    fn configured_artifacts_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, b"k").unwrap();
        let text = format!("kernel = {k:?}\ninitramfs = {k:?}\nvmm = \"/nonexistent/vmm\"\n");
        let c = Config::parse(&text, Path::new("/etc/b.toml")).unwrap();
        let e = c.artifacts().unwrap_err().to_string();
        assert_eq!(
            e,
            "configuration /etc/b.toml: vmm = \"/nonexistent/vmm\" is not a readable file"
        );
        let text = format!("kernel = {k:?}\ninitramfs = {k:?}\nvmm = {k:?}\n");
        let a = Config::parse(&text, Path::new("c")).unwrap().artifacts().unwrap();
        assert_eq!((a.kernel, a.vmm), (k.clone(), k));
    }

    /// The shipped file, as is and with every setting uncommented, gives
    /// exactly the built-in defaults: its comments cannot drift from them.
    #[test]
    fn the_packaged_config_documents_the_defaults() {
        let shipped = include_str!("../../packaging/config.toml");
        let as_is = Config::parse(shipped, Path::new("config.toml")).unwrap();
        let settings: String = shipped
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .map(|l| format!("{l}\n"))
            .collect();
        // One line for each of the fourteen settings.
        assert_eq!(settings.lines().count(), 14, "{settings}");
        let uncommented = Config::parse(&settings, Path::new("config.toml")).unwrap();
        let defaults = Config::parse("", Path::new("config.toml")).unwrap();
        for c in [&as_is, &uncommented] {
            assert_eq!(
                (c.vcpus, c.memory_mib, c.boot, c.spare_disks),
                (defaults.vcpus, defaults.memory_mib, defaults.boot, defaults.spare_disks)
            );
            assert_eq!(
                (&c.cache_dir, &c.template_dir, &c.run_dir),
                (&defaults.cache_dir, &defaults.template_dir, &defaults.run_dir)
            );
            assert_eq!(c.allowed_annotations, defaults.allowed_annotations);
            assert_eq!(c.ignore_lsm_labels, defaults.ignore_lsm_labels);
            assert_eq!(c.agent_timeout_secs, defaults.agent_timeout_secs);
            assert_eq!(c.create_timeout_secs, defaults.create_timeout_secs);
        }
        assert_eq!(as_is.kernel, None);
        assert_eq!(uncommented.kernel, Some(PathBuf::from("/usr/lib/bulkhead/vmlinux")));
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
