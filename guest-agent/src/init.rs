//! What PID 1 of the guest does before serving: leave the initramfs for a
//! tmpfs root (pivot_root, which containers need, refuses the initramfs),
//! mount the API filesystems, bring up loopback; and what it does last.

use std::ffi::CString;
use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct InitError {
    what: String,
    source: io::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError { what, source }
}

fn c(s: &str) -> CString {
    // Only called with literals below, none holding a NUL.
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if ret < 0 {
        return Err(err(format!("mounting {fstype} on {target}"))(io::Error::last_os_error()));
    }
    Ok(())
}

fn sys(ret: libc::c_int, what: &str) -> Result<(), InitError> {
    if ret < 0 {
        return Err(err(what)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Moves a fresh tmpfs over `/` and chroots into it.
fn leave_initramfs() -> Result<(), InitError> {
    mount("tmpfs", "/newroot", "tmpfs", libc::MS_NOSUID, "mode=755")?;
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        std::fs::create_dir_all(Path::new("/newroot").join(d)).map_err(err("new root"))?;
    }
    // SAFETY: plain system calls on literal paths.
    unsafe {
        sys(libc::chdir(c"/newroot".as_ptr()), "chdir /newroot")?;
        sys(
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ),
            "moving the new root",
        )?;
        sys(libc::chroot(c".".as_ptr()), "chroot")?;
        sys(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    Ok(())
}

fn loopback_up() -> Result<(), InitError> {
    // SAFETY: an ioctl on a fresh datagram socket with a zeroed ifreq whose
    // name is "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        sys(fd, "socket for loopback")?;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let ret = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        libc::close(fd);
        sys(ret, "bringing up lo")
    }
}

/// Everything PID 1 sets up before it serves.
pub fn boot() -> Result<(), InitError> {
    leave_initramfs()?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=755")?;
    mount("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=620,ptmxmode=666",
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=755")?;
    mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777")?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev | libc::MS_NOEXEC,
        "",
    )?;
    loopback_up()?;
    Ok(())
}

/// Ends the VM: with `reboot=k` the guest resets through the keyboard
/// controller, and the VMM exits 0.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 exiting panics the kernel,
    // which with panic=1 also resets.
    std::process::exit(1)
}
