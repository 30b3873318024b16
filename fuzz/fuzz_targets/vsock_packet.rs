//! The vsock packet header parser, on arbitrary bytes from the guest.
#![no_main]

use bulkhead_vmm::devices::virtio::vsock::packet::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
});
