//! The shim's seccomp compiler: an OCI spec's `linux.seccomp` object, as
//! a hostile bundle may carry it. Nothing in it may panic the shim, and a
//! program that compiles fits the kernel's limit with every jump in range
//! (the assembler checks ranges; this checks they land inside).
#![no_main]

use bulkhead_seccomp::bpf::{JA, RET_K};
use bulkhead_seccomp::profile::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(profile) = serde_json::from_slice::<Profile>(data) else { return };
    let Ok(program) = bulkhead_seccomp::compile(&profile) else { return };
    let f = &program.filter;
    assert!(!f.is_empty() && f.len() <= bulkhead_seccomp::MAX_INSNS);
    assert_eq!(f.last().map(|i| i.code), Some(RET_K), "a program must end in a return");
    for (pc, i) in f.iter().enumerate() {
        let reach = |off: usize| pc + 1 + off < f.len();
        match i.code {
            RET_K => {}
            JA => assert!(reach(i.k as usize)),
            _ => assert!(reach(usize::from(i.jt)) && reach(usize::from(i.jf))),
        }
    }
});
