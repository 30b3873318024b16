//! Boot CPU register state for the two entry protocols.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{self, CODE_SELECTOR_INDEX, DATA_SELECTOR_INDEX, TSS_SELECTOR_INDEX};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START};
use super::paging::{self, PagingError};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
    Pvh,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT/IDT to guest memory: {0}")]
    DescriptorTables(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Paging(#[from] PagingError),
}

/// General-purpose registers at the kernel entry point.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Writes the boot GDT, an empty IDT and (for long mode) the page tables,
/// and fills the special registers to match.
pub fn setup_sregs<M: GuestMemoryBackend>(mem: &M, mode: EntryMode, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let table = gdt::boot_gdt(mode == EntryMode::Linux64);
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(RegsError::DescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::DescriptorTables)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = gdt::kvm_segment_from_gdt(table[CODE_SELECTOR_INDEX as usize], CODE_SELECTOR_INDEX);
    let data = gdt::kvm_segment_from_gdt(table[DATA_SELECTOR_INDEX as usize], DATA_SELECTOR_INDEX);
    let tss = gdt::kvm_segment_from_gdt(table[TSS_SELECTOR_INDEX as usize], TSS_SELECTOR_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Linux64 => {
            sregs.cr3 = paging::setup_identity_map(mem)?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_state() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64, &mut s).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cr3, super::super::layout::PML4_START);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::gdt_entry(gdt::CODE64_FLAGS, 0, 0xfffff));
        let r = boot_regs(EntryMode::Linux64, 0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER));
    }

    #[test]
    fn pvh_state() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Pvh, &mut s).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        let r = boot_regs(EntryMode::Pvh, 0x100_0400);
        assert_eq!((r.rip, r.rbx), (0x100_0400, PVH_INFO_START));
    }

    #[test]
    fn fpu_defaults() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
