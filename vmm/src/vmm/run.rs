//! Running a built VM: the vCPU threads, the control API and the event
//! loop, until a guest reset, a vCPU stop, a signal or the timeout.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::virtio_devices::{Subscriber, VirtioDevices};
use super::{event_loop_err, RunOutcome, Stopped, VmmError};
use crate::api::{ApiContext, ApiListener};
use crate::devices::bus::lock;
use crate::devices::manager::DeviceManager;
use crate::host::HostKind;
use crate::seccomp::{self, Filters, SeccompPolicy, ThreadKind};
use crate::signals::TerminationSignals;
use crate::snapshot::create::Snapshotter;
use crate::snapshot::SavedConfig;
use crate::vcpu::control::{self, VcpuControl};
use crate::vcpu::exit_info::VcpuStop;
use crate::vcpu::state::SaveCaps;
use crate::vcpu::{Vcpu, VcpuStart};
use crate::vm::Vm;

/// A built VM, ready to run.
pub(super) struct Running {
    pub vm: Arc<Vm>,
    pub devices: DeviceManager,
    pub virtio: VirtioDevices,
    pub vcpus: Vec<Vcpu>,
    pub signals: TerminationSignals,
    pub api_listener: Option<ApiListener>,
    pub timeout_secs: Option<u64>,
    /// What a snapshot of it records.
    pub saved: SavedConfig,
    pub host: HostKind,
    pub seccomp: SeccompPolicy,
}

/// Starts the vCPUs, the API and the event loop; returns when the VM ends.
pub(super) fn run_vm(r: Running) -> Result<RunOutcome, VmmError> {
    let Running {
        vm,
        devices,
        mut virtio,
        vcpus,
        signals,
        api_listener,
        timeout_secs,
        saved,
        host,
        seccomp,
    } = r;
    let vcpu_count = saved.vcpus;

    let (stop_tx, stop_rx) = channel();
    let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(event_loop_err)?;
    let watcher = Arc::new(Mutex::new(ExitWatcher::new(
        signals,
        &devices,
        stop_evt.try_clone().map_err(event_loop_err)?,
        stop_rx,
        timeout_secs,
    )?));
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(event_loop_err)?;
    events.add_subscriber(watcher.clone());
    for sub in virtio.subscribers.drain(..) {
        events.add_subscriber(sub);
    }

    // Before any thread exists to inherit more, and before guest code runs.
    crate::harden::lock_down()?;
    control::install_kick_handler()?;
    let filters = Filters::compile(seccomp)?;
    // Every thread installs its own filter; no vCPU enters the guest until
    // all of them, this thread's included, have.
    let gate = Arc::new(Barrier::new(vcpus.len() + 1));
    let vcpu_control = Arc::new(VcpuControl::new(vcpu_count));
    for vcpu in vcpus {
        let evt = stop_evt.try_clone().map_err(event_loop_err)?;
        // Threads are detached: the process ends with the VM, and a vCPU
        // blocked in KVM_RUN (or parked by a pause) cannot be joined anyway.
        let start = VcpuStart {
            filters: filters.clone(),
            gate: gate.clone(),
        };
        vcpu.spawn(vcpu_control.clone(), stop_tx.clone(), evt, start)?;
    }
    drop(stop_tx);
    let _api = match api_listener {
        Some(l) => Some(l.serve(
            filters.clone(),
            ApiContext {
                control: vcpu_control.clone(),
                vcpus: vcpu_count,
                mem_mib: saved.mem_mib,
                started: Instant::now(),
                drives: Some(virtio.drives.clone()),
                snapshot: Some(Arc::new(Snapshotter {
                    vm: vm.clone(),
                    control: vcpu_control,
                    serial: devices.serial.clone(),
                    transports: devices.transports.clone(),
                    drives: virtio.drives.clone(),
                    config: saved.clone(),
                    caps: SaveCaps::query(&vm.kvm)?,
                })),
            },
        )?),
        None => None,
    };
    seccomp::apply(filters.as_deref(), ThreadKind::Vmm)?;
    gate.wait();

    let stopped = loop {
        events.run().map_err(event_loop_err)?;
        if let Some(s) = lock(&watcher).outcome.take() {
            break s;
        }
    };
    devices.flush_serial();
    let outcome = RunOutcome {
        stopped,
        template: saved.cpu_template,
        host,
        unhandled_pio: devices.pio_bus.unhandled_count(),
        unhandled_mmio: devices.mmio_bus.unhandled_count(),
    };
    Ok(outcome)
}

/// The main loop's one subscriber: guest reset, vCPU stops, timeout.
struct ExitWatcher {
    signals: TerminationSignals,
    reset_evt: EventFd,
    stop_evt: EventFd,
    stops: Receiver<VcpuStop>,
    timer: Option<(TimerFd, u64)>,
    outcome: Option<Stopped>,
}

impl ExitWatcher {
    fn new(
        signals: TerminationSignals,
        devices: &DeviceManager,
        stop_evt: EventFd,
        stops: Receiver<VcpuStop>,
        timeout_secs: Option<u64>,
    ) -> Result<Self, VmmError> {
        let timer = match timeout_secs {
            Some(secs) => {
                let mut t = TimerFd::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
                t.reset(Duration::from_secs(secs), None)
                    .map_err(|e| VmmError::EventLoop(e.to_string()))?;
                Some((t, secs))
            }
            None => None,
        };
        Ok(ExitWatcher {
            signals,
            reset_evt: devices
                .reset_evt
                .try_clone()
                .map_err(|e| VmmError::EventLoop(e.to_string()))?,
            stop_evt,
            stops,
            timer,
            outcome: None,
        })
    }

    fn settle(&mut self, s: Stopped) {
        self.outcome.get_or_insert(s);
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            self.signals.as_raw_fd(),
            self.reset_evt.as_raw_fd(),
            self.stop_evt.as_raw_fd(),
        ];
        if let Some((t, _)) = &self.timer {
            fds.push(t.as_raw_fd());
        }
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.as_raw_fd() {
            if let Some(sig) = self.signals.read() {
                self.settle(Stopped::Signal(sig));
            }
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.settle(Stopped::Guest(VcpuStop::Reset));
        } else if fd == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            if let Ok(stop) = self.stops.try_recv() {
                self.settle(Stopped::Guest(stop));
            }
        } else if let Some((t, secs)) = &mut self.timer {
            if fd == t.as_raw_fd() {
                let _ = t.wait();
                let secs = *secs;
                self.settle(Stopped::Timeout(secs));
            }
        }
    }
}
