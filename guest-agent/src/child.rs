//! Code that runs in a child cloned from the agent, which is multi-threaded.
//!
//! The child is a copy of one thread: another thread may have held the
//! allocator's lock at the moment of the clone. So everything here makes
//! raw system calls on data the parent prepared (`plan.rs`): no allocation,
//! no locks, no formatting. Failures go back to the agent as fixed-size
//! records on a control socket, then the child exits with 127.

use std::ffi::{c_char, c_int, CString};
use std::os::fd::RawFd;

use crate::plan::{ExecPlan, InitPlan, JoinPlan, MountStep};

/// Record tags on the control socket (`[tag, stage, 0, 0, value i32 LE]`).
pub const TAG_READY: u8 = b'R';
pub const TAG_ERROR: u8 = b'E';
pub const TAG_PID: u8 = b'P';
pub const RECORD_LEN: usize = 8;

/// Which step failed, for the error message the agent builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Cgroup = 1,
    Namespaces,
    Propagation,
    Mount,
    Devices,
    Hostname,
    PivotRoot,
    MaskedPaths,
    ReadonlyPaths,
    ReadonlyRoot,
    Terminal,
    Clone,
    Stdio,
    Cwd,
    Rlimit,
    Capabilities,
    Groups,
    Gid,
    Uid,
    NoNewPrivileges,
    Exec,
    Setns,
    OomScoreAdj,
    Sysctl,
    Seccomp,
}

/// Each stage with the words the agent's error message uses for it.
const STAGES: [(Stage, &str); 25] = [
    (Stage::Cgroup, "joining the container's cgroup"),
    (Stage::Namespaces, "creating namespaces"),
    (Stage::Propagation, "making mounts private"),
    (Stage::Mount, "mounting"),
    (Stage::Devices, "creating /dev nodes"),
    (Stage::Hostname, "setting the hostname"),
    (Stage::PivotRoot, "entering the root filesystem"),
    (Stage::MaskedPaths, "masking paths"),
    (Stage::ReadonlyPaths, "making paths read-only"),
    (Stage::ReadonlyRoot, "making the root read-only"),
    (Stage::Terminal, "opening a terminal (is devpts mounted at /dev/pts?)"),
    (Stage::Clone, "starting the process"),
    (Stage::Stdio, "connecting stdio"),
    (Stage::Cwd, "changing to the working directory"),
    (Stage::Rlimit, "setting rlimits"),
    (Stage::Capabilities, "setting capabilities"),
    (Stage::Groups, "setting supplementary groups"),
    (Stage::Gid, "setting the group id"),
    (Stage::Uid, "setting the user id"),
    (Stage::NoNewPrivileges, "setting no_new_privileges"),
    (Stage::Exec, "executing the command"),
    (Stage::Setns, "joining the container's namespaces"),
    (Stage::OomScoreAdj, "setting oom_score_adj (is /proc mounted?)"),
    (Stage::Sysctl, "setting a sysctl"),
    (Stage::Seccomp, "loading the seccomp filter"),
];

impl Stage {
    pub fn from_u8(v: u8) -> Option<Stage> {
        STAGES.iter().map(|(s, _)| *s).find(|s| *s as u8 == v)
    }

    pub fn describe(self) -> &'static str {
        STAGES
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("an unknown step", |(_, d)| d)
    }
}

/// Until `execve` (which makes a workload dumpable again, as any
/// program), this copy of the agent holds the agent's memory and
/// descriptors: once its capabilities and ids match the container's, a
/// container process could otherwise ptrace it or open its /proc files
/// (the class of runc's CVE-2016-9962).
fn undumpable() {
    // SAFETY: prctl on this process only; it cannot fail for these arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn record(ctl: RawFd, tag: u8, stage: u8, value: i32) {
    let v = value.to_le_bytes();
    let rec = [tag, stage, 0, 0, v[0], v[1], v[2], v[3]];
    // SAFETY: writes 8 bytes from a stack array to a descriptor we own.
    unsafe { libc::write(ctl, rec.as_ptr().cast(), RECORD_LEN) };
}

/// Reports a failed step with the current errno, then exits.
fn fail(ctl: RawFd, stage: Stage) -> ! {
    let e = errno();
    record(ctl, TAG_ERROR, stage as u8, e);
    // SAFETY: _exit never returns and runs no destructors or atexit handlers.
    unsafe { libc::_exit(127) }
}

fn check(ret: c_int, ctl: RawFd, stage: Stage) {
    if ret < 0 {
        fail(ctl, stage);
    }
}

/// A fork-like clone: the child gets a copy of this thread's stack.
/// Returns the child's pid in the parent and 0 in the child.
pub fn raw_clone(flags: libc::c_ulong) -> libc::pid_t {
    // SAFETY: clone with a null stack behaves like fork; the child only runs
    // code from this module on pre-built data.
    unsafe { libc::syscall(libc::SYS_clone, flags | libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) as libc::pid_t }
}

/// Closes every descriptor from 3 up except `keep` (sorted), so a child
/// holds no other container's pipes and streams.
fn close_others(keep: &[RawFd]) {
    let mut low: u32 = 3;
    for &k in keep {
        let k = k as u32;
        if k > low {
            // SAFETY: close_range only closes descriptors.
            unsafe { libc::syscall(libc::SYS_close_range, low, k - 1, 0) };
        }
        low = low.max(k + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, low, u32::MAX, 0) };
}

fn block_all_signals() {
    // SAFETY: sigset_t is plain data that sigfillset initialises.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn ptr(c: &CString) -> *const c_char {
    c.as_ptr()
}

/// Creates each directory of a mount target, refusing symlinks on the way:
/// the image is untrusted, and a link like `proc -> /run` would otherwise
/// put a container mount over the agent's own directories.
fn mkdirs(dirs: &[CString], ctl: RawFd) {
    for d in dirs {
        // SAFETY: NUL-terminated paths; stat fills a zeroed struct.
        unsafe {
            libc::mkdir(ptr(d), 0o755);
            let mut st: libc::stat = std::mem::zeroed();
            if libc::lstat(ptr(d), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                record(ctl, TAG_ERROR, Stage::Mount as u8, libc::ELOOP);
                libc::_exit(127);
            }
        }
    }
}

fn apply_mount(m: &MountStep, ctl: RawFd) {
    mkdirs(&m.mkdirs, ctl);
    if let Some(file) = &m.create_file {
        // O_NOFOLLOW: an image's symlink must not aim the bind elsewhere.
        let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: creates (or opens) the file to bind onto, then closes it.
        unsafe {
            let fd = libc::open(ptr(file), flags, 0o644);
            if fd < 0 {
                fail(ctl, Stage::Mount);
            }
            libc::close(fd);
        }
    }
    let data = m.data.as_ref().map_or(std::ptr::null(), |d| ptr(d).cast());
    // SAFETY: all strings are NUL-terminated and live in the plan.
    let ret = unsafe { libc::mount(ptr(&m.source), ptr(&m.target), ptr(&m.fstype), m.flags, data) };
    check(ret, ctl, Stage::Mount);
    if let Some(flags) = m.remount_flags {
        // SAFETY: as above; a bind mount takes MS_RDONLY only on remount.
        let ret = unsafe {
            libc::mount(
                std::ptr::null(),
                ptr(&m.target),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        check(ret, ctl, Stage::Mount);
    }
    for (src, dst) in &m.device_binds {
        // SAFETY: as above.
        unsafe {
            let fd = libc::open(ptr(dst), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
            if fd < 0 {
                fail(ctl, Stage::Devices);
            }
            libc::close(fd);
            let ret = libc::mount(ptr(src), ptr(dst), std::ptr::null(), libc::MS_BIND, std::ptr::null());
            check(ret, ctl, Stage::Devices);
        }
    }
    for (target, link) in &m.symlinks {
        // SAFETY: as above; an existing link is left alone.
        unsafe { libc::symlink(ptr(target), ptr(link)) };
    }
}

/// `linux.devices`: a node already there (the standard ones are bound
/// from the agent's) is left as it is.
fn make_nodes(plan: &InitPlan, ctl: RawFd) {
    for n in &plan.device_nodes {
        mkdirs(&n.mkdirs, ctl);
        // SAFETY: NUL-terminated paths from the plan. The node was just
        // made and no container process runs yet, so chmod and lchown
        // reach it, not a link put in its place.
        unsafe {
            if libc::mknod(ptr(&n.path), n.mode, n.dev) < 0 {
                if errno() != libc::EEXIST {
                    fail(ctl, Stage::Devices);
                }
                continue;
            }
            check(libc::chmod(ptr(&n.path), n.perm), ctl, Stage::Devices);
            check(libc::lchown(ptr(&n.path), n.uid, n.gid), ctl, Stage::Devices);
        }
    }
}

fn mask_paths(plan: &InitPlan, ctl: RawFd) {
    for p in &plan.masked_paths {
        // SAFETY: stat into a zeroed struct; mounts on NUL-terminated paths.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(ptr(p), &mut st) < 0 {
                continue; // absent paths need no mask
            }
            let ret = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    ptr(p),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    c"size=0".as_ptr().cast(),
                )
            } else {
                libc::mount(
                    c"/dev/null".as_ptr(),
                    ptr(p),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            check(ret, ctl, Stage::MaskedPaths);
        }
    }
    for p in &plan.readonly_paths {
        // SAFETY: as above.
        unsafe {
            let ret = libc::mount(
                ptr(p),
                ptr(p),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            );
            if ret < 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(ctl, Stage::ReadonlyPaths);
            }
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC;
            let ret = libc::mount(std::ptr::null(), ptr(p), std::ptr::null(), flags, std::ptr::null());
            check(ret, ctl, Stage::ReadonlyPaths);
        }
    }
}

/// Opens a pty in the container's own devpts; returns (master, slave).
fn open_pty(ctl: RawFd) -> (RawFd, RawFd) {
    // SAFETY: ioctls on the descriptor just opened, with the argument types
    // the kernel documents (int for TIOCSPTLCK, flags for TIOCGPTPEER).
    unsafe {
        let master = libc::open(
            c"/dev/pts/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            fail(ctl, Stage::Terminal);
        }
        let unlock: c_int = 0;
        check(libc::ioctl(master, libc::TIOCSPTLCK, &unlock), ctl, Stage::Terminal);
        let slave = libc::ioctl(
            master,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        check(slave, ctl, Stage::Terminal);
        (master, slave)
    }
}

/// Sends one record with a descriptor attached (SCM_RIGHTS).
fn send_fd(ctl: RawFd, tag: u8, fd: RawFd) -> bool {
    let rec = [tag, 0, 0, 0, 0, 0, 0, 0];
    // u64s keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr points at the stack buffers above, sized with
    // CMSG_SPACE for one int; CMSG_* only compute addresses inside cbuf.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: rec.as_ptr() as *mut _,
            iov_len: RECORD_LEN,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), fd);
        libc::sendmsg(ctl, &msg, 0) == RECORD_LEN as isize
    }
}

/// The container's PID 1: builds the container's view of the world, waits
/// for `start`, starts the workload, then forwards signals to it and reaps
/// orphans until it exits, and exits with the workload's status.
pub fn container_init(plan: &InitPlan) -> ! {
    let ctl = plan.ctl;
    block_all_signals();
    undumpable();
    close_others(&plan.keep_fds);
    // SAFETY: "0" moves the writer into the cgroup the descriptor names.
    if unsafe { libc::write(plan.cgroup_procs, c"0".as_ptr().cast(), 1) } < 0 {
        fail(ctl, Stage::Cgroup);
    }
    // SAFETY: plain system calls on pre-built data.
    unsafe {
        libc::close(plan.cgroup_procs);
        for &(nstype, fd) in &plan.join {
            check(libc::setns(fd, nstype), ctl, Stage::Setns);
            libc::close(fd);
        }
        check(libc::unshare(libc::CLONE_NEWCGROUP), ctl, Stage::Namespaces);
        let ret = libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        check(ret, ctl, Stage::Propagation);
    }
    for m in &plan.mounts {
        apply_mount(m, ctl);
    }
    make_nodes(plan, ctl);
    if let Some(h) = &plan.hostname {
        // SAFETY: the name's bytes without the NUL.
        check(
            unsafe { libc::sethostname(ptr(h), h.as_bytes().len()) },
            ctl,
            Stage::Hostname,
        );
    }
    for (path, value) in &plan.sysctls {
        // SAFETY: open/write/close on pre-built data; the agent's /proc
        // shows this process's new IPC and UTS namespaces.
        unsafe {
            let fd = libc::open(ptr(path), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, value.as_ptr().cast(), value.len()) != value.len() as isize {
                fail(ctl, Stage::Sysctl);
            }
            libc::close(fd);
        }
    }
    // SAFETY: the usual pivot into "." and lazy detach of the old root.
    unsafe {
        check(libc::chdir(ptr(&plan.rootfs)), ctl, Stage::PivotRoot);
        let dot = c".".as_ptr();
        check(
            libc::syscall(libc::SYS_pivot_root, dot, dot) as c_int,
            ctl,
            Stage::PivotRoot,
        );
        check(libc::umount2(dot, libc::MNT_DETACH), ctl, Stage::PivotRoot);
        check(libc::chdir(c"/".as_ptr()), ctl, Stage::PivotRoot);
    }
    mask_paths(plan, ctl);
    if plan.root_readonly {
        // Last, as runc does: the mounts above were made into the root.
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        // SAFETY: a remount of "/" by NUL-terminated path; no data.
        let ret = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        check(ret, ctl, Stage::ReadonlyRoot);
    }

    let mut stdio = plan.stdio;
    let mut slave = -1;
    if plan.workload.terminal {
        let (master, s) = open_pty(ctl);
        slave = s;
        stdio = [s, s, s];
        if !send_fd(ctl, TAG_READY, master) {
            fail(ctl, Stage::Terminal);
        }
        // SAFETY: the agent has its own copy now.
        unsafe { libc::close(master) };
    } else {
        record(ctl, TAG_READY, 0, 0);
    }

    // Wait for `start`; anything but 'S' (the agent dropping the container)
    // ends the container before any workload runs.
    let mut go = [0u8; 1];
    // SAFETY: reads one byte into a stack buffer.
    let n = unsafe { libc::read(ctl, go.as_mut_ptr().cast(), 1) };
    if n != 1 || go[0] != b'S' {
        // SAFETY: as in fail().
        unsafe { libc::_exit(0) };
    }
    if !plan.helper_init {
        // The workload is PID 1 of its namespace, as under runc; the agent
        // is its parent and reaps it.
        exec_process(&plan.workload, stdio, ctl);
    }
    let workload = raw_clone(0);
    if workload < 0 {
        fail(ctl, Stage::Clone);
    }
    if workload == 0 {
        exec_process(&plan.workload, stdio, ctl);
    }
    // SAFETY: dropping this process's copies, so streams see EOF when the
    // workload's side closes and the agent sees exec succeed.
    unsafe {
        for fd in plan.stdio.into_iter().chain([slave, ctl]) {
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
    // SAFETY: names this process for ps; the string is a literal.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"bulkhead-init".as_ptr()) };
    drop_to_kill_only(plan.workload.last_cap);
    supervise(workload)
}

/// The init only forwards signals and reaps from here on: keep CAP_KILL
/// (the workload may run as another user) and nothing else, and make it
/// undumpable so a workload allowed to ptrace cannot borrow its privileges.
fn drop_to_kill_only(last_cap: u32) {
    const CAP_KILL: u32 = 5;
    let kill = 1u64 << CAP_KILL;
    // SAFETY: prctl and capset with the documented arguments; failures
    // leave the init as privileged as before, which the agent logs nowhere
    // (no allocation here), so they are ignored.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        for cap in 0..=last_cap {
            if kill & (1u64 << cap) == 0 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
        }
        let mut hdr = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: kill as u32,
                permitted: kill as u32,
                inheritable: 0,
            },
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr());
    }
}

/// Forwards every signal to the workload and reaps orphans; exits with the
/// workload's status the shell way (code, or 128 + signal).
fn supervise(workload: libc::pid_t) -> ! {
    // SAFETY: sigwaitinfo and waitpid on stack data.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&all, &mut info);
            if sig < 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(workload, sig);
                continue;
            }
            loop {
                let mut status: c_int = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
                if pid == workload {
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    };
                    libc::_exit(code);
                }
            }
        }
    }
}

/// A container that shares another's PID namespace: its init must be
/// created inside it (a process cannot enter a PID namespace itself), so
/// this middle process joins it, clones the init as a child of the agent
/// (CLONE_PARENT), reports the init's pid and exits. The init waits for
/// the agent to register it ('G'), then carries on as `container_init`.
pub fn init_in_pid_namespace(plan: &InitPlan, pid_ns: RawFd, flags: libc::c_ulong) -> ! {
    let ctl = plan.ctl;
    block_all_signals();
    undumpable();
    // SAFETY: setns on a descriptor the agent opened for this call.
    check(unsafe { libc::setns(pid_ns, libc::CLONE_NEWPID) }, ctl, Stage::Setns);
    let pid = raw_clone(flags | libc::CLONE_PARENT as libc::c_ulong);
    if pid < 0 {
        fail(ctl, Stage::Clone);
    }
    if pid == 0 {
        let mut go = [0u8; 1];
        // SAFETY: reads one byte into a stack buffer; closes our copy.
        unsafe {
            if libc::read(ctl, go.as_mut_ptr().cast(), 1) != 1 || go[0] != b'G' {
                libc::_exit(127);
            }
            libc::close(pid_ns);
        }
        container_init(plan);
    }
    record(ctl, TAG_PID, 0, pid);
    // SAFETY: as in fail().
    unsafe { libc::_exit(0) }
}

/// `exec`: joins the container (cgroup, namespaces), then clones the
/// process as a child of the agent (CLONE_PARENT) inside the container's
/// PID namespace, reports its pid and exits.
pub fn exec_intermediate(plan: &JoinPlan) -> ! {
    let ctl = plan.ctl;
    block_all_signals();
    // Inherited by the process it clones, which waits in the container's
    // PID namespace before it becomes the workload.
    undumpable();
    close_others(&plan.keep_fds);
    // SAFETY: as in container_init.
    unsafe {
        if libc::write(plan.cgroup_procs, c"0".as_ptr().cast(), 1) < 0 {
            fail(ctl, Stage::Cgroup);
        }
        for &ns in &plan.namespaces {
            check(libc::setns(ns, 0), ctl, Stage::Setns);
        }
    }
    let pid = raw_clone(libc::CLONE_PARENT as libc::c_ulong);
    if pid < 0 {
        fail(ctl, Stage::Clone);
    }
    if pid == 0 {
        // Run only once the agent has registered this pid, so its exit
        // can never be reaped before the agent knows whose it is.
        let mut go = [0u8; 1];
        // SAFETY: reads one byte into a stack buffer.
        if unsafe { libc::read(ctl, go.as_mut_ptr().cast(), 1) } != 1 || go[0] != b'G' {
            // SAFETY: as in fail().
            unsafe { libc::_exit(127) };
        }
        exec_process(&plan.process, plan.stdio, ctl);
    }
    record(ctl, TAG_PID, 0, pid);
    // SAFETY: as in fail().
    unsafe { libc::_exit(0) }
}

/// Becomes the workload: session, stdio, limits, identity, capabilities,
/// then execve. Never returns.
fn exec_process(p: &ExecPlan, stdio: [RawFd; 3], ctl: RawFd) -> ! {
    undumpable();
    // SAFETY: plain system calls on pre-built data throughout.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::setsid();
        // Move the sources above 2 first, so dup2 never overwrites one.
        let mut high = [0; 3];
        for (i, fd) in stdio.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            if high[i] < 0 {
                fail(ctl, Stage::Stdio);
            }
        }
        for (i, fd) in high.iter().enumerate() {
            check(libc::dup2(*fd, i as c_int), ctl, Stage::Stdio);
        }
        if p.terminal {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0), ctl, Stage::Terminal);
        }
        for (resource, limit) in &p.rlimits {
            check(libc::setrlimit(*resource, limit), ctl, Stage::Rlimit);
        }
        if let Some(text) = &p.oom_score_adj {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, text.as_ptr().cast(), text.len()) != text.len() as isize {
                fail(ctl, Stage::OomScoreAdj);
            }
            libc::close(fd);
        }
        if !p.no_new_privileges {
            // Without no_new_privileges, loading a filter needs
            // CAP_SYS_ADMIN, which the workload may not keep.
            load_seccomp(p, ctl);
        }
        for cap in 0..=p.last_cap {
            if p.caps.bounding & (1u64 << cap) == 0 {
                check(
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
                    ctl,
                    Stage::Capabilities,
                );
            }
        }
        libc::mkdir(ptr(&p.cwd), 0o755);
        // Raw system calls: glibc's wrappers would try to change the ids of
        // every thread the agent had, which this copy does not.
        let ret = libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr());
        check(ret as c_int, ctl, Stage::Groups);
        check(libc::syscall(libc::SYS_setgid, p.gid) as c_int, ctl, Stage::Gid);
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        check(libc::syscall(libc::SYS_setuid, p.uid) as c_int, ctl, Stage::Uid);
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        set_caps(p, ctl);
        check(libc::chdir(ptr(&p.cwd)), ctl, Stage::Cwd);
        libc::umask(p.umask);
        if p.no_new_privileges {
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                ctl,
                Stage::NoNewPrivileges,
            );
            // As late as can be: only execve runs under it here.
            load_seccomp(p, ctl);
        }
        let mut err = libc::ENOENT;
        for path in &p.exec_candidates {
            libc::execve(ptr(path), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
            let e = errno();
            // Keep the most telling error: permission beats absence.
            if e != libc::ENOENT && e != libc::ENOTDIR {
                err = e;
            }
        }
        record(ctl, TAG_ERROR, Stage::Exec as u8, err);
        libc::_exit(127)
    }
}

fn load_seccomp(p: &ExecPlan, ctl: RawFd) {
    let Some(sc) = &p.seccomp else { return };
    let prog = libc::sock_fprog {
        len: sc.filter.len() as libc::c_ushort,
        filter: sc.filter.as_ptr().cast_mut(),
    };
    // SAFETY: the program points at the plan's instructions, which outlive
    // the call; the kernel copies and checks them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            sc.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    check(ret as c_int, ctl, Stage::Seccomp);
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn set_caps(p: &ExecPlan, ctl: RawFd) {
    let c = &p.caps;
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: c.effective as u32,
            permitted: c.permitted as u32,
            inheritable: c.inheritable as u32,
        },
        CapData {
            effective: (c.effective >> 32) as u32,
            permitted: (c.permitted >> 32) as u32,
            inheritable: (c.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: capset with a version-3 header and two data words, the layout
    // linux/capability.h defines.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check(ret as c_int, ctl, Stage::Capabilities);
    for cap in 0..=p.last_cap {
        if c.ambient & (1u64 << cap) != 0 {
            // SAFETY: raising an ambient capability; needs it permitted and
            // inheritable, which the plan ensures.
            let ret = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            check(ret, ctl, Stage::Capabilities);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_round_trips_through_its_byte() {
        for (s, _) in STAGES {
            assert_eq!(Stage::from_u8(s as u8), Some(s));
        }
        assert_eq!(Stage::from_u8(0), None);
        assert_eq!(Stage::Exec.describe(), "executing the command");
    }
}
