//! The container defaults every host-side caller starts from (the CLI, the
//! shim for specs that leave them out): the mounts, capabilities and masked
//! paths a Docker or containerd user expects, so the agent can take each
//! request literally.

use crate::messages::{Capabilities, DeviceRule, Mount};

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        kind: kind.into(),
        source: source.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    }
}

/// `/proc`, a small `/dev` (the agent fills in the standard nodes), ptys,
/// shared memory, POSIX queues, and a read-only `/sys` and cgroup.
pub fn mounts() -> Vec<Mount> {
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        // The container's own cgroup (it has a cgroup namespace), read-only.
        mount(
            "/sys/fs/cgroup",
            "cgroup2",
            "cgroup",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ]
}

/// Docker's default capability set.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The default set in every OCI set but ambient; a non-root user gets no
/// effective or permitted capabilities, as with Docker.
pub fn capabilities(uid: u32) -> Capabilities {
    let set: Vec<String> = CAPABILITIES.iter().map(|c| c.to_string()).collect();
    let owned = if uid == 0 { set.clone() } else { Vec::new() };
    Capabilities {
        bounding: set,
        effective: owned.clone(),
        inheritable: Vec::new(),
        permitted: owned,
        ambient: Vec::new(),
    }
}

pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

pub const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Device rules as Docker's and containerd's defaults have them: nothing
/// but making nodes, and the standard character devices (null, zero, full,
/// random, urandom, tty, console, ptmx, the ptys).
pub fn device_rules() -> Vec<DeviceRule> {
    let rule = |allow: bool, kind: char, major: Option<u32>, minor: Option<u32>, access: &str| DeviceRule {
        allow,
        kind,
        major,
        minor,
        access: access.into(),
    };
    let mut rules = vec![
        rule(false, 'a', None, None, "rwm"),
        rule(true, 'c', None, None, "m"),
        rule(true, 'b', None, None, "m"),
        rule(true, 'c', Some(136), None, "rwm"),
    ];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)] {
        rules.push(rule(true, 'c', Some(major), Some(minor), "rwm"));
    }
    rules
}

pub fn masked_paths() -> Vec<String> {
    MASKED_PATHS.iter().map(|p| p.to_string()).collect()
}

pub fn readonly_paths() -> Vec<String> {
    READONLY_PATHS.iter().map(|p| p.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{CreateContainer, Process, Root};

    #[test]
    fn defaults_pass_validation() {
        let c = CreateContainer {
            id: "c".into(),
            hostname: None,
            root: Root {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                size_bytes: None,
                readonly: false,
            },
            mounts: mounts(),
            masked_paths: masked_paths(),
            readonly_paths: readonly_paths(),
            process: Process {
                args: vec!["true".into()],
                capabilities: Some(capabilities(1000)),
                ..Default::default()
            },
            stdio: Default::default(),
            resources: Default::default(),
            sysctl: Default::default(),
            join: Default::default(),
            init: false,
            seccomp: None,
            device_rules: Vec::new(),
            device_nodes: Vec::new(),
        };
        c.validate().unwrap();
        assert!(capabilities(1000).effective.is_empty());
        assert_eq!(capabilities(0).permitted.len(), CAPABILITIES.len());
    }
}
