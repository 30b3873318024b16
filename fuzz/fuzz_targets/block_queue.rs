//! virtio-blk request handling from arbitrary guest memory: the fuzzer
//! writes the descriptor table, the available ring and the buffers; the
//! device must answer or skip every chain without panicking or touching
//! memory outside the guest.
#![no_main]

use std::io::Write;
use std::sync::{Arc, OnceLock};

use bulkhead_vmm::devices::virtio::block::{Block, BlockConfig};
use bulkhead_vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 0x4_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QUEUE: u16 = 16;

fn image() -> &'static std::path::Path {
    static IMG: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("bulkhead-fuzz-{}.img", std::process::id()));
        let mut f = std::fs::File::create(&p).expect("temp image");
        f.write_all(&[0x5a; 64 * 1024]).expect("temp image");
        p
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 * QUEUE as usize + 4 {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else { return };
    let (table, rest) = data.split_at(16 * QUEUE as usize);
    let (ring, buffers) = rest.split_at(4);
    let _ = mem.write_slice(table, GuestAddress(DESC));
    // Available ring: flags 0, idx from the input, entries 0..QUEUE.
    let idx = u16::from_le_bytes([ring[0], ring[1]]) % (QUEUE * 2);
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL));
    let _ = mem.write_obj(idx, GuestAddress(AVAIL + 2));
    for i in 0..QUEUE {
        let _ = mem.write_obj((i + u16::from(ring[2])) % QUEUE, GuestAddress(AVAIL + 4 + 2 * u64::from(i)));
    }
    let _ = mem.write_slice(&buffers[..buffers.len().min(MEM - 0x4000)], GuestAddress(0x4000));

    let read_only = ring[3] & 1 == 1;
    let Ok(mut dev) = Block::new(&BlockConfig { path: image().to_path_buf(), read_only }) else { return };
    let q = &mut dev.queues_mut()[0];
    q.set_size(QUEUE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else { return };
    // Activation leaves the queue to the event loop; serve it as that does.
    if dev.activate(mem, Arc::new(Interrupt::new(irq)), VIRTIO_F_VERSION_1).is_ok() {
        dev.process_queue();
    }
});
