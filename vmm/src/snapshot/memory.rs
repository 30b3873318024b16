//! Guest memory to and from the snapshot's memory file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tracing::debug;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::{MemoryRegionState, SnapshotError};

const PAGE: usize = 4096;
/// Copied out of guest memory this much at a time.
const CHUNK: usize = 1 << 20;

/// The regions of `mem`, laid one after another in the file.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let s = MemoryRegionState {
                guest_addr: r.start_addr().raw_value(),
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            s
        })
        .collect()
}

/// The regions' sizes added up; `None` past 2^64 (sizes come from a
/// state file, which may lie).
pub fn total_size(regions: &[MemoryRegionState]) -> Option<u64> {
    regions.iter().try_fold(0u64, |sum, r| sum.checked_add(r.size))
}

/// Writes guest RAM to `path`, leaving holes where a page is all zeros (a
/// freshly booted guest has most of its memory untouched), and syncs it.
pub fn dump(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemoryRegionState>, SnapshotError> {
    let io = |what: &'static str| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let regions = layout(mem);
    let file = File::create(path).map_err(io("create"))?;
    let total =
        total_size(&regions).ok_or_else(|| SnapshotError::GuestMemory("guest memory past 2^64 bytes".into()))?;
    // Sets the length first: unwritten ranges stay holes that read as zeros.
    file.set_len(total).map_err(io("size"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written_pages = 0u64;
    for r in &regions {
        let mut done = 0u64;
        while done < r.size {
            let n = usize::try_from((r.size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    let at = r.file_offset + done + (i * PAGE) as u64;
                    file.write_all_at(page, at).map_err(io("write"))?;
                    written_pages += 1;
                }
            }
            done += n as u64;
        }
    }
    file.sync_all().map_err(io("sync"))?;
    debug!(
        total_mib = total >> 20,
        written_mib = (written_pages * PAGE as u64) >> 20,
        "guest memory written"
    );
    Ok(regions)
}

/// Maps the memory file privately: pages are read from the file lazily on
/// first touch and copied on first write, so restored VMs share the pages
/// they leave alone and the file is never written (it is opened read-only).
pub fn map_private(path: &Path, regions: &[MemoryRegionState]) -> Result<GuestMemoryMmap, SnapshotError> {
    let io = |what: &'static str| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    let needed = total_size(regions);
    if needed != Some(len) {
        return Err(SnapshotError::StateFile(super::StateFileError::Invalid(format!(
            "the memory file {} is {len} bytes, the state says {}",
            path.display(),
            needed.map_or("more than 2^64".into(), |n| n.to_string())
        ))));
    }
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| SnapshotError::GuestMemory("region too large".into()))?;
        let fd = file.try_clone().map_err(io("duplicate the descriptor of"))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| SnapshotError::GuestMemory(format!("cannot map {}: {e}", path.display())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::GuestMemory(format!("region at {:#x} wraps around", r.guest_addr)))?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| SnapshotError::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_then_map_private_sees_the_bytes_and_never_writes_the_file() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x11000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let regions = dump(&mem, &path).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].file_offset, 0x4000);
        let before = std::fs::read(&path).unwrap();
        assert_eq!(before.len(), 0x6000);

        let restored = map_private(&path, &regions).unwrap();
        let mut b = [0u8; 5];
        restored.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        assert_eq!(&b, b"world");
        restored.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        restored.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"HELLO");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "a private mapping never writes the file"
        );
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let regions = [MemoryRegionState {
            guest_addr: 0,
            size: 0x1000,
            file_offset: 0,
        }];
        let e = map_private(&path, &regions).unwrap_err().to_string();
        assert!(e.contains("is 100 bytes"), "{e}");
    }
}
