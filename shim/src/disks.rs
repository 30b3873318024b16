//! Which of the pod VM's disks holds which root image. Disk 0 gets the
//! first container's image when the VM starts; later images go to spare
//! disks, attached while the VM runs and emptied again once no container
//! of the pod uses them. Containers of one image share its disk.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error(
    "this pod's VM already holds {held} root images, one per disk (raise spare_disks in the bulkhead configuration)"
)]
pub struct DisksFull {
    pub held: usize,
}

/// Where a container's image is.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Already on this disk.
    Attached(u8),
    /// This spare disk is reserved for it: attach the image, or
    /// [`DiskSlots::abandon`] the claim.
    Attach(u8),
}

#[derive(Debug)]
struct Slot {
    image: PathBuf,
    users: usize,
}

#[derive(Debug)]
pub struct DiskSlots {
    slots: Vec<Option<Slot>>,
}

impl DiskSlots {
    /// Disk 0 holds `root`; `spare` disks are empty.
    pub fn new(root: &Path, spare: u8) -> DiskSlots {
        let mut slots = vec![Some(Slot {
            image: root.to_path_buf(),
            users: 0,
        })];
        slots.extend((0..spare).map(|_| None));
        DiskSlots { slots }
    }

    /// Counts a new user of `image`.
    pub fn claim(&mut self, image: &Path) -> Result<Claim, DisksFull> {
        if let Some((i, slot)) = self
            .slots
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| s.as_mut().filter(|s| s.image == image).map(|s| (i, s)))
        {
            slot.users += 1;
            return Ok(Claim::Attached(index(i)));
        }
        let Some(i) = self.slots.iter().skip(1).position(Option::is_none).map(|p| p + 1) else {
            return Err(DisksFull {
                held: self.slots.iter().filter(|s| s.is_some()).count(),
            });
        };
        self.slots[i] = Some(Slot {
            image: image.to_path_buf(),
            users: 1,
        });
        Ok(Claim::Attach(index(i)))
    }

    /// Gives up a [`Claim::Attach`] whose image could not be attached.
    pub fn abandon(&mut self, disk: u8) {
        if disk > 0 {
            if let Some(s) = self.slots.get_mut(usize::from(disk)) {
                *s = None;
            }
        }
    }

    /// Counts one user fewer; returns the spare disk to empty when that was
    /// its last user. Disk 0 keeps its image (the VM may start more
    /// containers from it).
    pub fn release(&mut self, disk: u8) -> Option<u8> {
        let slot = self.slots.get_mut(usize::from(disk))?;
        let s = slot.as_mut()?;
        s.users = s.users.saturating_sub(1);
        if s.users == 0 && disk > 0 {
            *slot = None;
            return Some(disk);
        }
        None
    }
}

fn index(i: usize) -> u8 {
    // At most 1 + u8::MAX slots exist, see `new`.
    u8::try_from(i).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_disk_per_image_shared_and_reused() {
        let mut d = DiskSlots::new(Path::new("/img/a"), 2);
        assert_eq!(d.claim(Path::new("/img/a")).unwrap(), Claim::Attached(0));
        assert_eq!(d.claim(Path::new("/img/b")).unwrap(), Claim::Attach(1));
        assert_eq!(d.claim(Path::new("/img/b")).unwrap(), Claim::Attached(1));
        assert_eq!(d.claim(Path::new("/img/c")).unwrap(), Claim::Attach(2));
        let e = d.claim(Path::new("/img/d")).unwrap_err();
        assert_eq!(e.held, 3);
        assert!(e.to_string().contains("spare_disks"), "{e}");
        assert_eq!(d.release(1), None, "b has another user");
        assert_eq!(d.release(1), Some(1), "b's last user: empty disk 1");
        assert_eq!(d.claim(Path::new("/img/d")).unwrap(), Claim::Attach(1));
        assert_eq!(d.release(0), None, "disk 0 keeps its image");
        assert_eq!(d.claim(Path::new("/img/a")).unwrap(), Claim::Attached(0));
    }

    #[test]
    fn an_abandoned_claim_frees_its_disk() {
        let mut d = DiskSlots::new(Path::new("/img/a"), 1);
        assert_eq!(d.claim(Path::new("/img/b")).unwrap(), Claim::Attach(1));
        d.abandon(1);
        assert_eq!(d.claim(Path::new("/img/c")).unwrap(), Claim::Attach(1));
        d.abandon(0);
        assert_eq!(d.claim(Path::new("/img/a")).unwrap(), Claim::Attached(0));
        assert_eq!(d.release(7), None, "no such disk");
    }
}
