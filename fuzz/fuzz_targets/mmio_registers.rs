//! The virtio-mmio register interface, driven by arbitrary guest accesses:
//! any sequence of reads and writes of any width at any offset must leave
//! the VMM standing.
#![no_main]

use std::sync::{Arc, Mutex};

use bulkhead_vmm::devices::bus::BusDevice;
use bulkhead_vmm::devices::virtio::mmio::MmioTransport;
use bulkhead_vmm::devices::virtio::rng::Rng;
use bulkhead_vmm::devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]) else { return };
    let Ok(rng) = Rng::new() else { return };
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else { return };
    let mut t = MmioTransport::new(Arc::new(Mutex::new(rng)), mem, Arc::new(Interrupt::new(irq)));
    // Each access: [kind, offset lo, offset hi, v0, v1, v2, v3].
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let len = [1usize, 2, 4, 8][usize::from(op[0] >> 1) % 4];
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..len]);
        } else {
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&op[3..7]);
            t.write(offset, &buf[..len]);
        }
    }
});
