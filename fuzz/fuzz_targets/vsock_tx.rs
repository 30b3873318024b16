//! vsock operations from arbitrary guest memory: the fuzzer writes the tx
//! queue's descriptor table, ring and packets (headers and payloads); the
//! device must answer, reset or drop each one without panicking.
#![no_main]

use std::sync::{Arc, OnceLock};

use bulkhead_vmm::devices::virtio::vsock::{Vsock, VsockConfig};
use bulkhead_vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 0x4_0000;
const QUEUE: u16 = 16;

fn socket_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("bulkhead-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn setup_queue(dev: &mut Vsock, index: usize, base: u64) {
    let q = &mut dev.queues_mut()[index];
    q.set_size(QUEUE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 * QUEUE as usize + 4 {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else { return };
    let (table, rest) = data.split_at(16 * QUEUE as usize);
    let (ring, packets) = rest.split_at(4);
    // tx queue at 0x1000: descriptors and ring from the input.
    let _ = mem.write_slice(table, GuestAddress(0x1000));
    let idx = u16::from_le_bytes([ring[0], ring[1]]) % (QUEUE * 2);
    let _ = mem.write_obj(idx, GuestAddress(0x1102));
    for i in 0..QUEUE {
        let _ = mem.write_obj((i + u16::from(ring[2])) % QUEUE, GuestAddress(0x1104 + 2 * u64::from(i)));
    }
    let _ = mem.write_slice(&packets[..packets.len().min(MEM - 0x8000)], GuestAddress(0x8000));

    let path = socket_dir().join("v.sock");
    let _ = std::fs::remove_file(&path);
    let Ok(mut dev) = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: path }) else { return };
    setup_queue(&mut dev, 0, 0x2000); // rx: empty
    setup_queue(&mut dev, 1, 0x1000); // tx: fuzzed
    setup_queue(&mut dev, 2, 0x3000); // event: empty
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else { return };
    if dev.activate(mem, Arc::new(Interrupt::new(irq)), VIRTIO_F_VERSION_1).is_ok() {
        dev.process_tx();
        dev.process_rx();
    }
});
