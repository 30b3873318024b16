//! Per-thread seccomp filters: once the guest can run, each VMM thread may
//! make only the system calls its job needs (see `rules.rs`). Anything
//! else traps; the handler (`violation.rs`) names the call on stderr, the
//! VMM's log, and the process dies of SIGSYS.

mod ioctls;
pub mod rules;
mod violation;

use std::cell::Cell;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp filters: {0}")]
    Compile(seccompiler::BackendError),
    #[error("compiling the seccomp filters: {0}")]
    Arch(seccompiler::BackendError),
    #[error("installing the {0} thread's seccomp filter: {1}")]
    Install(&'static str, seccompiler::Error),
    #[error("installing the seccomp violation handler: {0}")]
    Handler(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread's event loop (the virtio devices).
    Vmm,
    Vcpu,
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
        }
    }
}

/// Whether the VMM filters its threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompPolicy {
    /// The default: a call outside a thread's list ends the VMM.
    Enforce,
    /// `--no-seccomp`, for debugging only.
    Off,
    /// Debug builds only: calls outside the lists are allowed and logged by
    /// the kernel (audit, type 1326), to find what a change needs.
    #[cfg(debug_assertions)]
    LogOnly,
}

impl SeccompPolicy {
    /// Debug builds honour `BULKHEAD_VMM_SECCOMP=log`.
    pub fn from_flag(no_seccomp: bool) -> SeccompPolicy {
        if no_seccomp {
            return SeccompPolicy::Off;
        }
        #[cfg(debug_assertions)]
        if std::env::var("BULKHEAD_VMM_SECCOMP").as_deref() == Ok("log") {
            return SeccompPolicy::LogOnly;
        }
        SeccompPolicy::Enforce
    }
}

/// The compiled filter of each thread kind.
pub struct Filters {
    programs: [BpfProgram; 3],
}

thread_local! {
    /// Which filter this thread runs under, for the violation message.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

impl Filters {
    /// `None` when the policy is off. Installs the violation handler when
    /// violations are to end the VMM.
    pub fn compile(policy: SeccompPolicy) -> Result<Option<Arc<Filters>>, SeccompError> {
        let mismatch = match policy {
            SeccompPolicy::Off => {
                tracing::warn!(
                    "SECCOMP IS OFF (--no-seccomp): a device-model bug the guest exploits can make any \
                     system call on this host; use this for debugging only"
                );
                return Ok(None);
            }
            SeccompPolicy::Enforce => {
                violation::install_handler().map_err(SeccompError::Handler)?;
                SeccompAction::Trap
            }
            #[cfg(debug_assertions)]
            SeccompPolicy::LogOnly => SeccompAction::Log,
        };
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SeccompError::Arch)?;
        let compile = |kind| -> Result<BpfProgram, SeccompError> {
            let filter = SeccompFilter::new(rules::for_thread(kind)?, mismatch.clone(), SeccompAction::Allow, arch)
                .map_err(SeccompError::Compile)?;
            BpfProgram::try_from(filter).map_err(SeccompError::Compile)
        };
        Ok(Some(Arc::new(Filters {
            programs: [
                compile(ThreadKind::Vmm)?,
                compile(ThreadKind::Vcpu)?,
                compile(ThreadKind::Api)?,
            ],
        })))
    }

    fn program(&self, kind: ThreadKind) -> &BpfProgram {
        &self.programs[kind as usize]
    }
}

/// Puts the calling thread under `kind`'s filter (nothing when filters are
/// off). Seccomp filters are per thread, so each thread calls this itself,
/// before it touches guest state.
pub fn apply(filters: Option<&Filters>, kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = filters else {
        return Ok(());
    };
    #[cfg(debug_assertions)]
    let forbidden = test_hook::wanted(kind);
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(filters.program(kind)).map_err(|e| SeccompError::Install(kind.name(), e))?;
    #[cfg(debug_assertions)]
    if forbidden {
        test_hook::make_forbidden_call();
    }
    Ok(())
}

/// Debug builds only: `BULKHEAD_VMM_TEST_FORBIDDEN_SYSCALL=vmm|vcpu|api`
/// makes that thread call sysinfo(2), which no filter allows, right after
/// its filter is installed: the tests' way to see a violation end the VMM.
#[cfg(debug_assertions)]
pub mod test_hook {
    use super::ThreadKind;

    pub const ENV: &str = "BULKHEAD_VMM_TEST_FORBIDDEN_SYSCALL";
    /// The call made, for tests to look for in the message.
    pub const SYSCALL: libc::c_long = libc::SYS_sysinfo;

    pub(super) fn wanted(kind: ThreadKind) -> bool {
        std::env::var(ENV).as_deref() == Ok(kind.name())
    }

    pub(super) fn make_forbidden_call() {
        let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
        // SAFETY: sysinfo writes at most one struct sysinfo to the buffer.
        unsafe { libc::syscall(SYSCALL, info.as_mut_ptr()) };
    }
}

/// Each thread kind's rule count, as the README publishes them.
pub fn rule_counts() -> Result<Vec<(ThreadKind, usize)>, SeccompError> {
    ThreadKind::ALL
        .into_iter()
        .map(|k| Ok((k, rules::count(&rules::for_thread(k)?))))
        .collect()
}

#[cfg(test)]
mod tests;
