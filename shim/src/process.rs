//! A pod's processes as containerd sees them (a container's init and its
//! execs), their states, and the waiter that reports each exit.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use bulkhead_protocol::messages::Process;
use bulkhead_runtime::sandbox::Sandbox;
use bulkhead_runtime::stdio::StdioStreams;
use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;

use crate::events::{now, Events};
use crate::io::Fifos;
use crate::lock;

/// Output still in flight after an exit drains within this.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The exit status reported when the VM itself went away (not the
/// workload): 255, with the reason in the shim's log.
pub const VM_GONE_STATUS: u32 = 255;

#[derive(Clone, Copy, Debug)]
pub enum ProcState {
    Created,
    Running,
    Stopped { status: u32 },
}

pub struct Proc {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub fifos: Fifos,
    /// An exec's process, until it starts.
    pub exec_process: Mutex<Option<Process>>,
    /// The init's streams, opened at create, bridged at start.
    pub streams: Mutex<Option<StdioStreams>>,
    pid: Mutex<u32>,
    state: Mutex<(ProcState, Option<Timestamp>)>,
    changed: Condvar,
}

impl Proc {
    pub fn new(container_id: &str, exec_id: &str, fifos: Fifos) -> Proc {
        Proc {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            fifos,
            exec_process: Mutex::new(None),
            streams: Mutex::new(None),
            pid: Mutex::new(0),
            state: Mutex::new((ProcState::Created, None)),
            changed: Condvar::new(),
        }
    }

    /// The agent's name for it: `None` for the init.
    pub fn exec_opt(&self) -> Option<String> {
        (!self.exec_id.is_empty()).then(|| self.exec_id.clone())
    }

    pub fn snapshot(&self) -> (ProcState, Option<Timestamp>) {
        lock(&self.state).clone()
    }

    pub fn pid(&self) -> u32 {
        *lock(&self.pid)
    }

    pub fn set_running(&self, pid: u32) {
        *lock(&self.pid) = pid;
        lock(&self.state).0 = ProcState::Running;
    }

    fn set_stopped(&self, status: u32, at: Timestamp) {
        *lock(&self.state) = (ProcState::Stopped { status }, Some(at));
        self.changed.notify_all();
    }

    /// Blocks until the process has stopped: its status and when.
    pub fn wait(&self) -> (u32, Option<Timestamp>) {
        let mut st = lock(&self.state);
        loop {
            if let (ProcState::Stopped { status }, at) = &*st {
                return (*status, at.clone());
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs the waiter: the exit status from the agent, the output
    /// drained, then TaskExit and the waiters woken.
    pub fn spawn_waiter(self: &Arc<Self>, sb: Arc<Sandbox>, drains: Vec<mpsc::Receiver<()>>, events: Events) {
        let p = self.clone();
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
            p.set_stopped(status, at.clone());
            let id = if p.exec_id.is_empty() {
                p.container_id.clone()
            } else {
                p.exec_id.clone()
            };
            events.publish(
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
            self.set_stopped(VM_GONE_STATUS, now());
        }
    }
}

/// One container of the pod: its bundle, the disk its root image is on,
/// and its processes (the init under "").
pub struct Container {
    pub bundle: String,
    pub disk: u8,
    pub procs: HashMap<String, Arc<Proc>>,
}
