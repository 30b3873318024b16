//! What kind of virtualization this host offers.

use std::fmt;
use std::path::Path;

/// How `/dev/kvm` runs guests here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V: guests run natively.
    HardwareVirtualization,
    /// KVM from the `kvm_pvm` module without VT-x/AMD-V: a kernel that is
    /// not PVM-enlightened runs through KVM's instruction emulator.
    Pvm,
    /// No usable `/dev/kvm`.
    NoKvm,
}

impl HostKind {
    /// Pure decision from the three observations, for tests.
    pub fn classify(kvm_usable: bool, cpu_has_vmx_or_svm: bool, pvm_module_loaded: bool) -> HostKind {
        match (kvm_usable, cpu_has_vmx_or_svm, pvm_module_loaded) {
            (false, _, _) => HostKind::NoKvm,
            (true, true, _) => HostKind::HardwareVirtualization,
            (true, false, true) => HostKind::Pvm,
            // KVM without VT-x/AMD-V flags and without PVM: a nested set-up
            // that hides the flags. Treat it as hardware; the KVM API works.
            (true, false, false) => HostKind::HardwareVirtualization,
        }
    }

    /// Looks at `/dev/kvm`, `/proc/cpuinfo` and `/sys/module`, once: the
    /// jailed VMM sees none of the last two, so `main` asks before it
    /// enters the jail.
    pub fn detect() -> HostKind {
        static DETECTED: std::sync::OnceLock<HostKind> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Self::look)
    }

    fn look() -> HostKind {
        let kvm_usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostKind::classify(
            kvm_usable,
            cpu_flags_have_virtualization(&cpuinfo),
            Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::HardwareVirtualization => "hardware virtualization (VT-x/AMD-V)",
            HostKind::Pvm => {
                "PVM without hardware virtualization: the guest kernel runs through KVM's emulator (boots take minutes)"
            }
            HostKind::NoKvm => "no usable /dev/kvm",
        }
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

fn cpu_flags_have_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(HostKind::classify(false, true, true), HostKind::NoKvm);
        assert_eq!(HostKind::classify(true, true, false), HostKind::HardwareVirtualization);
        assert_eq!(HostKind::classify(true, false, true), HostKind::Pvm);
        assert_eq!(HostKind::classify(true, true, true), HostKind::HardwareVirtualization);
    }

    #[test]
    fn flags_parsing() {
        assert!(cpu_flags_have_virtualization("flags\t: fpu vme vmx sse\n"));
        assert!(cpu_flags_have_virtualization("flags\t: fpu svm\n"));
        assert!(!cpu_flags_have_virtualization("flags\t: fpu vmxe\nvmx: yes\n"));
    }
}
