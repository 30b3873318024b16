//! Kernel and initrd loading through linux-loader.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::layout::{HIMEM_START, MMIO_GAP_START};
use crate::arch::regs::EntryMode;

/// bzImage's 64-bit entry point sits 0x200 bytes into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{path} is neither an ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bzimage})")]
    UnknownFormat {
        path: String,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("cannot load the ELF kernel {path}: {source}")]
    Elf {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("the bzImage {0} has no 64-bit entry point")]
    No64BitEntry(String),
    #[error("the initrd ({size} bytes) does not fit between the kernel end ({kernel_end:#x}) and {top:#x}")]
    InitrdTooLarge { size: u64, kernel_end: u64, top: u64 },
    #[error("cannot read the initrd {path}: {source}")]
    Initrd {
        path: String,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where and how the kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// First byte after the kernel image.
    pub end: u64,
    /// bzImage only: the setup header to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads an ELF `vmlinux` (PVH entry when the note is present, otherwise
/// the 64-bit boot protocol) or a bzImage.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let shown = path.display().to_string();
    let open = || {
        File::open(path).map_err(|source| LoaderError::Open {
            path: shown.clone(),
            source,
        })
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut open()?, highmem) {
        Ok(r) => {
            let (entry, mode) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), EntryMode::Pvh),
                _ => (r.kernel_load.raw_value(), EntryMode::Linux64),
            };
            return Ok(LoadedKernel {
                entry,
                mode,
                end: r.kernel_end,
                setup_header: None,
            });
        }
        Err(e @ linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => e,
        Err(source) => return Err(LoaderError::Elf { path: shown, source }),
    };
    match BzImage::load(mem, None, &mut open()?, highmem) {
        Ok(r) => {
            let hdr = r.setup_header.ok_or_else(|| LoaderError::No64BitEntry(shown.clone()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::No64BitEntry(shown));
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                mode: EntryMode::Linux64,
                end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
        Err(bzimage) => Err(LoaderError::UnknownFormat {
            path: shown,
            elf: elf_err,
            bzimage,
        }),
    }
}

/// Guest address and size of a loaded initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Highest page-aligned address for `size` bytes below `top` and above `kernel_end`.
pub fn place_initrd(size: u64, kernel_end: u64, top: u64) -> Result<InitrdPlacement, LoaderError> {
    let too_large = || LoaderError::InitrdTooLarge { size, kernel_end, top };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    Ok(InitrdPlacement { addr, size })
}

/// Loads the initrd as high as possible in low memory (below the MMIO gap
/// and below `max_addr`, the kernel's `initrd_addr_max`).
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<InitrdPlacement, LoaderError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| LoaderError::Open {
        path: shown.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::Open {
            path: shown.clone(),
            source,
        })?
        .len();
    let ram_top = (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START);
    let placement = place_initrd(size, kernel_end, ram_top.min(max_addr.saturating_add(1)))?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut file, size as usize)
        .map_err(|source| LoaderError::Initrd { path: shown, source })?;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let p = place_initrd(10_000, 0x200_0000, 0x400_0000).unwrap();
        assert_eq!(p.addr % PAGE_SIZE, 0);
        assert!(p.addr + p.size <= 0x400_0000);
        assert!(p.addr >= 0x200_0000);
        assert!(0x400_0000 - (p.addr + p.size) < PAGE_SIZE);
    }

    #[test]
    fn initrd_overlapping_kernel_is_refused() {
        assert!(place_initrd(0x300_0000, 0x200_0000, 0x400_0000).is_err());
        assert!(place_initrd(u64::MAX, 0, 0x400_0000).is_err());
    }

    #[test]
    fn initrd_bytes_land_in_memory() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"070701 initrd").unwrap();
        let p = load_initrd(&m, f.path(), 0x200_0000, u64::MAX).unwrap();
        let mut buf = [0u8; 13];
        m.read_slice(&mut buf, GuestAddress(p.addr)).unwrap();
        assert_eq!(&buf, b"070701 initrd");
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        let err = load_kernel(&m, f.path()).unwrap_err().to_string();
        assert!(err.contains("neither an ELF vmlinux nor a bzImage"), "{err}");
        let err = load_kernel(&m, Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(err.contains("cannot open"), "{err}");
    }
}
