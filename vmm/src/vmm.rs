//! Builds a VM from a configuration, runs it, and says how it ended.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use tracing::info;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{ApiContext, ApiError, ApiListener};
use crate::arch::cpu_template::CpuTemplate;
use crate::arch::layout::{CMDLINE_START, MMIO_GAP_START};
use crate::arch::mptable::{self, MpTableError};
use crate::arch::regs::EntryMode;
use crate::boot::cmdline::{self, CmdlineError};
use crate::boot::loader::{self, LoaderError};
use crate::boot::params::{self, ParamsError};
use crate::config::BlockConfig;
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialOut;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::virtio::block::{Block, BlockError, Drive, Drives};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::host::HostKind;
use crate::signals::{self, TerminationSignals};
use crate::snapshot::create::Snapshotter;
use crate::snapshot::{self as snap, SavedConfig, SnapshotError};
use crate::vcpu::control::{self, ControlError, VcpuControl};
use crate::vcpu::exit_info::VcpuStop;
use crate::vcpu::{BootEntry, Vcpu, VcpuError};
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot run a VM on this host: {0}")]
    NoKvm(&'static str),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read KVM's supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile { path: String, source: std::io::Error },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot create the entropy device: {0}")]
    Rng(std::io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    VcpuControl(#[from] ControlError),
    /// The snapshot cannot be used: unreadable, corrupt, another format
    /// version, or not matching its memory file.
    #[error("cannot restore from {dir}: {source}")]
    BadSnapshot { dir: PathBuf, source: SnapshotError },
    #[error("cannot restore the device state: {0}")]
    Restore(String),
}

/// Every event source of the main loop: the exit watcher and the devices.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn event_loop_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::EventLoop(e.to_string())
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    Guest(VcpuStop),
    Timeout(u64),
    /// SIGINT, SIGTERM or SIGHUP reached the VMM.
    Signal(i32),
}

impl Stopped {
    /// The VMM's exit status: 0 for a guest reboot/shutdown, 3 for a KVM
    /// internal error, 4 for a triple fault, 5 for a timeout, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Guest(VcpuStop::Reset) | Stopped::Guest(VcpuStop::Halted { .. }) => 0,
            Stopped::Guest(VcpuStop::InternalError { .. }) => 3,
            Stopped::Guest(VcpuStop::TripleFault { .. }) => 4,
            Stopped::Timeout(_) => 5,
            Stopped::Signal(sig) => 128 + *sig as u8,
            Stopped::Guest(_) => 1,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Guest(s) => s.fmt(f),
            Stopped::Timeout(secs) => {
                write!(f, "the guest did not finish within the {secs} s timeout")
            }
            Stopped::Signal(sig) => write!(f, "stopped by {}", signals::name(*sig)),
        }
    }
}

/// What the run produced, for the caller to report.
#[derive(Debug)]
pub struct RunOutcome {
    pub stopped: Stopped,
    pub template: CpuTemplate,
    pub host: HostKind,
    pub unhandled_pio: u64,
    pub unhandled_mmio: u64,
}

/// Resolved settings that the VM is built from.
pub struct BootPlan {
    pub host: HostKind,
    pub template: CpuTemplate,
    pub cmdline: String,
}

impl BootPlan {
    /// `device_params` are the `virtio_mmio.device=` entries of the VM's devices.
    pub fn new(config: &VmConfig, host: HostKind, device_params: &[String]) -> Result<Self, VmmError> {
        let template = config.cpu_template.unwrap_or_else(|| CpuTemplate::for_host(host));
        let mut extra: Vec<String> = template.kernel_params().iter().map(|s| s.to_string()).collect();
        extra.extend_from_slice(device_params);
        let cmdline = cmdline::compose(config.cmdline.as_deref(), &extra)?;
        Ok(BootPlan {
            host,
            template,
            cmdline,
        })
    }
}

/// A device just put on the bus, and its transport.
type Added<D> = (Arc<Mutex<D>>, Arc<Mutex<MmioTransport>>);

/// The VM's virtio devices, seen as event sources and as devices.
struct VirtioDevices {
    subscribers: Vec<Subscriber>,
    devices: ReleaseOnDrop,
    drives: Arc<Drives>,
}

/// Gives the devices' host resources back on every way out of `run`: vCPU
/// threads keep the devices alive, so their own `Drop` would come too late.
#[derive(Default)]
struct ReleaseOnDrop(Vec<Arc<Mutex<dyn VirtioDevice>>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        for dev in &self.0 {
            lock(dev).release_host_resources();
        }
    }
}

impl VirtioDevices {
    fn add<D: VirtioDevice + 'static>(
        &mut self,
        vm: &Vm,
        manager: &mut DeviceManager,
        dev: D,
    ) -> Result<Added<D>, VmmError> {
        let dev = Arc::new(Mutex::new(dev));
        let transport = manager.add_virtio_device(&vm.fd, &vm.memory, dev.clone())?;
        self.subscribers.push(dev.clone());
        self.devices.0.push(dev.clone());
        Ok((dev, transport))
    }
}

/// Creates the configured virtio devices and puts them on the MMIO bus.
fn create_virtio_devices(
    disks: &[BlockConfig],
    vsock: Option<&VsockConfig>,
    rng: bool,
    vm: &Vm,
    manager: &mut DeviceManager,
) -> Result<VirtioDevices, VmmError> {
    let mut all = VirtioDevices {
        subscribers: Vec::new(),
        devices: ReleaseOnDrop::default(),
        drives: Arc::new(Drives::new(Vec::new(), Vec::new())),
    };
    let mut drives = Vec::with_capacity(disks.len());
    for disk in disks {
        let (device, transport) = all.add(vm, manager, Block::new(disk)?)?;
        drives.push(Drive { device, transport });
    }
    all.drives = Arc::new(Drives::new(drives, disks.to_vec()));
    if let Some(v) = vsock {
        all.add(vm, manager, Vsock::new(v)?)?;
    }
    if rng {
        all.add(vm, manager, Rng::new().map_err(VmmError::Rng)?)?;
    }
    Ok(all)
}

fn open_serial(serial: &SerialOutput) -> Result<Option<SerialOut>, VmmError> {
    Ok(match serial {
        SerialOutput::Off => None,
        SerialOutput::Stdout => Some(Box::new(std::io::stdout())),
        SerialOutput::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Some(Box::new(f))
        }
    })
}

/// Validates `config`, boots the VM and blocks until it ends.
pub fn run(config: &VmConfig) -> Result<RunOutcome, VmmError> {
    config.validate()?;
    // Before anything that leaves state behind (the vsock socket): from here
    // on a termination signal ends the run through the normal exit path.
    let signals = TerminationSignals::block().map_err(event_loop_err)?;
    let host = HostKind::detect();
    if host == HostKind::NoKvm {
        return Err(VmmError::NoKvm(
            "/dev/kvm is missing or not accessible (load kvm_intel, kvm_amd or kvm_pvm, and check permissions)",
        ));
    }
    // Bound now so that a bad path fails before booting; served once the
    // vCPUs run. Dropping it (any way out of here) removes the socket file.
    let api_listener = config.api_socket.as_deref().map(ApiListener::bind).transpose()?;
    let mem_size = u64::from(config.mem_mib) << 20;
    let vm = Arc::new(Vm::create(mem_size)?);
    let mut devices = DeviceManager::new(&vm.fd, open_serial(&config.serial)?)?;
    let virtio = create_virtio_devices(&config.disks, config.vsock.as_ref(), config.rng, &vm, &mut devices)?;
    let plan = BootPlan::new(config, host, devices.cmdline_entries())?;
    info!(host = %host, template = %plan.template, cmdline = %plan.cmdline, "booting");

    let kernel = loader::load_kernel(&vm.memory, &config.kernel)?;
    let mut cmdline_bytes = plan.cmdline.clone().into_bytes();
    cmdline_bytes.push(0);
    vm.memory
        .write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(VmmError::CmdlineWrite)?;

    let initrd = match &config.initrd {
        Some(path) => {
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(MMIO_GAP_START - 1);
            Some(loader::load_initrd(&vm.memory, path, kernel.end, max)?)
        }
        None => None,
    };
    match kernel.mode {
        EntryMode::Linux64 => {
            params::write_linux_params(&vm.memory, mem_size, plan.cmdline.len(), initrd, kernel.setup_header)?
        }
        EntryMode::Pvh => params::write_pvh_params(&vm.memory, mem_size, initrd)?,
    }
    mptable::setup(&vm.memory, config.vcpus)?;

    let supported = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::Cpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(
            &vm.fd,
            index,
            devices.pio_bus.clone(),
            devices.mmio_bus.clone(),
            vm.memory.clone(),
        )?;
        let boot = (index == 0).then_some(BootEntry {
            mode: kernel.mode,
            entry: kernel.entry,
        });
        vcpu.configure(&supported, plan.template, config.vcpus, boot)?;
        vcpus.push(vcpu);
    }

    let saved = SavedConfig {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        cpu_template: plan.template,
        disks: config.disks.clone(),
        vsock: config.vsock.clone(),
        rng: config.rng,
    };
    run_vm(Running {
        vm,
        devices,
        virtio,
        vcpus,
        signals,
        api_listener,
        timeout_secs: config.timeout_secs,
        saved,
        host,
    })
}

/// How to start a VM from a snapshot directory. Everything else (vCPUs,
/// memory, disks, devices) comes from the snapshot.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    pub dir: PathBuf,
    pub api_socket: Option<PathBuf>,
    /// Replaces the saved vsock device's CID and socket: each restored VM
    /// needs a socket of its own. The guest re-reads its CID after the
    /// transport reset that every restore sends.
    pub vsock: Option<VsockConfig>,
    pub serial: SerialOutput,
    pub timeout_secs: Option<u64>,
    /// Replaces the saved disks' files, one for one, read-only flags equal:
    /// a template booted with a placeholder root serves any root image.
    /// The guest keeps the capacity it read at boot, so a replacement must
    /// not hold data beyond the saved disk's size.
    pub disks: Option<Vec<BlockConfig>>,
}

/// Checks that `new` can stand in for the saved disks.
fn replace_disks(saved: &[BlockConfig], new: &[BlockConfig]) -> Result<(), ConfigError> {
    if saved.len() != new.len() {
        return Err(ConfigError::Invalid {
            field: "disks",
            message: format!("the snapshot has {} disks; {} were given", saved.len(), new.len()),
        });
    }
    for (i, (s, n)) in saved.iter().zip(new).enumerate() {
        if s.read_only != n.read_only {
            return Err(ConfigError::Invalid {
                field: "disks",
                message: format!(
                    "disk {i} was {} in the snapshot; a replacement keeps that",
                    if s.read_only { "read-only" } else { "writable" }
                ),
            });
        }
    }
    Ok(())
}

/// Rebuilds the VM saved in `rc.dir`, with its memory mapped privately from
/// the snapshot's memory file, and runs it until it ends.
pub fn restore(rc: &RestoreConfig) -> Result<RunOutcome, VmmError> {
    let bad = |source: SnapshotError| VmmError::BadSnapshot {
        dir: rc.dir.clone(),
        source,
    };
    let state = snap::read_state_file(&rc.dir).map_err(bad)?;
    if let Some(d) = &rc.disks {
        replace_disks(&state.config.disks, d)?;
    }
    if rc.vsock.is_some() && state.config.vsock.is_none() {
        return Err(ConfigError::Invalid {
            field: "vsock",
            message: "the snapshot has no vsock device to attach a socket to".into(),
        }
        .into());
    }
    if rc.timeout_secs == Some(0) {
        return Err(ConfigError::Invalid {
            field: "timeout_secs",
            message: "must be at least 1 second".into(),
        }
        .into());
    }
    let signals = TerminationSignals::block().map_err(event_loop_err)?;
    let host = HostKind::detect();
    if host == HostKind::NoKvm {
        return Err(VmmError::NoKvm(
            "/dev/kvm is missing or not accessible (load kvm_intel, kvm_amd or kvm_pvm, and check permissions)",
        ));
    }
    let api_listener = rc.api_socket.as_deref().map(ApiListener::bind).transpose()?;
    let memory = snap::memory::map_private(&rc.dir.join(snap::MEMORY_FILE), &state.memory).map_err(bad)?;
    let vm = Arc::new(Vm::with_memory(memory)?);
    // The interrupt controllers, PIT and clock before any vCPU exists.
    vm.restore_state(&state.vm)?;

    let mut saved = state.config.clone();
    if let Some(v) = &rc.vsock {
        saved.vsock = Some(v.clone());
    }
    if let Some(d) = &rc.disks {
        saved.disks = d.clone();
    }
    let mut devices = DeviceManager::new(&vm.fd, open_serial(&rc.serial)?)?;
    let virtio = create_virtio_devices(&saved.disks, saved.vsock.as_ref(), saved.rng, &vm, &mut devices)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for vs in &state.vcpus {
        let vcpu = Vcpu::new(
            &vm.fd,
            vs.id,
            devices.pio_bus.clone(),
            devices.mmio_bus.clone(),
            vm.memory.clone(),
        )?;
        vcpu.restore_state(vs)?;
        vcpus.push(vcpu);
    }
    // Devices last: re-activating them may raise interrupts, which must
    // reach the restored local APICs rather than be overwritten by them.
    lock(&devices.serial)
        .restore_state(&state.serial)
        .map_err(VmmError::Restore)?;
    for (transport, ts) in devices.transports.iter().zip(&state.virtio) {
        lock(transport).restore_state(ts).map_err(VmmError::Restore)?;
    }
    info!(
        dir = %rc.dir.display(),
        vcpus = saved.vcpus,
        mem_mib = saved.mem_mib,
        "restored from the snapshot"
    );
    run_vm(Running {
        vm,
        devices,
        virtio,
        vcpus,
        signals,
        api_listener,
        timeout_secs: rc.timeout_secs,
        saved,
        host,
    })
}

/// A built VM, ready to run.
struct Running {
    vm: Arc<Vm>,
    devices: DeviceManager,
    virtio: VirtioDevices,
    vcpus: Vec<Vcpu>,
    signals: TerminationSignals,
    api_listener: Option<ApiListener>,
    timeout_secs: Option<u64>,
    /// What a snapshot of it records.
    saved: SavedConfig,
    host: HostKind,
}

/// Starts the vCPUs, the API and the event loop; returns when the VM ends.
fn run_vm(r: Running) -> Result<RunOutcome, VmmError> {
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

    control::install_kick_handler()?;
    let vcpu_control = Arc::new(VcpuControl::new(vcpu_count));
    for vcpu in vcpus {
        let evt = stop_evt.try_clone().map_err(event_loop_err)?;
        // Threads are detached: the process ends with the VM, and a vCPU
        // blocked in KVM_RUN (or parked by a pause) cannot be joined anyway.
        vcpu.spawn(vcpu_control.clone(), stop_tx.clone(), evt)?;
    }
    drop(stop_tx);
    let _api = match api_listener {
        Some(l) => Some(l.serve(ApiContext {
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
            })),
        })?),
        None => None,
    };

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_disks_must_match_in_number_and_mode() {
        let d = |p: &str, ro| BlockConfig {
            path: p.into(),
            read_only: ro,
        };
        let saved = [d("/placeholder", true)];
        replace_disks(&saved, &[d("/root.ext4", true)]).unwrap();
        let e = replace_disks(&saved, &[d("/root.ext4", false)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-only in the snapshot"), "{e}");
        let e = replace_disks(&saved, &[]).unwrap_err().to_string();
        assert!(e.contains("has 1 disks; 0 were given"), "{e}");
    }

    #[test]
    fn exit_codes() {
        use crate::vcpu::exit_info::GuestLocation;
        assert_eq!(Stopped::Guest(VcpuStop::Reset).exit_code(), 0);
        let at = GuestLocation::default();
        assert_eq!(
            Stopped::Guest(VcpuStop::TripleFault { cpu: 0, at: at.clone() }).exit_code(),
            4
        );
        assert_eq!(
            Stopped::Guest(VcpuStop::InternalError {
                cpu: 0,
                suberror: 1,
                at
            })
            .exit_code(),
            3
        );
        assert_eq!(Stopped::Timeout(3).exit_code(), 5);
        assert_eq!(Stopped::Guest(VcpuStop::FailEntry { cpu: 0, reason: 1 }).exit_code(), 1);
    }

    #[test]
    fn plan_picks_template_from_host_and_appends_its_params() {
        let mut c = VmConfig::new("/k");
        c.cmdline = Some("console=ttyS0 -- init-arg".into());
        let p = BootPlan::new(&c, HostKind::Pvm, &[]).unwrap();
        assert_eq!(p.template, CpuTemplate::Pvm);
        assert!(
            p.cmdline.starts_with("console=ttyS0 noxsave clearcpuid=cx16,"),
            "{}",
            p.cmdline
        );
        assert!(
            p.cmdline.ends_with(" bulkhead.no_int3_selftest -- init-arg"),
            "{}",
            p.cmdline
        );
        let p = BootPlan::new(
            &c,
            HostKind::HardwareVirtualization,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert_eq!(p.template, CpuTemplate::Host);
        assert_eq!(
            p.cmdline,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 -- init-arg"
        );
        c.cpu_template = Some(CpuTemplate::Pvm);
        let p = BootPlan::new(&c, HostKind::HardwareVirtualization, &[]).unwrap();
        assert_eq!(p.template, CpuTemplate::Pvm, "--cpu-template overrides detection");
    }
}
