//! Block request parsing and execution, apart from queue handling so that
//! it can be tested and fuzzed on its own.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{ByteValued, Le32, Le64};

pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer accepted in one request (the guest's queue limits
/// keep Linux far below this).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
pub const DISK_ID_BYTES: usize = 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}
// SAFETY: plain little-endian integers; every bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct DiscardSegment {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}
// SAFETY: plain little-endian integers; every bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request header is truncated")]
    ShortHeader,
    #[error("transfer of {0} bytes is not a whole number of sectors")]
    Unaligned(usize),
    #[error("transfer of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("sectors {start}..+{count} reach past the end of the disk ({capacity} sectors)")]
    OutOfRange { start: u64, count: u64, capacity: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("malformed discard/write-zeroes payload")]
    BadSegment,
    #[error("I/O error on the backing file: {0}")]
    Io(String),
    #[error("guest buffer error: {0}")]
    GuestBuffer(String),
}

impl RequestError {
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The disk a request runs against.
pub struct Disk<'a> {
    pub file: &'a File,
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: &'a [u8; DISK_ID_BYTES],
}

/// Checks that `len` bytes at `sector` are whole sectors inside the disk.
pub fn check_range(sector: u64, len: usize, capacity: u64) -> Result<(), RequestError> {
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    let count = len as u64 / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            start: sector,
            count,
            capacity,
        }),
    }
}

fn io(e: std::io::Error) -> RequestError {
    RequestError::Io(e.to_string())
}

/// Runs one request. `reader` yields the device-readable bytes after the
/// header; `writer` takes the device-writable bytes before the status byte.
/// Returns the number of bytes written to the guest.
pub fn execute<R: Read, W: Write>(
    disk: &Disk<'_>,
    header: &RequestHeader,
    reader: &mut R,
    readable_len: usize,
    writer: &mut W,
    writable_len: usize,
) -> Result<u32, RequestError> {
    let sector = header.sector.to_native();
    match header.type_.to_native() {
        VIRTIO_BLK_T_IN => {
            check_range(sector, writable_len, disk.capacity_sectors)?;
            let mut buf = vec![0u8; writable_len];
            disk.file.read_exact_at(&mut buf, sector * SECTOR_SIZE).map_err(io)?;
            writer
                .write_all(&buf)
                .map_err(|e| RequestError::GuestBuffer(e.to_string()))?;
            Ok(writable_len as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_range(sector, readable_len, disk.capacity_sectors)?;
            let mut buf = vec![0u8; readable_len];
            reader
                .read_exact(&mut buf)
                .map_err(|e| RequestError::GuestBuffer(e.to_string()))?;
            disk.file.write_all_at(&buf, sector * SECTOR_SIZE).map_err(io)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file.sync_data().map_err(io)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = writable_len.min(DISK_ID_BYTES);
            writer
                .write_all(&disk.id[..n])
                .map_err(|e| RequestError::GuestBuffer(e.to_string()))?;
            Ok(n as u32)
        }
        t @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            // We advertise one segment per request.
            if readable_len != std::mem::size_of::<DiscardSegment>() {
                return Err(RequestError::BadSegment);
            }
            let mut raw = [0u8; std::mem::size_of::<DiscardSegment>()];
            reader.read_exact(&mut raw).map_err(|_| RequestError::BadSegment)?;
            let seg = DiscardSegment::from_slice(&raw).ok_or(RequestError::BadSegment)?;
            let start = seg.sector.to_native();
            let count = u64::from(seg.num_sectors.to_native());
            // Only write-zeroes may ask to unmap (bit 0); other flags are unknown.
            let flags = seg.flags.to_native();
            if flags & !1 != 0 || (t == VIRTIO_BLK_T_DISCARD && flags != 0) {
                return Err(RequestError::Unsupported(t));
            }
            let len = count * SECTOR_SIZE;
            match start.checked_add(count) {
                Some(end) if end <= disk.capacity_sectors => {}
                _ => {
                    return Err(RequestError::OutOfRange {
                        start,
                        count,
                        capacity: disk.capacity_sectors,
                    })
                }
            }
            let mode = if t == VIRTIO_BLK_T_DISCARD {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            // SAFETY: fallocate on a file descriptor we own, with a range
            // checked to lie inside the file; it touches no user memory.
            let r = unsafe { libc::fallocate(disk.file.as_raw_fd(), mode, (start * SECTOR_SIZE) as i64, len as i64) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    return Err(RequestError::Unsupported(t));
                }
                return Err(io(e));
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn disk_file(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    fn hdr(t: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            type_: t.into(),
            reserved: 0.into(),
            sector: sector.into(),
        }
    }

    const ID: [u8; 20] = *b"bulkhead-test-disk-1";

    #[test]
    fn read_write_round_trip() {
        let f = disk_file(8);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 8,
            read_only: false,
            id: &ID,
        };
        let mut out = Vec::new();
        let n = execute(
            &d,
            &hdr(VIRTIO_BLK_T_IN, 2),
            &mut Cursor::new(vec![]),
            0,
            &mut out,
            1024,
        )
        .unwrap();
        assert_eq!(n, 1024);
        assert!(out[..512].iter().all(|b| *b == 2) && out[512..].iter().all(|b| *b == 3));
        let data = vec![0xabu8; 512];
        execute(
            &d,
            &hdr(VIRTIO_BLK_T_OUT, 7),
            &mut Cursor::new(data.clone()),
            512,
            &mut Vec::new(),
            0,
        )
        .unwrap();
        let all = std::fs::read(f.path()).unwrap();
        assert_eq!(&all[7 * 512..], &data[..]);
        execute(
            &d,
            &hdr(VIRTIO_BLK_T_FLUSH, 0),
            &mut Cursor::new(vec![]),
            0,
            &mut Vec::new(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn read_only_disk_refuses_writes_and_stays_untouched() {
        let f = disk_file(4);
        let before = std::fs::read(f.path()).unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 4,
            read_only: true,
            id: &ID,
        };
        for t in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let e = execute(
                &d,
                &hdr(t, 0),
                &mut Cursor::new(vec![0u8; 512]),
                512,
                &mut Vec::new(),
                0,
            )
            .unwrap_err();
            assert_eq!(e, RequestError::ReadOnly);
            assert_eq!(e.status(), VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
        // Flush on a read-only disk is harmless.
        execute(
            &d,
            &hdr(VIRTIO_BLK_T_FLUSH, 0),
            &mut Cursor::new(vec![]),
            0,
            &mut Vec::new(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn out_of_range_and_unaligned_are_io_errors() {
        let f = disk_file(4);
        let file = std::fs::File::open(f.path()).unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 4,
            read_only: false,
            id: &ID,
        };
        let mut out = Vec::new();
        let cases = [(3u64, 1024usize), (4, 512), (u64::MAX, 512), (u64::MAX / 512, 1024)];
        for (sector, len) in cases {
            let e = execute(
                &d,
                &hdr(VIRTIO_BLK_T_IN, sector),
                &mut Cursor::new(vec![]),
                0,
                &mut out,
                len,
            )
            .unwrap_err();
            assert!(matches!(e, RequestError::OutOfRange { .. }), "{sector} {len}: {e}");
        }
        let e = execute(&d, &hdr(VIRTIO_BLK_T_IN, 0), &mut Cursor::new(vec![]), 0, &mut out, 100).unwrap_err();
        assert_eq!(e, RequestError::Unaligned(100));
        let e = execute(
            &d,
            &hdr(VIRTIO_BLK_T_IN, 0),
            &mut Cursor::new(vec![]),
            0,
            &mut out,
            MAX_REQUEST_BYTES + 512,
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::TooLarge(_)));
    }

    #[test]
    fn get_id_and_unsupported() {
        let f = disk_file(1);
        let file = std::fs::File::open(f.path()).unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 1,
            read_only: true,
            id: &ID,
        };
        let mut out = Vec::new();
        assert_eq!(
            execute(
                &d,
                &hdr(VIRTIO_BLK_T_GET_ID, 0),
                &mut Cursor::new(vec![]),
                0,
                &mut out,
                64
            )
            .unwrap(),
            20
        );
        assert_eq!(&out, &ID);
        let e = execute(&d, &hdr(99, 0), &mut Cursor::new(vec![]), 0, &mut out, 0).unwrap_err();
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn discard_flags_follow_the_spec() {
        let f = disk_file(8);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 8,
            read_only: false,
            id: &ID,
        };
        // Unmap is only meaningful for write-zeroes; unknown flags are unsupported.
        for (t, flags) in [(VIRTIO_BLK_T_DISCARD, 1u32), (VIRTIO_BLK_T_WRITE_ZEROES, 2)] {
            let seg = DiscardSegment {
                sector: 0.into(),
                num_sectors: 1.into(),
                flags: flags.into(),
            };
            let e = execute(
                &d,
                &hdr(t, 0),
                &mut Cursor::new(seg.as_slice().to_vec()),
                16,
                &mut Vec::new(),
                0,
            )
            .unwrap_err();
            assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP, "type {t} flags {flags}");
        }
        let seg = DiscardSegment {
            sector: 0.into(),
            num_sectors: 1.into(),
            flags: 1.into(),
        };
        execute(
            &d,
            &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
            &mut Cursor::new(seg.as_slice().to_vec()),
            16,
            &mut Vec::new(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let f = disk_file(8);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let d = Disk {
            file: &file,
            capacity_sectors: 8,
            read_only: false,
            id: &ID,
        };
        let seg = DiscardSegment {
            sector: 2.into(),
            num_sectors: 2.into(),
            flags: 0.into(),
        };
        execute(
            &d,
            &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
            &mut Cursor::new(seg.as_slice().to_vec()),
            16,
            &mut Vec::new(),
            0,
        )
        .unwrap();
        let all = std::fs::read(f.path()).unwrap();
        assert!(all[1024..2048].iter().all(|b| *b == 0));
        assert!(all[2048..2560].iter().all(|b| *b == 4), "neighbours untouched");
        assert_eq!(all.len(), 8 * 512, "size kept");
        let bad = DiscardSegment {
            sector: 7.into(),
            num_sectors: 2.into(),
            flags: 0.into(),
        };
        let e = execute(
            &d,
            &hdr(VIRTIO_BLK_T_DISCARD, 0),
            &mut Cursor::new(bad.as_slice().to_vec()),
            16,
            &mut Vec::new(),
            0,
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::OutOfRange { .. }));
        let e = execute(
            &d,
            &hdr(VIRTIO_BLK_T_DISCARD, 0),
            &mut Cursor::new(vec![0; 8]),
            8,
            &mut Vec::new(),
            0,
        )
        .unwrap_err();
        assert_eq!(e, RequestError::BadSegment);
    }
}
