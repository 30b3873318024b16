//! One cgroup v2 directory per container: limits, stats, the process list,
//! killing everything in it, and its OOM counter.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bulkhead_protocol::messages::{Resources, Stats};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("a {0} limit was asked for, but this kernel's cgroup has no {0} controller")]
    NoController(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Turns on the controllers containers use, at `parent`; returns the ones
/// this kernel offers. A host cgroup without some (a v1/v2 hybrid) still
/// works, with fewer limits and stats.
pub fn enable_controllers(parent: &Path) -> Vec<String> {
    let offered = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
    let mut on = Vec::new();
    for c in ["cpu", "memory", "pids"] {
        if offered.split_whitespace().any(|o| o == c)
            && fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
        {
            on.push(c.to_string());
        }
    }
    on
}

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn create(root: &Path, id: &str, res: &Resources) -> Result<Cgroup, CgroupError> {
        let path = root.join(id);
        fs::create_dir(&path).map_err(io_err(&path))?;
        let cg = Cgroup { path };
        if let Err(e) = cg.apply(res) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str, controller: &'static str) -> Result<(), CgroupError> {
        let p = self.path.join(file);
        if !p.exists() {
            return Err(CgroupError::NoController(controller));
        }
        fs::write(&p, value).map_err(io_err(&p))
    }

    pub fn apply(&self, res: &Resources) -> Result<(), CgroupError> {
        if let Some(m) = res.memory_max_bytes {
            self.write("memory.max", &m.to_string(), "memory")?;
            // A sandbox has no swap to speak of; make the limit a limit.
            let _ = self.write("memory.swap.max", "0", "memory");
        }
        if let Some(p) = res.pids_max {
            self.write("pids.max", &p.to_string(), "pids")?;
        }
        if let (Some(q), Some(p)) = (res.cpu_quota_usec, res.cpu_period_usec) {
            self.write("cpu.max", &format!("{q} {p}"), "cpu")?;
        }
        Ok(())
    }

    /// `cgroup.procs` opened for the child to move itself in with "0".
    pub fn procs_file(&self) -> Result<File, CgroupError> {
        let p = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&p)
            .map_err(io_err(&p))
    }

    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Signals every process; SIGKILL through `cgroup.kill`, which also
    /// catches processes forking while we walk the list.
    pub fn signal_all(&self, sig: i32) {
        if sig == libc::SIGKILL && fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    fn read_key(&self, file: &str, key: &str) -> Option<u64> {
        fs::read_to_string(self.path.join(file)).ok()?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    fn read_number(&self, file: &str) -> Option<u64> {
        fs::read_to_string(self.path.join(file)).ok()?.trim().parse().ok()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            cpu_usage_usec: self.read_key("cpu.stat", "usage_usec").unwrap_or(0),
            memory_current_bytes: self.read_number("memory.current").unwrap_or(0),
            memory_max_bytes: self.read_number("memory.max"),
            pids_current: self
                .read_number("pids.current")
                .unwrap_or_else(|| self.pids().len() as u64),
        }
    }

    pub fn events_file(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// Kills what is left and removes the directory; best effort, since a
    /// dying process can hold it for a moment.
    pub fn remove(&self) {
        self.signal_all(libc::SIGKILL);
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!(path = %self.path.display(), "cgroup still busy; left in place");
    }
}
