//! Boot-time segment descriptors.
//!
//! The guest starts with a flat GDT of four entries: null, code, data, TSS.
//! The code descriptor is 64-bit for the Linux 64-bit boot protocol and
//! 32-bit for PVH, which starts in protected mode with paging off.

use kvm_bindings::kvm_segment;

pub const CODE_SELECTOR_INDEX: u8 = 1;
pub const DATA_SELECTOR_INDEX: u8 = 2;
pub const TSS_SELECTOR_INDEX: u8 = 3;

/// Access/flags words (bits 40..56 of a descriptor without base and limit).
pub const CODE64_FLAGS: u16 = 0xa09b; // G, L, present, DPL0, code, read, accessed
pub const CODE32_FLAGS: u16 = 0xc09b; // G, D/B, present, DPL0, code, read, accessed
pub const DATA_FLAGS: u16 = 0xc093; // G, D/B, present, DPL0, data, write, accessed
pub const TSS_FLAGS: u16 = 0x808b; // G, present, busy 64-bit TSS

/// Packs a segment descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT for the given entry mode.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode { CODE64_FLAGS } else { CODE32_FLAGS };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn field(entry: u64, shift: u32, mask: u64) -> u8 {
    ((entry >> shift) & mask) as u8
}

/// The KVM segment register matching descriptor `index` of a table.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = field(entry, 55, 1);
    // With 4 KiB granularity the limit counts pages, so the low 12 bits are all ones.
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = field(entry, 47, 1);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: field(entry, 40, 0xf),
        present,
        dpl: field(entry, 45, 0x3),
        db: field(entry, 54, 1),
        s: field(entry, 44, 1),
        l: field(entry, 53, 1),
        g: granular,
        avl: field(entry, 52, 1),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let gdt = boot_gdt(true);
        let cs = kvm_segment_from_gdt(gdt[1], CODE_SELECTOR_INDEX);
        assert_eq!(cs.selector, 0x8);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn protected_mode_code_segment() {
        let gdt = boot_gdt(false);
        let cs = kvm_segment_from_gdt(gdt[1], CODE_SELECTOR_INDEX);
        assert_eq!((cs.l, cs.db), (0, 1));
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt(true);
        let ds = kvm_segment_from_gdt(gdt[2], DATA_SELECTOR_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.g), (0x10, 0x3, 1, 1));
        let tss = kvm_segment_from_gdt(gdt[3], TSS_SELECTOR_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
        assert_eq!(kvm_segment_from_gdt(gdt[0], 0).unusable, 1);
    }

    #[test]
    fn entry_packing_round_trips_base_and_limit() {
        let e = gdt_entry(DATA_FLAGS, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
    }
}
