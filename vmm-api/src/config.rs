//! The VM configuration `bulkhead-vmm` takes: from flags, from a JSON
//! file (`--config`), or both (flags override the file); and the
//! configuration of a restore (`--restore-config`). Parsing errors name
//! the field. The VMM checks the values (files exist, limits) before any
//! VM exists.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u32 = 128;
/// What a guest's serial console file may hold on the host; a boot log is
/// about 30 KiB. At the budget the VMM drops the older half.
pub const CONSOLE_MAX_BYTES: u64 = 1 << 20;

/// A named CPU template: which CPUID features the guest sees and which
/// kernel parameters go with them (the VMM holds the tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// The host's features as KVM offers them.
    Host,
    /// For PVM hosts: hides what KVM's instruction emulator cannot run.
    Pvm,
}

impl CpuTemplate {
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::Pvm];

    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Pvm => "pvm",
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown CPU template {0:?}; known templates: host, pvm")]
pub struct UnknownTemplate(pub String);

impl FromStr for CpuTemplate {
    type Err = UnknownTemplate;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuTemplate::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownTemplate(s.to_string()))
    }
}

/// One disk as the user describes it (`--disk PATH[,ro]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// The vsock device as the user describes it (`--vsock CID,UDS_PATH`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// The VM's virtio devices, as one value: a new kind of device is a new
/// field here (and its flag and JSON entry in [`VmConfig`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSet {
    /// virtio-blk disks in order: the first is /dev/vda.
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng, fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
}

impl DeviceSet {
    /// How many virtio devices (each takes an interrupt line).
    pub fn count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.rng)
    }
}

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

impl ConfigError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
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

    /// The virtio devices this configuration asks for.
    pub fn devices(&self) -> DeviceSet {
        DeviceSet {
            disks: self.disks.clone(),
            vsock: self.vsock.clone(),
            rng: self.rng,
        }
    }

    /// Parses JSON text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        from_json(text, origin)
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        from_json_file(path)
    }
}

/// How to start a VM from a snapshot directory (`--restore-config`, or the
/// `--restore DIR` flags). Everything else (vCPUs, memory, devices) comes
/// from the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The directory with the snapshot's state and memory files.
    pub snapshot_dir: PathBuf,
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Replaces the saved vsock device's CID and socket: each restored VM
    /// needs a socket of its own. The guest re-reads its CID after the
    /// transport reset that every restore sends.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub serial: SerialOutput,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Replaces the saved disks' files, one for one, read-only flags equal:
    /// a template booted with a placeholder root serves any root image.
    /// The guest keeps the capacity it read at boot, so a replacement must
    /// not hold data beyond the saved disk's size.
    #[serde(default)]
    pub disks: Option<Vec<BlockConfig>>,
}

impl RestoreConfig {
    pub fn new(snapshot_dir: impl Into<PathBuf>) -> Self {
        RestoreConfig {
            snapshot_dir: snapshot_dir.into(),
            api_socket: None,
            vsock: None,
            serial: SerialOutput::default(),
            timeout_secs: None,
            disks: None,
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        from_json_file(path)
    }
}

/// Parses JSON text naming the offending field; `origin` names the file.
fn from_json<T: serde::de::DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
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

pub(crate) fn from_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    from_json(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (r#"{"kernel":"/k","disks":[{"path":"/d","readonly":true}]}"#, "disks[0]"),
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
    fn devices_and_api_socket_from_json() {
        let json = r#"{"kernel":"/k","disks":[{"path":"/d","read_only":true}],"vsock":{"guest_cid":3,"uds_path":"/v"},"rng":false,"api_socket":"/run/a.sock"}"#;
        let c = VmConfig::from_json(json, Path::new("c.json")).unwrap();
        assert_eq!(c.disks.len(), 1);
        assert!(!c.rng);
        assert_eq!(c.api_socket, Some(PathBuf::from("/run/a.sock")));
    }

    #[test]
    fn restore_config_round_trips_and_names_bad_fields() {
        let d = tempfile::tempdir().unwrap();
        let mut r = RestoreConfig::new("/cache/t1");
        r.disks = Some(vec![BlockConfig {
            path: "/img".into(),
            read_only: true,
        }]);
        r.serial = SerialOutput::File("/run/console".into());
        let path = d.path().join("restore.json");
        std::fs::write(&path, serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(RestoreConfig::from_json_file(&path).unwrap(), r);
        std::fs::write(&path, r#"{"snapshot_dir":"/x","kernel":"/k"}"#).unwrap();
        let err = RestoreConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(err.contains("kernel"), "{err}");
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
    fn serial_and_template_names() {
        assert_eq!("stdout".parse::<SerialOutput>().unwrap(), SerialOutput::Stdout);
        assert_eq!("off".parse::<SerialOutput>().unwrap(), SerialOutput::Off);
        assert_eq!(
            "/var/log/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/var/log/x".into())
        );
        for t in CpuTemplate::ALL {
            assert_eq!(t.name().parse::<CpuTemplate>().unwrap(), t);
        }
        let err = "t2".parse::<CpuTemplate>().unwrap_err().to_string();
        assert!(err.contains("host, pvm"), "{err}");
    }
}
