//! Identity-mapped page tables for the 64-bit boot protocol.
//!
//! The kernel's 64-bit entry expects paging on and the low memory it touches
//! (itself, the zero page, the command line, the initrd pointer) mapped 1:1.
//! One PML4 entry, one PDPT entry and 512 2 MiB pages map the first GiB.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M_FLAG: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;

/// Bytes mapped by the boot page tables.
pub const IDENTITY_MAPPED_BYTES: u64 = 512 * TWO_MIB;

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("cannot write the boot page tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes the tables and returns the value for CR3.
pub fn setup_identity_map<M: GuestMemoryBackend>(mem: &M) -> Result<u64, PagingError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        let entry = (i * TWO_MIB) | PAGE_SIZE_2M_FLAG | PRESENT_WRITABLE;
        mem.write_obj(entry, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables as the MMU would for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8)).ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .ok()?;
        if pde & 1 == 0 || pde & PAGE_SIZE_2M_FLAG == 0 {
            return None;
        }
        Some((pde & !(TWO_MIB - 1) & 0x000f_ffff_ffff_f000) | (va & (TWO_MIB - 1)))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cr3 = setup_identity_map(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, IDENTITY_MAPPED_BYTES - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, IDENTITY_MAPPED_BYTES), None);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(setup_identity_map(&mem).is_err());
    }
}
