use std::io::Write;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::QueueT;

use crate::devices::virtio::indirect::refuse_indirect;
use crate::devices::virtio::{DeviceCore, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;
/// Bytes handed out per request at most, so one request cannot make the
/// event loop spend long in getrandom.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

pub struct Rng {
    core: DeviceCore,
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            core: DeviceCore::new(1, QUEUE_SIZE)?,
        })
    }

    /// Serves every available request; returns whether the guest must be told.
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = &self.core.active else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut self.core.q.queues[0];
        let mut used_any = false;
        let mut buf = vec![0u8; MAX_BYTES_PER_REQUEST];
        // A guest that keeps refilling the ring must not keep the event loop
        // here: serve one ring's worth, then come back through the eventfd.
        let mut budget = queue.size();
        while budget > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if refuse_indirect(queue, mem, head, "virtio-rng") {
                used_any = true;
                continue;
            }
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
                    match fill_random(&mut buf[..n]) {
                        Ok(()) => writer.write_all(&buf[..n]).map(|_| n as u32).unwrap_or(0),
                        Err(e) => {
                            warn!("virtio-rng: getrandom failed: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    debug!("virtio-rng: malformed descriptor chain: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                debug!("virtio-rng: cannot return a buffer: {e}");
            }
            used_any = true;
        }
        if budget == 0 {
            // Possibly more waiting: a spurious wake-up costs nothing.
            let _ = self.core.q.events[0].write(1);
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn core(&self) -> &DeviceCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

impl Rng {
    fn signal(&self) {
        self.core.signal_used();
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_queues(ops, "virtio-rng");
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
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::Interrupt;
    use std::sync::Arc;
    use virtio_queue::desc::split::VirtqUsedElem;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::devices::virtio::test_utils::WRITE;

    fn activated(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> (Rng, EventFd) {
        let mut rng = Rng::new().unwrap();
        rng.core.q.queues[0] = mock.create_queue().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        rng.activate(
            mem.clone(),
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            VIRTIO_F_VERSION_1,
        )
        .unwrap();
        // Activation leaves queued requests to the event loop, as here.
        assert_eq!(rng.core.q.events[0].read().unwrap(), 1);
        if rng.process_queue() {
            rng.signal();
        }
        (rng, irq)
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(0x10_0000, 4096, WRITE, 0))];
        mock.add_desc_chains(&descs, 0).unwrap();
        let (mut rng, irq) = activated(&mem, &mock);
        assert!(irq.read().unwrap() >= 1, "the pending request was served");
        let used: VirtqUsedElem = mem.read_obj(mock.used_addr().unchecked_add(4)).unwrap();
        assert_eq!(used.len(), 4096);
        let mut out = vec![0u8; 4096];
        mem.read_slice(&mut out, GuestAddress(0x10_0000)).unwrap();
        assert!(out.iter().filter(|b| **b != 0).count() > 3000, "bytes look random");
        assert!(!rng.process_queue(), "nothing more to do");
    }

    #[test]
    fn oversized_and_read_only_buffers_are_safe() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // A device-readable buffer gets nothing; a huge one is capped.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 512, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1 << 20, WRITE, 0)),
        ];
        mock.add_desc_chains(&descs[..1], 0).unwrap();
        mock.add_desc_chains(&descs[1..], 1).unwrap();
        let (_rng, _irq) = activated(&mem, &mock);
        let u0: VirtqUsedElem = mem.read_obj(mock.used_addr().unchecked_add(4)).unwrap();
        let u1: VirtqUsedElem = mem.read_obj(mock.used_addr().unchecked_add(12)).unwrap();
        assert_eq!(u0.len(), 0);
        assert_eq!(u1.len() as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn buffer_outside_guest_memory_is_not_fatal() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0xffff_0000_0000,
            4096,
            WRITE,
            0,
        ))];
        mock.add_desc_chains(&descs, 0).unwrap();
        let (_rng, _irq) = activated(&mem, &mock);
        let used: VirtqUsedElem = mem.read_obj(mock.used_addr().unchecked_add(4)).unwrap();
        assert_eq!(used.len(), 0);
    }
}
