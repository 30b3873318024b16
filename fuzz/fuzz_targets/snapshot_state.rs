//! The snapshot state-file parser: bytes from a file on disk, which
//! `--restore` reads before trusting anything in it. Nothing in a state
//! file may panic the VMM; what parses must survive a round trip.
//!
//! The first byte picks the mode: odd wraps the rest in a valid header
//! (magic, version, length, CRC), so the fuzzer reaches the JSON payload
//! and its consistency checks instead of stopping at the checksum; even
//! feeds the bytes as they are, header included.
#![no_main]

use bulkhead_vmm::snapshot::{checksum, decode, encode, FORMAT_VERSION, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        let mut b = Vec::with_capacity(24 + rest.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        b.extend_from_slice(&checksum(rest).to_le_bytes());
        b.extend_from_slice(rest);
        b
    } else {
        rest.to_vec()
    };
    if let Ok(state) = decode(&bytes) {
        let again = encode(&state).expect("a parsed state serializes");
        assert_eq!(decode(&again).expect("what we wrote parses"), state);
    }
});
