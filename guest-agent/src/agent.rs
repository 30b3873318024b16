//! The agent's state and operations: containers, their processes, exit
//! statuses, and what each request does.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bulkhead_protocol::messages::{
    CreateContainer, ErrorKind, Mount, Process, Response, SeccompProgram, SharedNamespaces, StdioTokens,
};

use crate::cgroup::{Cgroup, CgroupError};
use crate::child::{self, TAG_PID, TAG_READY};
use crate::ctl::{self, Record};
use crate::devices;
use crate::disk;
use crate::oom::OomWatch;
use crate::plan::{self, ExecPlan, InitPlan, JoinPlan, MountStep, PlanError, SeccompPlan};
use crate::stdio::{self, Attached, Handles, Streams};
use crate::transport::Transport;
use crate::volume::{VolumeError, Volumes};
use bulkhead_protocol::volume::VOLUME_MOUNT_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Failed(String),
}

impl From<VolumeError> for OpError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NotReady(_) => OpError::NotFound(e.to_string()),
            VolumeError::Sealed(_) | VolumeError::TooLarge { .. } => OpError::Invalid(e.to_string()),
            VolumeError::Io { .. } => OpError::Failed(e.to_string()),
        }
    }
}

impl From<PlanError> for OpError {
    fn from(e: PlanError) -> Self {
        OpError::Invalid(e.to_string())
    }
}

impl From<CgroupError> for OpError {
    fn from(e: CgroupError) -> Self {
        OpError::Failed(e.to_string())
    }
}

impl OpError {
    pub fn response(&self) -> Response {
        let kind = match self {
            OpError::Invalid(_) => ErrorKind::Invalid,
            OpError::NotFound(_) => ErrorKind::NotFound,
            OpError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            OpError::Failed(_) => ErrorKind::Failed,
        };
        Response::Error {
            kind,
            message: self.to_string(),
        }
    }
}

fn failed(what: &str) -> impl FnOnce(io::Error) -> OpError + '_ {
    move |e| OpError::Failed(format!("{what}: {e}"))
}

pub struct Config {
    pub transport: Transport,
    /// Per-container mounts live under here.
    pub state_dir: PathBuf,
    /// Where `/dev/vdX` names resolve, and the device nodes a container's
    /// `/dev` gets.
    pub dev_dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// Tell workloads' glibc to leave alone the vector registers this
    /// kernel does not switch (see `vector_state`).
    pub glibc_tunable: bool,
}

struct Proc {
    pid: i32,
    pidfd: Option<OwnedFd>,
    status: Option<i32>,
    io: Handles,
    /// A `wait` has seen the status, so a finished exec may be forgotten.
    waited: bool,
}

impl Proc {
    fn new(pid: i32, io: Handles) -> Proc {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        Proc {
            pid,
            // SAFETY: a fresh descriptor we own.
            pidfd: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }),
            status: None,
            io,
            waited: false,
        }
    }

    /// Its exit is known: the pidfd and stdio handles are no longer needed
    /// (the copying threads hold their own).
    fn exited(&mut self, status: i32) {
        self.status = Some(status);
        self.pidfd = None;
        self.io = Handles::default();
    }

    /// Signals through the pidfd, so a recycled pid is never hit.
    fn signal(&self, sig: i32) -> Result<(), OpError> {
        if self.status.is_some() {
            return Err(OpError::NotFound("the process has exited".into()));
        }
        let ret = match &self.pidfd {
            // SAFETY: pidfd_send_signal with no siginfo.
            Some(fd) => unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, 0, 0) },
            // SAFETY: kill has no memory effects.
            None => (unsafe { libc::kill(self.pid, sig) }) as libc::c_long,
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(OpError::Failed(format!("signal {sig}: {e}")));
            }
        }
        Ok(())
    }
}

struct Container {
    init: Proc,
    /// The init's control socket until `start` uses it.
    ctl: Option<OwnedFd>,
    started: bool,
    cgroup: Cgroup,
    /// The init's namespaces, in setns order ([`NAMESPACES`]), for `exec`
    /// and for containers that join them.
    namespaces: Vec<File>,
    /// The init is a helper that started the workload as its child.
    helper_init: bool,
    /// Loaded for every exec, as for the workload.
    seccomp: Option<SeccompProgram>,
    /// Innermost last; unmounted in reverse on delete.
    mounts: Vec<PathBuf>,
    dir: PathBuf,
    /// As the host named it (`/dev/vdX`).
    root_device: String,
    execs: HashMap<String, Proc>,
}

/// A container's namespaces as `exec` joins them: mnt last, since
/// entering it changes how later paths resolve.
const NAMESPACES: [&str; 5] = ["cgroup", "ipc", "uts", "pid", "mnt"];

impl Container {
    fn namespace(&self, kind: &str) -> Option<&File> {
        NAMESPACES
            .iter()
            .position(|n| *n == kind)
            .and_then(|i| self.namespaces.get(i))
    }
}

/// Descriptors of the namespaces a new container joins.
#[derive(Default)]
struct Joined {
    ipc: Option<OwnedFd>,
    uts: Option<OwnedFd>,
    pid: Option<OwnedFd>,
}

/// Whose exit a pid is, so the reaper can record it.
type Owner = (String, Option<String>);

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    /// Every child the agent waits for is registered here before it can
    /// exit: inits and exec's middle processes under the lock held across
    /// the clone, exec'd processes before they get the go-ahead to run.
    /// Anything else reaped is an orphan and is forgotten.
    owners: HashMap<i32, Owner>,
    /// exec's short-lived middle processes, reaped and forgotten.
    intermediates: HashSet<i32>,
}

/// Finished and waited-for execs kept per container before the oldest go.
const MAX_FINISHED_EXECS: usize = 64;

impl State {
    fn proc_mut(&mut self, id: &str, exec: Option<&str>) -> Result<&mut Proc, OpError> {
        let c = self
            .containers
            .get_mut(id)
            .ok_or_else(|| OpError::NotFound(format!("no container {id:?}")))?;
        match exec {
            None => Ok(&mut c.init),
            Some(e) => c
                .execs
                .get_mut(e)
                .ok_or_else(|| OpError::NotFound(format!("no exec {e:?} in container {id:?}"))),
        }
    }

    fn container(&self, id: &str) -> Result<&Container, OpError> {
        self.containers
            .get(id)
            .ok_or_else(|| OpError::NotFound(format!("no container {id:?}")))
    }

    fn register(&mut self, pid: i32, owner: Owner) {
        self.owners.insert(pid, owner);
    }
}

/// The shell's view of a wait status.
pub fn shell_status(raw: i32) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        255
    }
}

pub struct Agent {
    cfg: Config,
    state: Mutex<State>,
    exited: Condvar,
    /// Serialises `create`, so two requests for one id cannot both build.
    creating: Mutex<()>,
    pub oom: OomWatch,
    /// Stdio streams the host opened, until a request names them.
    pub attached: Arc<Attached>,
    /// Copied-in volumes, apart from `state`: filling one takes a while.
    volumes: Mutex<Volumes>,
}

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"));
    let (src, tgt, fs, d) = (
        c(source.as_bytes())?,
        c(target.as_os_str().as_encoded_bytes())?,
        c(fstype.as_bytes())?,
        c(data.as_bytes())?,
    );
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, d.as_ptr().cast()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn mount_tmpfs(target: &Path, data: &str) -> io::Result<()> {
    mount("tmpfs", target, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, data)
}

pub(crate) fn remount_read_only(target: &Path) -> io::Result<()> {
    let flags = libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount("", target, "", flags, "")
}

pub(crate) fn unmount(target: &Path) {
    if let Ok(t) = CString::new(target.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Agent {
    pub fn new(cfg: Config) -> io::Result<Agent> {
        fs::create_dir_all(&cfg.state_dir)?;
        Ok(Agent {
            volumes: Mutex::new(Volumes::new(&cfg.state_dir)),
            cfg,
            state: Mutex::new(State::default()),
            exited: Condvar::new(),
            creating: Mutex::new(()),
            oom: OomWatch::new()?,
            attached: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take every later request down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a reaped child's exit.
    pub fn reaped(&self, pid: i32, raw: i32) {
        let status = shell_status(raw);
        let mut st = self.lock();
        if st.intermediates.remove(&pid) {
            return;
        }
        match st.owners.remove(&pid) {
            Some((id, exec)) => {
                if let Ok(p) = st.proc_mut(&id, exec.as_deref()) {
                    p.exited(status);
                    tracing::info!(container = %id, exec = ?exec, pid, status, "process exited");
                }
            }
            None => tracing::debug!(pid, status, "reaped an orphan"),
        }
        drop(st);
        self.exited.notify_all();
    }

    fn resolve_device(&self, dev: &str) -> PathBuf {
        self.cfg.dev_dir.join(dev.trim_start_matches("/dev/"))
    }

    pub fn create(&self, c: &CreateContainer) -> Result<(), OpError> {
        let _one = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock().containers.contains_key(&c.id) {
            return Err(OpError::AlreadyExists(format!("container {:?} exists", c.id)));
        }
        let streams = self.take_streams(&c.stdio)?;
        let dir = self.cfg.state_dir.join(&c.id);
        let mut mounts = Vec::new();
        match self.build(c, &dir, &mut mounts, streams) {
            Ok(container) => {
                self.lock().containers.insert(c.id.clone(), container);
                tracing::info!(container = %c.id, "created");
                Ok(())
            }
            Err(e) => {
                for m in mounts.iter().rev() {
                    unmount(m);
                }
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Mounts the root, builds the cgroup and starts the container's init,
    /// which waits for `start`. `mounts` collects what to undo on failure.
    fn build(
        &self,
        c: &CreateContainer,
        dir: &Path,
        mounts: &mut Vec<PathBuf>,
        streams: Streams,
    ) -> Result<Container, OpError> {
        let (lower, rw, rootfs) = (dir.join("lower"), dir.join("rw"), dir.join("rootfs"));
        for d in [&lower, &rw, &rootfs] {
            fs::create_dir_all(d).map_err(failed("state directory"))?;
        }
        let device = self.resolve_device(&c.root.device);
        if let Some(bytes) = c.root.size_bytes {
            // A device another container has mounted keeps its image (the
            // host changes only unused ones); flushing it would only slow
            // that container down.
            let in_use = self.lock().containers.values().any(|o| o.root_device == c.root.device);
            if !in_use {
                disk::settle(&device, bytes, disk::SETTLE_WITHIN)
                    .map_err(|e| OpError::Failed(format!("the new image of {}: {e}", c.root.device)))?;
            }
        }
        mount(
            &device.to_string_lossy(),
            &lower,
            &c.root.fstype,
            libc::MS_RDONLY | libc::MS_NODEV,
            "",
        )
        .map_err(|e| OpError::Failed(format!("mounting {} ({}): {e}", c.root.device, c.root.fstype)))?;
        mounts.push(lower.clone());
        mount("tmpfs", &rw, "tmpfs", libc::MS_NODEV, "mode=755").map_err(failed("writable layer"))?;
        mounts.push(rw.clone());
        for d in ["upper", "work"] {
            fs::create_dir(rw.join(d)).map_err(failed("writable layer"))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        // nodev: device nodes in an untrusted image, or made with mknod in
        // the writable layer, give no access to the guest's devices.
        mount("overlay", &rootfs, "overlay", libc::MS_NODEV, &data).map_err(failed("overlay root"))?;
        mounts.push(rootfs.clone());

        let mut steps = Vec::new();
        for (i, m) in c.mounts.iter().enumerate() {
            if m.destination.trim_end_matches('/') == "/dev/shm" && m.kind == "tmpfs" {
                let shm = self.shared_memory(c, m, dir, mounts)?;
                let bind = Mount {
                    destination: m.destination.clone(),
                    kind: "bind".into(),
                    source: String::new(),
                    options: ["rbind", "nosuid", "nodev", "noexec"].map(String::from).to_vec(),
                };
                steps.push(MountStep::new(
                    &rootfs,
                    &bind,
                    &shm.to_string_lossy(),
                    Path::new("/dev"),
                )?);
                continue;
            }
            if m.kind == VOLUME_MOUNT_TYPE {
                // A copied-in volume: bound read-only from its tmpfs.
                let volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
                let source = volumes.source(&m.source)?.to_string_lossy().into_owned();
                let bind = Mount {
                    destination: m.destination.clone(),
                    kind: "bind".into(),
                    source: String::new(),
                    options: ["rbind", "ro", "nosuid", "nodev"].map(String::from).to_vec(),
                };
                steps.push(MountStep::new(&rootfs, &bind, &source, Path::new("/dev"))?);
                continue;
            }
            let mut source = m.source.clone();
            if m.kind == "bind" && source.starts_with("/dev/vd") {
                // A bind from a disk: mount the disk in the agent, bind that.
                let vol = dir.join(format!("volume{i}"));
                fs::create_dir_all(&vol).map_err(failed("volume"))?;
                let ro = if m.options.iter().any(|o| o == "ro") {
                    libc::MS_RDONLY
                } else {
                    0
                };
                let dev = self.resolve_device(&source);
                mount(&dev.to_string_lossy(), &vol, "ext4", ro | libc::MS_NODEV, "")
                    .map_err(|e| OpError::Failed(format!("mounting volume {source}: {e}")))?;
                mounts.push(vol.clone());
                source = vol.to_string_lossy().into_owned();
            }
            steps.push(MountStep::new(&rootfs, m, &source, Path::new("/dev"))?);
        }

        let cgroup = Cgroup::create(&self.cfg.cgroup_root, &c.id, &c.resources)?;
        if !c.device_rules.is_empty() {
            if let Err(e) = devices::attach(cgroup.path(), &c.device_rules) {
                cgroup.remove();
                return Err(OpError::Failed(format!("applying the device rules: {e}")));
            }
        }
        match self.start_init(c, &rootfs, steps, &cgroup, streams) {
            Ok((init, ctl, namespaces)) => Ok(Container {
                init,
                ctl: Some(ctl),
                started: false,
                cgroup,
                namespaces,
                helper_init: c.init,
                seccomp: c.seccomp.clone(),
                mounts: mounts.clone(),
                dir: dir.to_path_buf(),
                root_device: c.root.device.clone(),
                execs: HashMap::new(),
            }),
            Err(e) => {
                cgroup.remove();
                Err(e)
            }
        }
    }

    fn start_init(
        &self,
        c: &CreateContainer,
        rootfs: &Path,
        steps: Vec<MountStep>,
        cgroup: &Cgroup,
        streams: Streams,
    ) -> Result<(Proc, OwnedFd, Vec<File>), OpError> {
        let terminal = c.process.terminal;
        let (child_io, mut handles, tty_streams) = if terminal {
            (None, Handles::default(), Some(streams))
        } else {
            let (fds, h) = stdio::pipes(streams).map_err(failed("stdio"))?;
            (Some(fds), h, None)
        };
        let joined = self.joined(&c.join)?;
        let join: Vec<(libc::c_int, RawFd)> = [(libc::CLONE_NEWIPC, &joined.ipc), (libc::CLONE_NEWUTS, &joined.uts)]
            .into_iter()
            .filter_map(|(t, fd)| fd.as_ref().map(|f| (t, f.as_raw_fd())))
            .collect();
        let (ours, theirs) = ctl::pair().map_err(failed("control socket"))?;
        let procs = cgroup.procs_file()?;
        let stdio_fds: [RawFd; 3] = child_io
            .as_ref()
            .map_or([-1; 3], |f| [0, 1, 2].map(|i| f[i].as_raw_fd()));
        let plan = InitPlan {
            ctl: theirs.as_raw_fd(),
            cgroup_procs: procs.as_raw_fd(),
            keep_fds: plan::keep(
                stdio_fds
                    .into_iter()
                    .chain(join.iter().map(|(_, fd)| *fd))
                    .chain([theirs.as_raw_fd(), procs.as_raw_fd()]),
            ),
            mounts: steps,
            hostname: c
                .hostname
                .as_deref()
                .map(|h| CString::new(h).map_err(|_| OpError::Invalid("hostname".into())))
                .transpose()?,
            rootfs: CString::new(rootfs.as_os_str().as_encoded_bytes())
                .map_err(|_| OpError::Invalid("state path".into()))?,
            masked_paths: plan::paths(&c.masked_paths)?,
            readonly_paths: plan::paths(&c.readonly_paths)?,
            root_readonly: c.root.readonly,
            sysctls: plan::sysctls(&c.sysctl)?,
            stdio: stdio_fds,
            workload: ExecPlan::new(&c.process, self.cfg.glibc_tunable)?
                .with_seccomp(c.seccomp.as_ref().map(SeccompPlan::new)),
            join,
            helper_init: c.init,
            device_nodes: plan::device_nodes(rootfs, &c.device_nodes)?,
        };
        let mut flags = libc::CLONE_NEWNS;
        for (new, shared) in [
            (libc::CLONE_NEWIPC, joined.ipc.is_some()),
            (libc::CLONE_NEWUTS, joined.uts.is_some()),
            (libc::CLONE_NEWPID, joined.pid.is_some()),
        ] {
            if !shared {
                flags |= new;
            }
        }
        let pid = match &joined.pid {
            None => {
                // Hold the state lock across the clone, so the reaper cannot
                // see the init's exit before its owner is registered.
                let mut st = self.lock();
                let pid = child::raw_clone(flags as libc::c_ulong);
                if pid == 0 {
                    child::container_init(&plan);
                }
                if pid < 0 {
                    return Err(OpError::Failed(format!(
                        "starting the container init: {}",
                        io::Error::last_os_error()
                    )));
                }
                st.register(pid, (c.id.clone(), None));
                pid
            }
            Some(pid_ns) => self.init_in_pid_namespace(&plan, pid_ns, flags, &ours, &c.id)?,
        };
        drop((theirs, procs, child_io, joined));
        let mut init = Proc::new(pid, Handles::default());

        let abort = |msg: String| {
            // SAFETY: kill has no memory effects; the reaper collects it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            OpError::Failed(msg)
        };
        match ctl::recv(&ours).map_err(failed("container init"))? {
            Record::Ok { tag: TAG_READY, fd, .. } => {
                if terminal {
                    let master = fd.ok_or_else(|| abort("the init sent no terminal".into()))?;
                    handles = stdio::terminal(tty_streams.unwrap_or_default(), File::from(master))
                        .map_err(|e| abort(format!("the terminal: {e}")))?;
                }
            }
            other => return Err(abort(format!("creating the container: {}", other.describe()))),
        }
        init.io = handles;
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| File::open(format!("/proc/{pid}/ns/{ns}")))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| abort(format!("opening the container's namespaces: {e}")))?;
        Ok((init, ours, namespaces))
    }

    /// The tmpfs behind a container's `/dev/shm`, kept in the agent's view
    /// so that containers joining its IPC namespace bind the same one:
    /// POSIX shared memory lives there, not in the namespace.
    fn shared_memory(
        &self,
        c: &CreateContainer,
        m: &Mount,
        dir: &Path,
        mounts: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, OpError> {
        if let Some(owner) = &c.join.ipc {
            let theirs = self.cfg.state_dir.join(owner).join("shm");
            if self.lock().containers.contains_key(owner) && theirs.is_dir() {
                return Ok(theirs);
            }
            return Err(OpError::NotFound(format!(
                "join.ipc: no container {owner:?} with a /dev/shm"
            )));
        }
        let shm = dir.join("shm");
        fs::create_dir_all(&shm).map_err(failed("/dev/shm"))?;
        let data: Vec<&str> = m
            .options
            .iter()
            .map(String::as_str)
            .filter(|o| o.contains('='))
            .collect();
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount("shm", &shm, "tmpfs", flags, &data.join(",")).map_err(failed("/dev/shm"))?;
        mounts.push(shm.clone());
        Ok(shm)
    }

    /// The namespaces `join` names, from containers of this VM that are
    /// still running (or created, waiting for `start`).
    fn joined(&self, join: &SharedNamespaces) -> Result<Joined, OpError> {
        let st = self.lock();
        let take = |kind: &str, owner: &Option<String>| -> Result<Option<OwnedFd>, OpError> {
            let Some(owner) = owner else { return Ok(None) };
            let c = st
                .containers
                .get(owner)
                .ok_or_else(|| OpError::NotFound(format!("join.{kind}: no container {owner:?}")))?;
            if c.init.status.is_some() {
                return Err(OpError::Failed(format!(
                    "join.{kind}: container {owner:?} has exited; its namespaces are gone"
                )));
            }
            let ns = c
                .namespace(kind)
                .ok_or_else(|| OpError::Failed(format!("join.{kind}: {owner:?} has no such namespace")))?;
            Ok(Some(ns.try_clone().map(OwnedFd::from).map_err(failed("namespaces"))?))
        };
        Ok(Joined {
            ipc: take("ipc", &join.ipc)?,
            uts: take("uts", &join.uts)?,
            pid: take("pid", &join.pid)?,
        })
    }

    /// Starts the init of a container inside another's PID namespace
    /// through a middle process; registers the init before it runs on.
    fn init_in_pid_namespace(
        &self,
        plan: &InitPlan,
        pid_ns: &OwnedFd,
        flags: libc::c_int,
        ours: &OwnedFd,
        id: &str,
    ) -> Result<i32, OpError> {
        let mut st = self.lock();
        let middle = child::raw_clone(0);
        if middle == 0 {
            child::init_in_pid_namespace(plan, pid_ns.as_raw_fd(), flags as libc::c_ulong);
        }
        if middle < 0 {
            return Err(OpError::Failed(format!(
                "starting the container init: {}",
                io::Error::last_os_error()
            )));
        }
        st.intermediates.insert(middle);
        drop(st);
        let pid = match ctl::recv(ours).map_err(failed("container init"))? {
            Record::Ok {
                tag: TAG_PID, value, ..
            } => value,
            other => return Err(OpError::Failed(format!("creating the container: {}", other.describe()))),
        };
        self.lock().register(pid, (id.to_string(), None));
        ctl::send_byte(ours, b'G').map_err(failed("container init"))?;
        Ok(pid)
    }

    pub fn start(&self, id: &str) -> Result<u32, OpError> {
        let (ctl, init_pid, helper) = {
            let mut st = self.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| OpError::NotFound(format!("no container {id:?}")))?;
            if c.started {
                return Err(OpError::AlreadyExists(format!("container {id:?} was already started")));
            }
            c.started = true;
            let ctl = c
                .ctl
                .take()
                .ok_or_else(|| OpError::Failed("container has no control socket".into()))?;
            (ctl, c.init.pid, c.helper_init)
        };
        ctl::send_byte(&ctl, b'S').map_err(failed("starting (the container init is gone)"))?;
        match ctl::recv(&ctl).map_err(failed("starting"))? {
            Record::Closed => {}
            other => return Err(OpError::Failed(format!("starting: {}", other.describe()))),
        }
        let workload = if helper {
            child_of(init_pid).unwrap_or(init_pid as u32)
        } else {
            init_pid as u32
        };
        tracing::info!(container = %id, pid = workload, "started");
        Ok(workload)
    }

    /// Takes the streams a request names; a bad token fails it at once.
    fn take_streams(&self, tokens: &StdioTokens) -> Result<Streams, OpError> {
        self.attached
            .take_all(tokens)
            .map_err(|e| OpError::Invalid(format!("stdio: {e}")))
    }

    pub fn exec(&self, id: &str, exec_id: &str, p: &Process, tokens: &StdioTokens) -> Result<u32, OpError> {
        let (init_pid, ns_fds, procs, seccomp) = {
            let st = self.lock();
            let c = st.container(id)?;
            if !c.started || c.init.status.is_some() {
                return Err(OpError::Failed(format!("container {id:?} is not running")));
            }
            if c.execs.contains_key(exec_id) {
                return Err(OpError::AlreadyExists(format!("exec {exec_id:?} exists in {id:?}")));
            }
            let ns: Vec<OwnedFd> = c
                .namespaces
                .iter()
                .map(|f| f.try_clone().map(OwnedFd::from))
                .collect::<io::Result<_>>()
                .map_err(failed("namespaces"))?;
            let seccomp = c.seccomp.as_ref().map(SeccompPlan::new);
            (c.init.pid, ns, c.cgroup.procs_file()?, seccomp)
        };
        let streams = self.take_streams(tokens)?;
        let (child_fds, handles): (Vec<OwnedFd>, Handles) = if p.terminal {
            let (master, slave) = stdio::open_container_pty(init_pid).map_err(failed("opening a terminal"))?;
            let h = stdio::terminal(streams, master).map_err(failed("the terminal"))?;
            (vec![slave], h)
        } else {
            let (fds, h) = stdio::pipes(streams).map_err(failed("stdio"))?;
            (fds.into(), h)
        };
        let stdio_fds: [RawFd; 3] = if p.terminal {
            [child_fds[0].as_raw_fd(); 3]
        } else {
            [0, 1, 2].map(|i| child_fds[i].as_raw_fd())
        };
        let (ours, theirs) = ctl::pair().map_err(failed("control socket"))?;
        let ns_raw: Vec<RawFd> = ns_fds.iter().map(|f| f.as_raw_fd()).collect();
        let plan = JoinPlan {
            ctl: theirs.as_raw_fd(),
            cgroup_procs: procs.as_raw_fd(),
            keep_fds: plan::keep(
                stdio_fds
                    .into_iter()
                    .chain(ns_raw.iter().copied())
                    .chain([theirs.as_raw_fd(), procs.as_raw_fd()]),
            ),
            namespaces: ns_raw,
            stdio: stdio_fds,
            process: ExecPlan::new(p, self.cfg.glibc_tunable)?.with_seccomp(seccomp),
        };
        let mut st = self.lock();
        let middle = child::raw_clone(0);
        if middle == 0 {
            child::exec_intermediate(&plan);
        }
        if middle < 0 {
            return Err(OpError::Failed(format!("exec: {}", io::Error::last_os_error())));
        }
        st.intermediates.insert(middle);
        drop(st);
        drop((theirs, procs, child_fds, ns_fds));

        let pid = match ctl::recv(&ours).map_err(failed("exec"))? {
            Record::Ok {
                tag: TAG_PID, value, ..
            } => value,
            other => return Err(OpError::Failed(format!("exec: {}", other.describe()))),
        };
        let proc_ = Proc::new(pid, handles);
        {
            let mut st = self.lock();
            st.register(pid, (id.to_string(), Some(exec_id.to_string())));
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| OpError::NotFound(format!("container {id:?} went away")))?;
            if c.execs.len() >= MAX_FINISHED_EXECS {
                c.execs.retain(|_, p| !(p.waited && p.status.is_some()));
            }
            c.execs.insert(exec_id.to_string(), proc_);
        }
        // Registered: the process may run (and exit) now.
        ctl::send_byte(&ours, b'G').map_err(failed("exec"))?;
        match ctl::recv(&ours).map_err(failed("exec"))? {
            Record::Closed => {
                tracing::info!(container = %id, exec = %exec_id, pid, "exec started");
                Ok(pid as u32)
            }
            other => {
                let mut st = self.lock();
                st.owners.remove(&pid);
                if let Some(c) = st.containers.get_mut(id) {
                    c.execs.remove(exec_id);
                }
                Err(OpError::Failed(format!("exec: {}", other.describe())))
            }
        }
    }

    pub fn signal(&self, id: &str, exec: Option<&str>, sig: i32, all: bool) -> Result<(), OpError> {
        let mut st = self.lock();
        if all {
            st.container(id)?.cgroup.signal_all(sig);
            return Ok(());
        }
        st.proc_mut(id, exec)?.signal(sig)
    }

    /// Blocks until the process has exited; answers at once afterwards.
    pub fn wait(&self, id: &str, exec: Option<&str>) -> Result<i32, OpError> {
        let mut st = self.lock();
        loop {
            let p = st.proc_mut(id, exec)?;
            if let Some(s) = p.status {
                p.waited = true;
                return Ok(s);
            }
            st = self.exited.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resize(&self, id: &str, exec: Option<&str>, rows: u16, cols: u16) -> Result<(), OpError> {
        let mut st = self.lock();
        let p = st.proc_mut(id, exec)?;
        let tty =
            p.io.tty
                .as_ref()
                .ok_or_else(|| OpError::Invalid("the process has no terminal".into()))?;
        stdio::resize(tty, rows, cols).map_err(failed("resize"))
    }

    pub fn close_stdin(&self, id: &str, exec: Option<&str>) -> Result<(), OpError> {
        let slot = self.lock().proc_mut(id, exec)?.io.stdin.clone();
        if let Some(slot) = slot {
            slot.close();
        }
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<bulkhead_protocol::messages::Stats, OpError> {
        Ok(self.lock().container(id)?.cgroup.stats())
    }

    pub fn update(&self, id: &str, res: &bulkhead_protocol::messages::Resources) -> Result<(), OpError> {
        self.lock()
            .container(id)?
            .cgroup
            .apply(res)
            .map_err(|e| OpError::Failed(format!("updating the limits of {id:?}: {e}")))
    }

    pub fn processes(&self, id: &str) -> Result<Vec<u32>, OpError> {
        Ok(self.lock().container(id)?.cgroup.pids())
    }

    pub fn delete(&self, id: &str) -> Result<(), OpError> {
        // A create of the same id waits until this one's mounts are gone.
        let _one = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let c = {
            let mut st = self.lock();
            let c = st.container(id)?;
            if c.started && c.init.status.is_none() {
                return Err(OpError::Failed(format!("container {id:?} is running; kill it first")));
            }
            let c = st.containers.remove(id).ok_or_else(|| OpError::NotFound(id.into()))?;
            st.owners.retain(|_, (cid, _)| cid != id);
            c
        };
        self.oom.forget(id);
        destroy(c);
        tracing::info!(container = %id, "deleted");
        Ok(())
    }

    /// Ends every container (the VM is going away, or the test agent is).
    pub fn shutdown(&self) {
        let all: Vec<Container> = self.lock().containers.drain().map(|(_, c)| c).collect();
        for c in all {
            destroy(c);
        }
    }

    /// Dispatches one validated request.
    pub fn handle(&self, req: &bulkhead_protocol::messages::Request) -> Response {
        use bulkhead_protocol::messages::Request as R;
        let r = match req {
            R::Create { container } => self.create(container).map(|()| {
                self.oom.watch(&container.id, &self.cgroup_events(&container.id));
                Response::Ok
            }),
            R::Start { container_id } => self.start(container_id).map(|pid| Response::Started { pid }),
            R::Exec {
                container_id,
                exec_id,
                process,
                stdio,
            } => self
                .exec(container_id, exec_id, process, stdio)
                .map(|pid| Response::Started { pid }),
            R::Signal {
                container_id,
                exec_id,
                signal,
                all,
            } => self
                .signal(container_id, exec_id.as_deref(), *signal, *all)
                .map(|()| Response::Ok),
            R::Wait { container_id, exec_id } => self
                .wait(container_id, exec_id.as_deref())
                .map(|status| Response::Exited { status }),
            R::ResizeTty {
                container_id,
                exec_id,
                rows,
                cols,
            } => self
                .resize(container_id, exec_id.as_deref(), *rows, *cols)
                .map(|()| Response::Ok),
            R::CloseStdin { container_id, exec_id } => self
                .close_stdin(container_id, exec_id.as_deref())
                .map(|()| Response::Ok),
            R::Stats { container_id } => self.stats(container_id).map(|stats| Response::Stats { stats }),
            R::Update {
                container_id,
                resources,
            } => self.update(container_id, resources).map(|()| Response::Ok),
            R::ListProcesses { container_id } => self.processes(container_id).map(|pids| Response::Processes { pids }),
            R::Delete { container_id } => self.delete(container_id).map(|()| Response::Ok),
            R::Reseed { entropy, realtime_ns } => self.reseed(entropy, *realtime_ns).map(|()| Response::Ok),
            R::Volume {
                volume_id,
                entries,
                seal,
            } => self
                .volumes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fill(volume_id, entries, *seal)
                .map(|()| Response::Ok)
                .map_err(OpError::from),
            R::NextOomEvent => Ok(Response::Oom {
                container_id: self.oom.next(),
            }),
            R::Shutdown => Ok(Response::Ok),
        };
        r.unwrap_or_else(|e| e.response())
    }

    /// Fresh entropy and the wall clock; the clock only in a guest, never
    /// on a host running the debug listener.
    pub fn reseed(&self, entropy: &str, realtime_ns: u64) -> Result<(), OpError> {
        let seed =
            bulkhead_protocol::hex::decode(entropy).ok_or_else(|| OpError::Invalid("entropy is not hex".into()))?;
        crate::reseed::mix_entropy(&seed).map_err(failed("reseeding the random pool"))?;
        if self.cfg.transport.is_guest() {
            crate::reseed::set_realtime(realtime_ns).map_err(failed("setting the clock"))?;
            let disks = crate::reseed::forget_disk_contents().map_err(failed("dropping cached disk blocks"))?;
            tracing::info!(disks, "reseeded; clock set; disk caches dropped");
        }
        Ok(())
    }

    fn cgroup_events(&self, id: &str) -> PathBuf {
        self.lock()
            .containers
            .get(id)
            .map(|c| c.cgroup.events_file())
            .unwrap_or_default()
    }
}

fn destroy(c: Container) {
    c.cgroup.remove();
    drop(c.namespaces);
    for m in c.mounts.iter().rev() {
        unmount(m);
    }
    let _ = fs::remove_dir_all(&c.dir);
}

/// The first child of `parent`, found through /proc (the workload's pid
/// as the agent sees it; the init cannot tell us, it sees another PID
/// namespace).
fn child_of(parent: i32) -> Option<u32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and ')'; fields follow the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}
