//! Describing why a vCPU stopped, in terms a kernel developer can act on.

use std::fmt;

/// Instructions that KVM's emulator is known not to execute on PVM hosts,
/// with the fix that got past each (see ENVIRONMENT.md).
const KNOWN_GAPS: &[(&[u8], &str)] = &[
    (
        &[0xcc],
        "int3: the guest kernel's int3 self-test; use the project's kernel patch",
    ),
    (&[0x9b], "fwait: fpu__drop(); use the project's kernel patch"),
    (&[0x0f, 0x01, 0xca], "clac: SMAP; clearcpuid=smap,smep (pvm template)"),
    (&[0x0f, 0x01, 0xcb], "stac: SMAP; clearcpuid=smap,smep (pvm template)"),
    (&[0xf3, 0x0f, 0xb8], "popcnt: clearcpuid=popcnt (pvm template)"),
    (&[0xf3, 0x48, 0x0f, 0xb8], "popcnt: clearcpuid=popcnt (pvm template)"),
    (
        &[0xdb, 0xe2],
        "fnclex: AMD FXSAVE-leak workaround; announce xsaveerptr (pvm template)",
    ),
    (&[0x0f, 0xae], "fxsave/xsave/xrstor family: noxsave (pvm template)"),
    (&[0x48, 0x0f, 0xae], "fxsave64/xrstor64: noxsave (pvm template)"),
    (&[0x48, 0x0f, 0xc7], "cmpxchg16b: clearcpuid=cx16 (pvm template)"),
    (
        &[0xf0, 0x48, 0x0f, 0xc7],
        "lock cmpxchg16b: clearcpuid=cx16 (pvm template)",
    ),
];

/// A best guess at what the bytes at RIP are, for the error message.
pub fn known_gap(bytes: &[u8]) -> Option<&'static str> {
    KNOWN_GAPS
        .iter()
        .filter(|(prefix, _)| bytes.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, hint)| *hint)
}

/// Where a vCPU was when it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestLocation {
    pub rip: u64,
    pub cs: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Up to 15 bytes at RIP, when they could be read.
    pub bytes: Vec<u8>,
}

impl fmt::Display for GuestLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RIP {:#018x} CS {:#06x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
            self.rip, self.cs, self.cr0, self.cr3, self.cr4, self.efer
        )?;
        if self.bytes.is_empty() {
            f.write_str(", instruction bytes unavailable")
        } else {
            f.write_str(", instruction bytes:")?;
            for b in &self.bytes {
                write!(f, " {b:02x}")?;
            }
            if let Some(hint) = known_gap(&self.bytes) {
                write!(f, " ({hint})")?;
            }
            Ok(())
        }
    }
}

/// Why the guest, or one of its vCPUs, stopped for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// i8042 reset or a KVM reset/shutdown system event.
    Reset,
    /// A vCPU executed HLT with nothing to wake it that KVM handles.
    Halted {
        cpu: u8,
    },
    TripleFault {
        cpu: u8,
        at: GuestLocation,
    },
    InternalError {
        cpu: u8,
        suberror: u32,
        at: GuestLocation,
    },
    FailEntry {
        cpu: u8,
        reason: u64,
    },
    /// KVM_RUN itself failed.
    RunFailed {
        cpu: u8,
        error: String,
    },
    GuestCrash {
        cpu: u8,
    },
}

impl fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuStop::Reset => f.write_str("the guest reset the machine"),
            VcpuStop::Halted { cpu } => write!(f, "vCPU {cpu} halted"),
            VcpuStop::TripleFault { cpu, at } => {
                write!(f, "guest triple fault on vCPU {cpu}: {at}")
            }
            VcpuStop::InternalError { cpu, suberror, at } => {
                let what = match suberror {
                    1 => "emulation failure: KVM's instruction emulator cannot execute the instruction",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failed",
                    _ => "internal error",
                };
                write!(
                    f,
                    "KVM internal error on vCPU {cpu} (suberror {suberror}, {what}): {at}"
                )
            }
            VcpuStop::FailEntry { cpu, reason } => {
                write!(
                    f,
                    "KVM could not enter the guest on vCPU {cpu}: hardware entry failure reason {reason:#x}"
                )
            }
            VcpuStop::RunFailed { cpu, error } => {
                write!(f, "KVM_RUN failed on vCPU {cpu}: {error}")
            }
            VcpuStop::GuestCrash { cpu } => write!(f, "the guest reported a crash on vCPU {cpu}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gaps_take_the_longest_prefix() {
        assert!(known_gap(&[0xcc, 0x90]).unwrap().starts_with("int3"));
        assert!(known_gap(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e])
            .unwrap()
            .starts_with("lock cmpxchg16b"));
        assert!(known_gap(&[0x90]).is_none());
    }

    #[test]
    fn messages_carry_rip_and_bytes() {
        let stop = VcpuStop::InternalError {
            cpu: 0,
            suberror: 1,
            at: GuestLocation {
                rip: 0xffff_ffff_8100_0000,
                bytes: vec![0xcc],
                ..Default::default()
            },
        };
        let s = stop.to_string();
        assert!(s.contains("RIP 0xffffffff81000000"), "{s}");
        assert!(s.contains("instruction bytes: cc (int3"), "{s}");
        assert!(s.contains("emulation failure"), "{s}");
        let t = VcpuStop::TripleFault {
            cpu: 1,
            at: GuestLocation::default(),
        }
        .to_string();
        assert!(t.contains("triple fault on vCPU 1") && t.contains("unavailable"), "{t}");
    }
}
