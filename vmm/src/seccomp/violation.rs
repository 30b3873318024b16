//! What happens when a thread makes a call its filter refuses: the SIGSYS
//! handler writes which call, on which thread, to stderr (the VMM's log,
//! where the runtime reads it), then makes the same call again. SIGSYS is
//! blocked inside its own handler, so the kernel's second trap resets the
//! action to the default and the process dies of SIGSYS, the exit the
//! runtime reports as a seccomp violation.

use std::io;

use super::{ThreadKind, KIND};

/// The `_sigsys` member of the kernel's siginfo on 64-bit Linux; the libc
/// crate does not expose it.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

pub(super) fn install_handler() -> Result<(), io::Error> {
    // SAFETY: a zeroed sigaction is a valid starting value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_violation;
    act.sa_sigaction = handler as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is initialised; the handler only makes
    // async-signal-safe calls (write, syscall, _exit).
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// "bulkhead-vmm: seccomp violation: system call N (0xA, 0xB, 0xC) on the
/// K thread\n", with the call's first three arguments (an ioctl's
/// request, say), built without allocating.
fn message(nr: i64, args: &[libc::c_long], kind: Option<ThreadKind>, out: &mut [u8; 192]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"bulkhead-vmm: seccomp violation: system call ");
    let mut digits = [0u8; 20];
    if nr < 0 {
        put(b"-");
    }
    put(render(nr.unsigned_abs(), 10, &mut digits));
    for (i, a) in args.iter().enumerate() {
        put(if i == 0 { b" (0x" } else { b", 0x" });
        put(render(*a as u64, 16, &mut digits));
    }
    if !args.is_empty() {
        put(b")");
    }
    put(b" on the ");
    put(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    put(b" thread\n");
    len
}

fn render(mut v: u64, base: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(v % base) as usize];
        v /= base;
        if v == 0 {
            return &digits[at..];
        }
    }
}

extern "C" fn on_violation(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a siginfo whose union is
    // `_sigsys` when si_code is SYS_SECCOMP (1), checked before use.
    let sys = unsafe { &*info.cast::<SigsysInfo>() };
    if sys.code != 1 {
        return;
    }
    let nr = i64::from(sys.syscall);
    let args = call_args(context);
    let mut buf = [0u8; 192];
    let len = message(nr, &args[..3], KIND.with(|k| k.get()), &mut buf);
    // SAFETY: write(2) from a buffer we own; async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    // SAFETY: the very call that trapped, with its own arguments: it traps
    // again, and with SIGSYS blocked here the kernel ends the process.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    // SAFETY: _exit is async-signal-safe; reached only if it did not trap.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// The trapped call's arguments, from the registers the kernel saved.
#[cfg(target_arch = "x86_64")]
fn call_args(context: *mut libc::c_void) -> [libc::c_long; 6] {
    // SAFETY: for an SA_SIGINFO handler the third argument is the
    // interrupted thread's ucontext.
    let regs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    [
        libc::REG_RDI,
        libc::REG_RSI,
        libc::REG_RDX,
        libc::REG_R10,
        libc::REG_R8,
        libc::REG_R9,
    ]
    .map(|r| regs[r as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_call_and_the_thread() {
        let mut buf = [0u8; 192];
        let n = message(16, &[5, 0xc008_ae88, -1], Some(ThreadKind::Vcpu), &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "bulkhead-vmm: seccomp violation: system call 16 (0x5, 0xc008ae88, 0xffffffffffffffff) on the vcpu thread\n"
        );
        let n = message(0, &[], None, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "bulkhead-vmm: seccomp violation: system call 0 on the unfiltered thread\n"
        );
    }
}
