//! The host cgroup a sandbox's VMM runs in: the pod's (`linux.cgroupsPath`
//! of its sandbox container, as containerd gives it) or one of the CLI's.
//! What the guest uses is then charged to the pod and capped on the host,
//! whatever the guest reports. Works on cgroup v2 and on v1 (or a hybrid
//! host, whose v2 tree has no controllers): memory, cpu and pids.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// The v1 hierarchies limited here.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The scheduler period the CPU quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;
/// What the VMM itself may use besides guest RAM: its code, thread
/// stacks, device buffers (vsock holds up to a few MiB per busy connection).
pub const VMM_OVERHEAD_BYTES: u64 = 128 << 20;
/// Threads of a VMM besides its vCPUs (the event loop, the control API),
/// with room to spare: its seccomp filters refuse new threads anyway.
const VMM_THREADS: u64 = 64;
/// v1's `memory.limit_in_bytes` at or past this means no limit (the
/// kernel writes the largest page-aligned i64).
const V1_NO_LIMIT: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("cgroupsPath {0:?}: want an absolute path of plain names, or systemd's slice:prefix:name")]
    BadPath(String),
    #[error("no cgroup hierarchy with the memory controller under {ROOT}")]
    NoHierarchy,
    #[error("host cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HostCgroupError + '_ {
    move |source| HostCgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A VMM's use of the host, from its cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
    pub pids: Option<u64>,
}

/// The caps of one VMM's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPUs' worth of time per period.
    pub cpus: u64,
    pub pids: u64,
}

impl Limits {
    /// A VM of `vcpus` and `mem_mib`: its RAM plus the VMM's overhead, one
    /// CPU per vCPU and one for the VMM's own threads (device emulation
    /// must not starve a busy vCPU's exits), and its threads.
    pub fn for_vm(vcpus: u8, mem_mib: u32) -> Limits {
        Limits {
            memory_bytes: (u64::from(mem_mib) << 20) + VMM_OVERHEAD_BYTES,
            cpus: u64::from(vcpus) + 1,
            pids: u64::from(vcpus) + VMM_THREADS,
        }
    }
}

/// Which hierarchy layout the host has.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// One tree with every controller.
    V2(PathBuf),
    /// A tree per controller.
    V1(PathBuf),
}

fn layout(root: &Path) -> Result<Layout, HostCgroupError> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        return Ok(Layout::V2(root.to_path_buf()));
    }
    if root.join("memory/memory.limit_in_bytes").exists() {
        return Ok(Layout::V1(root.to_path_buf()));
    }
    Err(HostCgroupError::NoHierarchy)
}

/// `cgroupsPath` as a path under a hierarchy: an absolute path as is, or
/// systemd's `slice:prefix:name`, laid out as runc's systemd driver does
/// (`a-b.slice` nests in `a.slice`, the unit is `prefix-name.scope`).
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = || HostCgroupError::BadPath(cgroups_path.to_string());
    let path = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [one] if one.starts_with('/') => PathBuf::from(one.trim_start_matches('/')),
        [slice, prefix, name] if !name.is_empty() => {
            let slice = if slice.is_empty() { "system.slice" } else { slice };
            let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
            let mut p = PathBuf::new();
            let parts: Vec<&str> = stem.split('-').collect();
            for i in 1..=parts.len() {
                p.push(format!("{}.slice", parts[..i].join("-")));
            }
            let unit = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            p.push(unit);
            p
        }
        _ => return Err(bad()),
    };
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || path.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(path)
}

/// The cgroup directories made for one VMM, removed when dropped (after
/// the VMM has exited).
#[derive(Debug)]
pub struct HostCgroup {
    dirs: Vec<PathBuf>,
}

impl HostCgroup {
    /// Makes the cgroup at `cgroups_path` (in every hierarchy limited here)
    /// with `limits`.
    pub fn create(cgroups_path: &str, limits: Limits) -> Result<HostCgroup, HostCgroupError> {
        Self::create_under(Path::new(ROOT), cgroups_path, limits)
    }

    fn create_under(root: &Path, cgroups_path: &str, limits: Limits) -> Result<HostCgroup, HostCgroupError> {
        let rel = relative_path(cgroups_path)?;
        let mut cg = HostCgroup { dirs: Vec::new() };
        let cpu_max = limits.cpus * CPU_PERIOD_US;
        match layout(root)? {
            Layout::V2(base) => {
                let dir = base.join(&rel);
                cg.make(&dir)?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                write(&dir, "memory.swap.max", "0").or_else(absent_is_fine)?;
                write(&dir, "cpu.max", &format!("{cpu_max} {CPU_PERIOD_US}"))?;
                write(&dir, "pids.max", &limits.pids.to_string())?;
            }
            Layout::V1(base) => {
                // Memory is always there (see `layout`); a host may lack
                // the others' hierarchies, whose limits then cannot hold.
                for c in V1_CONTROLLERS {
                    let dir = base.join(c).join(&rel);
                    if !base.join(c).is_dir() {
                        tracing::warn!("no {c} cgroup hierarchy: the VMM's {c} is not limited");
                        continue;
                    }
                    cg.make(&dir)?;
                    match c {
                        "memory" => write(&dir, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?,
                        "cpu" => {
                            write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                            write(&dir, "cpu.cfs_quota_us", &cpu_max.to_string())?;
                        }
                        _ => write(&dir, "pids.max", &limits.pids.to_string())?,
                    }
                }
                // Accounting only: where cpuacct is a hierarchy apart from
                // cpu (not mounted with it), the VMM joins it too, so that
                // its CPU time is counted for the pod.
                let acct = base.join("cpuacct");
                let cpu = std::fs::canonicalize(base.join("cpu")).ok();
                if acct.is_dir() && std::fs::canonicalize(&acct).ok() != cpu {
                    if let Err(e) = cg.make(&acct.join(&rel)) {
                        tracing::warn!("the VMM's CPU time goes uncounted: {e}");
                    }
                }
            }
        }
        Ok(cg)
    }

    /// Makes `dir` and the parents it lacks; only `dir` itself is ours to
    /// remove (parents such as a pod's belong to whoever named them).
    fn make(&mut self, dir: &Path) -> Result<(), HostCgroupError> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {
                self.dirs.push(dir.to_path_buf());
                Ok(())
            }
            // Left by a VMM that died with its runtime: reuse it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.dirs.push(dir.to_path_buf());
                Ok(())
            }
            Err(e) => Err(io_err(dir)(e)),
        }
    }

    /// The `cgroup.procs` files a new process writes "0" to, to join.
    pub fn procs_files(&self) -> Result<Vec<File>, HostCgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                OpenOptions::new().write(true).open(&p).map_err(io_err(&p))
            })
            .collect()
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// What the VMM and its guest use, as the host's kernel counts it: a
    /// figure the guest cannot misreport. A hierarchy the host lacks
    /// leaves its figures out.
    pub fn usage(&self) -> HostUsage {
        let mut u = HostUsage::default();
        for d in &self.dirs {
            let num = |file: &str| {
                std::fs::read_to_string(d.join(file))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
            };
            u.memory_bytes = u
                .memory_bytes
                .or(num("memory.current"))
                .or(num("memory.usage_in_bytes"));
            // v1 says "no limit" with a huge number, v2 with "max".
            u.memory_limit_bytes = u
                .memory_limit_bytes
                .or(num("memory.max"))
                .or(num("memory.limit_in_bytes").filter(|&l| l < V1_NO_LIMIT));
            u.pids = u.pids.or(num("pids.current"));
            let v2_cpu = std::fs::read_to_string(d.join("cpu.stat")).ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            });
            // v1: cpuacct, mounted with cpu on most hosts, counts nanoseconds.
            u.cpu_usec = u.cpu_usec.or(v2_cpu).or(num("cpuacct.usage").map(|ns| ns / 1000));
        }
        u
    }

    /// Takes over directories a dead runtime recorded, to remove them;
    /// anything outside the cgroup tree, or not plainly named, is ignored.
    pub fn adopt(dirs: impl IntoIterator<Item = PathBuf>) -> HostCgroup {
        let ours = |d: &PathBuf| {
            d.strip_prefix(ROOT)
                .is_ok_and(|r| r.components().count() > 1 && r.components().all(|c| matches!(c, Component::Normal(_))))
        };
        HostCgroup {
            dirs: dirs.into_iter().filter(ours).collect(),
        }
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // An exited, reaped VMM leaves it empty; the kernel may need a
            // moment to let go of its last threads.
            let mut tries = 0;
            while let Err(e) = std::fs::remove_dir(d) {
                tries += 1;
                if e.kind() == io::ErrorKind::NotFound {
                    break;
                }
                if tries >= 50 {
                    tracing::warn!("cannot remove the host cgroup {}: {e}", d.display());
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), HostCgroupError> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(io_err(&p))
}

/// Swap limits exist only where the kernel accounts swap.
fn absent_is_fine(e: HostCgroupError) -> Result<(), HostCgroupError> {
    match e {
        HostCgroupError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound => Ok(()),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_as_containerd_and_kubelet_give_them() {
        assert_eq!(relative_path("/default/c1").unwrap(), Path::new("default/c1"));
        assert_eq!(
            relative_path("kubepods-besteffort-pod12.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(":bulkhead:x").unwrap(),
            Path::new("system.slice/bulkhead-x.scope")
        );
        for bad in [
            "",
            "/",
            "relative/x",
            "/a/../../etc",
            "a:b",
            "x.slice:p:",
            "x:p:n",
            "/a:b:c:d",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn limits_for_a_vm() {
        let l = Limits::for_vm(2, 256);
        assert_eq!(l.memory_bytes, (256 << 20) + VMM_OVERHEAD_BYTES);
        assert_eq!((l.cpus, l.pids), (3, 66));
    }

    /// On a fake v1 tree (plain directories): every controller gets its
    /// directory and limits, and they go when the cgroup is dropped.
    #[test]
    fn v1_layout_is_made_and_removed() {
        let root = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS.iter().chain(&["cpuacct"]) {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        let cg = HostCgroup::create_under(root.path(), "/pod/vm", Limits::for_vm(1, 128)).unwrap();
        assert!(
            root.path().join("cpuacct/pod/vm").is_dir(),
            "cpuacct apart from cpu: joined too"
        );
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(
            read("memory/pod/vm/memory.limit_in_bytes"),
            ((256u64) << 20).to_string()
        );
        assert_eq!(read("cpu/pod/vm/cpu.cfs_quota_us"), "200000");
        assert_eq!(read("pids/pod/vm/pids.max"), "65");
        assert_eq!(cg.dirs().len(), 4);
        // Plain directories hold the files written; a real cgroup's do not.
        for d in cg.dirs() {
            for f in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        drop(cg);
        assert!(!root.path().join("memory/pod/vm").exists());
        assert!(root.path().join("memory/pod").exists(), "the parent is not ours");

        // cpuacct mounted with cpu (a link to one directory): joined once.
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpu,cpuacct"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("cpuacct")).unwrap();
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        let cg = HostCgroup::create_under(root.path(), "/p/v", Limits::for_vm(1, 128)).unwrap();
        assert_eq!(cg.dirs().len(), 3, "{:?}", cg.dirs());
        std::mem::forget(cg);
    }

    #[test]
    fn a_missing_v1_hierarchy_is_skipped_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        let cg = HostCgroup::create_under(root.path(), "/p/v", Limits::for_vm(1, 64)).unwrap();
        assert_eq!(cg.dirs(), [root.path().join("memory/p/v")]);
        std::fs::remove_file(root.path().join("memory/p/v/memory.limit_in_bytes")).unwrap();
    }

    /// The figures come from whichever version's files a directory has.
    #[test]
    fn usage_is_read_from_v1_and_v2_files() {
        let v1 = tempfile::tempdir().unwrap();
        let (mem, cpu) = (v1.path().join("memory"), v1.path().join("cpu"));
        std::fs::create_dir(&mem).unwrap();
        std::fs::create_dir(&cpu).unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "1048576\n").unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "402653184\n").unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "2500000\n").unwrap();
        let cg = HostCgroup {
            dirs: vec![mem.clone(), cpu],
        };
        let u = cg.usage();
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cg.usage().memory_limit_bytes, None, "v1's unlimited is no limit");
        std::mem::forget(cg);
        assert_eq!(
            u,
            HostUsage {
                memory_bytes: Some(1 << 20),
                memory_limit_bytes: Some(402_653_184),
                cpu_usec: Some(2500),
                pids: None,
            }
        );

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(v2.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(v2.path().join("cpu.stat"), "usage_usec 77\nuser_usec 50\n").unwrap();
        std::fs::write(v2.path().join("pids.current"), "5\n").unwrap();
        let cg = HostCgroup {
            dirs: vec![v2.path().to_path_buf()],
        };
        let u = cg.usage();
        std::mem::forget(cg);
        assert_eq!(
            u,
            HostUsage {
                memory_bytes: Some(4096),
                memory_limit_bytes: None,
                cpu_usec: Some(77),
                pids: Some(5),
            }
        );
    }
}
