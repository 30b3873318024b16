//! What the VMM's seccomp filters cost: compiling the three programs once
//! per VMM, and the time each system call spends in a thread's filter.
//!
//! `cargo bench -p bulkhead-vmm --bench seccomp`
//!
//! The per-call figure times a zero-byte `write` to /dev/null on one thread,
//! a million times before and after that thread installs the vCPU
//! filter (a `write` is matched late in it, as most calls are).

use std::time::{Duration, Instant};

use bulkhead_vmm::seccomp::{self, Filters, SeccompPolicy, ThreadKind};

const CALLS: u32 = 1_000_000;

fn time_writes(fd: libc::c_int) -> Duration {
    let start = Instant::now();
    for _ in 0..CALLS {
        // SAFETY: a zero-byte write from a null buffer reads nothing.
        unsafe { libc::write(fd, std::ptr::null(), 0) };
    }
    start.elapsed()
}

fn main() {
    let rounds = 20;
    let start = Instant::now();
    let mut filters = None;
    for _ in 0..rounds {
        filters = Filters::compile(SeccompPolicy::Enforce).expect("filters compile");
    }
    println!(
        "seccomp: compiling the vmm, vcpu and api filters: {:.0} us",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    );
    for (kind, n) in seccomp::rule_counts().expect("rules") {
        println!("seccomp: {} thread: {n} rules", kind.name());
    }
    let filters = filters.expect("enforcing filters");
    let null = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let (without, with) = std::thread::spawn(move || {
        let without = time_writes(fd);
        seccomp::apply(Some(&filters), ThreadKind::Vcpu).expect("filter installs");
        (without, time_writes(fd))
    })
    .join()
    .expect("bench thread");
    let per_call = |d: Duration| d.as_secs_f64() * 1e9 / f64::from(CALLS);
    println!(
        "seccomp: write(2) {:.0} ns unfiltered, {:.0} ns under the vcpu filter (+{:.0} ns)",
        per_call(without),
        per_call(with),
        per_call(with) - per_call(without)
    );
}
