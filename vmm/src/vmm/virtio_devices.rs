//! The VM's virtio devices: created from the device set, put on the MMIO
//! bus, and handed to the event loop as event sources.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use super::VmmError;
use crate::config::DeviceSet;
use crate::devices::bus::lock;
use crate::devices::manager::DeviceManager;
use crate::devices::virtio::block::{Block, Drive, Drives};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::vm::Vm;

/// Every event source of the main loop: the exit watcher and the devices.
pub(super) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A device just put on the bus, and its transport.
type Added<D> = (Arc<Mutex<D>>, Arc<Mutex<MmioTransport>>);

/// The VM's virtio devices, seen as event sources and as devices.
pub(super) struct VirtioDevices {
    pub subscribers: Vec<Subscriber>,
    pub devices: ReleaseOnDrop,
    pub drives: Arc<Drives>,
}

/// Gives the devices' host resources back on every way out of `run`: vCPU
/// threads keep the devices alive, so their own `Drop` would come too late.
#[derive(Default)]
pub(super) struct ReleaseOnDrop(Vec<Arc<Mutex<dyn VirtioDevice>>>);

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

/// Creates the set's virtio devices and puts them on the MMIO bus, in the
/// set's order (the guest names disks by it).
pub(super) fn create_virtio_devices(
    set: &DeviceSet,
    vm: &Vm,
    manager: &mut DeviceManager,
) -> Result<VirtioDevices, VmmError> {
    let mut all = VirtioDevices {
        subscribers: Vec::new(),
        devices: ReleaseOnDrop::default(),
        drives: Arc::new(Drives::new(Vec::new(), Vec::new())),
    };
    let mut drives = Vec::with_capacity(set.disks.len());
    for disk in &set.disks {
        let (device, transport) = all.add(vm, manager, Block::new(disk)?)?;
        drives.push(Drive { device, transport });
    }
    all.drives = Arc::new(Drives::new(drives, set.disks.clone()));
    if let Some(v) = &set.vsock {
        all.add(vm, manager, Vsock::new(v)?)?;
    }
    if set.rng {
        all.add(vm, manager, Rng::new().map_err(VmmError::Rng)?)?;
    }
    Ok(all)
}
