//! The VMM process of one sandbox: started with the sandbox's devices,
//! bound to our lifetime (it gets SIGKILL when we die, however we die), and
//! always reaped.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The guest's vsock context id; any value above 2 (the host) works.
pub const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start the VMM {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("cannot create the VMM log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("cannot check on the VMM: {0}")]
    Wait(io::Error),
}

/// What to boot and where its files go.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Read-only disks in order: the root filesystem image (/dev/vda),
    /// then spare slots for images attached later.
    pub disks: Vec<PathBuf>,
    /// The VMM's vsock Unix socket.
    pub vsock_uds: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// The VMM's own stdout and stderr.
    pub log: PathBuf,
    /// Where the VMM serves its control API (`--api-sock`); `None`: no API.
    pub api_socket: Option<PathBuf>,
    /// Restore this snapshot directory instead of booting `kernel` and
    /// `initrd` (its vCPUs and memory come from the snapshot; `disks`
    /// replace the snapshot's, one for one).
    pub restore: Option<PathBuf>,
}

impl VmSpec {
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut vsock = std::ffi::OsString::from(format!("{GUEST_CID},"));
        vsock.push(&self.vsock_uds);
        let mut args: Vec<std::ffi::OsString> = match &self.restore {
            Some(dir) => vec!["--restore".into(), dir.clone().into()],
            None => vec![
                "--kernel".into(),
                self.kernel.clone().into(),
                "--initrd".into(),
                self.initrd.clone().into(),
                "--vcpus".into(),
                self.vcpus.to_string().into(),
                "--mem-mib".into(),
                self.mem_mib.to_string().into(),
            ],
        };
        for d in &self.disks {
            let mut disk = d.as_os_str().to_owned();
            disk.push(",ro");
            args.push("--disk".into());
            args.push(disk);
        }
        args.extend(["--vsock".into(), vsock, "--serial".into(), self.console.clone().into()]);
        if let Some(api) = &self.api_socket {
            args.push("--api-sock".into());
            args.push(api.clone().into());
        }
        args
    }
}

/// The VMM's exit status in words (see `bulkhead-vmm --help`).
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "the guest shut down (exit status 0)".into(),
        (Some(1), _) => "VMM error (exit status 1)".into(),
        (Some(2), _) => "the VMM refused its configuration (exit status 2)".into(),
        (Some(3), _) => "KVM internal error, e.g. an instruction the emulator cannot run (exit status 3)".into(),
        (Some(4), _) => "the guest triple-faulted (exit status 4)".into(),
        (Some(5), _) => "the VMM's timeout expired (exit status 5)".into(),
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown exit".into(),
    }
}

pub struct VmmProcess {
    child: Child,
    exit: Option<ExitStatus>,
    /// Dropping it ends the thread that started the VMM.
    release: Option<mpsc::Sender<()>>,
    owner: Option<JoinHandle<()>>,
}

impl VmmProcess {
    /// Starts the VMM. It is started from a thread that lives exactly as
    /// long as this value: PR_SET_PDEATHSIG fires when the *thread* that
    /// forked the child ends, and a caller's thread (a test's, say) may end
    /// long before the sandbox should.
    pub fn spawn(spec: &VmSpec) -> Result<VmmProcess, VmError> {
        let log = File::create(&spec.log).map_err(|source| VmError::Log {
            path: spec.log.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| VmError::Log {
            path: spec.log.clone(),
            source,
        })?;
        let mut cmd = Command::new(&spec.vmm);
        cmd.args(spec.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Terminal signals (Ctrl-C) reach us only; we forward them.
            .process_group(0);
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and only calls
        // async-signal-safe functions (sigemptyset, sigprocmask, prctl,
        // getppid) on memory it owns; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Our blocked signals (see signals.rs) are inherited
                // through exec; the VMM must see its own.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // We may have died before the prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let (child_tx, child_rx) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let owner = std::thread::Builder::new()
            .name("vmm-owner".into())
            .spawn(move || {
                let spawned = cmd.spawn();
                let ok = spawned.is_ok();
                if child_tx.send(spawned).is_ok() && ok {
                    // Blocks until the VmmProcess is dropped.
                    let _ = released.recv();
                }
            })
            .map_err(|source| VmError::Spawn {
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
                return Err(VmError::Spawn {
                    path: spec.vmm.clone(),
                    source,
                });
            }
        };
        tracing::debug!(pid = child.id(), "started {}", spec.vmm.display());
        Ok(VmmProcess {
            child,
            exit: None,
            release: Some(release),
            owner: Some(owner),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the VMM has ended (it is reaped here).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, VmError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(VmError::Wait)?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the VMM to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
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
    pub fn kill(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(s) = self.try_status()? {
            return Ok(s);
        }
        if let Err(e) = self.child.kill() {
            tracing::debug!("kill VMM: {e}");
        }
        let s = self.child.wait().map_err(VmError::Wait)?;
        self.exit = Some(s);
        Ok(s)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!("VMM (pid {}): {e}", self.child.id());
        }
        self.release.take();
        if let Some(t) = self.owner.take() {
            let _ = t.join();
        }
    }
}

/// Reads a log's last lines for an error message.
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    crate::util::tail_lines(path, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_for_the_vmm() {
        let spec = VmSpec {
            vmm: "/x/bulkhead-vmm".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            vcpus: 2,
            mem_mib: 256,
            disks: vec!["/img,with,commas.ext4".into(), "/spare".into()],
            vsock_uds: "/run/v.sock".into(),
            console: "/run/console.log".into(),
            log: "/run/vmm.log".into(),
            api_socket: None,
            restore: None,
        };
        let args: Vec<String> = spec.args().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "--kernel /k --initrd /i --vcpus 2 --mem-mib 256 --disk /img,with,commas.ext4,ro \
             --disk /spare,ro --vsock 3,/run/v.sock --serial /run/console.log"
        );
        let restored = VmSpec {
            restore: Some("/cache/t1".into()),
            api_socket: Some("/run/api.sock".into()),
            ..spec
        };
        let args: Vec<String> = restored.args().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "--restore /cache/t1 --disk /img,with,commas.ext4,ro --disk /spare,ro \
             --vsock 3,/run/v.sock --serial /run/console.log --api-sock /run/api.sock"
        );
    }

    #[test]
    fn child_is_reaped_and_killed_on_drop() {
        let d = tempfile::tempdir().unwrap();
        // A stand-in VMM that ignores its flags and sleeps.
        let script = d.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\necho started >&2\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let spec = VmSpec {
            vmm: script,
            kernel: "/k".into(),
            initrd: "/i".into(),
            vcpus: 1,
            mem_mib: 64,
            disks: vec!["/d".into()],
            vsock_uds: d.path().join("v.sock"),
            console: d.path().join("console.log"),
            log: d.path().join("vmm.log"),
            api_socket: None,
            restore: None,
        };
        // Started from a short-lived thread: the VMM must outlive it.
        let mut vm = std::thread::spawn(move || VmmProcess::spawn(&spec).unwrap())
            .join()
            .unwrap();
        let pid = vm.pid();
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
}
