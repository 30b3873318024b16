//! Per-vCPU CPUID: KVM's supported set, filtered through a template and
//! given this vCPU's topology.

use kvm_bindings::kvm_cpuid_entry2;

use super::cpu_template::{CpuTemplate, FeatureBit, Reg, TemplateTables};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u8 = 31;
const EDX_HTT_BIT: u8 = 28;

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn matches(e: &kvm_cpuid_entry2, fb: &FeatureBit) -> bool {
    e.function == fb.leaf && e.index == fb.subleaf
}

/// Bits needed to number `count` items (ceil(log2)).
fn id_bits(count: u32) -> u32 {
    u32::BITS - count.saturating_sub(1).leading_zeros()
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_index`
/// of `cpu_count`, one thread per core, one socket.
pub fn filter(entries: &mut [kvm_cpuid_entry2], template: CpuTemplate, cpu_index: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    for e in entries.iter_mut() {
        for fb in template.hidden_features() {
            if matches(e, fb) {
                *reg_mut(e, fb.reg) &= !(1u32 << fb.bit);
            }
        }
        for fb in template.added_features() {
            if matches(e, fb) {
                *reg_mut(e, fb.reg) |= 1u32 << fb.bit;
            }
        }
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processor count, CLFLUSH line size (8 qwords).
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << ECX_HYPERVISOR_BIT;
                if count > 1 {
                    e.edx |= 1 << EDX_HTT_BIT;
                } else {
                    e.edx &= !(1 << EDX_HTT_BIT);
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cores = (count - 1).min(63);
                e.eax = (e.eax & 0x3fff) | (cores << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: every vCPU is a core of the one package.
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f),
            entry(1, 0, u32::MAX),
            entry(4, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(7, 1, u32::MAX),
            entry(0xb, 0, u32::MAX),
            entry(0xb, 1, u32::MAX),
            entry(0xb, 2, u32::MAX),
            entry(0x8000_0001, 0, u32::MAX),
            entry(0x8000_0008, 0, 0),
        ]
    }

    fn get(v: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn pvm_template_hides_and_adds_bits() {
        let mut v = sample();
        filter(&mut v, CpuTemplate::Pvm, 0, 1);
        let l1 = get(&v, 1, 0);
        assert_eq!(l1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 23), 0, "popcnt");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        let l7 = get(&v, 7, 0);
        assert_eq!(l7.ebx & (1 << 20), 0, "smap");
        assert_eq!(l7.ebx & (1 << 7), 0, "smep");
        assert_ne!(l7.ebx & (1 << 9), 0, "erms stays");
        assert_eq!(get(&v, 0x8000_0001, 0).ecx & (1 << 5), 0, "abm");
        assert_ne!(get(&v, 0x8000_0008, 0).ebx & (1 << 2), 0, "xsaveerptr");
        assert_eq!(get(&v, 7, 1).eax & (1 << 4), 0, "avx_vnni");
    }

    #[test]
    fn host_template_keeps_features() {
        let mut v = sample();
        filter(&mut v, CpuTemplate::Host, 0, 1);
        let l1 = get(&v, 1, 0);
        assert_ne!(l1.ecx & (1 << 13), 0);
        assert_eq!(get(&v, 7, 0).ebx, u32::MAX);
    }

    #[test]
    fn topology_per_vcpu() {
        let mut v = sample();
        filter(&mut v, CpuTemplate::Host, 3, 4);
        let l1 = get(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_eq!(get(&v, 4, 0).eax >> 26, 3);
        let smt = get(&v, 0xb, 0);
        let core = get(&v, 0xb, 1);
        let end = get(&v, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut v = sample();
        filter(&mut v, CpuTemplate::Host, 0, 1);
        assert_eq!(get(&v, 1, 0).edx & (1 << 28), 0);
        assert_eq!(get(&v, 0xb, 1).eax, 0);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
