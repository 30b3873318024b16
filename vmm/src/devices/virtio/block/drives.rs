//! The VM's disks as the control API sees them: a disk's image can be
//! replaced while the guest runs (`PATCH /drives/{index}`), which is how a
//! pod's later containers get their own root images without a reboot.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{Block, BlockConfig, BlockError};
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::MmioTransport;

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("no drive {index}: this VM has {count} (numbered from 0 in --disk order)")]
    NoSuchDrive { index: usize, count: usize },
    #[error(transparent)]
    Backing(#[from] BlockError),
}

/// One disk: its device, and the transport that tells the guest's driver.
pub struct Drive {
    pub device: Arc<Mutex<Block>>,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Every disk, in `--disk` order, with the configuration a snapshot records.
pub struct Drives {
    drives: Vec<Drive>,
    configs: Mutex<Vec<BlockConfig>>,
}

impl Drives {
    pub fn new(drives: Vec<Drive>, configs: Vec<BlockConfig>) -> Self {
        Drives {
            drives,
            configs: Mutex::new(configs),
        }
    }

    /// The disks as they are now (a replaced image included).
    pub fn configs(&self) -> Vec<BlockConfig> {
        lock(&self.configs).clone()
    }

    /// Points drive `index` at the image `path` and raises a
    /// configuration-change interrupt, so the guest reads the new capacity.
    /// The guest's cached blocks of the old image are its own to drop.
    pub fn replace(&self, index: usize, path: &Path) -> Result<BlockConfig, DriveError> {
        let drive = self.drives.get(index).ok_or(DriveError::NoSuchDrive {
            index,
            count: self.drives.len(),
        })?;
        // Transport, then device: the order vCPU threads take them in.
        let mut transport = lock(&drive.transport);
        let cfg = lock(&drive.device).replace_backing(path)?;
        transport.notify_config_change();
        drop(transport);
        if let Some(slot) = lock(&self.configs).get_mut(index) {
            *slot = cfg.clone();
        }
        Ok(cfg)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::{Interrupt, VirtioDevice};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    pub fn image(bytes: usize, fill: u8) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![fill; bytes]).unwrap();
        f
    }

    /// One read-only drive on `first`, with a transport but no driver.
    pub fn drives(first: &Path) -> Drives {
        let cfg = BlockConfig {
            path: first.into(),
            read_only: true,
        };
        let device = Arc::new(Mutex::new(Block::new(&cfg).unwrap()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device.clone(),
            guest_memory(),
            Arc::new(Interrupt::new(irq)),
        )));
        Drives::new(vec![Drive { device, transport }], vec![cfg])
    }

    fn capacity(d: &Drives) -> u64 {
        let mut b = [0u8; 8];
        lock(&d.drives[0].device).read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn replacing_changes_capacity_and_recorded_path_but_not_mode() {
        let (a, b) = (image(4096, 1), image(8192, 2));
        let d = drives(a.path());
        assert_eq!(capacity(&d), 8);
        let cfg = d.replace(0, b.path()).unwrap();
        assert_eq!(cfg.path, b.path());
        assert!(cfg.read_only, "the drive keeps its read-only mode");
        assert_eq!(capacity(&d), 16);
        assert_eq!(d.configs(), vec![cfg]);
    }

    #[test]
    fn a_bad_image_or_index_changes_nothing() {
        let a = image(4096, 1);
        let d = drives(a.path());
        let e = d.replace(3, a.path()).unwrap_err().to_string();
        assert!(e.contains("no drive 3: this VM has 1"), "{e}");
        let empty = image(0, 0);
        let e = d.replace(0, empty.path()).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = d.replace(0, Path::new("/nonexistent/x.img")).unwrap_err().to_string();
        assert!(e.contains("cannot open"), "{e}");
        assert_eq!(capacity(&d), 8);
        assert_eq!(d.configs()[0].path, a.path());
    }
}
