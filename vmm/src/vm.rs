//! The KVM VM: guest memory, interrupt controllers, timers.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use tracing::debug;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{ram_ranges, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use serde::{Deserialize, Serialize};

use crate::kvm_bytes::Hex;

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// `kvm_irqchip` for chip 0 (PIC master), 1 (PIC slave), 2 (I/O APIC).
    pub pic_master: Hex,
    pub pic_slave: Hex,
    pub ioapic: Hex,
    /// `kvm_pit_state2`.
    pub pit: Hex,
    /// `kvm_clock_data`.
    pub clock: Hex,
}

const KVM_API_VERSION: i32 = 12;
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("this KVM lacks {0}")]
    MissingCap(&'static str),
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("saved VM state: {0}")]
    BadState(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub mem_size: u64,
}

impl Vm {
    /// Creates the VM with `mem_size` bytes of RAM, the in-kernel IRQ chip
    /// (PIC, I/O APIC, local APICs) and PIT.
    pub fn create(mem_size: u64) -> Result<Vm, VmError> {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let memory = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| VmError::Memory {
            mib: mem_size >> 20,
            reason: e.to_string(),
        })?;
        Self::with_memory(memory)
    }

    /// Creates the VM around guest memory that exists already (a snapshot's
    /// private mapping).
    pub fn with_memory(memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let mem_size: u64 = memory.iter().map(|r| r.len()).sum();
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip().map_err(kvm_err("create the in-kernel IRQ chip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;

        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Memory {
                    mib: mem_size >> 20,
                    reason: e.to_string(),
                })?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // this `Vm` keeps for as long as the VM fd exists; slots do not overlap.
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(kvm_err("register guest memory"))?;
            // Guest memory holds tenant data: never in a core dump.
            // SAFETY: advice on the live mapping above; it changes only
            // what a dump includes.
            if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTDUMP) } < 0 {
                return Err(VmError::Memory {
                    mib: mem_size >> 20,
                    reason: format!("madvise(MADV_DONTDUMP): {}", std::io::Error::last_os_error()),
                });
            }
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            mem_size,
        })
    }
}

fn irqchip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm_err(what))?;
    Ok(chip)
}

impl Vm {
    /// The in-kernel PIC, I/O APIC, PIT and the guest's kvmclock. Taken
    /// while the vCPUs are parked, so nothing moves under it but the clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let pic_master = irqchip(&self.fd, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?;
        let pic_slave = irqchip(&self.fd, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?;
        let ioapic = irqchip(&self.fd, KVM_IRQCHIP_IOAPIC, "read the I/O APIC")?;
        let pit = self.fd.get_pit2().map_err(kvm_err("read the PIT"))?;
        let clock = self
            .fd
            .get_clock()
            .map_err(kvm_err("read the kvmclock (KVM_GET_CLOCK)"))?;
        Ok(VmState {
            pic_master: Hex::of(&pic_master),
            pic_slave: Hex::of(&pic_slave),
            ioapic: Hex::of(&ioapic),
            pit: Hex::of(&pit),
            clock: Hex::of(&clock),
        })
    }

    /// Puts saved VM-wide state back; before any vCPU runs.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let bad = VmError::BadState;
        for (hex, id, what) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC, "the I/O APIC"),
        ] {
            let chip: kvm_irqchip = hex.get(what).map_err(bad)?;
            if chip.chip_id != id {
                return Err(VmError::BadState(format!("{what} is saved as chip {}", chip.chip_id)));
            }
            self.fd
                .set_irqchip(&chip)
                .map_err(kvm_err("restore an interrupt controller"))?;
        }
        let pit = state.pit.get("the PIT").map_err(bad)?;
        self.fd.set_pit2(&pit).map_err(kvm_err("restore the PIT"))?;
        let mut clock: kvm_clock_data = state.clock.get("the clock").map_err(bad)?;
        // Only the clock value is set: the flags KVM_GET_CLOCK reports
        // (TSC_STABLE, REALTIME, HOST_TSC) are not all settable, and the
        // guest's clock continues from the snapshot; the agent sets the
        // wall-clock time after a restore.
        debug!(clock = clock.clock, flags = clock.flags, "restoring kvmclock");
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("restore the kvmclock (KVM_SET_CLOCK)"))?;
        Ok(())
    }
}
