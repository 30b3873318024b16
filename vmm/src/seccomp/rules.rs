//! What each VMM thread may ask of the host kernel once the guest runs.
//! Set-up (opening KVM, mapping memory, creating devices and threads) is
//! done before any filter is installed, so none of it appears here.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{ioctls, SeccompError, ThreadKind};

/// System call number to the rules of which one must hold; no rules means
/// any arguments.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

struct Builder {
    rules: Rules,
    err: Option<SeccompError>,
}

/// Argument `index`, as a 64-bit value, compared with `op` against `value`.
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Compile)
}

impl Builder {
    fn new() -> Self {
        Builder {
            rules: Rules::new(),
            err: None,
        }
    }

    fn any(&mut self, calls: &[c_long]) -> &mut Self {
        for nr in calls {
            self.rules.insert(*nr, Vec::new());
        }
        self
    }

    /// `nr` when argument `index` is one of `values`.
    fn one_of(&mut self, nr: c_long, index: u8, values: &[u64]) -> &mut Self {
        for v in values {
            self.when(nr, vec![arg(index, SeccompCmpOp::Eq, *v)]);
        }
        self
    }

    /// `nr` when argument `index` has none of the bits of `mask`.
    fn without_bits(&mut self, nr: c_long, index: u8, mask: u64) -> &mut Self {
        self.when(nr, vec![arg(index, SeccompCmpOp::MaskedEq(mask), 0)])
    }

    fn when(&mut self, nr: c_long, conditions: Vec<Result<SeccompCondition, SeccompError>>) -> &mut Self {
        let rule = conditions
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .and_then(|c| SeccompRule::new(c).map_err(SeccompError::Compile));
        match rule {
            Ok(r) => self.rules.entry(nr).or_default().push(r),
            Err(e) => {
                self.err.get_or_insert(e);
            }
        }
        self
    }

    fn build(self) -> Result<Rules, SeccompError> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(self.rules),
        }
    }
}

/// What every thread needs: memory without execute permission (glibc
/// resizes large blocks with mremap), locks (a timed wait resumes through
/// restart_syscall after a stop), signals (the vCPU kick, abort, and std's
/// reset of its SIGSEGV/SIGBUS handler before a crash), logging, ending.
fn common(b: &mut Builder) {
    use libc::*;
    b.any(&[
        SYS_brk,
        SYS_clock_gettime,
        SYS_close,
        SYS_exit,
        SYS_exit_group,
        SYS_futex,
        SYS_getpid,
        SYS_getrandom,
        SYS_gettid,
        SYS_madvise,
        SYS_mremap,
        SYS_munmap,
        SYS_restart_syscall,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sched_yield,
        SYS_sigaltstack,
        SYS_write,
    ])
    .without_bits(SYS_mmap, 2, PROT_EXEC as u64)
    .without_bits(SYS_mprotect, 2, PROT_EXEC as u64)
    .one_of(
        SYS_fcntl,
        1,
        &[F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC].map(|c| c as u64),
    )
    .one_of(
        SYS_tgkill,
        2,
        &[crate::vcpu::control::kick_signal(), SIGABRT].map(|s| s as u64),
    )
    .one_of(SYS_rt_sigaction, 0, &[SIGSEGV, SIGBUS].map(|s| s as u64));
}

/// The main thread's event loop: the virtio devices' queues (disk files,
/// vsock's Unix sockets), the timeout, the termination signals.
fn vmm(b: &mut Builder) {
    use libc::*;
    b.any(&[
        SYS_accept4,
        SYS_connect,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_wait,
        SYS_fallocate,
        SYS_fdatasync,
        SYS_fsync,
        SYS_getsockopt,
        SYS_lseek,
        SYS_newfstatat,
        SYS_pread64,
        SYS_preadv,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_read,
        SYS_readv,
        SYS_recvfrom,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_shutdown,
        SYS_statx,
        SYS_timerfd_settime,
        SYS_unlink,
        SYS_writev,
    ])
    .one_of(SYS_socket, 0, &[AF_UNIX as u64])
    .one_of(SYS_ioctl, 1, ioctls::VMM);
}

/// A vCPU thread: KVM_RUN, and the devices its exits reach (the serial
/// console's file, eventfds).
fn vcpu(b: &mut Builder) {
    use libc::*;
    b.any(&[SYS_ftruncate, SYS_pread64, SYS_pwrite64, SYS_read])
        .one_of(SYS_ioctl, 1, ioctls::VCPU);
}

/// The control API: its socket, and what requests open: snapshot files,
/// replacement disk images; it sleeps a moment after a failed accept.
fn api(b: &mut Builder) {
    use libc::*;
    b.any(&[
        SYS_accept4,
        SYS_clock_nanosleep,
        SYS_fdatasync,
        SYS_fsync,
        SYS_ftruncate,
        SYS_lseek,
        SYS_mkdir,
        SYS_newfstatat,
        SYS_openat,
        SYS_poll,
        SYS_pwrite64,
        SYS_read,
        SYS_recvfrom,
        SYS_rename,
        SYS_sendto,
        SYS_statx,
        SYS_unlink,
    ])
    .one_of(SYS_ioctl, 1, ioctls::API)
    .when(
        SYS_setsockopt,
        vec![
            arg(1, SeccompCmpOp::Eq, SOL_SOCKET as u64),
            arg(2, SeccompCmpOp::Eq, SO_RCVTIMEO as u64),
        ],
    )
    .when(
        SYS_setsockopt,
        vec![
            arg(1, SeccompCmpOp::Eq, SOL_SOCKET as u64),
            arg(2, SeccompCmpOp::Eq, SO_SNDTIMEO as u64),
        ],
    );
}

pub fn for_thread(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut b = Builder::new();
    common(&mut b);
    match kind {
        ThreadKind::Vmm => vmm(&mut b),
        ThreadKind::Vcpu => vcpu(&mut b),
        ThreadKind::Api => api(&mut b),
    }
    b.build()
}

/// Rules counted as Firecracker counts its filters: one per system call
/// allowed with any arguments, one per argument rule.
pub fn count(rules: &Rules) -> usize {
    rules.values().map(|r| r.len().max(1)).sum()
}
