//! Named CPU templates: which CPUID features a guest may see, and which
//! kernel parameters go with them.

use crate::host::HostKind;
use bulkhead_protocol::guest_env::PVM_GLIBC_TUNABLE;

/// A CPUID register bit to hide from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features whose instructions KVM's instruction emulator cannot execute, or
/// that the guest kernel would use in paths that run under it on PVM hosts.
/// ENVIRONMENT.md records the instruction behind each of the first group.
const PVM_HIDDEN: &[FeatureBit] = &[
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("osxsave", 1, 0, Reg::Ecx, 27),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("avx512dq", 7, 0, Reg::Ebx, 17),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("avx512ifma", 7, 0, Reg::Ebx, 21),
    f("avx512cd", 7, 0, Reg::Ebx, 28),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("avx512bw", 7, 0, Reg::Ebx, 30),
    f("avx512vl", 7, 0, Reg::Ebx, 31),
    f("avx512vbmi", 7, 0, Reg::Ecx, 1),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("ospke", 7, 0, Reg::Ecx, 4),
    f("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    f("gfni", 7, 0, Reg::Ecx, 8),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    f("avx512_vnni", 7, 0, Reg::Ecx, 11),
    f("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("serialize", 7, 0, Reg::Edx, 14),
    f("tsxldtrk", 7, 0, Reg::Edx, 16),
    f("amx_bf16", 7, 0, Reg::Edx, 22),
    f("avx512_fp16", 7, 0, Reg::Edx, 23),
    f("amx_tile", 7, 0, Reg::Edx, 24),
    f("amx_int8", 7, 0, Reg::Edx, 25),
    f("avx_vnni", 7, 1, Reg::Eax, 4),
    f("avx512_bf16", 7, 1, Reg::Eax, 5),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
];

/// Features to announce: an AMD guest then skips the `fnclex; emms`
/// FXSAVE-leak workaround, which the emulator cannot run.
const PVM_ADDED: &[FeatureBit] = &[f("xsaveerptr", 0x8000_0008, 0, Reg::Ebx, 2)];

/// The same features by their Linux names. On PVM hosts the guest's CPUID
/// instruction returns the host's values whatever KVM_SET_CPUID2 says (seen
/// here with a kvm-tier guest), so the guest kernel must be told directly.
/// AVX-512 and the rest of the XSAVE-based features go with `noxsave`.
const PVM_CLEARCPUID: &str = "clearcpuid=cx16,smap,smep,pcid,invpcid,fsgsbase,popcnt,bmi1,bmi2,movbe,\
rdrand,rdseed,rdpid,abm,avx,avx2,fma,f16c,aes,pclmulqdq,sha_ni";

/// Kernel parameters the PVM template needs: `noxsave` keeps the kernel
/// off `xrstor`, `clearcpuid` off the other instructions above, and the
/// project's kernel skips its `int3` self-test (kernel-config/patches/0001),
/// which the emulator cannot run. Other kernels ignore the unknown parameter.
const PVM_CMDLINE: &[&str] = &["noxsave", PVM_CLEARCPUID, "bulkhead.no_int3_selftest"];

/// `noxsave` leaves the guest kernel switching only FXSAVE state, while
/// its user space still sees the host's XCR0. The kernel passes an unknown
/// `NAME=value` parameter to init as an environment variable, so every init
/// (the agent or a user's own) starts with glibc kept off the registers
/// that are not switched.
fn pvm_init_env() -> String {
    format!("GLIBC_TUNABLES={PVM_GLIBC_TUNABLE}")
}

pub use bulkhead_vmm_api::config::CpuTemplate;

/// What each template means to this VMM: its CPUID changes and the kernel
/// parameters that go with them.
pub trait TemplateTables {
    /// The template a host of `kind` needs when none is asked for.
    fn for_host(kind: HostKind) -> Self;
    fn hidden_features(self) -> &'static [FeatureBit];
    fn added_features(self) -> &'static [FeatureBit];
    fn kernel_params(self) -> Vec<String>;
}

impl TemplateTables for CpuTemplate {
    fn for_host(kind: HostKind) -> CpuTemplate {
        match kind {
            HostKind::Pvm => CpuTemplate::Pvm,
            HostKind::HardwareVirtualization | HostKind::NoKvm => CpuTemplate::Host,
        }
    }

    fn hidden_features(self) -> &'static [FeatureBit] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::Pvm => PVM_HIDDEN,
        }
    }

    fn added_features(self) -> &'static [FeatureBit] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::Pvm => PVM_ADDED,
        }
    }

    fn kernel_params(self) -> Vec<String> {
        match self {
            CpuTemplate::Host => Vec::new(),
            CpuTemplate::Pvm => PVM_CMDLINE
                .iter()
                .map(|p| p.to_string())
                .chain([pvm_init_env()])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_kind_picks_template() {
        assert_eq!(CpuTemplate::for_host(HostKind::Pvm), CpuTemplate::Pvm);
        assert_eq!(
            CpuTemplate::for_host(HostKind::HardwareVirtualization),
            CpuTemplate::Host
        );
    }

    #[test]
    fn pvm_hides_what_the_emulator_cannot_run() {
        let names: Vec<_> = CpuTemplate::Pvm.hidden_features().iter().map(|f| f.name).collect();
        for needed in ["cx16", "xsave", "smap", "smep", "popcnt", "rdrand", "avx", "abm"] {
            assert!(names.contains(&needed), "{needed} not hidden");
        }
        assert!(CpuTemplate::Host.hidden_features().is_empty());
        // Every feature cleared on the command line is hidden in CPUID too.
        let clear = PVM_CLEARCPUID.strip_prefix("clearcpuid=").unwrap();
        for name in clear.split(',') {
            assert!(names.contains(&name), "{name} cleared but not hidden");
        }
        let params = CpuTemplate::Pvm.kernel_params();
        assert!(params.iter().any(|p| p == "noxsave"));
        assert!(params
            .iter()
            .any(|p| p.starts_with("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,")));
        // A feature is never both hidden and announced.
        for add in CpuTemplate::Pvm.added_features() {
            assert!(!names.contains(&add.name));
        }
    }
}
