//! The VMM process of one sandbox: started with the sandbox's devices,
//! bound to our lifetime (it gets SIGKILL when we die, however we die), and
//! always reaped.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_vmm_api::config::{RestoreConfig, VmConfig};
use bulkhead_vmm_api::jail::JailConfig;

use crate::spawn;

/// The jail's description, next to the VMM's configuration file.
const JAIL_FILE: &str = "jail.json";

/// The guest's vsock context id; any value above 2 (the host) works.
pub const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    #[error("cannot start the VMM {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("cannot create the VMM log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("cannot write the VMM configuration {path}: {source}")]
    Config { path: PathBuf, source: io::Error },
    #[error("cannot check on the VMM: {0}")]
    Wait(io::Error),
}

/// What the VMM is told: a configuration to boot, or a snapshot to
/// restore. It travels as the JSON file the VMM reads (`--config`,
/// `--restore-config`), typed on both sides.
#[derive(Clone, Debug, PartialEq)]
pub enum LaunchConfig {
    Boot(VmConfig),
    Restore(RestoreConfig),
}

/// One VMM to start.
#[derive(Clone, Debug)]
pub struct Launch {
    pub vmm: PathBuf,
    pub config: LaunchConfig,
    /// Where the configuration is written for the VMM to read.
    pub config_file: PathBuf,
    /// The VMM's own stdout and stderr.
    pub log: PathBuf,
    /// `cgroup.procs` files the VMM joins before it runs (it writes "0"
    /// to each); the caller keeps them open until `spawn` returns.
    pub join_cgroups: Vec<RawFd>,
    /// Start the VMM in network, IPC and UTS namespaces of its own (needs
    /// root): it has no use for the host's network, System V IPC or host
    /// name, so a VMM taken over by its guest finds none of them.
    pub own_namespaces: bool,
    /// The jail the VMM enters first (written next to `config_file`).
    pub jail: Option<JailConfig>,
}

/// The namespaces a VMM starts in with [`Launch::own_namespaces`] (it
/// makes its mount namespace itself, when jailed).
pub const OWN_NAMESPACES: u64 =
    (libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as u64;

/// Whether this process may make namespaces: CAP_SYS_ADMIN in its
/// effective set (root in a container without it may not).
pub fn can_make_namespaces() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << CAP_SYS_ADMIN) != 0)
}

impl Launch {
    /// Writes the configuration file; returns the VMM's arguments.
    fn write_config(&self) -> Result<Vec<OsString>, VmmProcessError> {
        let (flag, json) = match &self.config {
            LaunchConfig::Boot(c) => ("--config", serde_json::to_vec_pretty(c)),
            LaunchConfig::Restore(r) => ("--restore-config", serde_json::to_vec_pretty(r)),
        };
        let err = |source| VmmProcessError::Config {
            path: self.config_file.clone(),
            source,
        };
        let json = json.map_err(|e| err(io::Error::other(e)))?;
        std::fs::write(&self.config_file, json).map_err(err)?;
        let mut args: Vec<OsString> = vec![flag.into(), self.config_file.clone().into()];
        if let Some(jail) = &self.jail {
            let path = self.config_file.with_file_name(JAIL_FILE);
            let json = serde_json::to_vec_pretty(jail).map_err(|e| err(io::Error::other(e)))?;
            std::fs::write(&path, json).map_err(|source| VmmProcessError::Config {
                path: path.clone(),
                source,
            })?;
            args.extend(["--jail".into(), path.into()]);
        }
        Ok(args)
    }
}

pub struct VmmProcess {
    /// Ours to reap: until `exit` is set, no other process has this pid.
    pid: libc::pid_t,
    exit: Option<ExitStatus>,
    /// The VMM's way to learn that we are gone (see `spawn::PARENT_FD`).
    _parent_alive: OwnedFd,
    /// Dropping it ends the thread that started the VMM.
    release: Option<mpsc::Sender<()>>,
    owner: Option<JoinHandle<()>>,
}

impl VmmProcess {
    /// Starts the VMM. It is started from a thread that lives exactly as
    /// long as this value: PR_SET_PDEATHSIG fires when the *thread* that
    /// forked the child ends, and a caller's thread (a test's, say) may end
    /// long before the sandbox should.
    pub fn spawn(spec: &Launch) -> Result<VmmProcess, VmmProcessError> {
        let args = spec.write_config()?;
        let log = File::create(&spec.log).map_err(|source| VmmProcessError::Log {
            path: spec.log.clone(),
            source,
        })?;
        let join_cgroups = spec.join_cgroups.clone();
        let namespaces = if spec.own_namespaces { OWN_NAMESPACES } else { 0 };
        let program = spec.vmm.clone();
        let (child_tx, child_rx) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let owner = std::thread::Builder::new()
            .name("vmm-owner".into())
            .spawn(move || {
                let setup = spawn::ChildSetup {
                    join_cgroups: &join_cgroups,
                    log: log.as_raw_fd(),
                    namespaces,
                };
                let spawned = spawn::spawn(&program, &args, &setup);
                drop(log);
                let ok = spawned.is_ok();
                if child_tx.send(spawned).is_ok() && ok {
                    // Blocks until the VmmProcess is dropped.
                    let _ = released.recv();
                }
            })
            .map_err(|source| VmmProcessError::Spawn {
                path: spec.vmm.clone(),
                source,
            })?;
        let spawned = child_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the VMM's owner thread ended early")));
        let child = match spawned {
            Ok(c) => c,
            Err(source) => {
                let _ = owner.join();
                return Err(VmmProcessError::Spawn {
                    path: spec.vmm.clone(),
                    source,
                });
            }
        };
        tracing::debug!(pid = child.pid, "started {}", spec.vmm.display());
        Ok(VmmProcess {
            pid: child.pid,
            _parent_alive: child.parent_alive,
            exit: None,
            release: Some(release),
            owner: Some(owner),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// The pid while it is still the VMM's: not yet reaped (a caller that
    /// holds this value keeps it so).
    pub fn unreaped_pid(&self) -> Option<u32> {
        self.exit.is_none().then(|| self.pid())
    }

    fn wait(&mut self, flags: libc::c_int) -> Result<Option<ExitStatus>, VmmProcessError> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own unreaped child; status is ours.
            let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if r == self.pid {
                return Ok(Some(ExitStatus::from_raw(status)));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(VmmProcessError::Wait(e));
            }
        }
    }

    /// The exit status if the VMM has ended (it is reaped here).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, VmmProcessError> {
        if self.exit.is_none() {
            self.exit = self.wait(libc::WNOHANG)?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the VMM to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmmProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill(&mut self) -> Result<ExitStatus, VmmProcessError> {
        if let Some(s) = self.try_status()? {
            return Ok(s);
        }
        // SAFETY: kill takes integers; the pid is our unreaped child's.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            tracing::debug!("kill VMM: {}", io::Error::last_os_error());
        }
        let s = self
            .wait(0)?
            .ok_or_else(|| VmmProcessError::Wait(io::Error::other("waitpid returned no status")))?;
        self.exit = Some(s);
        Ok(s)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!("VMM (pid {}): {e}", self.pid);
        }
        self.release.take();
        if let Some(t) = self.owner.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;

    fn boot_config(dir: &Path) -> VmConfig {
        VmConfig {
            initrd: Some("/i".into()),
            vcpus: 2,
            mem_mib: 256,
            serial: bulkhead_vmm_api::config::SerialOutput::File(dir.join("console.log")),
            ..VmConfig::new("/k")
        }
    }

    #[test]
    fn the_vmm_gets_its_configuration_as_a_typed_file() {
        let d = tempfile::tempdir().unwrap();
        let boot = Launch {
            vmm: "/x/bulkhead-vmm".into(),
            config: LaunchConfig::Boot(boot_config(d.path())),
            config_file: d.path().join("vmm.json"),
            log: d.path().join("vmm.log"),
            join_cgroups: Vec::new(),
            own_namespaces: false,
            jail: None,
        };
        let args = boot.write_config().unwrap();
        assert_eq!(args, [OsString::from("--config"), d.path().join("vmm.json").into()]);
        let back = VmConfig::from_json_file(&d.path().join("vmm.json")).unwrap();
        assert_eq!(LaunchConfig::Boot(back), boot.config);

        let restore = Launch {
            config: LaunchConfig::Restore(RestoreConfig::new("/cache/t1")),
            ..boot
        };
        let args = restore.write_config().unwrap();
        assert_eq!(args[0], "--restore-config");
        let back = RestoreConfig::from_json_file(&d.path().join("vmm.json")).unwrap();
        assert_eq!(LaunchConfig::Restore(back), restore.config);
    }

    #[test]
    fn child_is_reaped_and_killed_on_drop() {
        let d = tempfile::tempdir().unwrap();
        // A stand-in VMM that ignores its flags and sleeps.
        let script = d.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\necho started >&2\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // Stand-ins for two cgroup.procs files: each gets the "0" that
        // moves the writer, before the VMM's exec.
        let joins: Vec<_> = (0..2)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        use std::os::fd::AsRawFd;
        let spec = Launch {
            vmm: script,
            config: LaunchConfig::Boot(boot_config(d.path())),
            config_file: d.path().join("vmm.json"),
            log: d.path().join("vmm.log"),
            join_cgroups: joins.iter().map(|(w, _)| w.as_raw_fd()).collect(),
            own_namespaces: false,
            jail: None,
        };
        // Started from a short-lived thread: the VMM must outlive it.
        let mut vm = std::thread::spawn(move || VmmProcess::spawn(&spec).unwrap())
            .join()
            .unwrap();
        let pid = vm.pid();
        for (_, mut r) in joins {
            use std::io::Read;
            let mut got = [0u8; 1];
            r.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"0");
        }
        assert_eq!(
            vm.wait_timeout(Duration::from_millis(300)).unwrap(),
            None,
            "still running"
        );
        drop(vm);
        // Reaped: the pid no longer names our child.
        // SAFETY: waitpid on a pid that is not (any longer) our child only
        // returns ECHILD.
        let r = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1);
        assert!(std::fs::read_to_string(d.path().join("vmm.log"))
            .unwrap()
            .contains("started"));
    }

    /// As root the VMM gets PID, network, IPC and UTS namespaces of its
    /// own, and is PID 1 in its PID namespace; the others (mount, cgroup,
    /// user) stay the host's (a jailed VMM makes its mount namespace).
    #[test]
    fn the_vmm_can_get_namespaces_of_its_own() {
        if !can_make_namespaces() {
            eprintln!("skipped: new namespaces need CAP_SYS_ADMIN");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let spec = Launch {
            vmm: script,
            config: LaunchConfig::Boot(boot_config(d.path())),
            config_file: d.path().join("vmm.json"),
            log: d.path().join("vmm.log"),
            join_cgroups: Vec::new(),
            own_namespaces: true,
            jail: None,
        };
        let vm = VmmProcess::spawn(&spec).unwrap();
        let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        let pid = vm.pid().to_string();
        for kind in ["pid", "net", "ipc", "uts"] {
            assert_ne!(ns(&pid, kind), ns("self", kind), "{kind}");
        }
        for kind in ["mnt", "cgroup", "user"] {
            assert_eq!(ns(&pid, kind), ns("self", kind), "{kind}");
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap();
        assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), [pid.as_str(), "1"]);
    }

    /// A VMM that cannot be executed is an error naming it.
    #[test]
    fn a_missing_vmm_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let spec = Launch {
            vmm: d.path().join("no-such-vmm"),
            config: LaunchConfig::Boot(boot_config(d.path())),
            config_file: d.path().join("vmm.json"),
            log: d.path().join("vmm.log"),
            join_cgroups: Vec::new(),
            own_namespaces: can_make_namespaces(),
            jail: None,
        };
        let e = VmmProcess::spawn(&spec).err().expect("no VMM to start").to_string();
        assert!(e.contains("no-such-vmm") && e.contains("No such file"), "{e}");
    }
}
