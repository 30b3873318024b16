//! The parts of the OCI runtime spec (the bundle's `config.json`, and the
//! process of an exec) that the agent takes, read defensively: containerd
//! writes these, but a field of the wrong shape is an error, not a panic.

use std::collections::HashMap;
use std::path::Path;

use bulkhead_protocol::messages::{Capabilities, Process, Resources, Rlimit, User};
use serde_json::Value;

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
    let v: Value = serde_json::from_slice(json)?;
    let process = process(v.get("process").ok_or_else(|| SpecError::Field("no process".into()))?)?;
    let hostname = v.get("hostname").and_then(Value::as_str).map(String::from);
    let annotations = annotations(&v);
    let resources = v.pointer("/linux/resources").map(resources).unwrap_or_default();
    check_mounts(&v)?;
    Ok(BundleSpec {
        process,
        hostname,
        annotations,
        resources,
    })
}

/// The limits of an OCI `LinuxResources` object the agent can apply
/// (memory, pids, cpu quota); a negative value (unlimited) or an absent one
/// is `None`.
pub fn resources(r: &Value) -> Resources {
    let non_negative = |p: &str| r.pointer(p).and_then(Value::as_i64).and_then(|l| u64::try_from(l).ok());
    Resources {
        memory_max_bytes: non_negative("/memory/limit"),
        pids_max: non_negative("/pids/limit"),
        cpu_quota_usec: non_negative("/cpu/quota"),
        cpu_period_usec: r.pointer("/cpu/period").and_then(Value::as_u64),
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
fn check_mounts(v: &Value) -> Result<(), SpecError> {
    let Some(mounts) = v.get("mounts") else {
        return Ok(());
    };
    let mounts = mounts
        .as_array()
        .ok_or_else(|| SpecError::Field("mounts: not a list".into()))?;
    for m in mounts {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
        let options = strings(m.get("options"), "mounts[].options")?;
        let bind = kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if !bind {
            continue;
        }
        let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
        if CRI_MANAGED_FILES.contains(&dest) {
            continue;
        }
        let source = m.get("source").and_then(Value::as_str).unwrap_or("");
        return Err(SpecError::Field(format!(
            "mounts: the host bind mount {source} -> {dest} cannot be honoured: the sandbox VM has no \
             file-sharing device, so host directories and volumes are not supported"
        )));
    }
    Ok(())
}

/// The bundle's annotations (empty when it has none or cannot be read).
pub fn annotations(v: &Value) -> HashMap<String, String> {
    v.get("annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(String::from)
                    .ok_or_else(|| SpecError::Field(format!("{what}: not a string")))
            })
            .collect(),
        Some(_) => Err(SpecError::Field(format!("{what}: not a list"))),
    }
}

fn u32_at(v: &Value, ptr: &str) -> Result<u32, SpecError> {
    match v.pointer(ptr) {
        None | Some(Value::Null) => Ok(0),
        Some(x) => x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| SpecError::Field(format!("{ptr}: not a u32"))),
    }
}

/// An OCI `process` object as the agent's [`Process`].
pub fn process(p: &Value) -> Result<Process, SpecError> {
    let args = strings(p.get("args"), "process.args")?;
    if args.is_empty() {
        return Err(SpecError::Field("process.args is empty".into()));
    }
    let additional_gids = match p.pointer("/user/additionalGids") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|g| {
                g.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| SpecError::Field("additionalGids".into()))
            })
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let rlimits = match p.get("rlimits") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| {
                Some(Rlimit {
                    kind: r.get("type")?.as_str()?.to_string(),
                    soft: r.get("soft")?.as_u64()?,
                    hard: r.get("hard")?.as_u64()?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| SpecError::Field("process.rlimits".into()))?,
        _ => Vec::new(),
    };
    let capabilities = match p.get("capabilities") {
        Some(c) if c.is_object() => Some(Capabilities {
            bounding: strings(c.get("bounding"), "bounding")?,
            effective: strings(c.get("effective"), "effective")?,
            inheritable: strings(c.get("inheritable"), "inheritable")?,
            permitted: strings(c.get("permitted"), "permitted")?,
            ambient: strings(c.get("ambient"), "ambient")?,
        }),
        _ => None,
    };
    Ok(Process {
        args,
        env: strings(p.get("env"), "process.env")?,
        cwd: p.get("cwd").and_then(Value::as_str).unwrap_or("/").to_string(),
        user: User {
            uid: u32_at(p, "/user/uid")?,
            gid: u32_at(p, "/user/gid")?,
            additional_gids,
        },
        terminal: p.get("terminal").and_then(Value::as_bool).unwrap_or(false),
        rlimits,
        no_new_privileges: p.get("noNewPrivileges").and_then(Value::as_bool).unwrap_or(false),
        capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_agent_needs() {
        let json = br#"{"ociVersion":"1.0.2","hostname":"h","annotations":{"a":"b"},
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
        assert!(parse_bundle(br#"{"process":{"args":[1]}}"#).is_err());
        assert!(parse_bundle(br#"{"process":{"args":[]}}"#).is_err());
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
        let spec =
            |mounts: &str| format!(r#"{{"process":{{"args":["true"],"cwd":"/"}},"mounts":{mounts}}}"#).into_bytes();
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
