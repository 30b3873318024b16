//! Turns protocol requests into the pre-built data `child.rs` runs on:
//! every string NUL-terminated, every flag resolved, every path joined,
//! so the cloned child never allocates.

use std::ffi::{c_char, CString};
use std::os::fd::RawFd;
use std::path::Path;

use bulkhead_protocol::defaults;
use bulkhead_protocol::messages::{Mount, Process};

use crate::caps::{self, CapSets};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0} contains a NUL byte")]
    Nul(String),
    #[error("process.args is empty")]
    NoArgs,
    #[error("unknown mount option {0:?}")]
    MountOption(String),
    #[error("capabilities: {0}")]
    Caps(#[from] caps::CapsError),
    #[error("unknown rlimit {0}")]
    Rlimit(String),
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString, PlanError> {
    CString::new(s.as_ref()).map_err(|_| PlanError::Nul(what.into()))
}

pub struct ExecPlan {
    _argv: Vec<CString>,
    pub argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    pub envp_ptrs: Vec<*const c_char>,
    /// `args[0]` itself if it has a '/', else each `$PATH` entry joined.
    pub exec_candidates: Vec<CString>,
    pub cwd: CString,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub umask: libc::mode_t,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub caps: CapSets,
    pub last_cap: u32,
    pub no_new_privileges: bool,
    pub terminal: bool,
    /// `oom_score_adj` as the text written to /proc, set while the
    /// process may still lower it (before its capabilities go).
    pub oom_score_adj: Option<Vec<u8>>,
    /// The container's seccomp program, loaded just before `execve` with
    /// `no_new_privileges`, else while the process may still (before its
    /// capabilities go), as runc does.
    pub seccomp: Option<SeccompPlan>,
}

pub struct SeccompPlan {
    pub filter: Vec<libc::sock_filter>,
    pub flags: libc::c_uint,
}

impl SeccompPlan {
    pub fn new(p: &bulkhead_protocol::messages::SeccompProgram) -> SeccompPlan {
        SeccompPlan {
            filter: p
                .filter
                .iter()
                .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
                .collect(),
            flags: p.flags,
        }
    }
}

/// A process whose spec names no umask gets runc's.
const DEFAULT_UMASK: libc::mode_t = 0o022;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn null_terminated(v: &[CString]) -> Vec<*const c_char> {
    v.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect()
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

impl ExecPlan {
    /// `glibc_tunable`: add [`crate::vector_state::TUNABLE`] to the
    /// environment (where the kernel does not switch all vector state).
    pub fn new(p: &Process, glibc_tunable: bool) -> Result<ExecPlan, PlanError> {
        let argv: Vec<CString> = p.args.iter().map(|a| cstr(a, "args")).collect::<Result<_, _>>()?;
        let env = if glibc_tunable {
            crate::vector_state::add_tunable(&p.env)
        } else {
            p.env.clone()
        };
        let envp: Vec<CString> = env.iter().map(|e| cstr(e, "env")).collect::<Result<_, _>>()?;
        let arg0 = p.args.first().ok_or(PlanError::NoArgs)?;
        let exec_candidates = if arg0.contains('/') {
            vec![cstr(arg0, "args")?]
        } else {
            let path = p
                .env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstr(format!("{d}/{arg0}"), "PATH"))
                .collect::<Result<_, _>>()?
        };
        let rlimits = p
            .rlimits
            .iter()
            .map(|r| {
                let res = rlimit_resource(&r.kind).ok_or_else(|| PlanError::Rlimit(r.kind.clone()))?;
                Ok((
                    res,
                    libc::rlimit {
                        rlim_cur: r.soft,
                        rlim_max: r.hard,
                    },
                ))
            })
            .collect::<Result<_, PlanError>>()?;
        let requested = p
            .capabilities
            .clone()
            .unwrap_or_else(|| defaults::capabilities(p.user.uid));
        Ok(ExecPlan {
            argv_ptrs: null_terminated(&argv),
            _argv: argv,
            envp_ptrs: null_terminated(&envp),
            _envp: envp,
            exec_candidates,
            cwd: cstr(&p.cwd, "cwd")?,
            uid: p.user.uid,
            gid: p.user.gid,
            groups: p.user.additional_gids.clone(),
            umask: p.user.umask.unwrap_or(DEFAULT_UMASK),
            rlimits,
            caps: CapSets::from_names(&requested)?,
            last_cap: caps::last_cap(),
            no_new_privileges: p.no_new_privileges,
            terminal: p.terminal,
            oom_score_adj: p.oom_score_adj.map(|a| a.to_string().into_bytes()),
            seccomp: None,
        })
    }

    pub fn with_seccomp(self, seccomp: Option<SeccompPlan>) -> ExecPlan {
        ExecPlan { seccomp, ..self }
    }
}

/// One mount inside the container's root, before pivot_root.
pub struct MountStep {
    pub mkdirs: Vec<CString>,
    /// A bind of a file needs a file to land on.
    pub create_file: Option<CString>,
    pub source: CString,
    pub target: CString,
    pub fstype: CString,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    pub remount_flags: Option<libc::c_ulong>,
    /// For a tmpfs `/dev`: agent device nodes bound onto new files.
    pub device_binds: Vec<(CString, CString)>,
    pub symlinks: Vec<(CString, CString)>,
}

/// Splits OCI mount options into flags and the data string.
fn mount_flags(options: &[String]) -> Result<(libc::c_ulong, Vec<String>), PlanError> {
    let mut flags = 0;
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "relatime" => (libc::MS_RELATIME, 0),
            "noatime" => (libc::MS_NOATIME, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => (0, 0),
            other if other.contains('=') || other == "newinstance" => {
                data.push(other.to_string());
                (0, 0)
            }
            other => return Err(PlanError::MountOption(other.into())),
        };
        flags = (flags | set) & !clear;
    }
    Ok((flags, data))
}

/// `/a/b/c` under `root` as the list `root/a`, `root/a/b`, `root/a/b/c`.
fn parents_under(root: &Path, dest: &str, include_last: bool) -> Result<Vec<CString>, PlanError> {
    let comps: Vec<&str> = dest.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    let upto = if include_last {
        comps.len()
    } else {
        comps.len().saturating_sub(1)
    };
    let mut out = Vec::new();
    let mut p = root.to_path_buf();
    for c in &comps[..upto] {
        p.push(c);
        out.push(cstr(p.as_os_str().as_encoded_bytes(), "mount destination")?);
    }
    Ok(out)
}

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: &[(&str, &str)] = &[
    ("pts/ptmx", "ptmx"),
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
];

impl MountStep {
    /// `source` for a bind is already resolved to a path in the agent's view.
    pub fn new(root: &Path, m: &Mount, source: &str, dev_dir: &Path) -> Result<MountStep, PlanError> {
        let target = root.join(m.destination.trim_start_matches('/'));
        let (mut flags, data) = mount_flags(&m.options)?;
        let is_bind = m.kind == "bind";
        if is_bind {
            flags |= libc::MS_BIND;
        }
        let mut remount_flags = None;
        if flags & libc::MS_BIND != 0 {
            // Bind mounts take their other flags only on a remount.
            let rest = flags & !(libc::MS_BIND | libc::MS_REC);
            if rest != 0 {
                remount_flags = Some(libc::MS_BIND | libc::MS_REMOUNT | rest);
            }
            flags &= libc::MS_BIND | libc::MS_REC;
        }
        let source_is_file = is_bind && Path::new(source).is_file();
        let mut step = MountStep {
            mkdirs: parents_under(root, &m.destination, !source_is_file)?,
            create_file: source_is_file
                .then(|| cstr(target.as_os_str().as_encoded_bytes(), "target"))
                .transpose()?,
            source: cstr(source, "mount source")?,
            target: cstr(target.as_os_str().as_encoded_bytes(), "mount destination")?,
            fstype: cstr(if is_bind { "none" } else { m.kind.as_str() }, "mount type")?,
            flags,
            data: if data.is_empty() {
                None
            } else {
                Some(cstr(data.join(","), "mount options")?)
            },
            remount_flags,
            device_binds: Vec::new(),
            symlinks: Vec::new(),
        };
        if m.destination.trim_end_matches('/') == "/dev" && m.kind == "tmpfs" {
            for d in DEVICES {
                step.device_binds.push((
                    cstr(dev_dir.join(d).as_os_str().as_encoded_bytes(), "device")?,
                    cstr(target.join(d).as_os_str().as_encoded_bytes(), "device")?,
                ));
            }
            for (to, name) in DEV_LINKS {
                step.symlinks.push((
                    cstr(to, "link")?,
                    cstr(target.join(name).as_os_str().as_encoded_bytes(), "link")?,
                ));
            }
        }
        Ok(step)
    }
}

pub struct InitPlan {
    pub ctl: RawFd,
    pub cgroup_procs: RawFd,
    /// Sorted; everything else is closed in the child.
    pub keep_fds: Vec<RawFd>,
    pub mounts: Vec<MountStep>,
    pub hostname: Option<CString>,
    pub rootfs: CString,
    pub masked_paths: Vec<CString>,
    pub readonly_paths: Vec<CString>,
    /// OCI `root.readonly`.
    pub root_readonly: bool,
    /// (`/proc/sys/...` path, value), written in the container's new
    /// namespaces before it enters its root.
    pub sysctls: Vec<(CString, Vec<u8>)>,
    /// Ignored with a terminal: the workload then gets the pty.
    pub stdio: [RawFd; 3],
    pub workload: ExecPlan,
    /// Another container's IPC and UTS namespaces (nstype, descriptor),
    /// joined before anything is set in them.
    pub join: Vec<(libc::c_int, RawFd)>,
    /// A helper PID 1 that forwards signals to the workload and reaps;
    /// otherwise the init becomes the workload.
    pub helper_init: bool,
    /// OCI `linux.devices`, made after the mounts (so in the `/dev` tmpfs).
    pub device_nodes: Vec<NodePlan>,
}

pub struct NodePlan {
    pub mkdirs: Vec<CString>,
    pub path: CString,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
    /// Set again after mknod, which the umask trims.
    pub perm: libc::mode_t,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The validated `device_nodes` under `root`; absent mode and owner are
/// 0666 and root, as runc makes them.
pub fn device_nodes(
    root: &Path,
    nodes: &[bulkhead_protocol::messages::DeviceNode],
) -> Result<Vec<NodePlan>, PlanError> {
    nodes
        .iter()
        .map(|n| {
            let kind = match n.kind {
                'b' => libc::S_IFBLK,
                'p' => libc::S_IFIFO,
                _ => libc::S_IFCHR,
            };
            let perm = n.file_mode.unwrap_or(0o666);
            let path = root.join(n.path.trim_start_matches('/'));
            Ok(NodePlan {
                mkdirs: parents_under(root, &n.path, false)?,
                path: cstr(path.as_os_str().as_encoded_bytes(), "device path")?,
                mode: kind | perm,
                dev: libc::makedev(n.major, n.minor),
                perm,
                uid: n.uid.unwrap_or(0),
                gid: n.gid.unwrap_or(0),
            })
        })
        .collect()
}

pub struct JoinPlan {
    pub ctl: RawFd,
    pub cgroup_procs: RawFd,
    pub keep_fds: Vec<RawFd>,
    /// Opened from /proc/<init>/ns, in setns order (mnt last).
    pub namespaces: Vec<RawFd>,
    pub stdio: [RawFd; 3],
    pub process: ExecPlan,
}

/// The validated `sysctl` map as files under /proc/sys to write.
pub fn sysctls(map: &std::collections::BTreeMap<String, String>) -> Result<Vec<(CString, Vec<u8>)>, PlanError> {
    map.iter()
        .map(|(name, value)| {
            let path = format!("/proc/sys/{}", name.replace('.', "/"));
            Ok((cstr(path, "sysctl")?, value.as_bytes().to_vec()))
        })
        .collect()
}

pub fn paths(list: &[String]) -> Result<Vec<CString>, PlanError> {
    list.iter().map(|p| cstr(p, "path")).collect()
}

pub fn keep(fds: impl IntoIterator<Item = RawFd>) -> Vec<RawFd> {
    let mut v: Vec<RawFd> = fds.into_iter().filter(|fd| *fd >= 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::messages::User;

    #[test]
    fn path_lookup_uses_the_process_path() {
        let p = Process {
            args: vec!["sh".into()],
            env: vec!["PATH=/a:/b".into()],
            ..Default::default()
        };
        let plan = ExecPlan::new(&p, false).unwrap();
        let c: Vec<_> = plan.exec_candidates.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(c, ["/a/sh", "/b/sh"]);
        assert_eq!(plan.argv_ptrs.len(), 2);
        assert!(plan.argv_ptrs[1].is_null());
        let abs = ExecPlan::new(
            &Process {
                args: vec!["/bin/x".into()],
                ..Default::default()
            },
            true,
        )
        .unwrap();
        assert_eq!(abs.exec_candidates.len(), 1);
        let env: Vec<_> = abs._envp.iter().map(|e| e.to_str().unwrap()).collect();
        assert_eq!(env, [format!("GLIBC_TUNABLES={}", crate::vector_state::TUNABLE)]);
    }

    #[test]
    fn non_root_gets_no_effective_capabilities_by_default() {
        let p = Process {
            args: vec!["x".into()],
            user: User {
                uid: 1000,
                gid: 1000,
                ..Default::default()
            },
            ..Default::default()
        };
        let plan = ExecPlan::new(&p, false).unwrap();
        assert_eq!(plan.caps.effective, 0);
        assert_ne!(plan.caps.bounding, 0);
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (f, d) = mount_flags(&["nosuid".into(), "ro".into(), "mode=755".into()]).unwrap();
        assert_eq!(f, libc::MS_NOSUID | libc::MS_RDONLY);
        assert_eq!(d, ["mode=755"]);
        assert!(mount_flags(&["frobnicate".into()]).is_err());
        let m = Mount {
            destination: "/data".into(),
            kind: "bind".into(),
            source: "/srv".into(),
            options: vec!["ro".into()],
        };
        let s = MountStep::new(Path::new("/r"), &m, "/srv", Path::new("/dev")).unwrap();
        assert_eq!(s.flags, libc::MS_BIND);
        assert_eq!(
            s.remount_flags,
            Some(libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)
        );
        assert_eq!(s.target.to_str().unwrap(), "/r/data");
    }

    #[test]
    fn a_tmpfs_dev_gets_device_nodes() {
        let m = &defaults::mounts()[1];
        let s = MountStep::new(Path::new("/r"), m, &m.source, Path::new("/dev")).unwrap();
        assert_eq!(s.device_binds.len(), DEVICES.len());
        assert!(s.symlinks.iter().any(|(_, l)| l.to_str().unwrap() == "/r/dev/ptmx"));
        let dirs: Vec<_> = parents_under(Path::new("/r"), "/a/b", true).unwrap();
        assert_eq!(dirs.len(), 2);
    }
}
