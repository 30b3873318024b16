use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::debug;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;

use super::request::{self, Disk, RequestHeader, DISK_ID_BYTES, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use crate::devices::virtio::indirect::refuse_indirect;
use crate::devices::virtio::{read_config_bytes, DeviceCore, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Scatter-gather segments per request we accept (queue size minus header
/// and status descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap`.
const CONFIG_LEN: usize = 60;

pub use bulkhead_vmm_api::config::BlockConfig;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("the disk image {0} is empty")]
    Empty(String),
    #[error("cannot create the queues: {0}")]
    Queues(std::io::Error),
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; DISK_ID_BYTES],
    config_space: [u8; CONFIG_LEN],
    core: DeviceCore,
}

/// An opened image: its file, addressable size and the serial the guest
/// reads through GET_ID.
struct Backing {
    file: File,
    capacity_sectors: u64,
    id: [u8; DISK_ID_BYTES],
}

impl Backing {
    fn open(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let shown = cfg.path.display().to_string();
        let open_err = |source| BlockError::Open {
            path: shown.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let len = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        // A trailing partial sector is not addressable.
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Empty(shown));
        }
        let mut id = [0u8; DISK_ID_BYTES];
        let serial = format!("bh{:x}.{:x}", meta.dev(), meta.ino());
        let n = serial.len().min(DISK_ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Backing {
            file,
            capacity_sectors,
            id,
        })
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let max_sectors = u32::try_from(self.capacity_sectors).unwrap_or(u32::MAX);
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

impl Block {
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let backing = Backing::open(cfg)?;
        Ok(Block {
            config_space: backing.config_space(),
            file: backing.file,
            read_only: cfg.read_only,
            capacity_sectors: backing.capacity_sectors,
            id: backing.id,
            core: DeviceCore::new(1, QUEUE_SIZE).map_err(BlockError::Queues)?,
        })
    }

    /// Serves later requests from the image at `path` instead (the disk
    /// keeps its read-only mode), like changing the medium in a drive; the
    /// caller tells the driver through a configuration-change interrupt.
    /// Requests already served are unaffected, and on error nothing changes.
    pub fn replace_backing(&mut self, path: &Path) -> Result<BlockConfig, BlockError> {
        let cfg = BlockConfig {
            path: path.to_path_buf(),
            read_only: self.read_only,
        };
        let backing = Backing::open(&cfg)?;
        self.config_space = backing.config_space();
        self.file = backing.file;
        self.capacity_sectors = backing.capacity_sectors;
        self.id = backing.id;
        Ok(cfg)
    }

    /// Serves every available request; returns whether to interrupt the guest.
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = &self.core.active else {
            return false;
        };
        let mem = &active.mem;
        let disk = Disk {
            file: &self.file,
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: &self.id,
        };
        let queue = &mut self.core.q.queues[0];
        let mut used_any = false;
        // A guest that keeps refilling the ring must not keep the event loop
        // here: serve one ring's worth, then come back through the eventfd.
        let mut budget = queue.size();
        while budget > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if refuse_indirect(queue, mem, head, "virtio-blk") {
                used_any = true;
                continue;
            }
            let len = process_chain(&disk, mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                debug!("virtio-blk: cannot return a buffer: {e}");
            }
            used_any = true;
        }
        if budget == 0 {
            // Possibly more waiting: a spurious wake-up costs nothing.
            let _ = self.core.q.events[0].write(1);
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }

    fn signal(&self) {
        self.core.signal_used();
    }
}

/// Runs one descriptor chain and returns the bytes written to the guest
/// (data plus status). A chain without room for a status byte cannot be
/// answered and is returned with length 0.
fn process_chain(disk: &Disk<'_>, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            debug!("virtio-blk: malformed descriptor chain: {e}");
            return 0;
        }
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        debug!("virtio-blk: request without a status byte");
        return 0;
    }
    let Ok(mut status) = writer.split_at(writable - 1) else {
        return 0;
    };
    let (code, data_len) = match reader.read_obj::<RequestHeader>() {
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        Ok(header) => {
            let readable = reader.available_bytes();
            match request::execute(disk, &header, &mut reader, readable, &mut writer, writable - 1) {
                Ok(n) => (VIRTIO_BLK_S_OK, n),
                Err(e) => {
                    debug!("virtio-blk: request failed: {e}");
                    (e.status(), 0)
                }
            }
        }
    };
    match status.write_all(&[code]) {
        Ok(()) => data_len + 1,
        Err(_) => 0,
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }
    fn core(&self) -> &DeviceCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_queues(ops, "virtio-blk");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.core.q.events[0].read();
        if self.process_queue() {
            self.signal();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::*;
    use crate::devices::virtio::test_utils::{guest_memory, queue_with_chains, WRITE};
    use crate::devices::virtio::Interrupt;
    use std::sync::Arc;
    use virtio_queue::desc::split::VirtqUsedElem;
    use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    type Chain = Vec<(u64, u32, u16)>;

    fn image(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Block,
        irq: EventFd,
    }

    fn put_header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let h = RequestHeader {
            type_: t.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        mem.write_slice(h.as_slice(), GuestAddress(at)).unwrap();
    }

    /// A device activated on a queue holding `chains`, with a request header
    /// of type `t` at HDR, then served once as the event loop serves it.
    fn rig_with(path: &std::path::Path, ro: bool, t: u32, sector: u64, chains: &[Chain]) -> Rig {
        let mem = guest_memory();
        put_header(&mem, HDR, t, sector);
        rig_on(mem, path, ro, chains)
    }

    fn rig_on(mem: GuestMemoryMmap, path: &std::path::Path, ro: bool, chains: &[Chain]) -> Rig {
        let mut dev = Block::new(&BlockConfig {
            path: path.into(),
            read_only: ro,
        })
        .unwrap();
        dev.core.q.queues[0] = queue_with_chains(&mem, 64, chains);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(
            mem.clone(),
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            VIRTIO_F_VERSION_1,
        )
        .unwrap();
        // Activation (a vCPU thread's status write) does no I/O: it leaves
        // queued requests to the event loop.
        assert_eq!(dev.core.q.queues[0].next_used(), 0);
        assert_eq!(dev.core.q.events[0].read().unwrap(), 1);
        if dev.process_queue() {
            dev.signal();
        }
        Rig { mem, dev, irq }
    }

    fn used(r: &Rig, i: u64) -> VirtqUsedElem {
        let used_ring = r.dev.core.q.queues[0].used_ring();
        r.mem
            .read_obj(GuestAddress(used_ring).unchecked_add(4 + 8 * i))
            .unwrap()
    }

    fn status(r: &Rig) -> u8 {
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_request_through_the_queue() {
        let img = image(16);
        let chain = vec![(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)];
        let mut r = rig_with(img.path(), true, VIRTIO_BLK_T_IN, 3, &[chain]);
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(used(&r, 0).len(), 1025);
        let mut data = vec![0u8; 1024];
        r.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..512].iter().all(|b| *b == 3) && data[512..].iter().all(|b| *b == 4));
        assert_eq!(status(&r), VIRTIO_BLK_S_OK);
        assert!(!r.dev.process_queue());
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr_and_file_untouched() {
        let img = image(4);
        let before = std::fs::read(img.path()).unwrap();
        let chain = vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)];
        let r = rig_with(img.path(), true, VIRTIO_BLK_T_OUT, 0, &[chain]);
        assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
        assert_eq!(used(&r, 0).len(), 1);
        assert_eq!(std::fs::read(img.path()).unwrap(), before);
    }

    #[test]
    fn write_lands_in_the_file() {
        let img = image(4);
        let mem = guest_memory();
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let chain = vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)];
        let r = rig_on(mem, img.path(), false, &[chain]);
        assert_eq!(status(&r), VIRTIO_BLK_S_OK);
        assert_eq!(&std::fs::read(img.path()).unwrap()[512..1024], &[0x5a; 512][..]);
    }

    #[test]
    fn request_past_the_end_is_ioerr() {
        let img = image(4);
        let chain = vec![(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)];
        let r = rig_with(img.path(), true, VIRTIO_BLK_T_IN, 3, &[chain]);
        assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn malformed_chains_never_panic_and_the_queue_moves_on() {
        let img = image(4);
        let chains: Vec<Chain> = vec![
            // Header outside guest memory.
            vec![(0xffff_ffff_0000, 16, 0), (STATUS, 1, WRITE)],
            // No writable status byte at all.
            vec![(HDR, 16, 0)],
            // Header too short.
            vec![(HDR, 8, 0), (STATUS, 1, WRITE)],
            // Readable descriptor after a writable one (wrong direction).
            vec![(HDR, 16, 0), (STATUS, 1, WRITE), (DATA, 512, 0)],
            // Oversized data length.
            vec![(HDR, 16, 0), (DATA, u32::MAX, WRITE), (STATUS, 1, WRITE)],
            // A good request after all of that.
            vec![(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
        ];
        let r = rig_with(img.path(), true, VIRTIO_BLK_T_IN, 0, &chains);
        assert_eq!(
            r.dev.core.q.queues[0].next_used(),
            chains.len() as u16,
            "every chain was returned"
        );
        assert_eq!(used(&r, 0).len(), 0, "no status byte reachable");
        assert_eq!(used(&r, 1).len(), 0, "no status byte");
        assert_eq!(used(&r, 2).len(), 1, "short header: IOERR status only");
        assert_eq!(used(&r, 5).len(), 513);
        assert_eq!(status(&r), VIRTIO_BLK_S_OK, "the last, valid request succeeded");
    }

    #[test]
    fn descriptor_loop_is_not_followed_forever() {
        let img = image(4);
        let mem = guest_memory();
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let mut dev = Block::new(&BlockConfig {
            path: img.path().into(),
            read_only: true,
        })
        .unwrap();
        // Two descriptors pointing at each other.
        let mock = virtio_queue::mock::MockSplitQueue::new(&mem, 16);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        use virtio_queue::desc::{split::Descriptor as D, RawDescriptor as R};
        mock.desc_table().store(0, R::from(D::new(HDR, 16, next, 1))).unwrap();
        mock.desc_table()
            .store(1, R::from(D::new(STATUS, 1, next | WRITE, 0)))
            .unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0u16);
        mock.avail().idx().store(1u16);
        dev.core.q.queues[0] = mock.create_queue().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(mem.clone(), Arc::new(Interrupt::new(irq)), VIRTIO_F_VERSION_1)
            .unwrap();
        dev.process_queue();
        assert_eq!(dev.core.q.queues[0].next_used(), 1, "the looping chain was returned");
    }

    /// The same read through an indirect table, which the device never
    /// offered: returned unused, the disk's data never reaches the guest.
    #[test]
    fn a_chain_through_an_indirect_table_is_refused() {
        const TABLE: u64 = 0x40_0000;
        let img = image(16);
        let mem = guest_memory();
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        use virtio_queue::desc::split::Descriptor as D;
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        mem.write_obj(D::new(DATA, 512, WRITE | next, 1), GuestAddress(TABLE))
            .unwrap();
        mem.write_obj(D::new(STATUS, 1, WRITE, 0), GuestAddress(TABLE + 16))
            .unwrap();
        mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let chain = vec![(HDR, 16, 0), (TABLE, 32, indirect)];
        let r = rig_on(mem, img.path(), true, &[chain]);
        assert_eq!(used(&r, 0).len(), 0);
        assert_eq!(status(&r), 0xaa, "no status was written");
        let mut data = vec![0u8; 512];
        r.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().all(|b| *b == 0), "the disk's data reached the guest");
    }

    #[test]
    fn a_full_ring_is_served_once_then_the_queue_event_is_rearmed() {
        let img = image(4);
        // One-descriptor chains, so that the 64-entry ring fills up.
        let chains: Vec<Chain> = (0..64).map(|_| vec![(HDR, 16, 0)]).collect();
        let r = rig_with(img.path(), true, VIRTIO_BLK_T_IN, 0, &chains);
        assert_eq!(r.dev.core.q.queues[0].next_used(), 64);
        // The budget (one ring) ran out, so the event loop will come back.
        assert_eq!(r.dev.core.q.events[0].read().unwrap(), 1);
    }

    #[test]
    fn get_id_and_config_space() {
        let img = image(8);
        let chain = vec![(HDR, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)];
        let r = rig_with(img.path(), false, VIRTIO_BLK_T_GET_ID, 0, &[chain]);
        assert_eq!(status(&r), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert!(id.starts_with(b"bh"));
        let mut cap = [0u8; 8];
        r.dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_ne!(r.dev.avail_features() & VIRTIO_BLK_F_DISCARD, 0);
        let ro = Block::new(&BlockConfig {
            path: img.path().into(),
            read_only: true,
        })
        .unwrap();
        assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro.avail_features() & VIRTIO_BLK_F_WRITE_ZEROES, 0);
    }

    #[test]
    fn empty_or_missing_image_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Block::new(&BlockConfig {
                path: f.path().into(),
                read_only: true
            }),
            Err(BlockError::Empty(_))
        ));
        assert!(matches!(
            Block::new(&BlockConfig {
                path: "/nonexistent".into(),
                read_only: true
            }),
            Err(BlockError::Open { .. })
        ));
    }
}
