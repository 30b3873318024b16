//! What the VMM gives up before the guest runs, so that a device-model bug
//! a guest exploits holds as little as possible: every capability, the
//! right to gain privileges through exec, ptrace and core dumps by its
//! peers, root itself when jailed, and more than a few thousand
//! descriptors. Called on the main
//! thread before any other thread exists, since capabilities and
//! `no_new_privs` are per thread and threads inherit them.

use std::io;

/// Descriptors the VMM may hold: vsock connections (at most
/// `MAX_CONNECTIONS`), disks, eventfds, API clients, with room to spare.
pub const MAX_OPEN_FILES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("locking the VMM down: {what}: {source}")]
pub struct HardenError {
    what: &'static str,
    source: io::Error,
}

fn check(what: &'static str, ret: libc::c_int) -> Result<(), HardenError> {
    if ret < 0 {
        return Err(HardenError {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub fn lock_down() -> Result<(), HardenError> {
    keep_heaps();
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given.
    check("no core files", unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) })?;
    if let Some(max) = crate::jail::max_file_bytes() {
        cap_file_size(max)?;
    }
    lower_open_files()?;
    // SAFETY: prctl with integer arguments only.
    check("not dumpable", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    drop_capabilities()?;
    // SAFETY: as above.
    check("no new privileges", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}

/// Files the VMM writes stop growing at `max` bytes. A write past it
/// fails (EFBIG) instead of killing the VMM: its log going quiet is
/// better than the VM going away.
fn cap_file_size(max: u64) -> Result<(), HardenError> {
    let limit = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads the struct it is given.
    check("file size", unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) })?;
    // SAFETY: sets the disposition of one signal to "ignore"; no handler.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(HardenError {
            what: "file size",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// glibc, the first time it shrinks a thread's heap, opens
/// /proc/sys/vm/overcommit_memory; the filtered vCPU and event-loop
/// threads may not open files. A trim threshold no heap reaches means no
/// shrink (freed memory stays with the process; large blocks are mapped
/// and unmapped on their own, as before).
fn keep_heaps() {
    // SAFETY: mallopt only sets a malloc tunable; no thread but this one
    // exists yet.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
}

fn lower_open_files() -> Result<(), HardenError> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    check("open files", unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) })?;
    let cap = now.rlim_max.min(MAX_OPEN_FILES);
    let lowered = libc::rlimit {
        rlim_cur: now.rlim_cur.min(cap),
        rlim_max: cap,
    };
    // SAFETY: setrlimit reads the struct it is given.
    check("open files", unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) })
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the bounding, ambient, inheritable, permitted and effective
/// sets. A VMM started without privileges has nothing to drop: the
/// bounding set then stays (it needs CAP_SETPCAP to change), which grants
/// nothing with empty permitted sets and `no_new_privs`.
fn drop_capabilities() -> Result<(), HardenError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            // EINVAL: past the last capability; EPERM: no CAP_SETPCAP.
            break;
        }
    }
    // SAFETY: as above. Fails only on kernels without ambient sets.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    // After the bounding set (that needs CAP_SETPCAP), before the rest.
    if let Some((uid, gid)) = crate::jail::identity() {
        crate::jail::take_identity(uid, gid).map_err(|source| HardenError {
            what: "taking the jail's uid and gid",
            source,
        })?;
    }
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3).
    check("dropping capabilities", unsafe {
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int
    })
}

#[cfg(test)]
mod tests {
    /// A write past the cap fails with EFBIG; the writer lives on.
    #[test]
    fn files_stop_growing_at_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let path = std::ffi::CString::new(d.path().join("log").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: the child only makes system calls on memory prepared
        // before the fork, and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            let code = unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
                let block = [b'x'; 4096];
                if fd < 0 || super::cap_file_size(8192).is_err() {
                    1
                } else if libc::write(fd, block.as_ptr().cast(), 4096) != 4096
                    || libc::write(fd, block.as_ptr().cast(), 4096) != 4096
                {
                    2
                } else if libc::write(fd, block.as_ptr().cast(), 1) != -1 || *libc::__errno_location() != libc::EFBIG {
                    3
                } else {
                    0
                }
            };
            // SAFETY: ends the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "killed: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "1 set-up, 2 under the cap, 3 past it");
        assert_eq!(std::fs::metadata(d.path().join("log")).unwrap().len(), 8192);
    }

    /// In a child, since it drops what the test process holds for good.
    #[test]
    fn lock_down_leaves_nothing_to_use() {
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = if super::lock_down().is_err() {
                1
            } else {
                // SAFETY: prctl and capget with integer or owned arguments.
                unsafe {
                    let header = super::CapHeader {
                        version: super::CAP_VERSION_3,
                        pid: 0,
                    };
                    let mut data = [super::CapData::default(); 2];
                    let caps = libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr());
                    let none = data
                        .iter()
                        .all(|d| d.effective == 0 && d.permitted == 0 && d.inheritable == 0);
                    if libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 {
                        2
                    } else if libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1 {
                        3
                    } else if caps != 0 || !none {
                        4
                    } else {
                        0
                    }
                }
            };
            // SAFETY: ends the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1 lock_down failed, 2 dumpable, 3 new privileges, 4 capabilities"
        );
    }
}
