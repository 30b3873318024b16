//! One booted sandbox: its run directory, its VMM process and the way to
//! its agent. `bulkhead run` drives one interactively; the boot tier uses
//! the same type to boot once and run several processes. Dropping a
//! `Sandbox` kills the VMM and removes the run directory; [`Sandbox::shutdown`]
//! asks the guest to stop first.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_protocol::client::{Client, ClientError};
use bulkhead_protocol::defaults;
use bulkhead_protocol::frame::FrameError;
use bulkhead_protocol::messages::{CreateContainer, Process, Request, Root, ValidationError};

use crate::agent_conn::{self, ConnError, WaitError};
use crate::host_cgroup::{HostCgroup, HostCgroupError, Limits};
use crate::jail::{self, JailError, JailId};
use crate::paths::Artifacts;
use crate::rootfs::RootfsImage;
use crate::rundir::{self, RunDir, RunDirError};
use crate::stdio::{self, StdioError, StdioPlan, StdioStreams};
use crate::util;
use crate::vmm_process::{Launch, LaunchConfig, VmmProcess, VmmProcessError, GUEST_CID};
use bulkhead_vmm_api::client::{ApiCallError, ApiClient};
use bulkhead_vmm_api::config::{BlockConfig, RestoreConfig, SerialOutput, VmConfig, VsockConfig, CONSOLE_MAX_BYTES};
use bulkhead_vmm_api::control::TargetState;
use bulkhead_vmm_api::jail::{JailConfig, JailPath};

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u32 = 256;
/// How long a guest gets to stop after `Shutdown` before the VMM is killed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest device the root image is attached as (the first `--disk`).
pub const ROOT_DEVICE: &str = "/dev/vda";
/// After `exited`, output still in flight drains within this.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const CONSOLE_LINES: usize = 20;
/// What the VMM's own log (`vmm.log`) may grow to when it is jailed.
pub const VMM_LOG_MAX_BYTES: u64 = 8 << 20;
/// A kept console is the log's last this many bytes: the VMM caps the log
/// at 1 MiB, but a VMM that broke out of its device model could write on.
const KEPT_CONSOLE_BYTES: u64 = 4 << 20;
/// A restored VMM has its socket up within milliseconds: look that often.
const RESTORE_RETRY_EVERY: Duration = Duration::from_millis(2);
/// The image behind an unused spare disk: one page of zeros (the VMM
/// refuses empty images).
const EMPTY_DISK_FILE: &str = "empty.img";
const EMPTY_DISK_BYTES: usize = 4096;
/// Under the run directory: what the jailed VMM sees of it, owned by root
/// (mode 0711) so that the VMM can plant no link or file there for the
/// runtime to follow: its sockets (bound before it gives up root), the
/// console (the one file it may write) and spare-disk images shown to it.
const VM_DIR: &str = "vm";
/// Under the run directory: where the VMM mounts its jail's root.
const JAIL_ROOT_DIR: &str = "root";
/// Control API calls are quick (a disk swap opens one file, a pause parks
/// the vCPUs): this only catches a wedged VMM.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Create, Start and Exec are answered in milliseconds on a hardware host
/// and in seconds under emulation; an agent silent this long is wedged.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Host entropy a restored guest mixes into its pool.
const RESEED_BYTES: usize = 64;

pub type AgentClient = Client<UnixStream>;

/// What to boot.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub artifacts: Artifacts,
    pub rootfs: RootfsImage,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Where run directories go; `None`: [`rundir::default_root`].
    pub runtime_root: Option<PathBuf>,
    /// Give up waiting for the agent after this long; `None`: wait as
    /// long as the VMM lives.
    pub boot_timeout: Option<Duration>,
    /// Copy the guest console here when the sandbox goes away.
    pub keep_console: Option<PathBuf>,
    /// Start the VMM with its control API (`<run dir>/api.sock`), for
    /// pause/resume by a runtime such as the containerd shim.
    pub api_socket: bool,
    /// Restore this snapshot directory (a template's) instead of booting
    /// cold (the root image replaces the snapshot's placeholder disk). It
    /// must have as many
    /// spare disks.
    pub restore_from: Option<PathBuf>,
    /// Read-only disks after the root one (/dev/vdb, ...), empty until
    /// [`Sandbox::attach_image`] gives one an image; they need `api_socket`.
    pub spare_disks: u8,
    /// How long `create`, `start` and `exec_start` on a
    /// [`Sandbox::request_client`] stream may go unanswered before they fail
    /// with [`SandboxError::Unanswered`]; `None`: as long as the VM lives.
    pub call_timeout: Option<Duration>,
    /// The host cgroup the VMM runs in (a `cgroupsPath`: absolute, or
    /// systemd's `slice:prefix:name`), made with the VM's limits and
    /// removed with it; `None`: the caller's own.
    pub host_cgroup: Option<String>,
    /// A directory the VMM may write snapshots into (a template's, while
    /// it is built); [`Sandbox::lend_for_snapshot`] hands it over.
    pub snapshot_into: Option<PathBuf>,
    /// Jail the VMM (when this process may: root with CAP_SYS_ADMIN).
    /// Off only to measure what the jail costs.
    pub jail: bool,
}

impl SandboxConfig {
    pub fn new(artifacts: Artifacts, rootfs: RootfsImage) -> Self {
        SandboxConfig {
            artifacts,
            rootfs,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            runtime_root: None,
            boot_timeout: None,
            keep_console: None,
            api_socket: false,
            restore_from: None,
            spare_disks: 0,
            call_timeout: None,
            host_cgroup: None,
            snapshot_into: None,
            jail: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Vm(#[from] VmmProcessError),
    #[error("guest agent: {0}")]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("the sandbox's VM stopped: {reason}{}", render_logs(.console, .vmm_log))]
    VmStopped {
        reason: String,
        console: Vec<String>,
        vmm_log: Vec<String>,
    },
    #[error("the guest agent did not answer within {} s{}", .after.as_secs(), render_logs(.console, &[]))]
    BootTimeout { after: Duration, console: Vec<String> },
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Api(#[from] ApiCallError),
    #[error("no spare disk {slot}: this sandbox has {count}")]
    NoSuchDisk { slot: u8, count: u8 },
    #[error("the sandbox's VMM has no control API")]
    NoApi,
    /// A bounded call ([`Sandbox::with_deadline`]) got no answer in time.
    #[error("the guest agent did not answer {op} within {} s", .after.as_secs())]
    Unanswered { op: &'static str, after: Duration },
    #[error(transparent)]
    HostCgroup(#[from] HostCgroupError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn render_logs(console: &[String], vmm_log: &[String]) -> String {
    let mut s = String::new();
    for (title, lines) in [("last console lines", console), ("VMM log", vmm_log)] {
        if !lines.is_empty() {
            s.push_str(&format!("\n{title}:"));
            for l in lines {
                s.push_str("\n  ");
                s.push_str(l);
            }
        }
    }
    s
}

/// What a boot watcher sees every retry (about every 100 ms).
pub struct BootProgress<'a> {
    pub elapsed: Duration,
    console: &'a Path,
}

impl BootProgress<'_> {
    /// The guest console's last line so far (the kernel's log, mostly).
    pub fn last_console_line(&self) -> Option<String> {
        util::tail_lines(self.console, 1).pop()
    }
}

/// A finished process's exit status and output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessOutput {
    /// As a shell reports it: the code, or 128 + the signal.
    pub status: i32,
    pub stdout: Vec<u8>,
    /// Empty for a terminal process (its output is all on stdout).
    pub stderr: Vec<u8>,
}

impl ProcessOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Copies the console out of the run directory before it is removed.
struct ConsoleKeeper {
    from: PathBuf,
    to: Option<PathBuf>,
}

impl Drop for ConsoleKeeper {
    fn drop(&mut self) {
        if let Some(to) = &self.to {
            if let Err(e) = util::copy_tail(&self.from, to, KEPT_CONSOLE_BYTES) {
                tracing::warn!("cannot keep the console log as {}: {e}", to.display());
            }
        }
    }
}

pub struct Sandbox {
    // Dropped in this order: the agent stream, the VMM (killed), the
    // console copy, the run directory.
    first_client: Mutex<Option<AgentClient>>,
    vmm: Mutex<VmmProcess>,
    /// Per disk slot, the mount point in the VM directory where its image
    /// is shown to the jailed VMM (removed when the slot changes).
    shown: Mutex<Vec<Option<PathBuf>>>,
    /// Removed once the VMM above is reaped.
    host_cgroup: Option<HostCgroup>,
    _console_keeper: ConsoleKeeper,
    dir: RunDir,
    /// Released only once the VMM is reaped and its files are gone.
    jail_id: Option<JailId>,
    vm_dir: PathBuf,
    vsock: PathBuf,
    console: PathBuf,
    vmm_log: PathBuf,
    rootfs: RootfsImage,
    next_id: AtomicU32,
    api_socket: Option<PathBuf>,
    spare_disks: u8,
    call_timeout: Option<Duration>,
}

// The boot tier shares one sandbox between test threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Sandbox>();
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most the jailed VMM may write to one file: its log's allowance
/// (the console keeps itself under [`CONSOLE_MAX_BYTES`]), or, while it
/// snapshots, the guest's memory: the configured size for a cold boot,
/// the snapshot's own for a restore. Its disks are read-only.
fn max_file_bytes(cfg: &SandboxConfig) -> io::Result<u64> {
    let logs = VMM_LOG_MAX_BYTES.max(CONSOLE_MAX_BYTES);
    if cfg.snapshot_into.is_none() {
        return Ok(logs);
    }
    let memory = match &cfg.restore_from {
        Some(dir) => std::fs::metadata(dir.join(bulkhead_vmm_api::snapshot::MEMORY_FILE))?.len(),
        None => u64::from(cfg.mem_mib) << 20,
    };
    Ok(logs.max(memory))
}

/// The VMM's jail: read-only, what it boots or restores from and its
/// disks; writable, its VM directory and a snapshot target.
fn jail_config(
    cfg: &SandboxConfig,
    config: &LaunchConfig,
    run_dir: &Path,
    vm_dir: &Path,
    id: &JailId,
) -> Result<JailConfig, SandboxError> {
    let ro = |path: &Path| JailPath {
        path: path.to_path_buf(),
        writable: false,
    };
    let rw = |path: &Path| JailPath {
        path: path.to_path_buf(),
        writable: true,
    };
    let mut paths = vec![rw(vm_dir)];
    match config {
        LaunchConfig::Boot(c) => {
            paths.push(ro(&c.kernel));
            paths.extend(c.initrd.as_deref().map(ro));
        }
        LaunchConfig::Restore(r) => paths.push(ro(&r.snapshot_dir)),
    }
    if !cfg.rootfs.path.starts_with(vm_dir) {
        paths.push(ro(&cfg.rootfs.path));
    }
    paths.extend(cfg.snapshot_into.as_deref().map(rw));
    let root = run_dir.join(JAIL_ROOT_DIR);
    std::fs::DirBuilder::new().mode(0o700).create(&root)?;
    Ok(JailConfig {
        root,
        uid: id.uid(),
        gid: id.gid(),
        paths,
        parent_fd: Some(crate::spawn::PARENT_FD),
        max_file_bytes: Some(max_file_bytes(cfg)?),
    })
}

/// A jail identity; none, with a warning, where this user namespace maps
/// no such ids (a root runtime inside a rootless container), which then
/// runs its VMMs as an unprivileged runtime does: unjailed, filtered.
fn jail_id_or_none() -> Result<Option<JailId>, JailError> {
    match JailId::allocate() {
        Ok(id) => Ok(Some(id)),
        Err(e @ JailError::Unmapped { .. }) => {
            tracing::warn!("VMMs run unjailed: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A directory of the run directory's, with exactly `mode` (not the
/// umask's).
fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn stopped(status: ExitStatus, console: &Path, vmm_log: &Path) -> SandboxError {
    SandboxError::VmStopped {
        reason: bulkhead_vmm_api::exit::describe(status),
        console: util::tail_lines(console, CONSOLE_LINES),
        vmm_log: util::tail_lines(vmm_log, 10),
    }
}

impl Sandbox {
    /// Boots and waits for the agent.
    pub fn boot(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        Self::boot_with(cfg, |_| Ok(()))
    }

    /// Boots; `watch` is called while waiting for the agent and may end
    /// the wait with a reason ([`SandboxError::Aborted`]).
    pub fn boot_with(
        cfg: &SandboxConfig,
        mut watch: impl FnMut(&BootProgress) -> Result<(), String>,
    ) -> Result<Sandbox, SandboxError> {
        let root = cfg.runtime_root.clone().unwrap_or_else(rundir::default_root);
        // Root and CAP_SYS_ADMIN: what the jail needs. Taken before the
        // run directory so that, on any early return, it is released only
        // after the directory and the VMM are gone.
        let jail_id = match cfg.jail && crate::vmm_process::can_make_namespaces() {
            true => jail_id_or_none()?,
            false => None,
        };
        let dir = RunDir::create(&root)?;
        let owner = jail_id.as_ref().map(|id| (id.uid(), id.gid()));
        let vm_dir = dir.path().join(VM_DIR);
        make_dir(&vm_dir, 0o711)?;
        let vsock = vm_dir.join("v.sock");
        let console = vm_dir.join("console.log");
        util::create_new(&console, 0o600, owner)?;
        let vmm_log = dir.path().join("vmm.log");
        let keeper = ConsoleKeeper {
            from: console.clone(),
            to: cfg.keep_console.clone(),
        };
        let ro = |path: PathBuf| BlockConfig { path, read_only: true };
        let mut disks = vec![ro(cfg.rootfs.path.clone())];
        if cfg.spare_disks > 0 {
            let empty = vm_dir.join(EMPTY_DISK_FILE);
            util::create_new(&empty, 0o444, None)?.write_all(&[0u8; EMPTY_DISK_BYTES])?;
            disks.extend(std::iter::repeat_n(ro(empty), usize::from(cfg.spare_disks)));
        }
        let api_socket = cfg.api_socket.then(|| vm_dir.join("api.sock"));
        let vsock_config = VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: vsock.clone(),
        };
        let serial = SerialOutput::File(console.clone());
        let config = match &cfg.restore_from {
            Some(snapshot_dir) => LaunchConfig::Restore(RestoreConfig {
                api_socket: api_socket.clone(),
                vsock: Some(vsock_config),
                serial,
                disks: Some(disks),
                ..RestoreConfig::new(snapshot_dir)
            }),
            None => LaunchConfig::Boot(VmConfig {
                initrd: Some(cfg.artifacts.initramfs.clone()),
                vcpus: cfg.vcpus,
                mem_mib: cfg.mem_mib,
                serial,
                disks,
                vsock: Some(vsock_config),
                api_socket: api_socket.clone(),
                ..VmConfig::new(&cfg.artifacts.kernel)
            }),
        };
        let host_cgroup = match &cfg.host_cgroup {
            Some(path) => Some(HostCgroup::create(path, Limits::for_vm(cfg.vcpus, cfg.mem_mib))?),
            None => None,
        };
        let procs = host_cgroup.as_ref().map(HostCgroup::procs_files).transpose()?;
        let jail = match &jail_id {
            Some(id) => Some(jail_config(cfg, &config, dir.path(), &vm_dir, id)?),
            None => None,
        };
        let spec = Launch {
            vmm: cfg.artifacts.vmm.clone(),
            config,
            config_file: dir.path().join("vmm.json"),
            log: vmm_log.clone(),
            join_cgroups: procs.iter().flatten().map(|f| f.as_raw_fd()).collect(),
            own_namespaces: crate::vmm_process::can_make_namespaces(),
            jail,
        };
        let retry_every = match cfg.restore_from {
            Some(_) => RESTORE_RETRY_EVERY,
            None => agent_conn::RETRY_EVERY,
        };
        let vmm = Mutex::new(VmmProcess::spawn(&spec)?);
        drop(procs);
        let waited = agent_conn::wait_for_agent(&vsock, retry_every, |elapsed| {
            if let Some(status) = lock(&vmm).try_status()? {
                return Err(stopped(status, &console, &vmm_log));
            }
            if let Some(limit) = cfg.boot_timeout.filter(|l| elapsed >= *l) {
                return Err(SandboxError::BootTimeout {
                    after: limit,
                    console: util::tail_lines(&console, CONSOLE_LINES),
                });
            }
            watch(&BootProgress {
                elapsed,
                console: &console,
            })
            .map_err(SandboxError::Aborted)
        });
        let client = match waited {
            Ok(c) => c,
            Err(WaitError::Check(e)) => return Err(e),
            Err(WaitError::Conn(e)) => {
                // A refused handshake is the agent's word; anything else
                // may be the VMM going away.
                let status = lock(&vmm).wait_timeout(Duration::from_secs(2))?;
                return Err(match status {
                    Some(s) => stopped(s, &console, &vmm_log),
                    None => e.into(),
                });
            }
        };
        tracing::debug!("agent reached through {}", vsock.display());
        let mut client = client;
        if cfg.restore_from.is_some() {
            // Every restored guest starts from the same memory: it must be
            // made unique (random pool, clock) before it runs anything.
            // (The VMM holds host connections until the guest has handled
            // the restore's transport reset, so this stream is not lost.)
            reseed(&mut client).map_err(|e| match lock(&vmm).try_status() {
                Ok(Some(status)) => stopped(status, &console, &vmm_log),
                _ => e,
            })?;
        }
        Ok(Sandbox {
            first_client: Mutex::new(Some(client)),
            vmm,
            shown: Mutex::new(vec![None; usize::from(cfg.spare_disks) + 1]),
            host_cgroup,
            _console_keeper: keeper,
            dir,
            jail_id,
            vm_dir,
            vsock,
            console,
            vmm_log,
            rootfs: cfg.rootfs.clone(),
            next_id: AtomicU32::new(1),
            api_socket,
            spare_disks: cfg.spare_disks,
            call_timeout: cfg.call_timeout,
        })
    }

    pub fn spare_disks(&self) -> u8 {
        self.spare_disks
    }

    /// The VMM's control API, when [`SandboxConfig::api_socket`] asked for one.
    pub fn api(&self) -> Result<ApiClient, SandboxError> {
        let sock = self.api_socket.as_deref().ok_or(SandboxError::NoApi)?;
        Ok(ApiClient::new(sock, API_TIMEOUT))
    }

    /// Pauses (or resumes) every vCPU of the VM.
    pub fn set_paused(&self, paused: bool) -> Result<(), SandboxError> {
        let state = if paused {
            TargetState::Paused
        } else {
            TargetState::Resumed
        };
        self.api()?.set_state(state).map_err(|e| self.explain(e))
    }

    /// Gives spare disk `slot` (1-based: slot 1 is /dev/vdb) the image at
    /// `path`; the guest sees the new size shortly after (the agent waits
    /// for it, see `Root::size_bytes`). The disk must be unused in the guest.
    /// A jailed VMM sees the image bound at a path in its VM directory,
    /// in its own mount namespace only.
    pub fn attach_image(&self, slot: u8, path: &Path) -> Result<(), SandboxError> {
        self.replace_disk(slot, Some(path))
    }

    /// Empties spare disk `slot` again, so the VMM lets go of its image.
    pub fn detach_image(&self, slot: u8) -> Result<(), SandboxError> {
        self.replace_disk(slot, None)
    }

    fn replace_disk(&self, slot: u8, image: Option<&Path>) -> Result<(), SandboxError> {
        if slot == 0 || slot > self.spare_disks {
            return Err(SandboxError::NoSuchDisk {
                slot,
                count: self.spare_disks,
            });
        }
        let api = self.api()?;
        let mut shown = lock(&self.shown);
        let (path, mount_point) = match (image, &self.jail_id) {
            (None, _) => (self.vm_dir.join(EMPTY_DISK_FILE), None),
            (Some(p), None) => (p.to_path_buf(), None),
            (Some(p), Some(_)) => {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                let target = self.vm_dir.join(format!("disk{slot}-{n}.img"));
                util::create_new(&target, 0o444, None)?;
                // Held so that the VMM cannot be reaped, and its pid
                // reused, while the helper enters its namespace.
                let vmm = lock(&self.vmm);
                let bound = match vmm.unreaped_pid() {
                    Some(pid) => jail::bind_into(pid, p, &target),
                    None => Err(jail::JailError::Bind {
                        image: p.to_path_buf(),
                        target: target.clone(),
                        why: "the VMM has ended".into(),
                    }),
                };
                drop(vmm);
                if let Err(e) = bound {
                    let _ = std::fs::remove_file(&target);
                    return Err(e.into());
                }
                (target.clone(), Some(target))
            }
        };
        let replaced = api.replace_drive(slot, &path).map_err(|e| self.explain(e));
        // The mount point no longer in use: unlinking it on the host
        // detaches the mount in the VMM's namespace too.
        let unused = match replaced {
            Ok(()) => std::mem::replace(&mut shown[usize::from(slot)], mount_point),
            Err(_) => mount_point,
        };
        if let Some(old) = unused {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!("cannot remove {}: {e}", old.display());
            }
        }
        replaced
    }

    /// The uid and gid of the jailed VMM, when it is jailed.
    pub fn jail_identity(&self) -> Option<(u32, u32)> {
        self.jail_id.as_ref().map(|id| (id.uid(), id.gid()))
    }

    /// Hands [`SandboxConfig::snapshot_into`] to the jailed VMM so that it
    /// can write a snapshot there; give it back to root with
    /// [`jail::reclaim`] once the VMM is gone.
    pub fn lend_for_snapshot(&self, dir: &Path) -> Result<(), SandboxError> {
        if let Some((uid, gid)) = self.jail_identity() {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The VMM's vsock socket (`<run dir>/vm/v.sock`).
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    /// The VMM's control API socket, when [`SandboxConfig::api_socket`] asked for one.
    pub fn api_socket_path(&self) -> Option<&Path> {
        self.api_socket.as_deref()
    }

    pub fn console_path(&self) -> &Path {
        &self.console
    }

    pub fn console_tail(&self, n: usize) -> Vec<String> {
        util::tail_lines(&self.console, n)
    }

    /// The VMM's host cgroup, when [`SandboxConfig::host_cgroup`] named one.
    pub fn host_cgroup(&self) -> Option<&HostCgroup> {
        self.host_cgroup.as_ref()
    }

    pub fn vmm_pid(&self) -> u32 {
        lock(&self.vmm).pid()
    }

    /// Kills the VMM now (through its handle, so never a reused pid) and
    /// reaps it; the sandbox's streams then fail as for any lost VM.
    pub fn kill_vmm(&self) -> Result<ExitStatus, SandboxError> {
        Ok(lock(&self.vmm).kill()?)
    }

    /// The VMM's exit status once it has ended.
    pub fn vmm_exit(&self) -> Result<Option<ExitStatus>, SandboxError> {
        Ok(lock(&self.vmm).try_status()?)
    }

    /// When an operation fails because the VM went away, says so (with
    /// the console) instead of "connection reset".
    pub fn explain(&self, e: impl Into<SandboxError>) -> SandboxError {
        let e = e.into();
        let transport = matches!(
            e,
            SandboxError::Agent(ClientError::Frame(_)) | SandboxError::Conn(_) | SandboxError::Stdio(_)
        );
        if transport {
            if let Ok(Some(status)) = lock(&self.vmm).wait_timeout(Duration::from_secs(2)) {
                return stopped(status, &self.console, &self.vmm_log);
            }
        }
        e
    }

    /// A request stream to the agent (each caller may hold its own; a
    /// blocking `wait` holds only its stream).
    pub fn client(&self) -> Result<AgentClient, SandboxError> {
        if let Some(c) = lock(&self.first_client).take() {
            return Ok(c);
        }
        agent_conn::connect_agent(&self.vsock).map_err(|e| self.explain(e))
    }

    /// A request stream for calls that answer promptly (`create`, `start`,
    /// `exec_start`, signals): its connection and every answer are bounded
    /// by [`SandboxConfig::call_timeout`]; a connection that runs out of
    /// it is `op` unanswered. Never for `wait`.
    pub fn request_client(&self, op: &'static str) -> Result<AgentClient, SandboxError> {
        let Some(limit) = self.call_timeout else {
            return self.client();
        };
        let first = lock(&self.first_client).take();
        let client = match first {
            Some(c) => c,
            None => agent_conn::connect_agent_bounded(&self.vsock, limit).map_err(|e| self.failed(op, e))?,
        };
        let s = client.get_ref();
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        Ok(client)
    }

    /// As [`Sandbox::explain`], and a call that ran out of
    /// [`SandboxConfig::call_timeout`] becomes [`SandboxError::Unanswered`].
    fn failed(&self, op: &'static str, e: impl Into<SandboxError>) -> SandboxError {
        let e = e.into();
        match self.call_timeout {
            Some(after) if ran_out(&e) => SandboxError::Unanswered { op, after },
            _ => self.explain(e),
        }
    }

    /// Runs `call` on a fresh request stream whose connection and every
    /// answer are bounded by `deadline`: for control requests (signals,
    /// stats, delete), so a guest that stops answering fails them with
    /// [`SandboxError::Unanswered`] instead of hanging its caller.
    pub fn with_deadline<T>(
        &self,
        op: &'static str,
        deadline: Duration,
        call: impl FnOnce(&mut AgentClient) -> Result<T, ClientError>,
    ) -> Result<T, SandboxError> {
        let unanswered = SandboxError::Unanswered { op, after: deadline };
        let mut client = match agent_conn::connect_agent_bounded(&self.vsock, deadline) {
            Ok(c) => c,
            Err(e) if timed_out(&e) => return Err(unanswered),
            Err(e) => return Err(self.explain(e)),
        };
        match call(&mut client) {
            Ok(v) => Ok(v),
            Err(ClientError::Frame(f)) if frame_timed_out(&f) => Err(unanswered),
            Err(e) => Err(self.explain(e)),
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A container over this sandbox's root image with the usual defaults
    /// (see [`container_spec`]).
    pub fn container(&self, id: &str, process: Process) -> CreateContainer {
        container_spec(id, process, &self.rootfs)
    }

    /// Opens and attaches the stdio streams of `plan`, then sends `req` (a
    /// `Create` or `Exec`) naming them; returns the answer and the streams.
    fn call_with_stdio(
        &self,
        client: &mut AgentClient,
        mut req: Request,
        plan: StdioPlan,
    ) -> Result<(bulkhead_protocol::messages::Response, StdioStreams), SandboxError> {
        let op = bulkhead_protocol::client::op_name(&req);
        let (tokens, streams) =
            stdio::open_streams(&self.vsock, plan, self.call_timeout).map_err(|e| self.failed(op, e))?;
        match &mut req {
            Request::Create { container } => container.stdio = tokens,
            Request::Exec { stdio, .. } => *stdio = tokens,
            _ => {}
        }
        req.validate()?;
        // On failure the streams are dropped, which closes them.
        let answer = client.call(&req).map_err(|e| self.failed(op, e))?;
        Ok((answer, streams))
    }

    /// `Create`; the process waits for [`Sandbox::start`].
    pub fn create(
        &self,
        client: &mut AgentClient,
        container: CreateContainer,
        plan: StdioPlan,
    ) -> Result<StdioStreams, SandboxError> {
        let req = Request::Create { container };
        let (answer, streams) = self.call_with_stdio(client, req, plan)?;
        match answer {
            bulkhead_protocol::messages::Response::Ok => Ok(streams),
            got => Err(ClientError::Unexpected {
                op: "create".into(),
                got: Box::new(got),
            }
            .into()),
        }
    }

    /// `Start`, returning the process's pid in the guest.
    pub fn start(&self, client: &mut AgentClient, container_id: &str) -> Result<u32, SandboxError> {
        client
            .call_started(&Request::Start {
                container_id: container_id.into(),
            })
            .map_err(|e| self.failed("start", e))
    }

    /// `Exec`: the process starts at once; returns its pid and streams.
    pub fn exec_start(
        &self,
        client: &mut AgentClient,
        container_id: &str,
        exec_id: &str,
        process: Process,
        plan: StdioPlan,
    ) -> Result<(u32, StdioStreams), SandboxError> {
        let req = Request::Exec {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process,
            stdio: Default::default(),
        };
        let (answer, streams) = self.call_with_stdio(client, req, plan)?;
        match answer {
            bulkhead_protocol::messages::Response::Started { pid } => Ok((pid, streams)),
            got => Err(ClientError::Unexpected {
                op: "exec".into(),
                got: Box::new(got),
            }
            .into()),
        }
    }

    /// Creates, starts and waits for a container, feeding it `stdin` (none:
    /// it reads /dev/null) and collecting its output.
    pub fn run_container(
        &self,
        container: CreateContainer,
        stdin: Option<&[u8]>,
    ) -> Result<ProcessOutput, SandboxError> {
        let plan = StdioPlan {
            stdin: stdin.is_some(),
            tty: container.process.terminal,
        };
        let id = container.id.clone();
        let mut c = self.client()?;
        let streams = self.create(&mut c, container, plan)?;
        let io = Collector::start(streams, stdin)?;
        self.start(&mut c, &id)?;
        let status = c.wait(&id, None).map_err(|e| self.explain(e))?;
        io.finish(status)
    }

    /// [`Sandbox::run_container`] with a new container of default settings
    /// (ids `run-1`, `run-2`, ...).
    pub fn run_process(&self, process: Process, stdin: Option<&[u8]>) -> Result<ProcessOutput, SandboxError> {
        let id = self.next_id("run");
        self.run_container(self.container(&id, process), stdin)
    }

    /// Runs `process` in the existing container `container_id` to its end
    /// (exec ids `exec-1`, ...).
    pub fn exec(
        &self,
        container_id: &str,
        process: Process,
        stdin: Option<&[u8]>,
    ) -> Result<ProcessOutput, SandboxError> {
        let exec_id = self.next_id("exec");
        let plan = StdioPlan {
            stdin: stdin.is_some(),
            tty: process.terminal,
        };
        let mut c = self.client()?;
        let (_pid, streams) = self.exec_start(&mut c, container_id, &exec_id, process, plan)?;
        let io = Collector::start(streams, stdin)?;
        let status = c.wait(container_id, Some(&exec_id)).map_err(|e| self.explain(e))?;
        io.finish(status)
    }

    /// Asks the guest to stop (best effort), waits up to
    /// [`SHUTDOWN_TIMEOUT`] for the VMM, kills it past that, and removes
    /// the run directory. Returns the VMM's exit status.
    pub fn shutdown(self) -> Result<ExitStatus, SandboxError> {
        lock(&self.first_client).take();
        if lock(&self.vmm).try_status()?.is_none() {
            let asked = agent_conn::connect_agent_bounded(&self.vsock, Duration::from_secs(10))
                .map_err(SandboxError::from)
                .and_then(|mut c| Ok(c.call_ok(&Request::Shutdown)?));
            if let Err(e) = asked {
                tracing::debug!("shutdown request: {e}");
            }
        }
        let mut vmm = lock(&self.vmm);
        match vmm.wait_timeout(SHUTDOWN_TIMEOUT)? {
            Some(s) => Ok(s),
            None => {
                tracing::warn!(
                    "the VM did not stop within {} s; killing it",
                    SHUTDOWN_TIMEOUT.as_secs()
                );
                Ok(vmm.kill()?)
            }
        }
    }
}

/// Sends `Reseed`: fresh entropy from the host's getrandom and the host's
/// wall-clock time.
fn reseed(client: &mut AgentClient) -> Result<(), SandboxError> {
    let entropy = util::random_hex(RESEED_BYTES)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| io::Error::other(format!("the host clock is before 1970: {e}")))?;
    let realtime_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    let req = Request::Reseed { entropy, realtime_ns };
    req.validate()?;
    client.call_ok(&req)?;
    Ok(())
}

/// A container over the root image `rootfs` (attached as [`ROOT_DEVICE`])
/// with the usual defaults: mounts, masked and read-only paths and device
/// rules from `bulkhead_protocol::defaults`, no resource limits; stdio is filled in
/// when it is sent.
pub fn container_spec(id: &str, process: Process, rootfs: &RootfsImage) -> CreateContainer {
    on_device(id, process, rootfs, ROOT_DEVICE.into(), None)
}

/// The guest's name for disk `index` (0: the root disk, /dev/vda).
pub fn disk_device(index: u8) -> String {
    format!("/dev/vd{}", char::from(b'a' + index % 26))
}

/// [`container_spec`] with its root on disk `index`; one above 0 is a
/// spare disk that got `rootfs` after boot, so the agent waits for its size.
pub fn container_on_disk(id: &str, process: Process, rootfs: &RootfsImage, index: u8) -> io::Result<CreateContainer> {
    let size_bytes = match index {
        0 => None,
        _ => Some(std::fs::metadata(&rootfs.path)?.len()),
    };
    Ok(on_device(id, process, rootfs, disk_device(index), size_bytes))
}

fn on_device(
    id: &str,
    process: Process,
    rootfs: &RootfsImage,
    device: String,
    size_bytes: Option<u64>,
) -> CreateContainer {
    CreateContainer {
        id: id.into(),
        hostname: None,
        root: Root {
            device,
            fstype: rootfs.fstype.as_str().into(),
            size_bytes,
            readonly: false,
        },
        mounts: defaults::mounts(),
        masked_paths: defaults::masked_paths(),
        readonly_paths: defaults::readonly_paths(),
        process,
        stdio: Default::default(),
        resources: Default::default(),
        sysctl: Default::default(),
        join: Default::default(),
        init: false,
        seccomp: None,
        device_rules: defaults::device_rules(),
        device_nodes: Vec::new(),
    }
}

/// Feeds stdin and collects stdout/stderr of one process on threads.
struct Collector {
    rx: mpsc::Receiver<(&'static str, io::Result<Vec<u8>>)>,
    expected: usize,
}

impl Collector {
    fn start(streams: StdioStreams, stdin: Option<&[u8]>) -> Result<Collector, SandboxError> {
        let (tx, rx) = mpsc::channel();
        let mut expected = 0;
        // A terminal's one stream carries stdin too.
        let input_to = match (&streams.stdin, &streams.stdout) {
            (Some(s), _) => Some(s.try_clone()?),
            (None, Some(s)) if stdin.is_some() => Some(s.try_clone()?),
            _ => None,
        };
        if let (Some(to), Some(bytes)) = (input_to, stdin) {
            stdio::copy_in(io::Cursor::new(bytes.to_vec()), to)?;
        }
        for (name, s) in [("stdout", streams.stdout), ("stderr", streams.stderr)] {
            if let Some(s) = s {
                let tx = tx.clone();
                let h = stdio::collect(s)?;
                expected += 1;
                std::thread::Builder::new()
                    .name(format!("join-{name}"))
                    .spawn(move || {
                        let r = h.join().unwrap_or_else(|_| Err(io::Error::other("collector panicked")));
                        let _ = tx.send((name, r));
                    })?;
            }
        }
        Ok(Collector { rx, expected })
    }

    fn finish(self, status: i32) -> Result<ProcessOutput, SandboxError> {
        let mut out = ProcessOutput {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        for _ in 0..self.expected {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (name, r) = self
                .rx
                .recv_timeout(left)
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the process's output did not end"))?;
            let bytes = r?;
            match name {
                "stdout" => out.stdout = bytes,
                _ => out.stderr = bytes,
            }
        }
        Ok(out)
    }
}

/// A bounded connection that ran out of time, waiting or in the hello.
fn timed_out(e: &ConnError) -> bool {
    match e {
        ConnError::TimedOut(_) => true,
        ConnError::Client(ClientError::Frame(f)) => frame_timed_out(f),
        _ => false,
    }
}

/// A read or write on a stream with a timeout that passed.
fn frame_timed_out(e: &FrameError) -> bool {
    matches!(e, FrameError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// A bounded call's connection, stdio stream or answer ran out of time.
fn ran_out(e: &SandboxError) -> bool {
    match e {
        SandboxError::Conn(c) | SandboxError::Stdio(StdioError::Connect { source: c, .. }) => timed_out(c),
        SandboxError::Agent(ClientError::Frame(f)) | SandboxError::Stdio(StdioError::Attach { source: f, .. }) => {
            frame_timed_out(f)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_message_shows_the_console() {
        let e = SandboxError::VmStopped {
            reason: "VMM error (exit status 1)".into(),
            console: vec!["[0.1] Linux version 6.1".into(), "Kernel panic".into()],
            vmm_log: vec![],
        };
        let text = e.to_string();
        assert!(
            text.starts_with("the sandbox's VM stopped: VMM error (exit status 1)"),
            "{text}"
        );
        assert!(
            text.contains("last console lines:\n  [0.1] Linux version 6.1\n  Kernel panic"),
            "{text}"
        );
        assert!(!text.contains("VMM log"), "{text}");
    }
}
