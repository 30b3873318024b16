//! Guest physical memory layout for x86_64 boots.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB,
//! out of the kernel's way; the kernel itself loads at `HIMEM_START`.

/// Global descriptor table used for the boot segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table: the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT and one page directory.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the 6.1 x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy hole (VGA, ROMs) that is not RAM.
pub const LEGACY_HOLE_START: u64 = EBDA_START;
/// First byte above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: no RAM between these addresses.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// MMIO addresses handed out to devices (virtio-mmio) inside the gap.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Architectural addresses of the I/O APIC and local APIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, below 4 GiB
/// and outside RAM; these sit just under the BIOS area at the top of the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest RAM ranges for a guest of `mem_size` bytes: one range below the MMIO
/// gap, and the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        const { assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START) };
        const { assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000) };
    }
}
