//! Starting the VMM in a PID namespace of its own, which
//! `std::process::Command` cannot do (the namespace must be given at
//! clone time): clone3 with namespace flags, then in the child only
//! system calls on memory prepared before the clone, then execve.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

/// The kernel's `struct clone_args` (version 0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// In the child, the read end of a pipe whose write end
/// [`Spawned::parent_alive`] holds: it reads end-of-file once we are gone.
pub const PARENT_FD: RawFd = 3;

/// A started child.
pub struct Spawned {
    pub pid: libc::pid_t,
    /// Held for the child's life (see [`PARENT_FD`]).
    pub parent_alive: OwnedFd,
}

/// What the child does before it becomes `program`.
pub struct ChildSetup<'a> {
    /// `cgroup.procs` files to join (the child writes "0" to each).
    pub join_cgroups: &'a [RawFd],
    /// The child's stdout and stderr.
    pub log: RawFd,
    /// Namespaces (CLONE_NEW*) the child starts in.
    pub namespaces: u64,
}

fn cstring(s: OsString) -> io::Result<CString> {
    CString::new(s.into_vec()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in an argument"))
}

fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these; each is owned once.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `program` with `args` as a child of the calling thread (which
/// its parent-death signal follows); returns its pid once it has
/// executed, or why it could not.
pub fn spawn(program: &Path, args: &[OsString], setup: &ChildSetup) -> io::Result<Spawned> {
    let path = cstring(program.as_os_str().to_owned())?;
    let mut argv_c = vec![path.clone()];
    for a in args {
        argv_c.push(cstring(a.clone())?);
    }
    let env_c: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstring(kv)
        })
        .collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let devnull = File::open("/dev/null")?;
    // The child learns through `alive` (hung up) that we are gone, and
    // tells us through `errors` why it could not exec.
    let (alive_rx, alive_tx) = pipe()?;
    let (mut errors_rx, errors_tx) = pipe()?;
    let mut args = CloneArgs {
        flags: setup.namespaces,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM forks: the child gets a copy of our
    // memory and returns 0 here; it then runs `child` only, which makes
    // system calls and never returns.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0
        && matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM)
        )
    {
        // Older kernels, and seccomp profiles that hide clone3 (ENOSYS in
        // container runtimes' defaults, EPERM in some others) so that
        // callers fall back: clone(2) takes the same flags, under the same
        // checks. A null stack makes it a fork (the child runs on a copy
        // of ours).
        // SAFETY: as for clone3 above.
        pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                setup.namespaces | libc::SIGCHLD as u64,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see `child`.
        unsafe {
            child(
                setup,
                &Prepared {
                    path: path.as_ptr(),
                    argv: argv.as_ptr(),
                    envp: envp.as_ptr(),
                    devnull: devnull.as_raw_fd(),
                    alive_rx: alive_rx.as_raw_fd(),
                    alive_tx: alive_tx.as_raw_fd(),
                    errors_tx: errors_tx.as_raw_fd(),
                },
            )
        }
    }
    let pid = pid as libc::pid_t;
    drop(errors_tx);
    let mut report = Vec::new();
    errors_rx.read_to_end(&mut report)?;
    if let Ok(errno) = <[u8; 4]>::try_from(&report[..]) {
        let mut status = 0;
        // SAFETY: reaps the child we made, which is exiting.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(Spawned {
        pid,
        parent_alive: alive_tx,
    })
}

struct Prepared {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    devnull: RawFd,
    alive_rx: RawFd,
    alive_tx: RawFd,
    errors_tx: RawFd,
}

/// The child's side.
///
/// # Safety
/// Runs between clone and exec in a copy of a multithreaded process:
/// only async-signal-safe system calls, on memory prepared before the
/// clone; never returns.
unsafe fn child(setup: &ChildSetup, p: &Prepared) -> ! {
    let fail = || -> ! {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(p.errors_tx, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    };
    // Before exec, so nothing of the VMM runs uncharged.
    for fd in setup.join_cgroups {
        if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
            fail();
        }
    }
    if libc::dup2(p.devnull, 0) < 0 || libc::dup2(setup.log, 1) < 0 || libc::dup2(setup.log, 2) < 0 {
        fail();
    }
    // Kept through exec: dup2 clears close-on-exec, except onto itself.
    let kept = if p.alive_rx == PARENT_FD {
        libc::fcntl(PARENT_FD, libc::F_SETFD, 0)
    } else {
        libc::dup2(p.alive_rx, PARENT_FD)
    };
    if kept < 0 {
        fail();
    }
    // Terminal signals (Ctrl-C) reach the runtime only; it forwards them.
    if libc::setpgid(0, 0) != 0 {
        fail();
    }
    // Our blocked and ignored signals would survive exec; the VMM must
    // see its own.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
        fail();
    }
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
        fail();
    }
    // We may have died before the prctl took effect: then no one holds
    // the pipe's write end any more.
    libc::close(p.alive_tx);
    let mut poll = libc::pollfd {
        fd: p.alive_rx,
        events: libc::POLLIN,
        revents: 0,
    };
    poll.fd = PARENT_FD;
    if libc::poll(&mut poll, 1, 0) != 0 {
        *libc::__errno_location() = libc::ESRCH;
        fail();
    }
    libc::execve(p.path, p.argv, p.envp);
    fail()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    const INNER: &str = "BULKHEAD_TEST_CLONE3_HIDDEN";

    /// Under a seccomp profile that hides clone3 (as container runtimes'
    /// defaults do), the VMM still starts in its namespaces, through
    /// clone(2). The check runs in a copy of this test binary started
    /// under such a filter.
    #[test]
    fn namespaces_are_made_without_clone3() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: new namespaces need root");
            return;
        }
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "spawn::tests::inner_spawn_with_clone3_hidden",
            "--ignored",
            "--nocapture",
        ])
        .env(INNER, "1");
        // SAFETY: only prctl calls on a filter prepared before the fork.
        unsafe {
            cmd.pre_exec(|| {
                const LD_W_ABS: u16 = 0x20;
                const JEQ_K: u16 = 0x15;
                const RET_K: u16 = 0x06;
                let filter = [
                    libc::sock_filter {
                        code: LD_W_ABS,
                        jt: 0,
                        jf: 0,
                        k: 0,
                    },
                    libc::sock_filter {
                        code: JEQ_K,
                        jt: 0,
                        jf: 1,
                        k: libc::SYS_clone3 as u32,
                    },
                    libc::sock_filter {
                        code: RET_K,
                        jt: 0,
                        jf: 0,
                        k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
                    },
                    libc::sock_filter {
                        code: RET_K,
                        jt: 0,
                        jf: 0,
                        k: libc::SECCOMP_RET_ALLOW,
                    },
                ];
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("1 passed"), "the inner check did not run: {text}");
    }

    #[test]
    #[ignore = "run by namespaces_are_made_without_clone3 under its filter"]
    fn inner_spawn_with_clone3_hidden() {
        assert!(
            std::env::var_os(INNER).is_some(),
            "run by namespaces_are_made_without_clone3"
        );
        // SAFETY: a clone3 with no arguments fails before doing anything.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null_mut::<CloneArgs>(), 0usize) };
        assert_eq!((r, io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOSYS)));
        let log = File::create("/dev/null").unwrap();
        let setup = ChildSetup {
            join_cgroups: &[],
            log: log.as_raw_fd(),
            namespaces: (libc::CLONE_NEWPID | libc::CLONE_NEWUTS) as u64,
        };
        let child = spawn(Path::new("/bin/sleep"), &["30".into()], &setup).unwrap();
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/uts")).unwrap();
        assert_ne!(ns(&child.pid.to_string()), ns("self"));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap();
        assert_eq!(nspid.split_whitespace().last(), Some("1"));
        // SAFETY: ends and reaps the child we started.
        unsafe {
            libc::kill(child.pid, libc::SIGKILL);
            libc::waitpid(child.pid, std::ptr::null_mut(), 0);
        }
    }
}
