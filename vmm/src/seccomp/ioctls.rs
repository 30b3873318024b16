//! The ioctl requests each VMM thread may issue once the guest runs. The
//! numbers are computed from KVM's structures, as `<linux/kvm.h>` does.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32) as u64
}

const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size_of::<T>() as u32) as u64
}

pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
pub const KVM_TRANSLATE: u64 = iowr::<kvm_translation>(0x85);
pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
pub const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
pub const KVM_GET_CPUID2: u64 = iowr::<kvm_cpuid2>(0x91);
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);

pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);

/// A vCPU thread runs its vCPU, reads its state for a snapshot, and
/// where it stopped when it fails (the registers, the code's address).
pub const VCPU: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_TRANSLATE,
    KVM_GET_MSRS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
];

/// The API thread reads the VM's state for a snapshot, and makes the
/// sockets it accepts blocking.
pub const API: &[u64] = &[KVM_GET_IRQCHIP, KVM_GET_CLOCK, KVM_GET_PIT2, libc::FIONBIO];

/// The event loop only switches vsock sockets to non-blocking.
pub const VMM: &[u64] = &[libc::FIONBIO];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> on x86_64, as strace prints them.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
    }
}
