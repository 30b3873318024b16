//! Device-model throughput on mock queues (virtio-queue's test helpers over
//! mock guest memory), per CPU-second of this process.
//!
//! `cargo bench -p bulkhead-vmm --bench devices`
//!
//! Block: 4 KiB and 64 KiB reads and writes against an image on tmpfs
//! (/dev/shm), so the figure is the device model, not the disk. Each round
//! queues 32 requests on a fresh queue and times only `process_queue`.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_vmm::devices::virtio::block::request::{RequestHeader, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use bulkhead_vmm::devices::virtio::block::{Block, BlockConfig};
use bulkhead_vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REQUESTS_PER_ROUND: u16 = 32;
const MIN_CPU: Duration = Duration::from_millis(1500);

fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn bench_block(write: bool, size: u32) {
    let path = std::path::Path::new("/dev/shm").join(format!("bulkhead-bench-{}.img", std::process::id()));
    std::fs::write(&path, vec![0x11u8; 64 << 20]).expect("image on /dev/shm");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let mut dev = Block::new(&BlockConfig {
        path: path.clone(),
        read_only: false,
    })
    .unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
    let data_flags = if write { 0 } else { VRING_DESC_F_WRITE as u16 };
    let sectors_per_req = u64::from(size / 512);

    let mut busy = Duration::ZERO;
    let mut requests = 0u64;
    let mut round = 0u64;
    let mut activated = false;
    while busy < MIN_CPU {
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        let mut descs = Vec::new();
        for i in 0..REQUESTS_PER_ROUND {
            let hdr_addr = 0x10_0000 + u64::from(i) * 64;
            let data_addr = 0x100_0000 + u64::from(i) * u64::from(size);
            let status_addr = 0x20_0000 + u64::from(i);
            let sector = ((round * u64::from(REQUESTS_PER_ROUND) + u64::from(i)) * sectors_per_req)
                % ((64 << 20) / 512 - sectors_per_req);
            let h = RequestHeader {
                type_: t.into(),
                reserved: 0.into(),
                sector: sector.into(),
            };
            mem.write_slice(h.as_slice(), GuestAddress(hdr_addr)).unwrap();
            let base = i * 3;
            let next = VRING_DESC_F_NEXT as u16;
            descs.push(RawDescriptor::from(Descriptor::new(hdr_addr, 16, next, base + 1)));
            descs.push(RawDescriptor::from(Descriptor::new(
                data_addr,
                size,
                data_flags | next,
                base + 2,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                status_addr,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )));
        }
        mock.add_desc_chains(&descs, 0).unwrap();
        dev.queues_mut()[0] = mock.create_queue().unwrap();
        if !activated {
            dev.activate(
                mem.clone(),
                Arc::new(Interrupt::new(irq.try_clone().unwrap())),
                VIRTIO_F_VERSION_1,
            )
            .unwrap();
            activated = true;
        }
        let start = cpu_time();
        dev.process_queue();
        busy += cpu_time() - start;
        requests += u64::from(REQUESTS_PER_ROUND);
        round += 1;
    }
    let secs = busy.as_secs_f64();
    let mib = requests as f64 * f64::from(size) / (1 << 20) as f64;
    println!(
        "virtio-blk {:5} {:>2} KiB: {:>9.0} requests/CPU-s {:>8.0} MiB/CPU-s ({} requests)",
        if write { "write" } else { "read" },
        size / 1024,
        requests as f64 / secs,
        mib / secs,
        requests
    );
    let _ = std::fs::remove_file(&path);
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not supported.
    for write in [false, true] {
        for size in [4096, 65536] {
            bench_block(write, size);
        }
    }
}
