//! Address buses for port I/O and MMIO: devices by address range.
//!
//! Accesses nobody claims are counted and ignored (reads return all ones),
//! the way an ISA bus with nothing on it behaves; a guest probing ports it
//! has no business with must never stop the VMM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus, addressed by offset from its base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("the range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("a device range must not be empty or wrap around ({base:#x}+{len:#x})")]
    InvalidRange { base: u64, len: u64 },
}

#[derive(Default)]
pub struct Bus {
    /// base -> (length, device)
    devices: BTreeMap<u64, (u64, SharedDevice)>,
    unhandled: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((b, (l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, access_len: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(access_len as u64)? <= *len).then_some((offset, dev))
    }

    /// Dispatches a read; unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Accesses that reached no device.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

/// A device whose lock was poisoned by a panic on another thread is still
/// used: its state is plain data and the VMM keeps serving the guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(lock(&dev).0, vec![(0, vec![0x41])]);
        assert_eq!(bus.unhandled_count(), 0);
    }

    #[test]
    fn unclaimed_accesses_are_counted_not_fatal() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder(vec![]))), 0x60, 1).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x80, &[1]));
        // An access that starts inside a device but runs past its end.
        assert!(!bus.read(0x60, &mut b));
        assert_eq!(bus.unhandled_count(), 3);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder(vec![]))) };
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap { base: 0x10f, len: 1 })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 0x10),
            Err(BusError::Overlap { base: 0xf8, len: 0x10 })
        );
        assert!(bus.insert(d(), 0x110, 1).is_ok());
        assert!(bus.insert(d(), 0xff, 1).is_ok());
        assert!(matches!(bus.insert(d(), 0x200, 0), Err(BusError::InvalidRange { .. })));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
