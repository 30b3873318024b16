//! Making a guest restored from a snapshot unique: every copy of a template
//! starts with the same random pool and a stale clock.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// RNDADDENTROPY and RNDRESEEDCRNG from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's pool, credited as full entropy (it comes
/// from the host's getrandom), and makes the CRNG reseed from it now rather
/// than at its next scheduled reseed.
pub fn mix_entropy(seed: &[u8]) -> io::Result<()> {
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: the buffer holds the header and buf_size bytes the kernel reads.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops what the guest cached of every virtio disk: a template is booted
/// with a placeholder disk, and its restored copies are given the real
/// root image in its place, whose blocks must be read afresh.
pub fn forget_disk_contents() -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir("/dev")?.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("vd") {
            continue;
        }
        let f = std::fs::File::open(e.path())?;
        crate::disk::flush_cache(&f)?;
        n += 1;
    }
    Ok(n)
}

pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
