//! vCPU set-up and the per-vCPU run loop (one thread each).

pub mod control;
pub mod exit_info;
pub mod state;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::cpu_template::CpuTemplate;
use crate::arch::regs::{self, EntryMode, RegsError};
use crate::arch::{cpuid, interrupts, msr};
use crate::devices::bus::Bus;
use crate::seccomp::{self, Filters, ThreadKind};
use control::{ExitCounters, ExitKind, VcpuControl};
use exit_info::{GuestLocation, VcpuStop};

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
const MAX_INSN_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("cannot set {what} on vCPU {cpu}: {source}")]
    Ioctl {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up the boot CPU state: {0}")]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    #[error("vCPU {cpu}'s saved state: {why}")]
    BadState { cpu: u8, why: String },
    #[error("cannot start the vCPU {0} thread: {1}")]
    Spawn(u8, std::io::Error),
}

/// What a vCPU thread does before it first enters the guest: install its
/// seccomp filter, then wait at the gate until every thread has one.
pub struct VcpuStart {
    pub filters: Option<Arc<Filters>>,
    pub gate: Arc<Barrier>,
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    memory: GuestMemoryMmap,
}

/// A run-loop step that ends the vCPU, before its details are read.
enum Ending {
    Stop(VcpuStop),
    TripleFault,
    InternalError,
}

impl Vcpu {
    pub fn new(
        vm: &VmFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            pio,
            mmio,
            memory,
        })
    }

    fn ioctl<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Ioctl {
            cpu: self.index,
            what,
            source,
        })
    }

    /// CPUID, MSRs and LAPIC for every vCPU; registers for the boot vCPU.
    /// Secondary vCPUs wait for INIT/SIPI from the guest.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        template: CpuTemplate,
        cpu_count: u8,
        boot: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter(cpuid.as_mut_slice(), template, self.index, cpu_count);
        for e in cpuid.as_slice().iter().filter(|e| matches!(e.function, 1 | 7)) {
            debug!(
                cpu = self.index,
                "CPUID {:#x}.{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x} flags={:#x}",
                e.function,
                e.index,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx,
                e.flags
            );
        }
        self.ioctl("CPUID", self.fd.set_cpuid2(&cpuid))?;

        let msrs = msr::boot_msrs()?;
        let written = self.ioctl("MSRs", self.fd.set_msrs(&msrs))?;
        if written != msrs.as_slice().len() {
            // KVM stops at the first MSR it refuses; name it so it can be dropped.
            let refused = msrs.as_slice().get(written).map(|e| e.index).unwrap_or_default();
            warn!(
                cpu = self.index,
                "KVM accepted {written} of {} boot MSRs (refused {refused:#x})",
                msrs.as_slice().len()
            );
        }

        let mut lapic = self.ioctl("LAPIC (get)", self.fd.get_lapic())?;
        interrupts::set_lint(&mut lapic);
        self.ioctl("LAPIC", self.fd.set_lapic(&lapic))?;

        if let Some(boot) = boot {
            self.ioctl("registers", self.fd.set_regs(&regs::boot_regs(boot.mode, boot.entry)))?;
            let mut sregs = self.ioctl("special registers (get)", self.fd.get_sregs())?;
            regs::setup_sregs(&self.memory, boot.mode, &mut sregs)?;
            self.ioctl("special registers", self.fd.set_sregs(&sregs))?;
            self.ioctl("FPU", self.fd.set_fpu(&regs::boot_fpu()))?;
        }
        Ok(())
    }

    /// Runs the vCPU on its own thread until it stops for good; the reason
    /// goes to `stops` and `stop_evt` wakes the main loop. `control` pauses
    /// and resumes it and holds its exit counters.
    pub fn spawn(
        mut self,
        control: Arc<VcpuControl>,
        stops: Sender<VcpuStop>,
        stop_evt: EventFd,
        start: VcpuStart,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let sealed = seccomp::apply(start.filters.as_deref(), ThreadKind::Vcpu);
                start.gate.wait();
                let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
                control.enter(index, immediate_exit, Some(&self.fd));
                let stop = match sealed {
                    Err(e) => VcpuStop::RunFailed {
                        cpu: index,
                        error: e.to_string(),
                    },
                    // Test and debug builds unwind; the main loop must still hear.
                    Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop(&control)))
                        .unwrap_or_else(|_| VcpuStop::RunFailed {
                            cpu: index,
                            error: "the vCPU thread panicked".into(),
                        }),
                };
                // Withdraw the kvm_run pointer before the VcpuFd unmaps it.
                control.leave(index);
                drop(self);
                debug!(cpu = index, "vCPU stopped: {stop}");
                // The main loop may already be gone; nothing is left to tell.
                let _ = stops.send(stop);
                let _ = stop_evt.write(1);
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run_loop(&mut self, control: &VcpuControl) -> VcpuStop {
        let cpu = self.index;
        let counters: &ExitCounters = control.counters(cpu);
        loop {
            let result = self.fd.run();
            counters.count(match &result {
                Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => ExitKind::Io,
                Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => ExitKind::Mmio,
                Ok(VcpuExit::Hlt) => ExitKind::Hlt,
                _ => ExitKind::Other,
            });
            let ending = match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    continue;
                }
                Ok(VcpuExit::Hlt) => Ending::Stop(VcpuStop::Halted { cpu }),
                Ok(VcpuExit::Shutdown) => Ending::TripleFault,
                Ok(VcpuExit::InternalError) => Ending::InternalError,
                Ok(VcpuExit::FailEntry(reason, _)) => Ending::Stop(VcpuStop::FailEntry { cpu, reason }),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Ending::Stop(VcpuStop::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Ending::Stop(VcpuStop::GuestCrash { cpu }),
                    other => {
                        debug!(cpu, "ignoring system event {other}");
                        continue;
                    }
                },
                Ok(other) => {
                    debug!(cpu, "ignoring exit {other:?}");
                    continue;
                }
                // A kick (or immediate_exit) for a pause: park here, where
                // no exit is half handled.
                Err(e) if e.errno() == libc::EINTR => {
                    control.interrupted(cpu, Some(&self.fd));
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => Ending::Stop(VcpuStop::RunFailed {
                    cpu,
                    error: e.to_string(),
                }),
            };
            return match ending {
                Ending::Stop(s) => s,
                Ending::TripleFault => VcpuStop::TripleFault {
                    cpu,
                    at: self.location(None),
                },
                Ending::InternalError => {
                    let (suberror, reported) = self.internal_error_details();
                    VcpuStop::InternalError {
                        cpu,
                        suberror,
                        at: self.location(reported),
                    }
                }
            };
        }
    }

    /// The suberror and, for emulation failures, the instruction bytes KVM reports.
    fn internal_error_details(&mut self) -> (u32, Option<Vec<u8>>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member of the exit union; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let mut bytes = None;
        // Emulation failures lay out: flags, then insn_size and 15 insn bytes.
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && data.len() >= 3
            && data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
        {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&data[1].to_le_bytes());
            raw[8..].copy_from_slice(&data[2].to_le_bytes());
            let len = usize::from(raw[0]).min(MAX_INSN_LEN);
            if len > 0 {
                bytes = Some(raw[1..=len].to_vec());
            }
        }
        (internal.suberror, bytes)
    }

    /// Registers and the bytes at RIP (read through the guest's page tables
    /// when KVM did not report them).
    fn location(&self, reported_bytes: Option<Vec<u8>>) -> GuestLocation {
        let mut at = GuestLocation::default();
        if let Ok(r) = self.fd.get_regs() {
            at.rip = r.rip;
        }
        if let Ok(s) = self.fd.get_sregs() {
            at.cs = s.cs.selector;
            at.cr0 = s.cr0;
            at.cr3 = s.cr3;
            at.cr4 = s.cr4;
            at.efer = s.efer;
        }
        at.bytes = reported_bytes.unwrap_or_else(|| self.bytes_at(at.rip));
        at
    }

    fn bytes_at(&self, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; MAX_INSN_LEN];
        match self.memory.read(&mut buf, GuestAddress(t.physical_address)) {
            Ok(n) => buf[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    }
}
