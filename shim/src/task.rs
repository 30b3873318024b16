//! containerd's Task service, translated: each call checks its request,
//! asks the pod (the VM), the agent or the process table, and answers or
//! publishes what containerd expects (TaskCreate, TaskStart, TaskExit,
//! TaskDelete; TaskExecAdded, TaskExecStarted for execs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bulkhead_protocol::messages::{Request, Response, SharedNamespaces};
use bulkhead_runtime::rootfs::{ImageCache, RootfsImage};
use bulkhead_runtime::sandbox::{self, Sandbox};
use bulkhead_runtime::stdio::StdioPlan;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::shim_ttrpc::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, Code, TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo, Status};

use crate::config::{Config, ConfigSource};
use crate::events::{now, Events};
use crate::io::{self, Fifos};
use crate::lock;
use crate::pod::{Asking, Pod, PodError};
use crate::process::{Container, Proc, ProcState};
use crate::rootfs::{self, RootMount};
use crate::spec;
use crate::ExitSignal;

const STATS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

type TResult<T> = ttrpc::Result<T>;

fn rpc_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    rpc_err(Code::INTERNAL, e)
}

fn pod_err(e: PodError) -> ttrpc::Error {
    let code = match &e {
        PodError::NotRunning => Code::FAILED_PRECONDITION,
        PodError::Sizing(_) => Code::INVALID_ARGUMENT,
        PodError::DisksFull(_) => Code::RESOURCE_EXHAUSTED,
        _ => Code::INTERNAL,
    };
    rpc_err(code, e)
}

fn agent_err(e: sandbox::SandboxError) -> ttrpc::Error {
    use bulkhead_protocol::client::ClientError;
    use bulkhead_protocol::messages::ErrorKind;
    match &e {
        sandbox::SandboxError::Agent(ClientError::Agent { kind, .. }) => {
            let code = match kind {
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::Invalid => Code::INVALID_ARGUMENT,
                ErrorKind::Failed => Code::INTERNAL,
            };
            rpc_err(code, e)
        }
        sandbox::SandboxError::Unanswered { .. } => rpc_err(Code::DEADLINE_EXCEEDED, e),
        _ => internal(e),
    }
}

pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config_source: ConfigSource,
    config: Mutex<Option<Config>>,
    exit: Arc<ExitSignal>,
    pod: Pod,
    containers: Mutex<HashMap<String, Container>>,
    events: Events,
}

impl Service {
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        config_source: ConfigSource,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Service {
            inner: Arc::new(Inner {
                config_source,
                config: Mutex::new(None),
                exit,
                pod: Pod::default(),
                containers: Mutex::new(HashMap::new()),
                events: Events::new(publisher, namespace),
            }),
        }
    }
}

impl Inner {
    fn config(&self, from_options: Option<PathBuf>) -> TResult<Config> {
        let mut c = lock(&self.config);
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let source = from_options.map_or_else(|| self.config_source.clone(), ConfigSource::Named);
        let loaded = Config::load(&source).map_err(|e| rpc_err(Code::FAILED_PRECONDITION, e))?;
        *c = Some(loaded.clone());
        Ok(loaded)
    }

    /// Create, Start or Exec failed; when the guest did not answer in
    /// time its state is unknown (a half-made container, a process that
    /// may start later), so the VM is ended and every task exits.
    fn start_failed(&self, e: sandbox::SandboxError) -> ttrpc::Error {
        if matches!(e, sandbox::SandboxError::Unanswered { .. }) {
            tracing::error!("{e}: ending the sandbox VM");
            self.pod.kill_vm();
            return rpc_err(Code::DEADLINE_EXCEEDED, format!("{e}: the sandbox VM was ended"));
        }
        agent_err(e)
    }

    /// The deadline of control calls to the agent.
    fn agent_timeout(&self) -> TResult<std::time::Duration> {
        Ok(self.config(None)?.agent_timeout())
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

    /// Creates container `req` in the VM `sb`, its root image on `disk`.
    /// Which running container of this pod owns each namespace the spec
    /// names by path (`/proc/<pid>/ns/<kind>`, the pid this shim reported
    /// for the container's Start).
    fn shared_namespaces(&self, joins: &[spec::NamespaceJoin]) -> TResult<SharedNamespaces> {
        let containers = lock(&self.containers);
        let mut shared = SharedNamespaces::default();
        for j in joins {
            let owner = containers
                .iter()
                .find(|(_, c)| {
                    c.procs
                        .get("")
                        .is_some_and(|p| p.pid() == j.pid && matches!(p.snapshot().0, ProcState::Running))
                })
                .map(|(id, _)| id.clone())
                .ok_or_else(|| {
                    rpc_err(
                        Code::INVALID_ARGUMENT,
                        format!(
                            "linux.namespaces: {} path {:?}: pid {} is no running container of this pod \
                             (a sandbox VM cannot join a host namespace)",
                            j.kind.name(),
                            j.path,
                            j.pid
                        ),
                    )
                })?;
            tracing::info!(namespace = j.kind.name(), %owner, "joining a pod namespace");
            let slot = match j.kind {
                spec::SharedKind::Ipc => &mut shared.ipc,
                spec::SharedKind::Uts => &mut shared.uts,
                spec::SharedKind::Pid => &mut shared.pid,
            };
            *slot = Some(owner);
        }
        Ok(shared)
    }

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
        container.root.readonly = bs.root_readonly;
        container.sysctl = bs.sysctl;
        container.init = bs.helper_init;
        container.seccomp = bs.seccomp;
        container.device_rules = bs.device_rules;
        container.device_nodes = bs.device_nodes;
        container.join = self.shared_namespaces(&bs.joins)?;
        let plan = StdioPlan {
            stdin: !req.stdin.is_empty(),
            tty: req.terminal,
        };
        let streams = sb
            .request_client("create")
            .and_then(|mut c| sb.create(&mut c, container, plan))
            .map_err(|e| self.start_failed(e))?;
        let proc = Proc::new(
            &req.id,
            "",
            Fifos {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        *lock(&proc.streams) = Some(streams);
        let proc = Arc::new(proc);
        self.events.own(&req.id);
        lock(&self.containers).insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                disk,
                procs: HashMap::from([(String::new(), proc)]),
            },
        );
        self.events.publish(
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
        let bs = spec::read_bundle(&bundle, cfg.spec_policy()).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
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
        let (sb, disk) = inner
            .pod
            .ensure_sandbox(
                &Asking {
                    container_id: &req.id,
                    annotations: &bs.annotations,
                    cgroups_path: bs.cgroups_path.as_deref(),
                    bundle: &bundle,
                },
                &cfg,
                &image,
                &inner.events,
            )
            .map_err(pod_err)?;
        let created = inner.create_in(&sb, disk, &req, &image, bs);
        if created.is_err() {
            inner.pod.release_disk(disk);
        }
        created
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TResult<api::StartResponse> {
        let inner = &self.inner;
        let proc = inner.proc(&req.id, &req.exec_id)?;
        if !matches!(proc.snapshot().0, ProcState::Created) {
            return Err(rpc_err(Code::FAILED_PRECONDITION, "the process was started already"));
        }
        let sb = inner.pod.sandbox().map_err(pod_err)?;
        let op = if req.exec_id.is_empty() { "start" } else { "exec" };
        let mut client = sb.request_client(op).map_err(|e| inner.start_failed(e))?;
        let (pid, streams) = if req.exec_id.is_empty() {
            let streams = lock(&proc.streams).take();
            let pid = sb.start(&mut client, &req.id).map_err(|e| inner.start_failed(e))?;
            (pid, streams)
        } else {
            let process = lock(&proc.exec_process)
                .take()
                .ok_or_else(|| rpc_err(Code::FAILED_PRECONDITION, "the exec has no process"))?;
            let plan = StdioPlan {
                stdin: !proc.fifos.stdin.is_empty(),
                tty: proc.fifos.terminal,
            };
            let (pid, streams) = sb
                .exec_start(&mut client, &req.id, &req.exec_id, process, plan)
                .map_err(|e| inner.start_failed(e))?;
            (pid, Some(streams))
        };
        proc.set_running(pid);
        let drains = match streams {
            Some(s) => io::bridge(&proc.fifos, s).map_err(internal)?,
            None => Vec::new(),
        };
        // Published before the waiter exists, so TaskExit comes after.
        if req.exec_id.is_empty() {
            inner.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            inner.events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        proc.spawn_waiter(sb, drains, inner.events.clone());
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
        if let Ok(sb) = inner.pod.sandbox() {
            let deadline = inner.agent_timeout()?;
            let forgot = sb.with_deadline("delete", deadline, |c| {
                if matches!(state, ProcState::Created) {
                    // Never started: end its waiting init first.
                    let _ = c.call_ok(&Request::Signal {
                        container_id: req.id.clone(),
                        exec_id: None,
                        signal: libc::SIGKILL,
                        all: true,
                    });
                }
                c.call_ok(&Request::Delete {
                    container_id: req.id.clone(),
                })
            });
            match forgot {
                Ok(()) => unmounted = true,
                Err(e) => tracing::warn!("agent delete of {}: {e}", req.id),
            }
        }
        let (removed, empty) = {
            let mut cs = lock(&inner.containers);
            let removed = cs.remove(&req.id);
            inner.events.disown(&req.id);
            (removed, cs.is_empty())
        };
        if empty {
            inner.pod.shutdown();
        } else if let Some(c) = removed.filter(|_| unmounted) {
            // Only once the guest has unmounted its root: a disk still
            // mounted in the guest keeps its image (and its slot).
            inner.pod.release_disk(c.disk);
        }
        inner.events.publish(
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
        let sb = self.inner.pod.sandbox().map_err(pod_err)?;
        let deadline = self.inner.agent_timeout()?;
        let answer = sb.with_deadline("list_processes", deadline, |c| {
            c.call(&Request::ListProcesses { container_id: req.id })
        });
        let pids = match answer {
            Ok(Response::Processes { pids }) => pids,
            Ok(other) => return Err(internal(format!("list_processes answered {other:?}"))),
            Err(e) => return Err(agent_err(e)),
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
        let sb = self.inner.pod.sandbox().map_err(pod_err)?;
        let deadline = self.inner.agent_timeout()?;
        let sent = sb.with_deadline("signal", deadline, |c| {
            c.call_ok(&Request::Signal {
                container_id: req.id.clone(),
                exec_id: proc.exec_opt(),
                signal,
                all: req.all,
            })
        });
        match sent {
            Ok(()) => Ok(Empty::new()),
            // A guest that cannot take a SIGKILL cannot be trusted to end
            // anything: end the VM, so its processes exit (as the VM's
            // loss) and the pod can be deleted.
            Err(e @ sandbox::SandboxError::Unanswered { .. }) if signal == libc::SIGKILL => {
                tracing::error!("{e}: killing the sandbox VM for SIGKILL to {}", req.id);
                self.inner.pod.kill_vm();
                Ok(Empty::new())
            }
            Err(e) => Err(agent_err(e)),
        }
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TResult<Empty> {
        let inner = &self.inner;
        let spec_any = req
            .spec
            .as_ref()
            .ok_or_else(|| rpc_err(Code::INVALID_ARGUMENT, "the exec has no process spec"))?;
        let policy = inner.config(None)?.spec_policy();
        let mut process =
            spec::exec_process(&spec_any.value, policy).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        process.terminal = req.terminal;
        {
            let mut cs = lock(&inner.containers);
            let c = cs
                .get_mut(&req.id)
                .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(rpc_err(Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
            }
            let proc = Proc::new(
                &req.id,
                &req.exec_id,
                Fifos {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
            );
            *lock(&proc.exec_process) = Some(process);
            c.procs.insert(req.exec_id.clone(), Arc::new(proc));
        }
        inner.events.publish(
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
        let sb = self.inner.pod.sandbox().map_err(pod_err)?;
        let deadline = self.inner.agent_timeout()?;
        let dim = |v: u32| u16::try_from(v).map_err(|_| rpc_err(Code::INVALID_ARGUMENT, "window size"));
        let request = Request::ResizeTty {
            container_id: req.id.clone(),
            exec_id: proc.exec_opt(),
            rows: dim(req.height)?,
            cols: dim(req.width)?,
        };
        sb.with_deadline("resize_tty", deadline, |c| c.call_ok(&request))
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TResult<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let sb = self.inner.pod.sandbox().map_err(pod_err)?;
        let deadline = self.inner.agent_timeout()?;
        let request = Request::CloseStdin {
            container_id: req.id.clone(),
            exec_id: proc.exec_opt(),
        };
        sb.with_deadline("close_stdin", deadline, |c| c.call_ok(&request))
            .map_err(agent_err)?;
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
        let sb = inner.pod.sandbox().map_err(pod_err)?;
        let deadline = inner.agent_timeout()?;
        sb.with_deadline("update", deadline, |c| c.call_ok(&request))
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TResult<api::WaitResponse> {
        let proc = self.inner.proc(&req.id, &req.exec_id)?;
        let (status, at) = proc.wait();
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: MessageField::from_option(at),
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TResult<api::StatsResponse> {
        let sb = self.inner.pod.sandbox().map_err(pod_err)?;
        let deadline = self.inner.agent_timeout()?;
        let answer = sb.with_deadline("stats", deadline, |c| {
            c.call(&Request::Stats {
                container_id: req.id.clone(),
            })
        });
        // The pod's own task stands for the whole VM: the host cgroup's
        // figures, which a hostile guest cannot shrink, wherever the host
        // has them; nor can a guest that does not answer withhold them.
        let host = match self.inner.pod.is_founder(&req.id) {
            true => sb.host_cgroup().map(|c| c.usage()),
            false => None,
        };
        let s = match answer {
            Ok(Response::Stats { stats }) => stats,
            Ok(other) => return Err(internal(format!("stats answered {other:?}"))),
            Err(e) if host.is_some() => {
                tracing::warn!(container = %req.id, "stats: the guest did not answer ({e}); the host cgroup's figures alone");
                Default::default()
            }
            Err(e) => return Err(agent_err(e)),
        };
        let mut cpu_usec = s.cpu_usage_usec;
        let mut memory = s.memory_current_bytes;
        let mut memory_limit = s.memory_max_bytes.unwrap_or(u64::MAX);
        let mut pids = s.pids_current;
        if let Some(host) = host {
            cpu_usec = host.cpu_usec.unwrap_or(cpu_usec);
            memory = host.memory_bytes.map_or(memory, |h| h.max(memory));
            memory_limit = host.memory_limit_bytes.unwrap_or(memory_limit);
            pids = host.pids.unwrap_or(pids);
        }
        let m = Metrics {
            cpu: MessageField::some(CPUStat {
                usage_usec: cpu_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: memory,
                usage_limit: memory_limit,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: pids,
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
        let paused = self.inner.pod.is_paused();
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
            stdin: proc.fifos.stdin.clone(),
            stdout: proc.fifos.stdout.clone(),
            stderr: proc.fifos.stderr.clone(),
            terminal: proc.fifos.terminal,
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
        self.inner.pod.shutdown();
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

impl Service {
    /// Pauses or resumes the whole VM: its containers share the vCPUs.
    fn set_paused(&self, id: &str, paused: bool) -> TResult<()> {
        let inner = &self.inner;
        let _ = inner.proc(id, "")?;
        inner.pod.set_paused(paused).map_err(pod_err)?;
        if paused {
            inner.events.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.into(),
                    ..Default::default()
                }),
            );
        } else {
            inner.events.publish(
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
