//! A vCPU's state for snapshots: read from a parked vCPU, written back to a
//! fresh one before it first runs.

use kvm_bindings::{kvm_cpuid_entry2, kvm_mp_state, kvm_msr_entry, CpuId, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use tracing::{debug, warn};

use super::{Vcpu, VcpuError};
use kvm_bindings::kvm_fpu;
use serde::{Deserialize, Serialize};

use crate::kvm_bytes::Hex;

/// One MSR's index and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// `kvm_fpu`, field by field: kvm-bindings gives it no byte view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpuSaved {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuSaved {
    fn from(f: &kvm_fpu) -> Self {
        FpuSaved {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuSaved> for kvm_fpu {
    fn from(f: &FpuSaved) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// A vCPU as KVM holds it. Every `Hex` is the raw bytes of the KVM
/// structure its name says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub id: u8,
    /// `kvm_cpuid_entry2` each, as the VMM set them at boot.
    pub cpuid: Vec<Hex>,
    pub regs: Hex,
    pub sregs: Hex,
    pub fpu: FpuSaved,
    /// `kvm_xsave` where KVM has KVM_CAP_XSAVE (it covers what `fpu` holds).
    pub xsave: Option<Hex>,
    /// `kvm_xcrs` where KVM has KVM_CAP_XCRS.
    pub xcrs: Option<Hex>,
    pub msrs: Vec<MsrValue>,
    pub lapic: Hex,
    pub debug_regs: Hex,
    pub vcpu_events: Hex,
    pub mp_state: Hex,
}

/// What this KVM can save, found once per snapshot.
#[derive(Clone, Debug)]
pub struct SaveCaps {
    /// Every MSR KVM lists (KVM_GET_MSR_INDEX_LIST); those that do not
    /// read back on a vCPU are left out of its state.
    pub msr_indices: Vec<u32>,
    pub xsave: bool,
    pub xcrs: bool,
}

impl SaveCaps {
    pub fn query(kvm: &Kvm) -> Result<SaveCaps, VcpuError> {
        let list = kvm.get_msr_index_list().map_err(|source| VcpuError::Ioctl {
            cpu: 0,
            what: "the MSR index list (KVM_GET_MSR_INDEX_LIST)",
            source,
        })?;
        Ok(SaveCaps {
            msr_indices: list.as_slice().to_vec(),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
        })
    }
}

fn ioctl(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { cpu, what, source }
}

fn bad(cpu: u8) -> impl Fn(String) -> VcpuError {
    move |why| VcpuError::BadState { cpu, why }
}

fn msr_batch(indices: &[u32], data: Option<&[u64]>) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .enumerate()
        .map(|(i, index)| kvm_msr_entry {
            index: *index,
            data: data.and_then(|d| d.get(i).copied()).unwrap_or(0),
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| VcpuError::Msr(crate::arch::msr::MsrError::Alloc(e)))
}

/// Reads the MSRs in `indices`; KVM stops at the first one it cannot read,
/// which is left out (logged) and the rest read on.
fn read_msrs(fd: &VcpuFd, cpu: u8, indices: &[u32]) -> Result<Vec<MsrValue>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msr_batch(batch, None)?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl(cpu, "MSRs (get)"))?;
        out.extend(msrs.as_slice()[..n.min(batch.len())].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        if n < batch.len() {
            debug!(
                cpu,
                "MSR {:#x} is listed by KVM but does not read back; not saved", batch[n]
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(out)
}

/// Everything KVM holds for one vCPU. The vCPU must not be running.
pub fn save(fd: &VcpuFd, cpu: u8, caps: &SaveCaps) -> Result<VcpuState, VcpuError> {
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl(cpu, "CPUID (get)"))?;
    let xsave = if caps.xsave {
        Some(Hex::of(&fd.get_xsave().map_err(ioctl(cpu, "XSAVE (get)"))?))
    } else {
        None
    };
    let xcrs = if caps.xcrs {
        Some(Hex::of(&fd.get_xcrs().map_err(ioctl(cpu, "XCRS (get)"))?))
    } else {
        None
    };
    Ok(VcpuState {
        id: cpu,
        cpuid: cpuid.as_slice().iter().map(Hex::of).collect(),
        regs: Hex::of(&fd.get_regs().map_err(ioctl(cpu, "registers (get)"))?),
        sregs: Hex::of(&fd.get_sregs().map_err(ioctl(cpu, "special registers (get)"))?),
        fpu: FpuSaved::from(&fd.get_fpu().map_err(ioctl(cpu, "FPU (get)"))?),
        xsave,
        xcrs,
        msrs: read_msrs(fd, cpu, &caps.msr_indices)?,
        lapic: Hex::of(&fd.get_lapic().map_err(ioctl(cpu, "LAPIC (get)"))?),
        debug_regs: Hex::of(&fd.get_debug_regs().map_err(ioctl(cpu, "debug registers (get)"))?),
        vcpu_events: Hex::of(&fd.get_vcpu_events().map_err(ioctl(cpu, "vCPU events (get)"))?),
        mp_state: Hex::of(&fd.get_mp_state().map_err(ioctl(cpu, "MP state (get)"))?),
    })
}

impl Vcpu {
    /// Puts saved state on this fresh vCPU, in the order KVM needs: CPUID
    /// first (it decides which MSRs and XSAVE features exist), special
    /// registers before MSRs and LAPIC (EFER, APIC base), the LAPIC before
    /// the TSC-deadline MSR, and pending events and MP state last, since
    /// setting the others may clear them.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let cpu = self.index;
        let bad = bad(cpu);
        let entries = state
            .cpuid
            .iter()
            .map(|h| h.get::<kvm_cpuid_entry2>("a CPUID entry"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(&bad)?;
        let cpuid = CpuId::from_entries(&entries).map_err(|e| bad(format!("CPUID: {e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(ioctl(cpu, "CPUID"))?;

        let sregs = state.sregs.get("sregs").map_err(&bad)?;
        self.fd.set_sregs(&sregs).map_err(ioctl(cpu, "special registers"))?;
        let regs = state.regs.get("regs").map_err(&bad)?;
        self.fd.set_regs(&regs).map_err(ioctl(cpu, "registers"))?;
        match &state.xsave {
            Some(x) => {
                let xsave = x.get("xsave").map_err(&bad)?;
                // SAFETY: a kvm_xsave of the legacy 4 KiB size, which is what
                // KVM_SET_XSAVE reads; KVM_GET_XSAVE filled it on save.
                unsafe { self.fd.set_xsave(&xsave) }.map_err(ioctl(cpu, "XSAVE"))?;
            }
            None => {
                self.fd.set_fpu(&kvm_fpu::from(&state.fpu)).map_err(ioctl(cpu, "FPU"))?;
            }
        }
        if let Some(x) = &state.xcrs {
            let xcrs = x.get("xcrs").map_err(&bad)?;
            self.fd.set_xcrs(&xcrs).map_err(ioctl(cpu, "XCRS"))?;
        }
        let dregs = state.debug_regs.get("debug_regs").map_err(&bad)?;
        self.fd.set_debug_regs(&dregs).map_err(ioctl(cpu, "debug registers"))?;
        let lapic = state.lapic.get("lapic").map_err(&bad)?;
        self.fd.set_lapic(&lapic).map_err(ioctl(cpu, "LAPIC"))?;
        self.restore_msrs(&state.msrs)?;
        let mp: kvm_mp_state = state.mp_state.get("mp_state").map_err(&bad)?;
        self.fd.set_mp_state(mp).map_err(ioctl(cpu, "MP state"))?;
        let events = state.vcpu_events.get("vcpu_events").map_err(&bad)?;
        self.fd.set_vcpu_events(&events).map_err(ioctl(cpu, "vCPU events"))?;
        Ok(())
    }

    /// Sets the saved MSRs; KVM stops at the first it refuses, which is
    /// skipped with a warning (a different host may lack it).
    fn restore_msrs(&self, saved: &[MsrValue]) -> Result<(), VcpuError> {
        let cpu = self.index;
        let mut rest = saved;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let indices: Vec<u32> = batch.iter().map(|m| m.index).collect();
            let data: Vec<u64> = batch.iter().map(|m| m.data).collect();
            let msrs = msr_batch(&indices, Some(&data))?;
            let n = self.fd.set_msrs(&msrs).map_err(ioctl(cpu, "MSRs"))?;
            if n < batch.len() {
                warn!(
                    cpu,
                    "KVM refused to restore MSR {:#x} = {:#x}; skipped", batch[n].index, batch[n].data
                );
                rest = &rest[n + 1..];
            } else {
                rest = &rest[batch.len()..];
            }
        }
        Ok(())
    }
}
