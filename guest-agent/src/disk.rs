//! Block devices whose image the host replaced while the guest runs: the
//! new capacity arrives through an asynchronous configuration-change
//! interrupt, and blocks cached from the old image must not be read as
//! the new one's.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 97)`.
const BLKFLSBUF: libc::c_ulong = 0x1261;
/// The config-change work runs within milliseconds on a fast host; an
/// emulated guest kernel can take far longer.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(5);

pub fn size_bytes(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Drops the device's cached blocks (dirty ones are written first).
pub fn flush_cache(f: &File) -> io::Result<()> {
    // SAFETY: BLKFLSBUF takes no argument beyond the descriptor.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `device` reports `expect` bytes (rounded down to whole
/// sectors, as the host reports them), then drops its cached blocks.
pub fn settle(device: &Path, expect: u64, within: Duration) -> io::Result<()> {
    let f = File::open(device)?;
    let want = expect / 512 * 512;
    let deadline = Instant::now() + within;
    loop {
        let have = size_bytes(&f)?;
        if have == want {
            break;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} reports {have} bytes after {within:?}, not the new image's {want}",
                    device.display()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
    flush_cache(&f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let exe = std::env::current_exe().unwrap();
        let e = settle(&exe, 4096, Duration::from_millis(10)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
