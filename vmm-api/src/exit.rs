//! `bulkhead-vmm`'s exit statuses and what they mean.

use std::os::unix::process::ExitStatusExt;

/// How the VMM ended, as its exit status says. A termination signal that
/// reached it ends it with 128 + the signal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VmmExit {
    /// The guest rebooted (with `reboot=k` through the i8042) or shut down.
    Stopped = 0,
    /// A VMM error (the message is on stderr).
    Error = 1,
    /// The configuration was refused, or the snapshot is unusable.
    BadConfig = 2,
    /// A KVM internal error, such as an instruction KVM's emulator cannot run.
    KvmInternal = 3,
    /// The guest triple-faulted.
    TripleFault = 4,
    /// `--timeout` expired.
    Timeout = 5,
}

impl VmmExit {
    pub const ALL: [VmmExit; 6] = [
        VmmExit::Stopped,
        VmmExit::Error,
        VmmExit::BadConfig,
        VmmExit::KvmInternal,
        VmmExit::TripleFault,
        VmmExit::Timeout,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i32) -> Option<VmmExit> {
        Self::ALL.into_iter().find(|e| i32::from(e.code()) == code)
    }

    pub fn describe(self) -> &'static str {
        match self {
            VmmExit::Stopped => "the guest shut down",
            VmmExit::Error => "VMM error",
            VmmExit::BadConfig => "the VMM refused its configuration",
            VmmExit::KvmInternal => "KVM internal error, e.g. an instruction the emulator cannot run",
            VmmExit::TripleFault => "the guest triple-faulted",
            VmmExit::Timeout => "the VMM's timeout expired",
        }
    }
}

/// The signal a seccomp violation ends the VMM with (31 on x86-64 and
/// arm64 Linux, the VMM's targets; this crate has no libc).
pub const SIGSYS: i32 = 31;

/// A VMM process's exit status in words.
pub fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => match VmmExit::from_code(c) {
            Some(e) => format!("{} (exit status {c})", e.describe()),
            None if c > 128 => format!("stopped by signal {} (exit status {c})", c - 128),
            None => format!("exit status {c}"),
        },
        (None, Some(SIGSYS)) => {
            "seccomp violation: a VMM thread made a system call its filter refuses (killed by SIGSYS)".into()
        }
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown exit".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_words() {
        for e in VmmExit::ALL {
            assert_eq!(VmmExit::from_code(i32::from(e.code())), Some(e));
        }
        let st = |raw: i32| std::process::ExitStatus::from_raw(raw);
        assert!(describe(st(SIGSYS)).starts_with("seccomp violation"));
        assert_eq!(
            describe(st(3 << 8)),
            "KVM internal error, e.g. an instruction the emulator cannot run (exit status 3)"
        );
        assert_eq!(describe(st(0)), "the guest shut down (exit status 0)");
        assert_eq!(describe(st(143 << 8)), "stopped by signal 15 (exit status 143)");
        assert_eq!(describe(st(9)), "killed by signal 9");
    }
}
