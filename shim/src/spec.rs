//! The parts of the OCI runtime spec (the bundle's `config.json`, and the
//! process of an exec) that the agent takes, parsed with `oci-spec`:
//! containerd writes these, but a field of the wrong shape is an error,
//! not a panic.

use std::collections::HashMap;
use std::path::Path;

use bulkhead_protocol::messages::{
    Capabilities, DeviceNode, DeviceRule, Process, Resources, Rlimit, SeccompProgram, User, MAX_DEVICE_RULES,
};
use oci_spec::runtime::{LinuxCapabilities, LinuxResources, Mount, Spec};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("malformed OCI spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("OCI spec: {0}")]
    Field(String),
}

/// What Create needs from `config.json`.
#[derive(Debug)]
pub struct BundleSpec {
    pub process: Process,
    pub hostname: Option<String>,
    pub annotations: HashMap<String, String>,
    pub resources: Resources,
    /// `root.readonly`.
    pub root_readonly: bool,
    /// `linux.sysctl`, namespaced ones only.
    pub sysctl: std::collections::BTreeMap<String, String>,
    /// `linux.namespaces` entries naming an existing namespace by path.
    pub joins: Vec<NamespaceJoin>,
    /// The annotation [`ANNOTATION_INIT`] asks for a helper init.
    pub helper_init: bool,
    /// `linux.seccomp`, compiled.
    pub seccomp: Option<SeccompProgram>,
    /// `linux.resources.devices`, in order.
    pub device_rules: Vec<DeviceRule>,
    /// `linux.devices`.
    pub device_nodes: Vec<DeviceNode>,
    /// `linux.cgroupsPath`, checked: the host cgroup of the pod's VMM
    /// when this container starts the pod.
    pub cgroups_path: Option<String>,
}

/// Asks for a helper PID 1 that forwards every signal to the workload and
/// reaps orphans (as `docker run --init`); by default the workload is PID
/// 1, as under runc.
pub const ANNOTATION_INIT: &str = "io.bulkhead.init";

/// A namespace kind the guest can share between a pod's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedKind {
    Ipc,
    Uts,
    Pid,
}

impl SharedKind {
    pub fn name(self) -> &'static str {
        match self {
            SharedKind::Ipc => "ipc",
            SharedKind::Uts => "uts",
            SharedKind::Pid => "pid",
        }
    }
}

/// `{"type": kind, "path": "/proc/<pid>/ns/<kind>"}`: join the namespace
/// of the process `pid`, which for a pod is its sandbox container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceJoin {
    pub kind: SharedKind,
    pub pid: u32,
    pub path: String,
}

/// What the operator's configuration lets through.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpecPolicy {
    /// Run containers whose spec names an AppArmor profile or SELinux
    /// label, which the guest (having neither) cannot apply.
    pub ignore_lsm_labels: bool,
}

pub fn read_bundle(bundle: &Path, policy: SpecPolicy) -> Result<BundleSpec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_bundle(&text, policy)
}

pub fn parse_bundle(json: &[u8], policy: SpecPolicy) -> Result<BundleSpec, SpecError> {
    let spec: Spec = serde_json::from_slice(json)?;
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Field("no process".into()))?;
    check_mounts(spec.mounts().as_deref().unwrap_or_default())?;
    refuse_unapplied(&spec, policy)?;
    Ok(BundleSpec {
        process: process(p, policy)?,
        hostname: spec.hostname().clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        resources: spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .map(resources)
            .unwrap_or_default(),
        root_readonly: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
        sysctl: sysctls(&spec)?,
        joins: namespace_joins(&spec)?,
        seccomp: seccomp(json)?,
        device_rules: device_rules(&spec)?,
        device_nodes: device_nodes(&spec)?,
        cgroups_path: cgroups_path(&spec)?,
        helper_init: match spec.annotations().as_ref().and_then(|a| a.get(ANNOTATION_INIT)) {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            Some(v) => {
                return Err(SpecError::Field(format!(
                    "annotation {ANNOTATION_INIT}: {v:?} is neither \"true\" nor \"false\""
                )))
            }
        },
    })
}

/// `linux.resources.devices`, which the guest applies as a cgroup device
/// program. FIFO rules (`p`) are dropped: the device cgroup never checks
/// a FIFO. A negative major or minor is the wildcard.
fn cgroups_path(spec: &Spec) -> Result<Option<String>, SpecError> {
    let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        return Ok(None);
    };
    let text = path
        .to_str()
        .ok_or_else(|| SpecError::Field("linux.cgroupsPath is not UTF-8".into()))?;
    bulkhead_runtime::host_cgroup::relative_path(text)
        .map_err(|e| SpecError::Field(format!("linux.cgroupsPath: {e}")))?;
    Ok(Some(text.to_string()))
}

/// The agent takes at most [`MAX_DEVICE_RULES`] of either list; the
/// message names the field.
fn at_most<T>(list: &[T], field: &str, unit: &str) -> Result<(), SpecError> {
    if list.len() > MAX_DEVICE_RULES {
        return Err(SpecError::Field(format!(
            "{field}: {} {unit}; at most {MAX_DEVICE_RULES}",
            list.len()
        )));
    }
    Ok(())
}

fn device_rules(spec: &Spec) -> Result<Vec<DeviceRule>, SpecError> {
    use oci_spec::runtime::LinuxDeviceType as T;
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    at_most(&devices, "linux.resources.devices", "rules")?;
    let number = |n: Option<i64>, what: &str| -> Result<Option<u32>, SpecError> {
        match n {
            None => Ok(None),
            Some(v) if v < 0 => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| SpecError::Field(format!("linux.resources.devices: {what} {v} is out of range"))),
        }
    };
    let mut rules = Vec::with_capacity(devices.len());
    for d in devices {
        let kind = match d.typ() {
            None | Some(T::A) => 'a',
            Some(T::B) => 'b',
            Some(T::C) | Some(T::U) => 'c',
            Some(T::P) => continue,
        };
        let access = d
            .access()
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "rwm".into());
        let rule = DeviceRule {
            allow: d.allow(),
            kind,
            major: number(d.major(), "major")?,
            minor: number(d.minor(), "minor")?,
            access,
        };
        rule.validate()
            .map_err(|e| SpecError::Field(format!("linux.resources.devices: {e}")))?;
        rules.push(rule);
    }
    Ok(rules)
}

/// `linux.devices`: nodes the guest makes in the container's root. Their
/// numbers name the guest's devices: a host device is not passed through.
fn device_nodes(spec: &Spec) -> Result<Vec<DeviceNode>, SpecError> {
    use oci_spec::runtime::LinuxDeviceType as T;
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    at_most(&devices, "linux.devices", "nodes")?;
    devices
        .iter()
        .map(|d| {
            let path = d.path().to_string_lossy().into_owned();
            let field = |why: String| SpecError::Field(format!("linux.devices: {path}: {why}"));
            let kind = match d.typ() {
                T::C => 'c',
                T::B => 'b',
                T::U => 'u',
                T::P => 'p',
                T::A => return Err(field("type \"a\" is no node type".into())),
            };
            let number = |n: i64| u32::try_from(n).map_err(|_| field(format!("device number {n}")));
            let node = DeviceNode {
                path: path.clone(),
                kind,
                major: number(d.major())?,
                minor: number(d.minor())?,
                file_mode: d.file_mode(),
                uid: d.uid(),
                gid: d.gid(),
            };
            node.validate().map_err(|e| field(e.to_string()))?;
            Ok(node)
        })
        .collect()
}

/// `linux.seccomp` compiled to the BPF program the guest loads. Read from
/// the JSON itself, in the profile's own names, which the compiler maps.
fn seccomp(json: &[u8]) -> Result<Option<SeccompProgram>, SpecError> {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        linux: Option<RawLinux>,
    }
    #[derive(serde::Deserialize)]
    struct RawLinux {
        #[serde(default)]
        seccomp: Option<bulkhead_seccomp::profile::Profile>,
    }
    let raw: Raw = serde_json::from_slice(json)?;
    let Some(profile) = raw.linux.and_then(|l| l.seccomp) else {
        return Ok(None);
    };
    let program = bulkhead_seccomp::compile(&profile).map_err(|e| SpecError::Field(e.to_string()))?;
    if !program.unknown.is_empty() {
        // As runc: a profile written for newer kernels names calls this one lacks.
        tracing::info!(calls = ?program.unknown, "seccomp: not x86_64 system calls here; skipped");
    }
    Ok(Some(SeccompProgram {
        filter: program.filter.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect(),
        flags: program.flags,
    }))
}

/// The `linux.namespaces` entries with a path. A pod's app containers
/// name their sandbox's IPC, UTS (and, when shared, PID) namespaces as
/// `/proc/<sandbox pid>/ns/<kind>`: inside the VM that pid is the guest's,
/// and the container joins them there. The network namespace is the VM's
/// for every container of the pod, so its path is not followed; mount and
/// cgroup namespaces are always the container's own.
fn namespace_joins(spec: &Spec) -> Result<Vec<NamespaceJoin>, SpecError> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let mut joins = Vec::new();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in namespaces {
        let kind = match ns.typ() {
            T::Ipc => SharedKind::Ipc,
            T::Uts => SharedKind::Uts,
            T::Pid => SharedKind::Pid,
            _ => continue,
        };
        let Some(path) = ns.path().as_ref() else { continue };
        let path = path.to_string_lossy().into_owned();
        let pid = path
            .strip_prefix("/proc/")
            .and_then(|rest| rest.strip_suffix(&format!("/ns/{}", kind.name())))
            .and_then(|pid| pid.parse::<u32>().ok())
            .filter(|pid| *pid > 0)
            .ok_or_else(|| {
                SpecError::Field(format!(
                    "linux.namespaces: {} path {path:?}: a sandbox VM can only join the namespace of another \
                     container of its pod, named as /proc/<pid>/ns/{}",
                    kind.name(),
                    kind.name()
                ))
            })?;
        joins.push(NamespaceJoin { kind, pid, path });
    }
    Ok(joins)
}

/// The bundle's annotations alone (empty when unreadable): `start` groups
/// a pod's containers by them before anything else is checked.
pub fn annotations(json: &[u8]) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    serde_json::from_slice::<Annotated>(json)
        .map(|a| a.annotations)
        .unwrap_or_default()
}

/// An exec's process, as containerd sends it (the OCI `process` JSON).
pub fn exec_process(json: &[u8], policy: SpecPolicy) -> Result<Process, SpecError> {
    process(&serde_json::from_slice(json)?, policy)
}

/// Security settings the guest does not apply yet. Running without them
/// would leave the user believing they hold, which is worse than refusing:
/// each is refused here, at Create, by its field's name.
fn refuse_unapplied(spec: &Spec, policy: SpecPolicy) -> Result<(), SpecError> {
    let refuse = |field: &str, why: &str| Err(SpecError::Field(format!("{field}: {why}")));
    let Some(linux) = spec.linux().as_ref() else {
        return Ok(());
    };
    let mapped = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| m.as_ref().is_some_and(|m| !m.is_empty());
    let user_ns = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User);
    if user_ns || mapped(linux.uid_mappings()) || mapped(linux.gid_mappings()) {
        return refuse(
            "linux.uidMappings/gidMappings",
            "user namespaces are not supported in the sandbox's guest (the VM is the boundary)",
        );
    }
    let time_ns = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Time);
    if time_ns || linux.time_offsets().as_ref().is_some_and(|o| !o.is_empty()) {
        return refuse(
            "linux.timeOffsets",
            "time namespaces are not supported in the sandbox's guest (its clocks are the VM's)",
        );
    }
    if linux.net_devices().as_ref().is_some_and(|d| !d.is_empty()) {
        return refuse(
            "linux.netDevices",
            "a host network device cannot be moved into the sandbox's VM",
        );
    }
    if linux.memory_policy().is_some() {
        return refuse("linux.memoryPolicy", "the guest has a single memory node");
    }
    if linux.intel_rdt().is_some() {
        return refuse(
            "linux.intelRdt",
            "cache and memory-bandwidth allocation is the host's to set for the whole VM",
        );
    }
    if let Some(p) = linux.personality() {
        let flags = p.flags().as_ref().is_some_and(|f| !f.is_empty());
        if p.domain() != oci_spec::runtime::LinuxPersonalityDomain::PerLinux || flags {
            return refuse(
                "linux.personality",
                "only the plain LINUX domain without flags: the guest runs x86_64 code only",
            );
        }
    }
    if !policy.ignore_lsm_labels {
        if let Some(label) = linux.mount_label().as_ref().filter(|l| !l.is_empty()) {
            return refuse("linux.mountLabel", &lsm_refusal("SELinux label", label));
        }
    }
    Ok(())
}

/// `linux.sysctl`, refusing any the guest cannot scope to this pod.
fn sysctls(spec: &Spec) -> Result<std::collections::BTreeMap<String, String>, SpecError> {
    let map: std::collections::BTreeMap<String, String> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut global: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|n| !bulkhead_protocol::messages::sysctl_is_namespaced(n))
        .collect();
    if !global.is_empty() {
        global.sort_unstable();
        return Err(SpecError::Field(format!(
            "linux.sysctl: {} not namespaced: in a sandbox VM it would reach every container of the pod \
             (allowed: kernel.shm*, kernel.msg*, kernel.sem, kernel.domainname, fs.mqueue.*, net.*)",
            global.join(", ")
        )));
    }
    Ok(map)
}

fn lsm_refusal(what: &str, value: &str) -> String {
    format!(
        "the {what} {value:?} cannot be applied: the sandbox's guest kernel has no AppArmor or SELinux \
         (set ignore_lsm_labels = true in the runtime's configuration to run without it)"
    )
}

/// The limits of an OCI `LinuxResources` object the agent can apply
/// (memory, pids, cpu quota); a negative value (unlimited) or an absent one
/// is `None`.
pub fn resources(r: &LinuxResources) -> Resources {
    let non_negative = |v: Option<i64>| v.and_then(|l| u64::try_from(l).ok());
    Resources {
        memory_max_bytes: non_negative(r.memory().as_ref().and_then(|m| m.limit())),
        pids_max: non_negative(r.pids().as_ref().map(|p| p.limit())),
        cpu_quota_usec: non_negative(r.cpu().as_ref().and_then(|c| c.quota())),
        cpu_period_usec: r.cpu().as_ref().and_then(|c| c.period()),
    }
}

/// The resources of an `UpdateTaskRequest`: containerd sends the OCI
/// `LinuxResources` as JSON under this type URL.
pub fn update_resources(type_url: &str, value: &[u8]) -> Result<Resources, SpecError> {
    if !type_url.ends_with("opencontainers/runtime-spec/1/LinuxResources") {
        return Err(SpecError::Field(format!("update resources of type {type_url:?}")));
    }
    Ok(resources(&serde_json::from_slice(value)?))
}

/// Files CRI bind-mounts from the host into every container. The guest
/// cannot reach host files, so the container keeps its image's (or the
/// agent's) version of these: they carry no workload data.
const CRI_MANAGED_FILES: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/shm",
    "/dev/termination-log",
];

/// Refuses host bind mounts (volumes): without a file-sharing device the
/// guest cannot see host files, and a workload writing to a volume that is
/// not there would lose its data without a word. The spec's other mounts
/// (proc, sysfs, tmpfs, devpts, ...) are what the agent sets up anyway.
fn check_mounts(mounts: &[Mount]) -> Result<(), SpecError> {
    for m in mounts {
        let options = m.options().as_deref().unwrap_or_default();
        let bind = m.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
        let dest = m.destination().to_string_lossy();
        if !bind || CRI_MANAGED_FILES.contains(&dest.as_ref()) {
            continue;
        }
        let source = m.source().as_ref().map(|s| s.display().to_string()).unwrap_or_default();
        return Err(SpecError::Field(format!(
            "mounts: the host bind mount {source} -> {dest} cannot be honoured: the sandbox VM has no \
             file-sharing device, so host directories and volumes are not supported"
        )));
    }
    Ok(())
}

fn capability_names(set: &Option<oci_spec::runtime::Capabilities>) -> Vec<String> {
    let mut names: Vec<String> = set.iter().flatten().map(|c| format!("CAP_{c}")).collect();
    names.sort();
    names
}

fn capabilities(c: &LinuxCapabilities) -> Capabilities {
    Capabilities {
        bounding: capability_names(c.bounding()),
        effective: capability_names(c.effective()),
        inheritable: capability_names(c.inheritable()),
        permitted: capability_names(c.permitted()),
        ambient: capability_names(c.ambient()),
    }
}

/// An OCI `process` object as the agent's [`Process`].
pub fn process(p: &oci_spec::runtime::Process, policy: SpecPolicy) -> Result<Process, SpecError> {
    if !policy.ignore_lsm_labels {
        if let Some(profile) = p.apparmor_profile().as_ref().filter(|l| !l.is_empty()) {
            return Err(SpecError::Field(format!(
                "process.apparmorProfile: {}",
                lsm_refusal("AppArmor profile", profile)
            )));
        }
        if let Some(label) = p.selinux_label().as_ref().filter(|l| !l.is_empty()) {
            return Err(SpecError::Field(format!(
                "process.selinuxLabel: {}",
                lsm_refusal("SELinux label", label)
            )));
        }
    }
    let unapplied = [
        ("process.scheduler", p.scheduler().is_some()),
        ("process.ioPriority", p.io_priority().is_some()),
        ("process.execCPUAffinity", p.exec_cpu_affinity().is_some()),
    ];
    if let Some((field, _)) = unapplied.iter().find(|(_, set)| *set) {
        return Err(SpecError::Field(format!(
            "{field}: not applied in the sandbox's guest, whose vCPUs and disks the host schedules"
        )));
    }
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::Field("process.args is empty".into()));
    }
    let cwd = p
        .cwd()
        .to_str()
        .ok_or_else(|| SpecError::Field("process.cwd is not UTF-8".into()))?;
    Ok(Process {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: if cwd.is_empty() { "/" } else { cwd }.to_string(),
        user: User {
            uid: p.user().uid(),
            gid: p.user().gid(),
            additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
            umask: p.user().umask(),
        },
        terminal: p.terminal().unwrap_or(false),
        rlimits: p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                kind: r.typ().to_string(),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        capabilities: p.capabilities().as_ref().map(capabilities),
        oom_score_adj: p.oom_score_adj(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_agent_needs() {
        let json = br#"{"ociVersion":"1.0.2","hostname":"h","annotations":{"a":"b"},
            "root":{"path":"rootfs","readonly":true},
            "process":{"args":["sh","-c","true"],"env":["PATH=/bin"],"cwd":"/tmp","terminal":true,
              "user":{"uid":1,"gid":2,"additionalGids":[3],"umask":63},
              "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],
              "capabilities":{"bounding":["CAP_KILL"]}},
            "linux":{"resources":{"memory":{"limit":67108864},"pids":{"limit":-1},
              "devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},
                         {"allow":true,"type":"b","major":-1,"minor":-1,"access":"m"},{"allow":true,"type":"p"}]},
              "devices":[{"path":"/dev/fuse","type":"c","major":10,"minor":229,"fileMode":438,"uid":0,"gid":0}]}}"#;
        let s = parse_bundle(json, SpecPolicy::default()).unwrap();
        assert_eq!(s.process.args, ["sh", "-c", "true"]);
        assert_eq!(s.process.cwd, "/tmp");
        assert!(s.process.terminal);
        assert_eq!(s.process.user.additional_gids, [3]);
        assert_eq!(s.process.user.umask, Some(0o77));
        assert_eq!(s.process.rlimits.len(), 1);
        assert_eq!(s.hostname.as_deref(), Some("h"));
        assert_eq!(s.annotations.get("a").map(String::as_str), Some("b"));
        assert_eq!(s.resources.memory_max_bytes, Some(64 << 20));
        assert_eq!(s.resources.pids_max, None);
        assert_eq!(s.process.capabilities.unwrap().bounding, ["CAP_KILL"]);
        assert_eq!(s.process.rlimits[0].kind, "RLIMIT_NOFILE");
        assert!(s.root_readonly);
        let rules: Vec<String> = s
            .device_rules
            .iter()
            .map(|r| format!("{} {} {:?} {:?} {}", r.allow, r.kind, r.major, r.minor, r.access))
            .collect();
        assert_eq!(
            rules,
            [
                "false a None None rwm",
                "true c Some(1) Some(3) rwm",
                "true b None None m"
            ]
        );
        assert_eq!(s.device_nodes.len(), 1);
        assert_eq!(
            (s.device_nodes[0].kind, s.device_nodes[0].major, s.device_nodes[0].minor),
            ('c', 10, 229)
        );
        let minimal = |p: &str| format!(r#"{{"ociVersion":"1.0.2","process":{p}}}"#).into_bytes();
        let plain = parse_bundle(
            &minimal(r#"{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0}}"#),
            SpecPolicy::default(),
        )
        .unwrap();
        assert!(
            !plain.root_readonly,
            "a spec without root.readonly gets a writable root"
        );
        assert!(parse_bundle(
            &minimal(r#"{"args":[1],"cwd":"/","user":{"uid":0,"gid":0}}"#),
            SpecPolicy::default()
        )
        .is_err());
        assert!(parse_bundle(
            &minimal(r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#),
            SpecPolicy::default()
        )
        .is_err());
        let e = parse_bundle(&minimal(
            r#"{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_WHAT","hard":1,"soft":1}]}"#,
        ), SpecPolicy::default())
        .unwrap_err()
        .to_string();
        assert!(e.contains("RLIMIT_WHAT") || e.contains("variant"), "{e}");
    }

    #[test]
    fn update_resources_come_as_oci_json() {
        let url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
        let r = update_resources(
            url,
            br#"{"memory":{"limit":33554432},"cpu":{"quota":50000,"period":100000}}"#,
        )
        .unwrap();
        assert_eq!(r.memory_max_bytes, Some(32 << 20));
        assert_eq!((r.cpu_quota_usec, r.cpu_period_usec), (Some(50000), Some(100000)));
        assert_eq!(r.pids_max, None, "absent: unchanged");
        assert!(update_resources(url, b"not json").is_err());
        let e = update_resources("example.com/Other", b"{}").unwrap_err().to_string();
        assert!(e.contains("example.com/Other"), "{e}");
    }

    #[test]
    fn host_bind_mounts_are_refused_but_cri_files_pass() {
        let spec = |mounts: &str| {
            format!(r#"{{"ociVersion":"1.0.2","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"mounts":{mounts}}}"#)
                    .into_bytes()
        };
        let ok = spec(
            r#"[{"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/etc/hosts","type":"bind","source":"/var/lib/x/hosts","options":["rbind","ro"]},
                {"destination":"/dev/shm","type":"bind","source":"/run/x/shm","options":["rbind"]}]"#,
        );
        parse_bundle(&ok, SpecPolicy::default()).unwrap();
        let volume = spec(r#"[{"destination":"/data","type":"none","source":"/srv/data","options":["rbind","rw"]}]"#);
        let e = parse_bundle(&volume, SpecPolicy::default()).unwrap_err().to_string();
        assert!(e.contains("/srv/data -> /data") && e.contains("not supported"), "{e}");
        let bind = spec(r#"[{"destination":"/x","type":"bind","source":"/y"}]"#);
        assert!(parse_bundle(&bind, SpecPolicy::default()).is_err());
        assert!(parse_bundle(&spec(r#"{"not":"a list"}"#), SpecPolicy::default()).is_err());
    }

    #[test]
    fn pod_namespaces_are_joined_by_the_pid_in_their_path() {
        let with = |linux: &str, annotations: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"linux":{linux}{annotations}}}"#
            )
            .into_bytes()
        };
        let app = with(
            r#"{"namespaces":[{"type":"network","path":"/var/run/netns/cni-1"},{"type":"ipc","path":"/proc/42/ns/ipc"},
               {"type":"uts","path":"/proc/42/ns/uts"},{"type":"pid"},{"type":"mount"},{"type":"cgroup"}]}"#,
            "",
        );
        let s = parse_bundle(&app, SpecPolicy::default()).unwrap();
        let kinds: Vec<(SharedKind, u32)> = s.joins.iter().map(|j| (j.kind, j.pid)).collect();
        assert_eq!(kinds, [(SharedKind::Ipc, 42), (SharedKind::Uts, 42)]);
        assert!(!s.helper_init);
        for bad in [
            r#"{"namespaces":[{"type":"pid","path":"/proc/42/ns/ipc"}]}"#,
            r#"{"namespaces":[{"type":"ipc","path":"/var/run/ipcns/x"}]}"#,
            r#"{"namespaces":[{"type":"uts","path":"/proc/0/ns/uts"}]}"#,
        ] {
            let e = parse_bundle(&with(bad, ""), SpecPolicy::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("linux.namespaces") && e.contains("/proc/<pid>/ns/"), "{e}");
        }
        let init = with("{}", r#","annotations":{"io.bulkhead.init":"true"}"#);
        assert!(parse_bundle(&init, SpecPolicy::default()).unwrap().helper_init);
        let e = parse_bundle(
            &with("{}", r#","annotations":{"io.bulkhead.init":"yes"}"#),
            SpecPolicy::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(ANNOTATION_INIT), "{e}");
    }

    #[test]
    fn security_fields_not_applied_are_refused_by_name() {
        let with = |linux: &str, process_extra: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}{process_extra}}},"linux":{linux}}}"#
            )
            .into_bytes()
        };
        let refused = |json: Vec<u8>, policy: SpecPolicy| parse_bundle(&json, policy).unwrap_err().to_string();
        let strict = SpecPolicy::default();
        let e = refused(with(r#"{"seccomp":{"defaultAction":"SCMP_ACT_NOTIFY"}}"#, ""), strict);
        assert!(e.contains("linux.seccomp") && e.contains("SCMP_ACT_NOTIFY"), "{e}");
        let ok = parse_bundle(&with(r#"{"seccomp":{"defaultAction":"SCMP_ACT_ERRNO"}}"#, ""), strict).unwrap();
        assert!(ok.seccomp.is_some_and(|p| !p.filter.is_empty()));
        let global = r#"{"sysctl":{"kernel.panic":"1","vm.swappiness":"9","net.core.somaxconn":"9"}}"#;
        let e = refused(with(global, ""), strict);
        assert!(
            e.contains("linux.sysctl: kernel.panic, vm.swappiness not namespaced"),
            "{e}"
        );
        let scoped = with(r#"{"sysctl":{"kernel.shmmax":"1","net.core.somaxconn":"9"}}"#, "");
        let ok = parse_bundle(&scoped, strict).unwrap();
        assert_eq!(ok.sysctl.len(), 2);
        assert_eq!(ok.sysctl["kernel.shmmax"], "1");
        let e = refused(with(r#"{"namespaces":[{"type":"user"}]}"#, ""), strict);
        assert!(e.contains("uidMappings") && e.contains("not supported"), "{e}");
        let e = refused(with(r#"{"personality":{"domain":"LINUX32"}}"#, ""), strict);
        assert!(e.contains("linux.personality"), "{e}");
        parse_bundle(&with(r#"{"personality":{"domain":"LINUX"}}"#, ""), strict).unwrap();
        let e = refused(with(r#"{"namespaces":[{"type":"time"}]}"#, ""), strict);
        assert!(e.contains("linux.timeOffsets") && e.contains("not supported"), "{e}");
        let e = refused(
            with(r#"{"timeOffsets":{"monotonic":{"secs":1,"nanosecs":0}}}"#, ""),
            strict,
        );
        assert!(e.contains("linux.timeOffsets"), "{e}");
        let e = refused(with(r#"{"intelRdt":{"closID":"guaranteed"}}"#, ""), strict);
        assert!(e.contains("linux.intelRdt"), "{e}");
        let e = refused(with(r#"{"netDevices":{"eth1":{"name":"net1"}}}"#, ""), strict);
        assert!(e.contains("linux.netDevices"), "{e}");
        let e = refused(with(r#"{"memoryPolicy":{"mode":"MPOL_BIND","nodes":"0"}}"#, ""), strict);
        assert!(e.contains("linux.memoryPolicy"), "{e}");
        let e = refused(
            with("{}", r#","scheduler":{"policy":"SCHED_FIFO","priority":50}"#),
            strict,
        );
        assert!(e.contains("process.scheduler"), "{e}");
        let e = refused(
            with("{}", r#","ioPriority":{"class":"IOPRIO_CLASS_RT","priority":0}"#),
            strict,
        );
        assert!(e.contains("process.ioPriority"), "{e}");
        let e = refused(
            with(r#"{"uidMappings":[{"containerID":0,"hostID":1000,"size":1}]}"#, ""),
            strict,
        );
        assert!(e.contains("uidMappings"), "{e}");
        let apparmor = with("{}", r#","apparmorProfile":"cri-containerd.apparmor.d""#);
        let e = refused(apparmor.clone(), strict);
        assert!(
            e.contains("process.apparmorProfile") && e.contains("ignore_lsm_labels"),
            "{e}"
        );
        let e = refused(
            with("{}", r#","selinuxLabel":"system_u:system_r:container_t:s0""#),
            strict,
        );
        assert!(e.contains("process.selinuxLabel"), "{e}");
        let e = refused(
            with(r#"{"mountLabel":"system_u:object_r:container_file_t:s0"}"#, ""),
            strict,
        );
        assert!(e.contains("linux.mountLabel"), "{e}");
        let lenient = SpecPolicy {
            ignore_lsm_labels: true,
        };
        parse_bundle(&apparmor, lenient).unwrap();
        // Empty values are what a spec without the setting often carries.
        parse_bundle(
            &with(r#"{"sysctl":{},"mountLabel":""}"#, r#","apparmorProfile":"""#),
            strict,
        )
        .unwrap();
        let e = exec_process(
            br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"apparmorProfile":"p"}"#,
            strict,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("process.apparmorProfile"), "{e}");
    }

    #[test]
    fn oom_score_adj_is_passed_on() {
        let json = br#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0},"oomScoreAdj":-998}}"#;
        assert_eq!(
            parse_bundle(json, SpecPolicy::default()).unwrap().process.oom_score_adj,
            Some(-998)
        );
    }
}
