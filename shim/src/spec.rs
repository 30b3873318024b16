//! The parts of the OCI runtime spec (the bundle's `config.json`, and the
//! process of an exec) that the agent takes, parsed with `oci-spec`:
//! containerd writes these, but a field of the wrong shape is an error,
//! not a panic.

use std::collections::HashMap;
use std::path::Path;

use bulkhead_protocol::messages::{Capabilities, Process, Resources, Rlimit, User};
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
}

pub fn read_bundle(bundle: &Path) -> Result<BundleSpec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_bundle(&text)
}

pub fn parse_bundle(json: &[u8]) -> Result<BundleSpec, SpecError> {
    let spec: Spec = serde_json::from_slice(json)?;
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Field("no process".into()))?;
    check_mounts(spec.mounts().as_deref().unwrap_or_default())?;
    Ok(BundleSpec {
        process: process(p)?,
        hostname: spec.hostname().clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        resources: spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .map(resources)
            .unwrap_or_default(),
        root_readonly: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
    })
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
pub fn exec_process(json: &[u8]) -> Result<Process, SpecError> {
    process(&serde_json::from_slice(json)?)
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
pub fn process(p: &oci_spec::runtime::Process) -> Result<Process, SpecError> {
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
              "user":{"uid":1,"gid":2,"additionalGids":[3]},
              "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],
              "capabilities":{"bounding":["CAP_KILL"]}},
            "linux":{"resources":{"memory":{"limit":67108864},"pids":{"limit":-1}}}}"#;
        let s = parse_bundle(json).unwrap();
        assert_eq!(s.process.args, ["sh", "-c", "true"]);
        assert_eq!(s.process.cwd, "/tmp");
        assert!(s.process.terminal);
        assert_eq!(s.process.user.additional_gids, [3]);
        assert_eq!(s.process.rlimits.len(), 1);
        assert_eq!(s.hostname.as_deref(), Some("h"));
        assert_eq!(s.annotations.get("a").map(String::as_str), Some("b"));
        assert_eq!(s.resources.memory_max_bytes, Some(64 << 20));
        assert_eq!(s.resources.pids_max, None);
        assert_eq!(s.process.capabilities.unwrap().bounding, ["CAP_KILL"]);
        assert_eq!(s.process.rlimits[0].kind, "RLIMIT_NOFILE");
        assert!(s.root_readonly);
        let minimal = |p: &str| format!(r#"{{"ociVersion":"1.0.2","process":{p}}}"#).into_bytes();
        let plain = parse_bundle(&minimal(r#"{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0}}"#)).unwrap();
        assert!(
            !plain.root_readonly,
            "a spec without root.readonly gets a writable root"
        );
        assert!(parse_bundle(&minimal(r#"{"args":[1],"cwd":"/","user":{"uid":0,"gid":0}}"#)).is_err());
        assert!(parse_bundle(&minimal(r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#)).is_err());
        let e = parse_bundle(&minimal(
            r#"{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_WHAT","hard":1,"soft":1}]}"#,
        ))
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
        parse_bundle(&ok).unwrap();
        let volume = spec(r#"[{"destination":"/data","type":"none","source":"/srv/data","options":["rbind","rw"]}]"#);
        let e = parse_bundle(&volume).unwrap_err().to_string();
        assert!(e.contains("/srv/data -> /data") && e.contains("not supported"), "{e}");
        let bind = spec(r#"[{"destination":"/x","type":"bind","source":"/y"}]"#);
        assert!(parse_bundle(&bind).is_err());
        assert!(parse_bundle(&spec(r#"{"not":"a list"}"#)).is_err());
    }
}
