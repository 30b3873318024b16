//! Boot parameters: the e820 memory map, and the structure each entry
//! protocol hands the kernel (the zero page, or PVH's `hvm_start_info`).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::loader::InitrdPlacement;
use crate::arch::layout::{
    ram_ranges, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("guest memory of {0} bytes is too small to boot")]
    MemoryTooSmall(u64),
    #[error("cannot write the boot parameters: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// RAM as the guest sees it: the low 640 KiB (up to the EBDA), then from
/// 1 MiB up to the MMIO gap, then anything above 4 GiB.
pub fn e820_map(mem_size: u64) -> Result<Vec<(u64, u64)>, ParamsError> {
    if mem_size <= HIMEM_START {
        return Err(ParamsError::MemoryTooSmall(mem_size));
    }
    let mut map = vec![(0, EBDA_START)];
    for (start, size) in ram_ranges(mem_size) {
        if start == 0 {
            map.push((HIMEM_START, size - HIMEM_START));
        } else {
            map.push((start, size));
        }
    }
    Ok(map)
}

/// Fills and writes the zero page for the Linux 64-bit boot protocol.
pub fn write_linux_params<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    header_from_image: Option<setup_header>,
) -> Result<(), ParamsError> {
    let mut params = boot_params::default();
    if let Some(h) = header_from_image {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len.min(CMDLINE_MAX_SIZE - 1) as u32 + 1;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = e820_map(mem_size)?;
    for (i, (addr, size)) in map.iter().take(E820_MAX_ENTRIES_ZEROPAGE).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)?;
    Ok(())
}

/// Fills and writes `hvm_start_info`, its memory map and module list.
pub fn write_pvh_params<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<(), ParamsError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)?
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 << 20).unwrap();
        assert_eq!(map, vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]);
    }

    #[test]
    fn e820_large_guest_has_no_ram_in_the_gap() {
        let map = e820_map(6 << 30).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(map[2], (MMIO_GAP_END, (6 << 30) - MMIO_GAP_START));
        for (a, s) in &map {
            assert!(a + s <= MMIO_GAP_START || *a >= MMIO_GAP_END);
        }
    }

    #[test]
    fn e820_refuses_tiny_memory() {
        assert!(e820_map(1 << 20).is_err());
    }

    #[test]
    fn zero_page_contents() {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x1234,
        };
        write_linux_params(&mem, size, 42, Some(initrd), None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 43);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0x300_0000, 0x1234));
        assert_eq!(p.e820_entries, 2);
        let e1 = p.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (HIMEM_START, size - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn pvh_start_info_contents() {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x1000,
        };
        write_pvh_params(&mem, size, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_START));
        assert_eq!((info.memmap_entries, info.cmdline_paddr), (2, CMDLINE_START));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x1000));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (HIMEM_START, size - HIMEM_START, E820_RAM));
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let size = 32u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write_pvh_params(&mem, size, None).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
