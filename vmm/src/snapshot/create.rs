//! Taking a snapshot of a running VM (paused through the API).

use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::info;

use super::{memory, write_state_file, SavedConfig, SnapshotError, SnapshotState, MEMORY_FILE, STATE_FILE};
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::block::Drives;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::vcpu::control::{ControlError, VcpuControl};
use crate::vcpu::state::{self, SaveCaps};
use crate::vm::Vm;

/// Reading a parked vCPU's state takes microseconds; this only catches a
/// vCPU thread that is wedged.
const VCPU_STATE_WITHIN: Duration = Duration::from_secs(10);

/// What a snapshot reads: the VM, its vCPUs (through their threads) and
/// its devices.
pub struct Snapshotter {
    pub vm: Arc<Vm>,
    pub control: Arc<VcpuControl>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Where the disks' current images come from (they may have been
    /// replaced since boot).
    pub drives: Arc<Drives>,
    pub config: SavedConfig,
    /// What KVM can save, asked before the seccomp filters forbid asking.
    pub caps: SaveCaps,
}

impl Snapshotter {
    /// Writes `dir/memory` and then `dir/state`. The VM must be paused. The
    /// state file goes last and by rename, so a directory with a state file
    /// holds a complete snapshot; an old one is removed first so that a
    /// failed snapshot never pairs old state with new memory.
    pub fn create(&self, dir: &Path) -> Result<(), SnapshotError> {
        if !self.control.is_paused() {
            return Err(SnapshotError::Control(ControlError::NotPaused));
        }
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove the old", &state_path)(e)),
        }

        let vcpus = self.vcpu_states()?;

        // The event loop keeps serving devices while vCPUs are parked (a
        // vsock stream may still fill rx buffers): hold every device so
        // that guest memory and queue indices are copied at one moment.
        // Transport then device is the vCPU threads' order too.
        let transports: Vec<MutexGuard<'_, MmioTransport>> = self.transports.iter().map(|t| lock(t)).collect();
        let devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = transports.iter().map(|t| t.device()).collect();
        let device_guards: Vec<MutexGuard<'_, dyn VirtioDevice>> = devices.iter().map(|d| lock(d)).collect();
        let virtio = transports
            .iter()
            .zip(&device_guards)
            .map(|(t, d)| t.save_state(&**d))
            .collect();
        let serial = lock(&self.serial).save_state();
        let vm = self.vm.save_state().map_err(|e| SnapshotError::Kvm(e.to_string()))?;
        let regions = memory::dump(&self.vm.memory, &dir.join(MEMORY_FILE))?;
        drop(device_guards);
        drop(transports);

        let state = SnapshotState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: {
                let mut c = self.config.clone();
                c.devices.disks = self.drives.configs();
                c
            },
            memory: regions,
            vm,
            vcpus,
            serial,
            virtio,
        };
        write_state_file(dir, &state)?;
        info!(dir = %dir.display(), "snapshot written");
        Ok(())
    }

    /// Every vCPU's state, read by its own (parked) thread.
    fn vcpu_states(&self) -> Result<Vec<crate::snapshot::VcpuState>, SnapshotError> {
        let caps = &self.caps;
        let (tx, rx) = channel();
        self.control
            .run_on_parked(|index| {
                let tx = tx.clone();
                let caps = caps.clone();
                Box::new(move |fd| {
                    let _ = tx.send((index, state::save(fd, index, &caps)));
                })
            })
            .map_err(SnapshotError::Control)?;
        drop(tx);
        let n = self.control.vcpu_count();
        let mut states = Vec::with_capacity(n);
        for _ in 0..n {
            let (index, result) = rx
                .recv_timeout(VCPU_STATE_WITHIN)
                .map_err(|_| SnapshotError::Kvm("a vCPU thread did not hand over its state".into()))?;
            let state = result.map_err(|e| SnapshotError::Kvm(e.to_string()))?;
            states.push((index, state));
        }
        states.sort_by_key(|(i, _)| *i);
        Ok(states.into_iter().map(|(_, s)| s).collect())
    }
}
