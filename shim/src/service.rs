//! The Task service: containerd's calls, carried out on one sandbox VM per
//! shim (one pod), through its guest agent.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bulkhead_protocol::messages::{Process, Request, Response};
use bulkhead_runtime::paths::Artifacts;
use bulkhead_runtime::rootfs::{ImageCache, RootfsImage};
use bulkhead_runtime::sandbox::{self, Sandbox, SandboxConfig};
use bulkhead_runtime::start;
use bulkhead_runtime::stdio::{StdioPlan, StdioStreams};
use bulkhead_runtime::template::TemplateCache;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim_protos::shim::shim_ttrpc::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, context::Context, Code, TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo, Status};

use crate::config::Config;
use crate::disks::{Claim, DiskSlots};
use crate::rootfs::{self, RootMount};
use crate::spec;

/// Written into the bundle so that `delete` finds a dead shim's sandbox.
pub const RUN_DIR_FILE: &str = "bulkhead-run-dir";
/// Output still in flight after an exit drains within this.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The exit status reported when the VM itself went away (not the
/// workload): 255, with the reason in the shim's log.
pub const VM_GONE_STATUS: u32 = 255;
const STATS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

type TResult<T> = ttrpc::Result<T>;

fn rpc_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Set when the shim should stop serving.
#[derive(Default)]
pub struct ExitSignal {
    done: Mutex<bool>,
    cond: Condvar,
    /// The socket containerd reaches this shim on.
    socket: Option<PathBuf>,
}

impl ExitSignal {
    /// One that also unlinks `socket` when signalled.
    pub fn removing(socket: PathBuf) -> Self {
        ExitSignal {
            socket: Some(socket),
            ..Default::default()
        }
    }

    pub fn signal(&self) {
        // Unlinked before Shutdown is answered: containerd may start a new
        // shim for the same id at once (another runtime's shim too), and
        // its `start` must not find this one's socket and connect to a
        // shim that is going away.
        if let Some(p) = &self.socket {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::debug!("removing {}: {e}", p.display());
            }
        }
        *lock(&self.done) = true;
        self.cond.notify_all();
    }
    pub fn wait(&self) {
        let mut d = lock(&self.done);
        while !*d {
            d = self.cond.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum ProcState {
    Created,
    Running,
    Stopped { status: u32 },
}

struct Proc {
    container_id: String,
    /// Empty for the container's init process.
    exec_id: String,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// An exec's process, until it starts.
    exec_process: Mutex<Option<Process>>,
    /// The init's streams, opened at create, bridged at start.
    streams: Mutex<Option<StdioStreams>>,
    pid: Mutex<u32>,
    state: Mutex<(ProcState, Option<Timestamp>)>,
    changed: Condvar,
}

impl Proc {
    fn exec_opt(&self) -> Option<String> {
        (!self.exec_id.is_empty()).then(|| self.exec_id.clone())
    }
    fn snapshot(&self) -> (ProcState, Option<Timestamp>) {
        lock(&self.state).clone()
    }
    fn pid(&self) -> u32 {
        *lock(&self.pid)
    }
}

struct Container {
    bundle: String,
    /// The VM disk its root image is on.
    disk: u8,
    procs: HashMap<String, Arc<Proc>>,
}

pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: Arc<Mutex<RemotePublisher>>,
    config_path: PathBuf,
    config: Mutex<Option<Config>>,
    exit: Arc<ExitSignal>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// Which VM disk holds which root image; set with the sandbox.
    disks: Mutex<Option<DiskSlots>>,
    paused: AtomicBool,
    containers: Mutex<HashMap<String, Container>>,
}

impl Service {
    pub fn new(namespace: &str, publisher: RemotePublisher, config_path: PathBuf, exit: Arc<ExitSignal>) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                publisher: Arc::new(Mutex::new(publisher)),
                config_path,
                config: Mutex::new(None),
                exit,
                sandbox: Mutex::new(None),
                disks: Mutex::new(None),
                paused: AtomicBool::new(false),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Inner {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let r = lock(&self.publisher).publish(Context::default(), topic, &self.namespace, event);
        if let Err(e) = r {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    fn config(&self, from_options: Option<PathBuf>) -> TResult<Config> {
        let mut c = lock(&self.config);
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let path = from_options.unwrap_or_else(|| self.config_path.clone());
        let loaded = Config::load(&path).map_err(|e| rpc_err(Code::FAILED_PRECONDITION, e))?;
        *c = Some(loaded.clone());
        Ok(loaded)
    }

    fn sandbox(&self) -> TResult<Arc<Sandbox>> {
        lock(&self.sandbox)
            .clone()
            .ok_or_else(|| rpc_err(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }

    fn proc(&self, id: &str, exec_id: &str) -> TResult<Arc<Proc>> {
        let cs = lock(&self.containers);
        let c = cs
            .get(id)
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {id} not found")))?;
        c.procs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("process {exec_id} of {id} not found")))
    }

    /// The sandbox for a container whose root image is `image`, and the
    /// disk that image is on: the pod's first container boots the VM with
    /// its image as disk 0; a later container's image is attached to a
    /// spare disk unless the pod already has it. The caller owns one use
    /// of the disk (see [`Inner::release_disk`]).
    fn ensure_sandbox(
        &self,
        cfg: &Config,
        image: &RootfsImage,
        annotations: &HashMap<String, String>,
        bundle: &Path,
    ) -> TResult<(Arc<Sandbox>, u8)> {
        let mut slot = lock(&self.sandbox);
        if let Some(sb) = slot.as_ref() {
            let disk = self.claim_disk(sb, image)?;
            return Ok((sb.clone(), disk));
        }
        let (vcpus, mem_mib) = cfg
            .sizing(annotations)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        let sc = SandboxConfig {
            vcpus,
            mem_mib,
            runtime_root: Some(cfg.run_dir.clone()),
            api_socket: true,
            spare_disks: cfg.spare_disks,
            ..SandboxConfig::new(
                Artifacts {
                    kernel: cfg.kernel.clone(),
                    initramfs: cfg.initramfs.clone(),
                    vmm: cfg.vmm.clone(),
                },
                image.clone(),
            )
        };
        let sb = Arc::new(start_sandbox(cfg, sc)?);
        if let Err(e) = std::fs::write(bundle.join(RUN_DIR_FILE), sb.run_dir().as_os_str().as_encoded_bytes()) {
            tracing::warn!("cannot record the run directory in the bundle: {e}");
        }
        self.watch_oom(&sb);
        let mut disks = DiskSlots::new(&image.path, cfg.spare_disks);
        let disk = match disks.claim(&image.path) {
            Ok(Claim::Attached(d)) => d,
            _ => return Err(internal("disk 0 does not hold the image the VM started with")),
        };
        *lock(&self.disks) = Some(disks);
        *slot = Some(sb.clone());
        Ok((sb, disk))
    }

    /// One more use of `image` in the running VM: the disk that has it, or
    /// a spare disk it is attached to now.
    fn claim_disk(&self, sb: &Sandbox, image: &RootfsImage) -> TResult<u8> {
        let mut guard = lock(&self.disks);
        let disks = guard
            .as_mut()
            .ok_or_else(|| internal("the sandbox has no disk table"))?;
        match disks.claim(&image.path) {
            Ok(Claim::Attached(d)) => Ok(d),
            Ok(Claim::Attach(d)) => match sb.attach_image(d, &image.path) {
                Ok(()) => {
                    tracing::info!("attached {} as disk {d}", image.path.display());
                    Ok(d)
                }
                Err(e) => {
                    disks.abandon(d);
                    Err(internal(format!("attaching the root image: {e}")))
                }
            },
            Err(full) => Err(rpc_err(Code::RESOURCE_EXHAUSTED, full)),
        }
    }

    /// One use of `disk` fewer; the last use of a spare disk empties it, so
    /// the VMM no longer holds the image (the guest has unmounted it).
    fn release_disk(&self, disk: u8) {
        // Sandbox, then disks: `ensure_sandbox`'s order.
        let sb = lock(&self.sandbox).clone();
        let mut guard = lock(&self.disks);
        let Some(disks) = guard.as_mut() else { return };
        if let (Some(d), Some(sb)) = (disks.release(disk), sb) {
            if let Err(e) = sb.detach_image(d) {
                tracing::warn!("cannot empty disk {d}: {e}");
            }
        }
    }

    /// Creates container `req` in the VM `sb`, its root image on `disk`.
    fn create_in(
        &self,
        sb: &Sandbox,
        disk: u8,
        req: &api::CreateTaskRequest,
        image: &RootfsImage,
        bs: spec::BundleSpec,
    ) -> TResult<api::CreateTaskResponse> {
        let mut process = bs.process;
        process.terminal = req.terminal;
        let mut container = sandbox::container_on_disk(&req.id, process, image, disk).map_err(internal)?;
        container.hostname = bs.hostname;
        container.resources = bs.resources;
        let plan = StdioPlan {
            stdin: !req.stdin.is_empty(),
            tty: req.terminal,
        };
        let mut client = sb.client().map_err(internal)?;
        let streams = sb.create(&mut client, container, plan).map_err(agent_err)?;
        let proc = Arc::new(Proc {
            container_id: req.id.clone(),
            exec_id: String::new(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            exec_process: Mutex::new(None),
            streams: Mutex::new(Some(streams)),
            pid: Mutex::new(0),
            state: Mutex::new((ProcState::Created, None)),
            changed: Condvar::new(),
        });
        lock(&self.containers).insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                disk,
                procs: HashMap::from([(String::new(), proc)]),
            },
        );
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: 0,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse::default())
    }

    fn watch_oom(&self, sb: &Arc<Sandbox>) {
        let sb = Arc::downgrade(sb);
        let publisher = self.publisher.clone();
        let ns = self.namespace.clone();
        let spawned = std::thread::Builder::new().name("oom".into()).spawn(move || loop {
            let Some(s) = sb.upgrade() else { return };
            let Ok(mut c) = s.client() else { return };
            drop(s);
            match c.call(&Request::NextOomEvent) {
                Ok(Response::Oom { container_id }) => {
                    let ev = TaskOOM {
                        container_id,
                        ..Default::default()
                    };
                    let r =
                        lock(&publisher).publish(Context::default(), topics::TASK_OOM_EVENT_TOPIC, &ns, Box::new(ev));
                    if let Err(e) = r {
                        tracing::warn!("cannot publish an OOM event: {e}");
                    }
                }
                Ok(other) => {
                    tracing::warn!("next_oom_event answered {other:?}");
                    return;
                }
                Err(_) => return,
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("no OOM watcher: {e}");
        }
    }

    /// Runs `proc`'s waiter: the exit status from the agent, the output
    /// drained, then TaskExit and the waiters woken.
    fn spawn_waiter(self: &Arc<Self>, sb: Arc<Sandbox>, proc: Arc<Proc>, drains: Vec<mpsc::Receiver<()>>) {
        let me = self.clone();
        let p = proc.clone();
        let run = move || {
            let status = match sb.client().and_then(|mut c| {
                c.wait(&p.container_id, p.exec_opt().as_deref())
                    .map_err(|e| sb.explain(e))
            }) {
                Ok(s) => u32::try_from(s).unwrap_or(VM_GONE_STATUS),
                Err(e) => {
                    tracing::error!(
                        "container {} process {:?}: the sandbox failed: {e}",
                        p.container_id,
                        p.exec_id
                    );
                    VM_GONE_STATUS
                }
            };
            let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
            for d in drains {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if d.recv_timeout(left) == Err(mpsc::RecvTimeoutError::Timeout) {
                    tracing::warn!("the output of {}/{} did not drain", p.container_id, p.exec_id);
                }
            }
            let at = now();
            {
                let mut st = lock(&p.state);
                *st = (ProcState::Stopped { status }, Some(at.clone()));
            }
            p.changed.notify_all();
            let id = if p.exec_id.is_empty() {
                p.container_id.clone()
            } else {
                p.exec_id.clone()
            };
            me.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: p.container_id.clone(),
                    id,
                    pid: p.pid(),
                    exit_status: status,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                }),
            );
        };
        if let Err(e) = std::thread::Builder::new().name("waiter".into()).spawn(run) {
            tracing::error!("cannot start a waiter: {e}");
            *lock(&proc.state) = (ProcState::Stopped { status: VM_GONE_STATUS }, Some(now()));
            proc.changed.notify_all();
        }
    }

    fn shutdown_sandbox(&self) {
        let sb = lock(&self.sandbox).take();
        lock(&self.disks).take();
        if let Some(sb) = sb {
            match Arc::try_unwrap(sb) {
                // Dropping kills the VMM and removes its run directory;
                // the guest holds nothing worth a clean shutdown.
                Ok(sb) => drop(sb),
                Err(sb) => {
                    // A waiter still holds it: kill the VM through its pid.
                    // SAFETY: kill(2) with a pid we started and have not reaped.
                    unsafe { libc::kill(sb.vmm_pid() as libc::pid_t, libc::SIGKILL) };
                    drop(sb);
                }
            }
        }
    }
}

/// Starts the pod's VM as the configuration says (the runtime's one start
/// path: the template, built on first use, or cold; the log says which).
fn start_sandbox(cfg: &Config, sc: SandboxConfig) -> TResult<Sandbox> {
    let templates = TemplateCache::new(&cfg.template_dir);
    start::start(&sc, cfg.boot, &templates, &mut start::Quiet)
        .map(|(sb, _)| sb)
        .map_err(|e| rpc_err(Code::INTERNAL, format!("sandbox boot: {e}")))
}

/// Opens a FIFO on a thread (a FIFO open blocks until the other end is
/// there) and copies between it and a guest stream.
fn bridge_out(from: UnixStream, fifo: String, name: &'static str) -> io::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name(format!("out-{name}")).spawn(move || {
        let sink: Box<dyn Write + Send> = if fifo.is_empty() {
            Box::new(io::sink())
        } else {
            match OpenOptions::new().write(true).open(&fifo) {
                Ok(f) => Box::new(f),
                Err(e) => {
                    tracing::warn!("cannot open {name} {fifo}: {e}");
                    Box::new(io::sink())
                }
            }
        };
        let done = bulkhead_runtime::stdio::copy_out(from, sink, name).map(|h| h.join());
        if let Err(e) = done {
            tracing::warn!("{name}: {e}");
        }
        let _ = tx.send(());
    })?;
    Ok(rx)
}

fn bridge_in(to: UnixStream, fifo: String) -> io::Result<()> {
    std::thread::Builder::new().name("in".into()).spawn(move || {
        match File::open(&fifo) {
            Ok(f) => {
                // copy_in closes the guest's stdin at EOF.
                match bulkhead_runtime::stdio::copy_in(f, to) {
                    Ok(h) => {
                        let _ = h.join();
                    }
                    Err(e) => tracing::warn!("stdin: {e}"),
                }
            }
            Err(e) => {
                tracing::warn!("cannot open stdin {fifo}: {e}");
                let _ = to.shutdown(Shutdown::Write);
            }
        }
    })?;
    Ok(())
}

/// Connects the process's FIFOs to its guest streams; the receivers tell
/// when each output stream has drained.
fn bridge(proc: &Proc, streams: StdioStreams) -> io::Result<Vec<mpsc::Receiver<()>>> {
    let mut drains = Vec::new();
    if !proc.stdin.is_empty() {
        // A terminal's one stream carries stdin too.
        let to = match (&streams.stdin, &streams.stdout) {
            (Some(s), _) => Some(s.try_clone()?),
            (None, Some(s)) if proc.terminal => Some(s.try_clone()?),
            _ => None,
        };
        if let Some(to) = to {
            bridge_in(to, proc.stdin.clone())?;
        }
    }
    if let Some(s) = streams.stdout {
        drains.push(bridge_out(s, proc.stdout.clone(), "stdout")?);
    }
    if let Some(s) = streams.stderr {
        drains.push(bridge_out(s, proc.stderr.clone(), "stderr")?);
    }
    Ok(drains)
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    rpc_err(Code::INTERNAL, e)
}

fn agent_err(e: bulkhead_runtime::sandbox::SandboxError) -> ttrpc::Error {
    use bulkhead_protocol::client::ClientError;
    use bulkhead_protocol::messages::ErrorKind;
    match &e {
        bulkhead_runtime::sandbox::SandboxError::Agent(ClientError::Agent { kind, .. }) => {
            let code = match kind {
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::Invalid => Code::INVALID_ARGUMENT,
                ErrorKind::Failed => Code::INTERNAL,
            };
            rpc_err(code, e)
        }
        _ => internal(e),
    }
}

impl Task for Service {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TResult<api::CreateTaskResponse> {
        let inner = &self.inner;
        if !req.checkpoint.is_empty() {
            return Err(rpc_err(Code::UNIMPLEMENTED, "checkpoint/restore is not supported"));
        }
        if lock(&inner.containers).contains_key(&req.id) {
            return Err(rpc_err(Code::ALREADY_EXISTS, format!("container {} exists", req.id)));
        }
        let from_options = match req.options.as_ref() {
            Some(o) => crate::config::config_path_from_options(&o.type_url, &o.value)
                .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?,
            None => None,
        };
        let cfg = inner.config(from_options)?;
        let bundle = PathBuf::from(&req.bundle);
        let bs = spec::read_bundle(&bundle).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        let mounts: Vec<RootMount> = req
            .rootfs
            .iter()
            .map(|m| RootMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let cache = ImageCache::new(cfg.cache_dir.clone());
        let image = rootfs::image_for(&bundle, &mounts, &cache).map_err(internal)?;
        let (sb, disk) = inner.ensure_sandbox(&cfg, &image, &bs.annotations, &bundle)?;
        let created = inner.create_in(&sb, disk, &req, &image, bs);
        if created.is_err() {
            inner.release_disk(disk);
        }
        created
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TResult<api::StartResponse> {
        let inner = &self.inner;
        let proc = inner.proc(&req.id, &req.exec_id)?;
        if !matches!(proc.snapshot().0, ProcState::Created) {
            return Err(rpc_err(Code::FAILED_PRECONDITION, "the process was started already"));
        }
        let sb = inner.sandbox()?;
        let mut client = sb.client().map_err(internal)?;
        let (pid, streams) = if req.exec_id.is_empty() {
            let streams = lock(&proc.streams).take();
            let pid = sb.start(&mut client, &req.id).map_err(agent_err)?;
            (pid, streams)
        } else {
            let process = lock(&proc.exec_process)
                .take()
                .ok_or_else(|| rpc_err(Code::FAILED_PRECONDITION, "the exec has no process"))?;
            let plan = StdioPlan {
                stdin: !proc.stdin.is_empty(),
                tty: proc.terminal,
            };
            let (pid, streams) = sb
                .exec_start(&mut client, &req.id, &req.exec_id, process, plan)
                .map_err(agent_err)?;
            (pid, Some(streams))
        };
        *lock(&proc.pid) = pid;
        lock(&proc.state).0 = ProcState::Running;
        let drains = match streams {
            Some(s) => bridge(&proc, s).map_err(internal)?,
            None => Vec::new(),
        };
        // Published before the waiter exists, so TaskExit comes after.
        if req.exec_id.is_empty() {
            inner.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            inner.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        self.inner.spawn_waiter(sb, proc, drains);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TResult<api::DeleteResponse> {
        let inner = &self.inner;
        let proc = inner.proc(&req.id, &req.exec_id)?;
        let (state, at) = proc.snapshot();
        let status = match state {
            ProcState::Stopped { status } => status,
            ProcState::Created => 0,
            ProcState::Running => {
                return Err(rpc_err(Code::FAILED_PRECONDITION, "the process is still running"));
            }
        };
        let resp = api::DeleteResponse {
            pid: proc.pid(),
            exit_status: status,
            exited_at: MessageField::some(at.unwrap_or_else(now)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            if let Some(c) = lock(&inner.containers).get_mut(&req.id) {
                c.procs.remove(&req.exec_id);
            }
            return Ok(resp);
        }
        let mut unmounted = false;
        if let Ok(sb) = inner.sandbox() {
            let forgot = sb.client().and_then(|mut c| {
                if matches!(state, ProcState::Created) {
                    // Never started: end its waiting init first.
                    let _ = c.call_ok(&Request::Signal {
                        container_id: req.id.clone(),
                        exec_id: None,
                        signal: libc::SIGKILL,
                        all: true,
                    });
                }
                Ok(c.call_ok(&Request::Delete {
                    container_id: req.id.clone(),
                })?)
            });
            match forgot {
                Ok(()) => unmounted = true,
                Err(e) => tracing::warn!("agent delete of {}: {e}", req.id),
            }
        }
        let (removed, empty) = {
            let mut cs = lock(&inner.containers);
            let removed = cs.remove(&req.id);
            (removed, cs.is_empty())
        };
        if empty {
            inner.shutdown_sandbox();
        } else if let Some(c) = removed.filter(|_| unmounted) {
            // Only once the guest has unmounted its root: a disk still
            // mounted in the guest keeps its image (and its slot).
            inner.release_disk(c.disk);
        }
        inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(resp)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TResult<api::PidsResponse> {
        let sb = self.inner.sandbox()?;
        let mut c = sb.client().map_err(internal)?;
        let pids = match c.call(&Request::ListProcesses { container_id: req.id }) {
            Ok(Response::Processes { pids }) => pids,
            Ok(other) => return Err(internal(format!("list_processes answered {other:?}"))),
            Err(e) => return Err(agent_err(e.into())),
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TResult<Empty> {
        self.set_paused(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TResult<Empty> {
        self.set_paused(&req.id, false)?;
        Ok(Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TResult<Empty> {
        Err(rpc_err(Code::UNIMPLEMENTED, "checkpoint is not supported"))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TResult<Empty> {
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        if matches!(proc.snapshot().0, ProcState::Stopped { .. }) && !req.all {
            return Err(rpc_err(Code::NOT_FOUND, "process already finished"));
        }
        let signal = i32::try_from(req.signal).map_err(|_| rpc_err(Code::INVALID_ARGUMENT, "bad signal"))?;
        let sb = self.inner.sandbox()?;
        let mut c = sb.client().map_err(internal)?;
        c.call_ok(&Request::Signal {
            container_id: req.id,
            exec_id: proc.exec_opt(),
            signal,
            all: req.all,
        })
        .map_err(|e| agent_err(e.into()))?;
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TResult<Empty> {
        let inner = &self.inner;
        let spec_any = req
            .spec
            .as_ref()
            .ok_or_else(|| rpc_err(Code::INVALID_ARGUMENT, "the exec has no process spec"))?;
        let v: serde_json::Value =
            serde_json::from_slice(&spec_any.value).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        let mut process = spec::process(&v).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        process.terminal = req.terminal;
        {
            let mut cs = lock(&inner.containers);
            let c = cs
                .get_mut(&req.id)
                .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(rpc_err(Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
            }
            c.procs.insert(
                req.exec_id.clone(),
                Arc::new(Proc {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    exec_process: Mutex::new(Some(process)),
                    streams: Mutex::new(None),
                    pid: Mutex::new(0),
                    state: Mutex::new((ProcState::Created, None)),
                    changed: Condvar::new(),
                }),
            );
        }
        inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TResult<Empty> {
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let sb = self.inner.sandbox()?;
        let mut c = sb.client().map_err(internal)?;
        let dim = |v: u32| u16::try_from(v).map_err(|_| rpc_err(Code::INVALID_ARGUMENT, "window size"));
        c.call_ok(&Request::ResizeTty {
            container_id: req.id.clone(),
            exec_id: proc.exec_opt(),
            rows: dim(req.height)?,
            cols: dim(req.width)?,
        })
        .map_err(|e| agent_err(e.into()))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TResult<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let sb = self.inner.sandbox()?;
        let mut c = sb.client().map_err(internal)?;
        c.call_ok(&Request::CloseStdin {
            container_id: req.id.clone(),
            exec_id: proc.exec_opt(),
        })
        .map_err(|e| agent_err(e.into()))?;
        Ok(Empty::new())
    }

    /// New memory, pids and CPU limits for a container's cgroup in the
    /// guest. The VM's own size stays (no memory or vCPU hotplug).
    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TResult<Empty> {
        let inner = &self.inner;
        let _ = inner.proc(&req.id, "")?;
        let Some(any) = req.resources.as_ref() else {
            return Ok(Empty::new());
        };
        let resources =
            spec::update_resources(&any.type_url, &any.value).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        let request = Request::Update {
            container_id: req.id.clone(),
            resources,
        };
        request.validate().map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        let sb = inner.sandbox()?;
        let mut client = sb.client().map_err(internal)?;
        client.call_ok(&request).map_err(|e| agent_err(sb.explain(e)))?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TResult<api::WaitResponse> {
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let mut st = lock(&proc.state);
        loop {
            if let (ProcState::Stopped { status }, at) = &*st {
                return Ok(api::WaitResponse {
                    exit_status: *status,
                    exited_at: MessageField::from_option(at.clone()),
                    ..Default::default()
                });
            }
            st = proc.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TResult<api::StatsResponse> {
        let sb = self.inner.sandbox()?;
        let mut c = sb.client().map_err(internal)?;
        let s = match c.call(&Request::Stats { container_id: req.id }) {
            Ok(Response::Stats { stats }) => stats,
            Ok(other) => return Err(internal(format!("stats answered {other:?}"))),
            Err(e) => return Err(agent_err(e.into())),
        };
        let m = Metrics {
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_current_bytes,
                usage_limit: s.memory_max_bytes.unwrap_or(u64::MAX),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = m.write_to_bytes().map_err(internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: STATS_TYPE_URL.into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TResult<api::StateResponse> {
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let bundle = lock(&self.inner.containers)
            .get(&req.id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default();
        let (state, at) = proc.snapshot();
        let paused = self.inner.paused.load(Ordering::SeqCst);
        let (status, exit_status) = match state {
            ProcState::Created => (Status::CREATED, 0),
            ProcState::Running if paused => (Status::PAUSED, 0),
            ProcState::Running => (Status::RUNNING, 0),
            ProcState::Stopped { status } => (Status::STOPPED, status),
        };
        Ok(api::StateResponse {
            id: req.id,
            bundle,
            pid: proc.pid(),
            status: status.into(),
            stdin: proc.stdin.clone(),
            stdout: proc.stdout.clone(),
            stderr: proc.stderr.clone(),
            terminal: proc.terminal,
            exit_status,
            exited_at: MessageField::from_option(at),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TResult<api::ConnectResponse> {
        let task_pid = self.inner.proc(&req.id, "").map(|p| p.pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TResult<Empty> {
        if !lock(&self.inner.containers).is_empty() {
            return Ok(Empty::new());
        }
        self.inner.shutdown_sandbox();
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

impl Service {
    /// Pauses or resumes the whole VM: its containers share the vCPUs.
    fn set_paused(&self, id: &str, paused: bool) -> TResult<()> {
        let inner = &self.inner;
        let _ = inner.proc(id, "")?;
        let sb = inner.sandbox()?;
        sb.set_paused(paused).map_err(internal)?;
        inner.paused.store(paused, Ordering::SeqCst);
        if paused {
            inner.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.into(),
                    ..Default::default()
                }),
            );
        } else {
            inner.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.into(),
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }
}
