//! No device offers VIRTIO_RING_F_INDIRECT_DESC, so a chain that uses an
//! indirect table breaks the protocol. virtio-queue would follow one
//! anyway; refusing it keeps every request within the queue's size, which
//! is also what a disk advertises as its segment limit.

use tracing::debug;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Size of one split-ring descriptor.
const DESC_BYTES: u64 = 16;

/// Whether the chain at `head` has a descriptor flagged indirect. A chain
/// that cannot be read is left to virtio-queue, which refuses it.
fn uses_indirect(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> bool {
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    // At most `size` links: a loop in the chain ends here too.
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let Some(at) = table.checked_add(u64::from(index) * DESC_BYTES) else {
            return false;
        };
        let Ok(d) = mem.read_obj::<Descriptor>(at) else {
            return false;
        };
        if d.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            return true;
        }
        if d.flags() & VRING_DESC_F_NEXT as u16 == 0 {
            return false;
        }
        index = d.next();
    }
    false
}

/// Returns the chain at `head` unused (length 0) when it uses an indirect
/// table; true if it did, and the caller must skip it.
pub fn refuse_indirect(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, device: &str) -> bool {
    if !uses_indirect(mem, queue, head) {
        return false;
    }
    debug!("{device}: refusing a chain with an indirect descriptor (not negotiated)");
    if let Err(e) = queue.add_used(mem, head, 0) {
        debug!("{device}: cannot return a buffer: {e}");
    }
    true
}
