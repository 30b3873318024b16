//! Pausing and resuming the vCPU threads, and their exit counters.
//!
//! To pause, the controller sets `paused`, stores 1 in each running
//! vCPU's `kvm_run.immediate_exit` and sends its thread the kick signal.
//! A thread blocked in `KVM_RUN` returns `EINTR` because of the signal; a
//! thread that was in user space (handling an exit, or about to enter)
//! gets `EINTR` from its next `KVM_RUN`, which `immediate_exit` makes
//! return at once (after completing any pending port or MMIO read, so the
//! parked vCPU has no half-done instruction). Either way the thread sees
//! `EINTR`, finds `paused` set and parks on the condition variable. The
//! controller waits until every vCPU is parked or stopped. Resuming clears
//! `paused`; each thread clears its `immediate_exit` before it runs again.
//!
//! Everything shared lives under one mutex. In particular the
//! `immediate_exit` pointer and the thread id are registered by the vCPU
//! thread itself and withdrawn, under the lock, before that thread drops
//! its `VcpuFd` (which unmaps `kvm_run`) and ends, so the controller never
//! writes to an unmapped `kvm_run` nor signals a thread that is gone.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use tracing::warn;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use crate::devices::bus::lock;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
    #[error("{waiting} of {total} vCPUs did not {what} within {within:?}")]
    Timeout {
        what: &'static str,
        waiting: usize,
        total: usize,
        within: Duration,
    },
    #[error("the VM must be paused first (PATCH /vm {{\"state\":\"Paused\"}})")]
    NotPaused,
    #[error("vCPU {0} is not parked (it stopped or has not started)")]
    NotParked(usize),
}

/// Work for a parked vCPU thread, which alone owns its `VcpuFd` (e.g.
/// reading its state for a snapshot). Results go back through whatever the
/// closure captures.
pub type VcpuTask = Box<dyn FnOnce(&VcpuFd) + Send>;

/// The signal that interrupts a vCPU thread's `KVM_RUN`. A real-time
/// signal, so never one of the termination signals of `signals.rs`, which
/// every thread blocks.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is what makes KVM_RUN return EINTR.
}

/// Installs the do-nothing kick handler, once per process. Without a
/// handler the signal's default action would end the process.
pub fn install_kick_handler() -> Result<(), ControlError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| ControlError::KickHandler(std::io::Error::from_raw_os_error(errno)))
}

/// One vCPU's exits by kind. Each vCPU has its own, on its own cache line,
/// so counting costs a relaxed add on a line no other thread writes.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ExitCounters {
    io: AtomicU64,
    mmio: AtomicU64,
    hlt: AtomicU64,
    other: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
pub enum ExitKind {
    Io,
    Mmio,
    Hlt,
    /// Anything else, interruptions by a signal included.
    Other,
}

impl ExitCounters {
    pub fn count(&self, kind: ExitKind) {
        let c = match kind {
            ExitKind::Io => &self.io,
            ExitKind::Mmio => &self.mmio,
            ExitKind::Hlt => &self.hlt,
            ExitKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub use bulkhead_vmm_api::control::ExitCounts;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The thread has not registered yet; it parks on arrival if paused.
    NotStarted,
    Running,
    Parked,
    /// The vCPU ended (guest reset, fatal exit); it counts as parked.
    Stopped,
}

/// What the controller needs to interrupt one vCPU thread.
struct Kick {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only dereferenced under the controller's mutex
// while the owning thread is registered, i.e. while its kvm_run is mapped
// (see the module comment); a pthread_t is an opaque id.
unsafe impl Send for Kick {}

impl Kick {
    fn set_immediate_exit(&self, value: u8) {
        // SAFETY: `immediate_exit` points into the registered vCPU's kvm_run
        // mapping, which stays mapped until the thread withdraws it under the
        // lock that the caller holds. Both Rust-side writers use atomic
        // stores, so they never race; KVM only reads the byte.
        unsafe { AtomicU8::from_ptr(self.immediate_exit) }.store(value, Ordering::SeqCst);
    }
}

struct Slot {
    phase: Phase,
    kick: Option<Kick>,
    task: Option<VcpuTask>,
}

struct Shared {
    paused: bool,
    slots: Vec<Slot>,
}

pub struct VcpuControl {
    shared: Mutex<Shared>,
    /// Signalled on every phase or `paused` change.
    changed: Condvar,
    counters: Vec<ExitCounters>,
}

impl VcpuControl {
    pub fn new(vcpus: u8) -> Self {
        let n = usize::from(vcpus);
        VcpuControl {
            shared: Mutex::new(Shared {
                paused: false,
                slots: (0..n)
                    .map(|_| Slot {
                        phase: Phase::NotStarted,
                        kick: None,
                        task: None,
                    })
                    .collect(),
            }),
            changed: Condvar::new(),
            counters: (0..n).map(|_| ExitCounters::default()).collect(),
        }
    }

    pub fn vcpu_count(&self) -> usize {
        self.counters.len()
    }

    /// The counters of vCPU `index`; a shared dummy past the end (no vCPU
    /// has such an index; it keeps the vCPU path free of panics).
    pub fn counters(&self, index: u8) -> &ExitCounters {
        static NONE: ExitCounters = ExitCounters {
            io: AtomicU64::new(0),
            mmio: AtomicU64::new(0),
            hlt: AtomicU64::new(0),
            other: AtomicU64::new(0),
        };
        self.counters.get(usize::from(index)).unwrap_or(&NONE)
    }

    pub fn exit_counts(&self) -> ExitCounts {
        let mut sum = ExitCounts::default();
        for c in &self.counters {
            sum.io += c.io.load(Ordering::Relaxed);
            sum.mmio += c.mmio.load(Ordering::Relaxed);
            sum.hlt += c.hlt.load(Ordering::Relaxed);
            sum.other += c.other.load(Ordering::Relaxed);
        }
        sum
    }

    /// Whether a pause is in force (requested and not undone).
    pub fn is_paused(&self) -> bool {
        lock(&self.shared).paused
    }

    /// Parks every vCPU; returns once each is parked or stopped. Pausing a
    /// paused VM returns at once. When a vCPU does not park `within`, the
    /// pause is undone and an error says how many were left.
    pub fn pause(&self, within: Duration) -> Result<(), ControlError> {
        let mut shared = lock(&self.shared);
        shared.paused = true;
        let sig = kick_signal();
        for slot in shared.slots.iter().filter(|s| s.phase == Phase::Running) {
            if let Some(kick) = &slot.kick {
                kick.set_immediate_exit(1);
                // SAFETY: the thread is registered, so it is alive: it
                // withdraws under the lock we hold before it ends.
                let r = unsafe { libc::pthread_kill(kick.thread, sig) };
                if r != 0 {
                    warn!("cannot kick a vCPU thread: {}", std::io::Error::from_raw_os_error(r));
                }
            }
        }
        let shared = self.wait_until(shared, within, |p| matches!(p, Phase::Parked | Phase::Stopped));
        match shared {
            Ok(_) => Ok(()),
            Err((mut shared, waiting)) => {
                shared.paused = false;
                self.changed.notify_all();
                Err(ControlError::Timeout {
                    what: "pause",
                    waiting,
                    total: shared.slots.len(),
                    within,
                })
            }
        }
    }

    /// Releases every parked vCPU; returns once none is parked. Resuming a
    /// running VM returns at once.
    pub fn resume(&self, within: Duration) -> Result<(), ControlError> {
        let mut shared = lock(&self.shared);
        shared.paused = false;
        self.changed.notify_all();
        match self.wait_until(shared, within, |p| p != Phase::Parked) {
            Ok(_) => Ok(()),
            Err((shared, waiting)) => Err(ControlError::Timeout {
                what: "resume",
                waiting,
                total: shared.slots.len(),
                within,
            }),
        }
    }

    /// Waits until every slot's phase satisfies `done`; on timeout, hands
    /// back the guard and how many slots were still waited for.
    fn wait_until<'a>(
        &'a self,
        mut shared: MutexGuard<'a, Shared>,
        within: Duration,
        done: impl Fn(Phase) -> bool,
    ) -> Result<MutexGuard<'a, Shared>, (MutexGuard<'a, Shared>, usize)> {
        let deadline = Instant::now() + within;
        loop {
            let waiting = shared.slots.iter().filter(|s| !done(s.phase)).count();
            if waiting == 0 {
                return Ok(shared);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((shared, waiting));
            }
            shared = match self.changed.wait_timeout(shared, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Called by vCPU thread `index` before its first `KVM_RUN`, with its
    /// kvm_run's `immediate_exit` byte, which must stay mapped until
    /// [`VcpuControl::leave`]. Parks first if the VM is paused.
    pub fn enter(&self, index: u8, immediate_exit: *mut u8, fd: Option<&VcpuFd>) {
        // A parent's signal mask survives exec; the kick must get through.
        if let Err(e) = unblock_signal(kick_signal()) {
            warn!(cpu = index, "cannot unblock the kick signal; pausing may time out: {e}");
        }
        let mut shared = lock(&self.shared);
        let Some(slot) = shared.slots.get_mut(usize::from(index)) else {
            return;
        };
        slot.kick = Some(Kick {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            immediate_exit,
        });
        slot.phase = Phase::Running;
        self.park_while_paused(shared, index, fd);
    }

    /// Called by vCPU thread `index` when `KVM_RUN` returned `EINTR`: parks
    /// while the VM is paused, then makes `KVM_RUN` run the guest again.
    /// `fd` runs the tasks given while parked (none in stand-in tests).
    pub fn interrupted(&self, index: u8, fd: Option<&VcpuFd>) {
        let shared = lock(&self.shared);
        self.park_while_paused(shared, index, fd);
    }

    fn park_while_paused<'a>(&'a self, mut shared: MutexGuard<'a, Shared>, index: u8, fd: Option<&VcpuFd>) {
        let i = usize::from(index);
        if shared.paused {
            if let Some(slot) = shared.slots.get_mut(i) {
                slot.phase = Phase::Parked;
            }
            self.changed.notify_all();
            while shared.paused {
                if let Some(task) = shared.slots.get_mut(i).and_then(|s| s.task.take()) {
                    // Unlocked while it runs: ioctls take their time, and the
                    // task may need nothing of ours. Without an fd the task
                    // is dropped, which its requester sees as no answer.
                    drop(shared);
                    if let Some(fd) = fd {
                        task(fd);
                    }
                    shared = lock(&self.shared);
                    continue;
                }
                shared = match self.changed.wait(shared) {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
        }
        if let Some(slot) = shared.slots.get_mut(i) {
            slot.phase = Phase::Running;
            // Also after a pause that was undone before this thread parked.
            if let Some(kick) = &slot.kick {
                kick.set_immediate_exit(0);
            }
        }
        self.changed.notify_all();
    }

    /// Hands `make(index)` to every vCPU thread to run while parked. The
    /// VM must be paused and every vCPU parked (a stopped one has no state
    /// left to read). Returns once the tasks are handed out; they report
    /// through what they capture.
    pub fn run_on_parked(&self, mut make: impl FnMut(u8) -> VcpuTask) -> Result<(), ControlError> {
        let mut shared = lock(&self.shared);
        if !shared.paused {
            return Err(ControlError::NotPaused);
        }
        if let Some(i) = shared.slots.iter().position(|s| s.phase != Phase::Parked) {
            return Err(ControlError::NotParked(i));
        }
        for (i, slot) in shared.slots.iter_mut().enumerate() {
            slot.task = Some(make(i as u8));
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Called by vCPU thread `index` when it stops for good, before its
    /// `VcpuFd` is dropped: from here on it counts as parked and is never
    /// kicked again.
    pub fn leave(&self, index: u8) {
        let mut shared = lock(&self.shared);
        if let Some(slot) = shared.slots.get_mut(usize::from(index)) {
            slot.phase = Phase::Stopped;
            slot.kick = None;
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A stand-in vCPU thread: "KVM_RUN" is a sleep that a kick or a set
    /// immediate_exit cuts short, as the kernel would.
    fn fake_vcpu(ctl: Arc<VcpuControl>, index: u8, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            // Stands for the kvm_run mapping: freed only after `leave`.
            let run: *mut u8 = Box::into_raw(Box::new(0u8));
            ctl.enter(index, run, None);
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: `run` stays allocated until after `leave`.
                if unsafe { AtomicU8::from_ptr(run) }.load(Ordering::SeqCst) == 1 {
                    ctl.interrupted(index, None);
                    continue;
                }
                // SAFETY: usleep has no preconditions; a kick cuts it short.
                unsafe { libc::usleep(1000) };
            }
            ctl.leave(index);
            // SAFETY: allocated above by Box::into_raw and no longer registered.
            drop(unsafe { Box::from_raw(run) });
        })
    }

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(VcpuControl::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..3).map(|i| fake_vcpu(ctl.clone(), i, stop.clone())).collect();
        for _ in 0..3 {
            ctl.pause(Duration::from_secs(10)).unwrap();
            assert!(ctl.is_paused());
            {
                let s = lock(&ctl.shared);
                assert!(s.slots.iter().all(|s| s.phase == Phase::Parked), "all parked");
            }
            ctl.pause(Duration::from_secs(10)).unwrap();
            ctl.resume(Duration::from_secs(10)).unwrap();
            assert!(!ctl.is_paused());
            let s = lock(&ctl.shared);
            assert!(s.slots.iter().all(|s| s.phase == Phase::Running));
        }
        ctl.resume(Duration::from_secs(10)).unwrap();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn stopped_and_late_vcpus_count_as_parked() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(VcpuControl::new(2));
        ctl.leave(0);
        // vCPU 1 has not started: the pause waits for it, and it parks on arrival.
        let late = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut run = 0u8;
                ctl.enter(1, &mut run as *mut u8, None);
                ctl.leave(1);
            })
        };
        ctl.pause(Duration::from_secs(10)).unwrap();
        ctl.resume(Duration::from_secs(10)).unwrap();
        late.join().unwrap();
    }

    #[test]
    fn a_vcpu_that_never_parks_undoes_the_pause() {
        let ctl = VcpuControl::new(1);
        let err = ctl.pause(Duration::from_millis(20)).unwrap_err().to_string();
        assert!(err.contains("1 of 1 vCPUs did not pause"), "{err}");
        assert!(!ctl.is_paused());
    }

    #[test]
    fn counts_are_summed_over_vcpus() {
        let ctl = VcpuControl::new(2);
        ctl.counters(0).count(ExitKind::Io);
        ctl.counters(1).count(ExitKind::Io);
        ctl.counters(1).count(ExitKind::Hlt);
        ctl.counters(9).count(ExitKind::Mmio);
        assert_eq!(
            ctl.exit_counts(),
            ExitCounts {
                io: 2,
                mmio: 0,
                hlt: 1,
                other: 0
            }
        );
    }

    #[test]
    fn kick_signal_is_not_a_termination_signal() {
        assert!(!crate::signals::HANDLED.contains(&kick_signal()));
    }
}
