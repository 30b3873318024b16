//! Vector registers that the guest kernel does not switch between tasks.
//!
//! On PVM hosts the guest kernel runs in KVM's instruction emulator, which
//! cannot execute XRSTOR, so it boots with `noxsave` and switches user FPU
//! state with FXSAVE: x87 and the low 128 bits of XMM0-15. Guest user
//! space runs natively, though, and where the host CPU has no CPUID
//! faulting it sees the host's CPUID and XCR0 (AVX, AVX-512). glibc then
//! copies memory through YMM/ZMM registers whose upper parts another task
//! overwrites at a context switch: measured on an AMD EPYC PVM host, two
//! guest processes read each other's YMM upper halves, and busybox died at
//! its first TLS access because its TLS image had been copied wrong.
//!
//! The guest cannot give user space a smaller XCR0 (PVM keeps the host's
//! while guest user code runs), so glibc is told not to use those
//! registers (`GLIBC_TUNABLES`): the VMM puts the tunable on the kernel
//! command line, which the kernel hands to init (this agent, or whatever
//! init a user boots) as its environment; the agent re-execs itself with it
//! when a VMM did not, and adds it to every process it starts. Other code that uses AVX by itself stays exposed to the other
//! processes of its own sandbox; separate VMs do not share these registers.

use std::ffi::OsString;

/// The glibc CPU features whose code paths use YMM, ZMM or opmask state.
pub const TUNABLE: &str = bulkhead_protocol::guest_env::PVM_GLIBC_TUNABLE;
const VAR: &str = "GLIBC_TUNABLES";
const ARCH_GET_XCOMP_SUPP: libc::c_int = 0x1021;
/// XCR0 bits beyond x87 and SSE: AVX, MPX, AVX-512 and the rest.
const BEYOND_SSE: u64 = !0b11;

/// XCR0 components user space may use that the kernel does not save and
/// restore at a context switch; 0 where the two agree.
pub fn unswitched_components() -> u64 {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        return 0; // No OSXSAVE: XGETBV would fault, and AVX is unusable.
    }
    let xcr0 = xgetbv0();
    let mut supported: u64 = 0;
    // SAFETY: arch_prctl writes one u64 through the pointer.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, &mut supported as *mut u64) };
    if r != 0 {
        // A kernel without the call predates it (5.16); it has no say.
        return 0;
    }
    xcr0 & !supported & BEYOND_SSE
}

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; the caller checked OSXSAVE,
    // without which it raises #UD.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `env` with [`TUNABLE`] added to its `GLIBC_TUNABLES` (kept first: glibc
/// takes the last setting of a tunable, so the workload's own still wins).
pub fn add_tunable(env: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(env.len() + 1);
    let mut found = false;
    for e in env {
        match e.strip_prefix("GLIBC_TUNABLES=") {
            Some(theirs) if !found => {
                found = true;
                out.push(if theirs.is_empty() {
                    format!("{VAR}={TUNABLE}")
                } else {
                    format!("{VAR}={TUNABLE}:{theirs}")
                });
            }
            _ => out.push(e.clone()),
        }
    }
    if !found {
        out.push(format!("{VAR}={TUNABLE}"));
    }
    out
}

/// For the agent itself, first thing in `main`: when the hazard exists and
/// glibc was not told yet, run this program again with the tunable (glibc
/// picks its memcpy at start-up). Returns only if no exec was needed or it
/// failed.
pub fn reexec_if_needed() {
    if std::env::var_os(VAR).is_some_and(|v| v.to_string_lossy().contains(TUNABLE)) {
        return;
    }
    let unswitched = unswitched_components();
    if unswitched == 0 {
        return;
    }
    let mut args = std::env::args_os();
    let Some(program) = args.next().filter(|p| p.to_string_lossy().starts_with('/')) else {
        eprintln!("bulkhead-agent: XCR0 components {unswitched:#x} are not switched by this kernel; cannot re-exec");
        return;
    };
    let mut value = OsString::from(TUNABLE);
    if let Some(old) = std::env::var_os(VAR) {
        value.push(":");
        value.push(old);
    }
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(&program).args(args).env(VAR, value).exec();
    eprintln!(
        "bulkhead-agent: cannot re-exec {} with {VAR}: {e}",
        program.to_string_lossy()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunable_is_added_or_prepended() {
        let env = vec!["PATH=/bin".to_string()];
        assert_eq!(
            add_tunable(&env),
            vec!["PATH=/bin".to_string(), format!("GLIBC_TUNABLES={TUNABLE}")]
        );
        let env = vec!["GLIBC_TUNABLES=glibc.malloc.check=3".to_string(), "A=1".into()];
        assert_eq!(
            add_tunable(&env),
            vec![
                format!("GLIBC_TUNABLES={TUNABLE}:glibc.malloc.check=3"),
                "A=1".to_string()
            ]
        );
    }

    #[test]
    fn this_host_kernel_switches_what_user_space_sees() {
        // A normal kernel (XSAVE in use) switches every XCR0 component.
        assert_eq!(unswitched_components(), 0);
    }
}
