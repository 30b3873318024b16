//! Requests, responses, and the OCI runtime-spec subset they carry. Every
//! message is checked by [`Request::validate`] before the agent acts on it:
//! identifiers, paths, counts and sizes are bounded, so a hostile or buggy
//! host cannot make the agent do something surprising.

use serde::{Deserialize, Serialize};

pub const MAX_ID_LEN: usize = 64;
pub const MAX_ARGS_BYTES: usize = 128 * 1024;
pub const MAX_ENV_ENTRIES: usize = 4096;
pub const MAX_LIST_ENTRIES: usize = 256;
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_ADDITIONAL_GIDS: usize = 64;
/// A reseed carries at least a full 256-bit seed.
pub const MIN_ENTROPY_BYTES: usize = 32;
pub const MAX_ENTROPY_BYTES: usize = 256;

/// Mount types a container may ask for; block-device roots come separately.
/// `volume` is a copied-in volume (see [`crate::volume`]), named by its id
/// as the source.
pub const MOUNT_TYPES: &[&str] = &[
    "tmpfs", "proc", "sysfs", "devpts", "mqueue", "cgroup2", "bind", "volume",
];

/// Rlimits by their OCI names.
pub const RLIMITS: &[&str] = &[
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// The process's umask; `None`: 0o022, as runc gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// The OCI `process` object, as far as a sandbox honours it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default = "root_dir")]
    pub cwd: String,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// OCI `process.oomScoreAdj`, -1000 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
}

/// The range the kernel accepts for `/proc/PID/oom_score_adj`.
pub const OOM_SCORE_ADJ_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

fn root_dir() -> String {
    "/".into()
}

impl Default for Process {
    /// What serde fills in for absent fields, so `..Default::default()`
    /// and a sparse JSON request mean the same process.
    fn default() -> Self {
        Process {
            args: Vec::new(),
            env: Vec::new(),
            cwd: root_dir(),
            user: User::default(),
            terminal: false,
            rlimits: Vec::new(),
            no_new_privileges: false,
            capabilities: None,
            oom_score_adj: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
}

/// The container's root: a guest block device, mounted read-only under an
/// overlay whose writable layer lives in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// `/dev/vdX`.
    pub device: String,
    /// `ext4` or `erofs`.
    pub fstype: String,
    /// The image's size in bytes, when the host just gave the device this
    /// image (a disk's image can change while the guest runs): the agent
    /// waits until the device reports it and drops the device's cached
    /// blocks before mounting.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// OCI `root.readonly`: the container's `/` is mounted read-only
    /// (its other mounts keep their own options). Left out when false, so
    /// such a request reads the same to an agent that predates the field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

/// The process's stdio: tokens of streams the host attached beforehand
/// (see the `stdio` module); `None` is /dev/null. A terminal uses the
/// stdout stream both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioTokens {
    pub stdin: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
}

impl StdioTokens {
    pub fn validate(&self, terminal: bool) -> Result<(), ValidationError> {
        let named: Vec<(&str, &String)> = [
            ("stdio.stdin", &self.stdin),
            ("stdio.stdout", &self.stdout),
            ("stdio.stderr", &self.stderr),
        ]
        .into_iter()
        .filter_map(|(f, t)| t.as_ref().map(|t| (f, t)))
        .collect();
        for (i, (field, token)) in named.iter().enumerate() {
            check_token(field, token)?;
            if named[..i].iter().any(|(_, t)| t == token) {
                return Err(invalid(field, "names a stream another stdio entry names"));
            }
        }
        if terminal && (self.stdin.is_some() || self.stderr.is_some()) {
            return Err(invalid(
                "stdio",
                "a terminal uses one stream, stdout, for both directions",
            ));
        }
        Ok(())
    }
}

/// cgroup v2 limits for the container; `None` leaves a limit unset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `memory.max`, in bytes.
    #[serde(default)]
    pub memory_max_bytes: Option<u64>,
    /// `pids.max`.
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// `cpu.max`: quota and period in microseconds.
    #[serde(default)]
    pub cpu_quota_usec: Option<u64>,
    #[serde(default)]
    pub cpu_period_usec: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    pub id: String,
    #[serde(default)]
    pub hostname: Option<String>,
    pub root: Root,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    pub process: Process,
    #[serde(default)]
    pub stdio: StdioTokens,
    #[serde(default)]
    pub resources: Resources,
    /// OCI `linux.sysctl`: namespaced ones only ([`sysctl_is_namespaced`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sysctl: std::collections::BTreeMap<String, String>,
    /// Namespaces joined from another container of the pod instead of
    /// made new, as a pod's app containers join its sandbox's.
    #[serde(default, skip_serializing_if = "SharedNamespaces::is_empty")]
    pub join: SharedNamespaces,
    /// A helper init as PID 1 that reaps and forwards every signal; by
    /// default the workload is PID 1 of its namespace, as under runc.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// OCI `linux.seccomp`, compiled on the host: loaded for the workload
    /// and for every exec in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompProgram>,
    /// OCI `linux.resources.devices`, in order (a later rule wins); empty
    /// leaves device access to the mounts alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_rules: Vec<DeviceRule>,
    /// OCI `linux.devices`: nodes made in the container's root (numbers
    /// name the guest's devices; no host device is passed through).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNode {
    pub path: String,
    /// 'c', 'b', 'u' (unbuffered character) or 'p' (FIFO).
    pub kind: char,
    pub major: u32,
    pub minor: u32,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

impl DeviceNode {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_path("device_nodes.path", &self.path)?;
        if !"cbup".contains(self.kind) {
            return Err(invalid(
                "device_nodes.kind",
                format!("{:?}: one of c, b, u, p", self.kind),
            ));
        }
        if self.file_mode.is_some_and(|m| m > 0o7777) {
            return Err(invalid(
                "device_nodes.file_mode",
                "permission bits only (at most 0o7777)",
            ));
        }
        Ok(())
    }
}

/// One device cgroup rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    pub allow: bool,
    /// 'a' (any), 'b' (block) or 'c' (character).
    pub kind: char,
    /// `None` matches any.
    #[serde(default)]
    pub major: Option<u32>,
    #[serde(default)]
    pub minor: Option<u32>,
    /// Some of "rwm": read, write, mknod.
    pub access: String,
}

/// Device rules one container may carry.
pub const MAX_DEVICE_RULES: usize = 256;

impl DeviceRule {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !"abc".contains(self.kind) {
            return Err(invalid("device_rules.kind", format!("{:?}: one of a, b, c", self.kind)));
        }
        let mut seen = String::new();
        for ch in self.access.chars() {
            if !"rwm".contains(ch) || seen.contains(ch) {
                return Err(invalid(
                    "device_rules.access",
                    format!("{:?}: some of r, w, m", self.access),
                ));
            }
            seen.push(ch);
        }
        if seen.is_empty() {
            return Err(invalid("device_rules.access", "empty"));
        }
        Ok(())
    }
}

/// A classic BPF seccomp program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompProgram {
    /// `struct sock_filter`s: (code, jt, jf, k).
    pub filter: Vec<(u16, u8, u8, u32)>,
    /// `SECCOMP_FILTER_FLAG_LOG` (2) and `SECCOMP_FILTER_FLAG_SPEC_ALLOW` (4).
    #[serde(default)]
    pub flags: u32,
}

/// `BPF_MAXINSNS`.
pub const MAX_SECCOMP_INSNS: usize = 4096;
const SECCOMP_FLAGS: u32 = 2 | 4;

impl SeccompProgram {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.filter.is_empty() || self.filter.len() > MAX_SECCOMP_INSNS {
            return Err(invalid(
                "seccomp.filter",
                format!("{} instructions; 1 to {MAX_SECCOMP_INSNS}", self.filter.len()),
            ));
        }
        if self.flags & !SECCOMP_FLAGS != 0 {
            return Err(invalid(
                "seccomp.flags",
                format!("{:#x}: only LOG and SPEC_ALLOW", self.flags),
            ));
        }
        Ok(())
    }
}

/// For each namespace kind, the container whose namespace to join; `None`
/// gives the container a new one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedNamespaces {
    #[serde(default)]
    pub ipc: Option<String>,
    #[serde(default)]
    pub uts: Option<String>,
    #[serde(default)]
    pub pid: Option<String>,
}

impl SharedNamespaces {
    pub fn is_empty(&self) -> bool {
        self.ipc.is_none() && self.uts.is_none() && self.pid.is_none()
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        check_optional_id("join.ipc", &self.ipc)?;
        check_optional_id("join.uts", &self.uts)?;
        check_optional_id("join.pid", &self.pid)
    }
}

/// Sysctls of the container's own IPC and UTS namespaces, and `net.*`,
/// which belong to the network namespace its pod (the VM) shares, as
/// Kubernetes' pod-level sysctls do. Anything else would reach every
/// container of the VM, and is refused.
/// Sysctls one container may set.
pub const MAX_SYSCTLS: usize = 64;

pub fn sysctl_is_namespaced(name: &str) -> bool {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let well_formed = !name.is_empty()
        && name.len() <= 128
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    well_formed
        && (IPC.contains(&name)
            || name == "kernel.domainname"
            || name.starts_with("fs.mqueue.")
            || name.starts_with("net."))
}

// One request per operation, built and serialized at once: its size never
// multiplies, so boxing Create would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Create {
        container: CreateContainer,
    },
    Start {
        container_id: String,
    },
    Exec {
        container_id: String,
        exec_id: String,
        process: Process,
        stdio: StdioTokens,
    },
    /// `exec_id: None` is the container's init; `all` signals every process.
    Signal {
        container_id: String,
        exec_id: Option<String>,
        signal: i32,
        all: bool,
    },
    Wait {
        container_id: String,
        exec_id: Option<String>,
    },
    ResizeTty {
        container_id: String,
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    CloseStdin {
        container_id: String,
        exec_id: Option<String>,
    },
    Stats {
        container_id: String,
    },
    /// Changes a running container's limits; the ones left `None` stay.
    Update {
        container_id: String,
        resources: Resources,
    },
    ListProcesses {
        container_id: String,
    },
    /// Makes a guest restored from a snapshot unique and current before it
    /// runs anything: mixes fresh host entropy (hex) into the guest's random
    /// pool and forces a reseed, sets the wall clock, and drops cached disk
    /// blocks (a restore may give a disk a new image).
    Reseed {
        entropy: String,
        realtime_ns: u64,
    },
    /// Forgets a stopped container: its mounts, cgroup and status go.
    Delete {
        container_id: String,
    },
    /// Fills copied-in volume `volume_id` (made by its first message, on a
    /// guest tmpfs); `seal` makes it read-only and mountable, and ends it.
    Volume {
        volume_id: String,
        entries: Vec<crate::volume::VolumeEntry>,
        #[serde(default)]
        seal: bool,
    },
    /// Blocks until a container is killed for running out of memory.
    NextOomEvent,
    Shutdown,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub memory_current_bytes: u64,
    pub memory_max_bytes: Option<u64>,
    pub pids_current: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Invalid,
    NotFound,
    AlreadyExists,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Ok,
    Started {
        pid: u32,
    },
    /// The exit status as a shell reports it: the code, or 128 + signal.
    Exited {
        status: i32,
    },
    Stats {
        stats: Stats,
    },
    Processes {
        pids: Vec<u32>,
    },
    Oom {
        container_id: String,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// The shell convention for a wait status: the exit code, or 128 + the
/// signal that killed the process.
pub fn exit_status(code: Option<i32>, signal: Option<i32>) -> i32 {
    match (code, signal) {
        (Some(c), _) => c & 0xff,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

/// Hex digits in a stdio token: 128 random bits.
pub const TOKEN_HEX_LEN: usize = 32;

/// A stdio token as the host makes them: [`TOKEN_HEX_LEN`] lowercase hex
/// digits (see the `stdio` module).
pub fn check_token(field: &str, token: &str) -> Result<(), ValidationError> {
    if token.len() != TOKEN_HEX_LEN || !token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid(field, format!("must be {TOKEN_HEX_LEN} lowercase hex digits")));
    }
    Ok(())
}

fn invalid(field: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_id(field: &str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(invalid(field, format!("must be 1 to {MAX_ID_LEN} characters")));
    }
    if id.starts_with('.') || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err(invalid(field, "only letters, digits, '_', '.', '-' (not leading '.')"));
    }
    Ok(())
}

fn check_text(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.contains('\0') {
        return Err(invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

/// An absolute path without `..` components.
fn check_path(field: &str, p: &str) -> Result<(), ValidationError> {
    check_text(field, p)?;
    if !p.starts_with('/') || p.len() > MAX_PATH_LEN {
        return Err(invalid(
            field,
            format!("{p:?} is not an absolute path of at most {MAX_PATH_LEN} bytes"),
        ));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(invalid(field, format!("{p:?} contains '..'")));
    }
    Ok(())
}

fn check_count<T>(field: &str, v: &[T], max: usize) -> Result<(), ValidationError> {
    if v.len() > max {
        return Err(invalid(field, format!("{} entries; at most {max}", v.len())));
    }
    Ok(())
}

fn check_optional_id(field: &str, id: &Option<String>) -> Result<(), ValidationError> {
    id.as_deref().map_or(Ok(()), |i| check_id(field, i))
}

impl Process {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.args.is_empty() {
            return Err(invalid("process.args", "empty"));
        }
        let bytes: usize = self.args.iter().map(|a| a.len() + 1).sum();
        if bytes > MAX_ARGS_BYTES {
            return Err(invalid(
                "process.args",
                format!("{bytes} bytes; at most {MAX_ARGS_BYTES}"),
            ));
        }
        for a in &self.args {
            check_text("process.args", a)?;
        }
        check_count("process.env", &self.env, MAX_ENV_ENTRIES)?;
        for e in &self.env {
            check_text("process.env", e)?;
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() => {}
                _ => return Err(invalid("process.env", format!("{e:?} is not KEY=VALUE"))),
            }
        }
        check_path("process.cwd", &self.cwd)?;
        check_count(
            "process.user.additional_gids",
            &self.user.additional_gids,
            MAX_ADDITIONAL_GIDS,
        )?;
        if let Some(mask) = self.user.umask.filter(|m| *m > 0o777) {
            return Err(invalid(
                "process.user.umask",
                format!("{mask:#o} has bits beyond 0o777"),
            ));
        }
        if let Some(adj) = self.oom_score_adj.filter(|a| !OOM_SCORE_ADJ_RANGE.contains(a)) {
            return Err(invalid("process.oomScoreAdj", format!("{adj} is outside -1000..=1000")));
        }
        check_count("process.rlimits", &self.rlimits, RLIMITS.len())?;
        for r in &self.rlimits {
            if !RLIMITS.contains(&r.kind.as_str()) {
                return Err(invalid("process.rlimits", format!("unknown rlimit {:?}", r.kind)));
            }
            if r.soft > r.hard {
                return Err(invalid(
                    "process.rlimits",
                    format!("{}: soft limit above hard limit", r.kind),
                ));
            }
        }
        if let Some(c) = &self.capabilities {
            for set in [&c.bounding, &c.effective, &c.inheritable, &c.permitted, &c.ambient] {
                check_count("process.capabilities", set, 64)?;
                for cap in set.iter() {
                    let name = cap.strip_prefix("CAP_").unwrap_or("");
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                        return Err(invalid(
                            "process.capabilities",
                            format!("{cap:?} is not a capability name"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl CreateContainer {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("id", &self.id)?;
        if let Some(h) = &self.hostname {
            if h.is_empty() || h.len() > 64 || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
                return Err(invalid("hostname", format!("{h:?} is not a valid host name")));
            }
        }
        check_path("root.device", &self.root.device)?;
        if !self.root.device.starts_with("/dev/vd") {
            return Err(invalid("root.device", "must be a virtio block device (/dev/vdX)"));
        }
        if !["ext4", "erofs"].contains(&self.root.fstype.as_str()) {
            return Err(invalid(
                "root.fstype",
                format!("{:?}: only ext4 and erofs", self.root.fstype),
            ));
        }
        check_count("mounts", &self.mounts, MAX_LIST_ENTRIES)?;
        for m in &self.mounts {
            check_path("mounts.destination", &m.destination)?;
            if !MOUNT_TYPES.contains(&m.kind.as_str()) {
                return Err(invalid(
                    "mounts.type",
                    format!("{:?} is not one of {MOUNT_TYPES:?}", m.kind),
                ));
            }
            check_text("mounts.source", &m.source)?;
            if m.kind == crate::volume::VOLUME_MOUNT_TYPE {
                check_id("mounts.source (a volume id)", &m.source)?;
            }
            check_count("mounts.options", &m.options, 64)?;
            for o in &m.options {
                check_text("mounts.options", o)?;
            }
        }
        check_count("masked_paths", &self.masked_paths, MAX_LIST_ENTRIES)?;
        check_count("readonly_paths", &self.readonly_paths, MAX_LIST_ENTRIES)?;
        for p in self.masked_paths.iter().chain(&self.readonly_paths) {
            check_path("masked_paths/readonly_paths", p)?;
        }
        self.resources.validate()?;
        self.join.validate()?;
        if let Some(p) = &self.seccomp {
            p.validate()?;
        }
        check_count("device_rules", &self.device_rules, MAX_DEVICE_RULES)?;
        for r in &self.device_rules {
            r.validate()?;
        }
        check_count("device_nodes", &self.device_nodes, MAX_DEVICE_RULES)?;
        for d in &self.device_nodes {
            d.validate()?;
        }
        if self.hostname.is_some() && self.join.uts.is_some() {
            return Err(invalid(
                "hostname",
                "set in a UTS namespace joined from another container; the owner of the namespace sets it",
            ));
        }
        if self.sysctl.len() > MAX_SYSCTLS {
            return Err(invalid(
                "sysctl",
                format!("{} entries; at most {MAX_SYSCTLS}", self.sysctl.len()),
            ));
        }
        for (name, value) in &self.sysctl {
            if !sysctl_is_namespaced(name) {
                return Err(invalid(
                    "sysctl",
                    format!("{name:?} is not a namespaced sysctl this sandbox can set for one pod"),
                ));
            }
            if value.is_empty() || value.len() > 256 || value.bytes().any(|b| b == 0 || b == b'\n') {
                return Err(invalid(
                    "sysctl",
                    format!("{name}: a value of 1 to 256 bytes on one line"),
                ));
            }
        }
        self.stdio.validate(self.process.terminal)?;
        self.process.validate()
    }
}

impl Resources {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.memory_max_bytes.is_some_and(|m| m < 1 << 20) {
            return Err(invalid("resources.memory_max_bytes", "below 1 MiB"));
        }
        if self.pids_max == Some(0) {
            return Err(invalid("resources.pids_max", "must be at least 1"));
        }
        match (self.cpu_quota_usec, self.cpu_period_usec) {
            (None, None) => Ok(()),
            (Some(q), Some(p)) if (1000..=1_000_000).contains(&p) && q >= 1000 => Ok(()),
            _ => Err(invalid(
                "resources.cpu_quota_usec",
                "quota (at least 1000) and period (1000 to 1000000) go together",
            )),
        }
    }
}

impl Request {
    /// Checks every field before the agent acts on the request.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Request::Create { container } => container.validate(),
            Request::Update {
                container_id,
                resources,
            } => {
                check_id("container_id", container_id)?;
                resources.validate()
            }
            Request::Volume { volume_id, entries, .. } => {
                check_id("volume_id", volume_id)?;
                check_count("entries", entries, crate::volume::MAX_ENTRIES)?;
                entries.iter().try_for_each(crate::volume::VolumeEntry::validate)
            }
            Request::Start { container_id }
            | Request::Delete { container_id }
            | Request::Stats { container_id }
            | Request::ListProcesses { container_id } => check_id("container_id", container_id),
            Request::Exec {
                container_id,
                exec_id,
                process,
                stdio,
            } => {
                check_id("container_id", container_id)?;
                check_id("exec_id", exec_id)?;
                stdio.validate(process.terminal)?;
                process.validate()
            }
            Request::Signal {
                container_id,
                exec_id,
                signal,
                ..
            } => {
                check_id("container_id", container_id)?;
                check_optional_id("exec_id", exec_id)?;
                if !(1..=64).contains(signal) {
                    return Err(invalid("signal", format!("{signal} is not a signal number")));
                }
                Ok(())
            }
            Request::Wait { container_id, exec_id }
            | Request::CloseStdin { container_id, exec_id }
            | Request::ResizeTty {
                container_id, exec_id, ..
            } => {
                check_id("container_id", container_id)?;
                check_optional_id("exec_id", exec_id)
            }
            Request::Reseed { entropy, .. } => {
                let n = entropy.len();
                if !(MIN_ENTROPY_BYTES * 2..=MAX_ENTROPY_BYTES * 2).contains(&n)
                    || n % 2 != 0
                    || !entropy.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(invalid(
                        "entropy",
                        format!("must be {MIN_ENTROPY_BYTES} to {MAX_ENTROPY_BYTES} bytes as hex"),
                    ));
                }
                Ok(())
            }
            Request::NextOomEvent | Request::Shutdown => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> Process {
        Process {
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            rlimits: vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 1024,
                hard: 4096,
            }],
            capabilities: Some(Capabilities {
                bounding: vec!["CAP_CHOWN".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn create() -> CreateContainer {
        CreateContainer {
            id: "ctr-1".into(),
            hostname: Some("sandbox".into()),
            root: Root {
                device: "/dev/vdb".into(),
                fstype: "ext4".into(),
                size_bytes: None,
                readonly: false,
            },
            mounts: vec![Mount {
                destination: "/proc".into(),
                kind: "proc".into(),
                source: "proc".into(),
                options: vec![],
            }],
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            process: process(),
            stdio: StdioTokens {
                stdin: None,
                stdout: Some("0123456789abcdef0123456789abcdef".into()),
                stderr: Some("fedcba9876543210fedcba9876543210".into()),
            },
            sysctl: [("kernel.shmmax".to_string(), "123456".to_string())].into(),
            join: SharedNamespaces {
                ipc: Some("pause".into()),
                uts: None,
                pid: None,
            },
            init: false,
            seccomp: None,
            device_rules: vec![DeviceRule {
                allow: false,
                kind: 'a',
                major: None,
                minor: None,
                access: "rwm".into(),
            }],
            device_nodes: vec![DeviceNode {
                path: "/dev/fuse".into(),
                kind: 'c',
                major: 10,
                minor: 229,
                file_mode: Some(0o666),
                uid: None,
                gid: None,
            }],
            resources: Resources {
                memory_max_bytes: Some(64 << 20),
                pids_max: Some(100),
                cpu_quota_usec: None,
                cpu_period_usec: None,
            },
        }
    }

    #[test]
    fn reseed_wants_enough_hex_entropy() {
        let r = |e: &str| Request::Reseed {
            entropy: e.into(),
            realtime_ns: 1,
        };
        r(&"ab".repeat(32)).validate().unwrap();
        assert!(r(&"ab".repeat(31)).validate().is_err(), "too little");
        assert!(r(&"ab".repeat(257)).validate().is_err(), "too much");
        assert!(r(&"zz".repeat(32)).validate().is_err(), "not hex");
        assert!(r(&format!("{}a", "ab".repeat(32))).validate().is_err(), "odd length");
    }

    #[test]
    fn requests_round_trip_and_validate() {
        let reqs = vec![
            Request::Create { container: create() },
            Request::Start {
                container_id: "ctr-1".into(),
            },
            Request::Exec {
                container_id: "ctr-1".into(),
                exec_id: "e1".into(),
                process: process(),
                stdio: StdioTokens::default(),
            },
            Request::Signal {
                container_id: "ctr-1".into(),
                exec_id: None,
                signal: 9,
                all: true,
            },
            Request::Wait {
                container_id: "ctr-1".into(),
                exec_id: Some("e1".into()),
            },
            Request::ResizeTty {
                container_id: "ctr-1".into(),
                exec_id: None,
                rows: 24,
                cols: 80,
            },
            Request::NextOomEvent,
            Request::Shutdown,
        ];
        for r in reqs {
            r.validate().unwrap();
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r, "{json}");
        }
        let wire = serde_json::to_string(&Request::Shutdown).unwrap();
        assert_eq!(wire, r#"{"op":"shutdown"}"#);
        // root.readonly goes on the wire only when set.
        let mut c = create();
        assert!(!serde_json::to_string(&c.root).unwrap().contains("readonly"));
        c.root.readonly = true;
        let r = Request::Create { container: c };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""readonly":true"#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }

    #[test]
    fn unknown_ops_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"start","container_id":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<Process>(r#"{"args":["a"],"oomScoreAdj":5}"#).is_err());
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let sysctl = |name: &str, value: &str| CreateContainer {
            sysctl: [(name.to_string(), value.to_string())].into(),
            ..create()
        };
        let mut cases: Vec<(CreateContainer, &str)> = vec![
            (sysctl("kernel.panic", "1"), "sysctl"),
            (sysctl("vm.overcommit_memory", "1"), "sysctl"),
            (sysctl("net..x", "1"), "sysctl"),
            (sysctl("net/../../x", "1"), "sysctl"),
            (sysctl("kernel.shmmax", ""), "sysctl"),
            (sysctl("kernel.shmmax", "1\n2"), "sysctl"),
            (
                CreateContainer {
                    id: "../x".into(),
                    ..create()
                },
                "id",
            ),
            (
                CreateContainer {
                    id: "".into(),
                    ..create()
                },
                "id",
            ),
            (
                CreateContainer {
                    id: "a".repeat(65),
                    ..create()
                },
                "id",
            ),
            (
                CreateContainer {
                    hostname: Some("bad host".into()),
                    ..create()
                },
                "hostname",
            ),
            (
                CreateContainer {
                    root: Root {
                        device: "/etc/shadow".into(),
                        fstype: "ext4".into(),
                        size_bytes: None,
                        readonly: false,
                    },
                    ..create()
                },
                "root.device",
            ),
            (
                CreateContainer {
                    root: Root {
                        device: "/dev/vdb".into(),
                        fstype: "nfs".into(),
                        size_bytes: None,
                        readonly: false,
                    },
                    ..create()
                },
                "root.fstype",
            ),
            (
                CreateContainer {
                    mounts: vec![Mount {
                        destination: "/x/../../etc".into(),
                        kind: "tmpfs".into(),
                        source: "".into(),
                        options: vec![],
                    }],
                    ..create()
                },
                "mounts.destination",
            ),
            (
                CreateContainer {
                    mounts: vec![Mount {
                        destination: "/x".into(),
                        kind: "nfs".into(),
                        source: "".into(),
                        options: vec![],
                    }],
                    ..create()
                },
                "mounts.type",
            ),
            (
                CreateContainer {
                    device_rules: vec![DeviceRule {
                        allow: true,
                        kind: 'c',
                        major: Some(1),
                        minor: None,
                        access: "rr".into(),
                    }],
                    ..create()
                },
                "device_rules.access",
            ),
            (
                CreateContainer {
                    device_nodes: vec![DeviceNode {
                        path: "/dev/../etc/x".into(),
                        kind: 'c',
                        major: 1,
                        minor: 3,
                        file_mode: None,
                        uid: None,
                        gid: None,
                    }],
                    ..create()
                },
                "device_nodes.path",
            ),
            (
                CreateContainer {
                    device_rules: vec![DeviceRule {
                        allow: true,
                        kind: 'p',
                        major: None,
                        minor: None,
                        access: "r".into(),
                    }],
                    ..create()
                },
                "device_rules.kind",
            ),
            (
                CreateContainer {
                    seccomp: Some(SeccompProgram {
                        filter: vec![(6, 0, 0, 0x7fff_0000); MAX_SECCOMP_INSNS + 1],
                        flags: 0,
                    }),
                    ..create()
                },
                "seccomp.filter",
            ),
            (
                CreateContainer {
                    seccomp: Some(SeccompProgram {
                        filter: vec![(6, 0, 0, 0x7fff_0000)],
                        flags: 8,
                    }),
                    ..create()
                },
                "seccomp.flags",
            ),
            (
                CreateContainer {
                    join: SharedNamespaces {
                        pid: Some("../x".into()),
                        ..Default::default()
                    },
                    ..create()
                },
                "join.pid",
            ),
            (
                CreateContainer {
                    join: SharedNamespaces {
                        uts: Some("pause".into()),
                        ..Default::default()
                    },
                    ..create()
                },
                "hostname",
            ),
            (
                CreateContainer {
                    masked_paths: vec!["relative".into()],
                    ..create()
                },
                "masked_paths",
            ),
            (
                CreateContainer {
                    readonly_paths: vec!["/a".into(); MAX_LIST_ENTRIES + 1],
                    ..create()
                },
                "readonly_paths",
            ),
        ];
        let token = |s: &str| Some(s.repeat(32));
        let stdio_cases = [
            (
                StdioTokens {
                    stdout: Some("xyz".into()),
                    ..Default::default()
                },
                "stdio.stdout",
            ),
            (
                StdioTokens {
                    stdout: token("a"),
                    stderr: token("a"),
                    ..Default::default()
                },
                "stdio.stderr",
            ),
        ];
        for (stdio, field) in stdio_cases {
            cases.push((CreateContainer { stdio, ..create() }, field));
        }
        let mut tty = create();
        tty.process.terminal = true;
        tty.stdio = StdioTokens {
            stdin: token("b"),
            stdout: token("a"),
            stderr: None,
        };
        cases.push((tty, "stdio"));
        for (c, field) in cases {
            let e = c.validate().unwrap_err();
            assert!(e.field.starts_with(field), "{field}: {e}");
        }
        let pcases: Vec<(Process, &str)> = vec![
            (
                Process {
                    args: vec![],
                    ..process()
                },
                "process.args",
            ),
            (
                Process {
                    args: vec!["a\0b".into()],
                    ..process()
                },
                "process.args",
            ),
            (
                Process {
                    args: vec!["x".repeat(MAX_ARGS_BYTES)],
                    ..process()
                },
                "process.args",
            ),
            (
                Process {
                    env: vec!["NOEQUALS".into()],
                    ..process()
                },
                "process.env",
            ),
            (
                Process {
                    env: vec!["=v".into()],
                    ..process()
                },
                "process.env",
            ),
            (
                Process {
                    cwd: "tmp".into(),
                    ..process()
                },
                "process.cwd",
            ),
            (
                Process {
                    oom_score_adj: Some(1001),
                    ..process()
                },
                "process.oomScoreAdj",
            ),
            (
                Process {
                    oom_score_adj: Some(-1001),
                    ..process()
                },
                "process.oomScoreAdj",
            ),
            (
                Process {
                    rlimits: vec![Rlimit {
                        kind: "RLIMIT_BOGUS".into(),
                        soft: 1,
                        hard: 1,
                    }],
                    ..process()
                },
                "process.rlimits",
            ),
            (
                Process {
                    rlimits: vec![Rlimit {
                        kind: "RLIMIT_NOFILE".into(),
                        soft: 2,
                        hard: 1,
                    }],
                    ..process()
                },
                "process.rlimits",
            ),
            (
                Process {
                    capabilities: Some(Capabilities {
                        effective: vec!["chown".into()],
                        ..Default::default()
                    }),
                    ..process()
                },
                "process.capabilities",
            ),
            (
                Process {
                    user: User {
                        additional_gids: vec![1; 65],
                        ..Default::default()
                    },
                    ..process()
                },
                "process.user",
            ),
            (
                Process {
                    user: User {
                        umask: Some(0o1022),
                        ..Default::default()
                    },
                    ..process()
                },
                "process.user.umask",
            ),
        ];
        for (p, field) in pcases {
            let e = p.validate().unwrap_err();
            assert!(e.field.starts_with(field), "{field}: {e}");
        }
        let sig = Request::Signal {
            container_id: "a".into(),
            exec_id: None,
            signal: 0,
            all: false,
        };
        assert_eq!(sig.validate().unwrap_err().field, "signal");
        let ex = Request::Exec {
            container_id: "a".into(),
            exec_id: "../e".into(),
            process: process(),
            stdio: StdioTokens::default(),
        };
        assert_eq!(ex.validate().unwrap_err().field, "exec_id");
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Ok,
            Response::Started { pid: 42 },
            Response::Exited { status: 137 },
            Response::Stats {
                stats: Stats {
                    cpu_usage_usec: 1,
                    memory_current_bytes: 2,
                    memory_max_bytes: None,
                    pids_current: 3,
                },
            },
            Response::Processes { pids: vec![1, 2] },
            Response::Oom {
                container_id: "c".into(),
            },
            Response::Error {
                kind: ErrorKind::NotFound,
                message: "no such container".into(),
            },
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), r, "{json}");
        }
    }

    #[test]
    fn exit_status_convention() {
        assert_eq!(exit_status(Some(3), None), 3);
        assert_eq!(exit_status(None, Some(9)), 137);
        assert_eq!(exit_status(Some(256 + 7), None), 7);
    }
}
