//! The agent tier's harness: the real `bulkhead-agent` in its debug-only
//! listener mode, started as a host process in new PID and mount namespaces,
//! serving the real protocol on a Unix socket, with a busybox root filesystem
//! on a read-only loop device standing in for `/dev/vda`.
//!
//! Everything here is bounded: a stream that stays silent, a stdio port the
//! agent never connects, an agent that does not exit all fail the test after
//! [`TIMEOUT`] (or less) instead of hanging CI.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bulkhead_protocol::client::{Client, ClientError};
use bulkhead_protocol::defaults;
use bulkhead_protocol::frame::FrameError;
use bulkhead_protocol::messages::{CreateContainer, ErrorKind, Process, Request, Root, StdioTokens, User};
use bulkhead_runtime::stdio::{StdioPlan, StdioStreams};

use crate::text;

/// The safety net for anything that waits on the agent.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Fails the calling test where it cannot run: namespaces, mounts, loop
/// devices and cgroups all need root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the agent tier needs root (namespaces, mounts, loop devices, cgroups); CI runs it as root"
    );
}

/// The agent under test: `$BULKHEAD_AGENT`, or the workspace's debug build
/// (the listener mode is compiled out of release builds).
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("debug/bulkhead-agent"));
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p bulkhead-guest-agent`, a debug build)",
        path.display()
    );
    path
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path), "sha256sum");
    out.split_whitespace().next().unwrap_or_default().to_string()
}

/// A busybox root filesystem in an ext4 image, attached to a read-only loop
/// device.
pub struct Rootfs {
    dir: tempfile::TempDir,
    pub image: PathBuf,
    pub loop_dev: PathBuf,
    /// The image's digest when it was made, to show that no container wrote to it.
    pub sha256: String,
}

// A static is never dropped, so the image is shared through a Weak: the last
// agent to go detaches it, and a later test builds it again.
static ROOTFS: Mutex<Weak<Rootfs>> = Mutex::new(Weak::new());

impl Rootfs {
    pub fn shared() -> Arc<Rootfs> {
        let mut shared = ROOTFS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = shared.upgrade() {
            return r;
        }
        let r = Arc::new(Rootfs::build());
        *shared = Arc::downgrade(&r);
        r
    }

    fn build() -> Rootfs {
        let dir = tempfile::Builder::new().prefix("bh-rootfs").tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("bin/busybox"), crate::busybox()).unwrap();
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        let applets = run_ok(Command::new("/bin/busybox").arg("--list"), "/bin/busybox --list");
        for applet in applets
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox")
        {
            symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let image = dir.path().join("rootfs.ext4");
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-O", "^has_journal", "-d"])
                .arg(&root)
                .arg(&image)
                .arg("64M"),
            "mkfs.ext4 (install e2fsprogs)",
        );
        let sha256 = sha256(&image);
        let dev = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(&image),
            "losetup",
        );
        Rootfs {
            dir,
            image,
            loop_dev: PathBuf::from(dev.trim()),
            sha256,
        }
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        // A device still mounted somewhere is detached when that goes (the
        // kernel turns this into autoclear).
        let out = Command::new("losetup").arg("-d").arg(&self.loop_dev).output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!(
                "losetup -d {} ({}): {other:?}",
                self.loop_dev.display(),
                self.dir.path().display()
            ),
        }
    }
}

/// The host's cgroup2 mount (on a hybrid host, not /sys/fs/cgroup).
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2") {
            if let Some(mountpoint) = pre.split_whitespace().nth(4) {
                return PathBuf::from(mountpoint);
            }
        }
    }
    panic!("no cgroup2 mount on this host: the agent needs cgroup v2");
}

/// Whether containers can get a memory limit here, enabling the controller
/// for the agent's cgroup root where the host has it but does not delegate it.
pub fn memory_controller() -> Result<(), String> {
    let root = cgroup2_mount();
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!("host cgroup v2 has no memory controller ({})", root.display()));
    }
    let control = root.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).unwrap_or_default();
    if !enabled.split_whitespace().any(|c| c == "memory") {
        fs::write(&control, "+memory")
            .map_err(|e| format!("cannot enable the memory controller in {}: {e}", control.display()))?;
    }
    Ok(())
}

/// One process as seen from the host's /proc.
#[derive(Clone, Debug)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    pub starttime: u64,
    pub comm: String,
    pub cmdline: String,
}

impl ProcInfo {
    pub fn read(pid: u32) -> Option<ProcInfo> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // comm may hold spaces and parentheses; it ends at the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        Some(ProcInfo {
            pid,
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            starttime: f.get(19)?.parse().ok()?,
            comm,
            cmdline: text(&cmdline).replace('\0', " ").trim_end().to_string(),
        })
    }

    /// Dead: no longer there, a zombie, or its pid reused.
    pub fn is_gone(&self) -> bool {
        match ProcInfo::read(self.pid) {
            None => true,
            Some(now) => matches!(now.state, 'Z' | 'X') || now.starttime != self.starttime,
        }
    }
}

pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(ProcInfo::read)
        .collect()
}

/// Every process below `pid`, not `pid` itself.
pub fn descendants(pid: u32) -> Vec<ProcInfo> {
    let all = processes();
    let mut found: Vec<ProcInfo> = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            parents.push(p.pid);
            found.push(p.clone());
        }
    }
    found
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static NEXT_AGENT: AtomicU32 = AtomicU32::new(0);

pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::SeqCst))
}

/// A process running `args` as root with Docker's capabilities; `PATH` is
/// set because busybox's applets are all in /bin.
pub fn process(args: &[&str]) -> Process {
    Process {
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        capabilities: Some(defaults::capabilities(0)),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> Process {
    process(&["/bin/sh", "-c", script])
}

/// `p` as another user, with the capabilities such a user gets.
pub fn as_user(mut p: Process, uid: u32, gid: u32, additional_gids: &[u32]) -> Process {
    p.user = User {
        uid,
        gid,
        additional_gids: additional_gids.to_vec(),
        ..Default::default()
    };
    p.capabilities = Some(defaults::capabilities(uid));
    p
}

/// A container on the test root filesystem with the usual mounts and masks.
pub fn container(id: &str, process: Process) -> CreateContainer {
    CreateContainer {
        id: id.into(),
        hostname: None,
        root: Root {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            size_bytes: None,
            readonly: false,
        },
        mounts: defaults::mounts(),
        masked_paths: defaults::masked_paths(),
        readonly_paths: defaults::readonly_paths(),
        process,
        stdio: StdioTokens::default(),
        resources: Default::default(),
        sysctl: Default::default(),
        join: Default::default(),
        init: false,
        seccomp: None,
        device_rules: Vec::new(),
        device_nodes: Vec::new(),
    }
}

/// The kind of an agent's refusal; panics on anything else.
#[track_caller]
pub fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Agent { kind, .. }) => kind,
        other => panic!("expected the agent to refuse, got {other:?}"),
    }
}

/// `wait`'s status; says plainly when the process never ended (the read timed out).
#[track_caller]
pub fn wait_for(c: &mut Client<UnixStream>, container_id: &str, exec_id: Option<&str>) -> i32 {
    match c.wait(container_id, exec_id) {
        Ok(status) => status,
        Err(ClientError::Frame(FrameError::Io(e)))
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
        {
            panic!("wait {container_id} {exec_id:?}: no exit within {TIMEOUT:?}; the process is still running")
        }
        Err(e) => panic!("wait {container_id} {exec_id:?}: {e}"),
    }
}

/// An output stream read to EOF in the background, visible while it grows.
struct Capture {
    name: &'static str,
    buf: Arc<Mutex<Vec<u8>>>,
    done: JoinHandle<Result<(), String>>,
}

impl Capture {
    fn new(mut s: UnixStream, name: &'static str) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let done = thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => return Ok(()),
                    Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("{name}: {e} before EOF")),
                }
            }
        });
        Capture { name, buf, done }
    }

    fn so_far(&self) -> String {
        text(&self.buf.lock().unwrap())
    }

    fn finish(self) -> String {
        match self.done.join() {
            Ok(Ok(())) => text(&self.buf.lock().unwrap()),
            Ok(Err(e)) => panic!("{e}; read so far: {:?}", text(&self.buf.lock().unwrap())),
            Err(_) => panic!("the reader of {} panicked", self.name),
        }
    }
}

/// The host's ends of a process's stdio: streams opened to the agent and
/// attached before `create` or `exec`, which name them by token.
pub struct Stdio {
    pub tokens: StdioTokens,
    stdin: Option<UnixStream>,
    terminal: Option<UnixStream>,
    stdout: Option<Capture>,
    stderr: Option<Capture>,
}

impl Stdio {
    /// The stream to write the process's stdin to.
    pub fn stdin(&mut self) -> UnixStream {
        self.stdin.take().expect("no stdin stream, or already taken")
    }

    /// The terminal's stream, for writing; its output is captured as stdout.
    pub fn terminal(&mut self) -> UnixStream {
        self.terminal.take().expect("not a terminal, or already taken")
    }

    /// Waits (bounded) until the captured stdout contains `needle`.
    pub fn stdout_until(&self, needle: &str) -> String {
        let c = self.stdout.as_ref().expect("no stdout stream");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let ended = c.done.is_finished();
            let got = c.so_far();
            if got.contains(needle) {
                return got;
            }
            assert!(!ended, "stdout ended without {needle:?}; got {got:?}");
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stdout within {TIMEOUT:?}; got {got:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stdout and stderr, each read to EOF.
    pub fn finish(mut self) -> (String, String) {
        let out = self.stdout.take().map(Capture::finish).unwrap_or_default();
        let err = self.stderr.take().map(Capture::finish).unwrap_or_default();
        (out, err)
    }
}

/// A running `bulkhead-agent --listen-unix`, PID 1 of its own PID namespace.
/// Start and drop it on the same thread: the `unshare` above it dies with
/// the thread that started it.
pub struct Agent {
    child: Child,
    /// The agent itself on the host (`unshare`'s child).
    pub process: Option<ProcInfo>,
    dir: tempfile::TempDir,
    sock_dir: PathBuf,
    pub cgroup: PathBuf,
    pub rootfs: Arc<Rootfs>,
    exited: Option<ExitStatus>,
}

impl Agent {
    pub fn start() -> Agent {
        require_root();
        let bin = agent_bin();
        let rootfs = Rootfs::shared();
        let dir = tempfile::Builder::new().prefix("bh-agent").tempdir().unwrap();
        let sock_dir = dir.path().join("sock");
        let dev_dir = dir.path().join("dev");
        let state_dir = dir.path().join("state");
        for d in [&sock_dir, &dev_dir, &state_dir] {
            fs::create_dir(d).unwrap();
        }
        symlink(&rootfs.loop_dev, dev_dir.join("vda")).unwrap();
        let n = NEXT_AGENT.fetch_add(1, Ordering::SeqCst);
        let cgroup = cgroup2_mount().join(format!("bulkhead-agent-tier-{}-{n}", std::process::id()));
        let log = fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--mount", "--fork", "--mount-proc", "--propagation", "private"])
            // unshare dying takes the agent, and so its whole PID namespace, with it.
            .arg("--kill-child")
            .arg(&bin)
            .arg("--listen-unix")
            .arg(&sock_dir)
            .arg("--dev-dir")
            .arg(&dev_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--cgroup-root")
            .arg(&cgroup)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. A test process that dies (a CI
        // timeout) then takes unshare, and with it the agent, along.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot run unshare (util-linux)");
        let mut agent = Agent {
            child,
            process: None,
            dir,
            sock_dir,
            cgroup,
            rootfs,
            exited: None,
        };
        agent.wait_until_listening();
        let unshare = agent.child.id();
        agent.process = processes().into_iter().find(|p| p.ppid == unshare);
        assert!(
            agent.process.is_some(),
            "unshare ({unshare}) has no child: where is the agent?"
        );
        agent
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.exited = Some(st);
                panic!(
                    "the agent exited ({st}) before listening on {}; its output:\n{}",
                    self.socket().display(),
                    self.log()
                );
            }
            if self.socket().exists() && UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {} within 30 s; its output:\n{}",
                self.socket().display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.sock_dir.join("agent.sock")
    }

    /// The agent's output so far (the end of it).
    pub fn log(&self) -> String {
        let all = text(&fs::read(self.dir.path().join("agent.log")).unwrap_or_default());
        let cut = all.len().saturating_sub(16 * 1024);
        let cut = (cut..all.len()).find(|&i| all.is_char_boundary(i)).unwrap_or(all.len());
        all[cut..].to_string()
    }

    /// A connected request stream, before any hello.
    pub fn stream(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket())
            .unwrap_or_else(|e| panic!("cannot connect to the agent: {e}\nits output:\n{}", self.log()));
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// A request stream past the handshake.
    pub fn connect(&self) -> Client<UnixStream> {
        Client::handshake(self.stream(), "agent-tier")
            .unwrap_or_else(|e| panic!("handshake with the agent: {e}\nits output:\n{}", self.log()))
    }

    pub fn is_running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited.is_none()
    }

    /// The agent is alive and answers a new stream.
    pub fn assert_serves(&mut self) {
        assert!(
            self.is_running(),
            "the agent died ({:?}); its output:\n{}",
            self.exited,
            self.log()
        );
        let mut c = self.connect();
        let kind = refusal(c.wait("no-such-container", None));
        assert_eq!(kind, ErrorKind::NotFound);
    }

    /// After streams the agent will close on its own: a new one is served
    /// again once it has noticed (bounded by [`TIMEOUT`]).
    pub fn serves_again(&mut self) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            match Client::handshake(self.stream(), "agent-tier") {
                Ok(mut c) => {
                    assert_eq!(refusal(c.wait("no-such-container", None)), ErrorKind::NotFound);
                    return;
                }
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "the agent serves no new stream: {e}\nits output:\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Opens and attaches the streams of `plan` to the agent's stdio socket.
    pub fn open_stdio(&self, plan: StdioPlan) -> (StdioTokens, StdioStreams) {
        let path = self.sock_dir.join("agent-stdio.sock");
        bulkhead_runtime::stdio::attach_all(plan, |_| {
            let s = UnixStream::connect(&path)
                .unwrap_or_else(|e| panic!("connect {}: {e}\nagent output:\n{}", path.display(), self.log()));
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.set_write_timeout(Some(TIMEOUT)).unwrap();
            Ok(s)
        })
        .unwrap_or_else(|e| panic!("attaching stdio: {e}\nagent output:\n{}", self.log()))
    }

    /// Streams for stdout and stderr (captured), and stdin if asked for.
    pub fn stdio(&self, with_stdin: bool) -> Stdio {
        let (tokens, s) = self.open_stdio(StdioPlan {
            stdin: with_stdin,
            tty: false,
        });
        Stdio {
            tokens,
            stdin: s.stdin,
            terminal: None,
            stdout: s.stdout.map(|s| Capture::new(s, "stdout")),
            stderr: s.stderr.map(|s| Capture::new(s, "stderr")),
        }
    }

    /// A terminal's single stream: stdout, both ways.
    pub fn terminal_stdio(&self) -> Stdio {
        let (tokens, s) = self.open_stdio(StdioPlan { stdin: true, tty: true });
        let out = s.stdout.expect("a terminal stream");
        Stdio {
            tokens,
            stdin: None,
            terminal: Some(out.try_clone().unwrap()),
            stdout: Some(Capture::new(out, "terminal")),
            stderr: None,
        }
    }

    /// Creates and starts `c` with captured stdout and stderr; returns the
    /// pid `start` answered.
    pub fn start_container(&self, client: &mut Client<UnixStream>, mut c: CreateContainer) -> (u32, Stdio) {
        let stdio = self.stdio(false);
        c.stdio = stdio.tokens.clone();
        let id = c.id.clone();
        client
            .call_ok(&Request::Create { container: c })
            .unwrap_or_else(|e| panic!("create {id}: {e}\nagent output:\n{}", self.log()));
        let pid = client
            .call_started(&Request::Start {
                container_id: id.clone(),
            })
            .unwrap_or_else(|e| panic!("start {id}: {e}\nagent output:\n{}", self.log()));
        (pid, stdio)
    }

    /// Runs `c` to completion: (status, stdout, stderr).
    pub fn run_container(&self, c: CreateContainer) -> (i32, String, String) {
        let mut client = self.connect();
        let id = c.id.clone();
        let (_, stdio) = self.start_container(&mut client, c);
        let status = wait_for(&mut client, &id, None);
        let (out, err) = stdio.finish();
        (status, out, err)
    }

    /// Runs `process` in a new container: (status, stdout, stderr).
    pub fn run(&self, process: Process) -> (i32, String, String) {
        self.run_container(container(&unique_id("run"), process))
    }

    /// Runs `process` in a running container: (status, stdout, stderr).
    pub fn exec(&self, client: &mut Client<UnixStream>, container_id: &str, process: Process) -> (i32, String, String) {
        let exec_id = unique_id("exec");
        let stdio = self.stdio(false);
        client
            .call_started(&Request::Exec {
                container_id: container_id.into(),
                exec_id: exec_id.clone(),
                process,
                stdio: stdio.tokens.clone(),
            })
            .unwrap_or_else(|e| panic!("exec in {container_id}: {e}\nagent output:\n{}", self.log()));
        let status = wait_for(client, container_id, Some(&exec_id));
        let (out, err) = stdio.finish();
        (status, out, err)
    }

    pub fn signal(
        &self,
        client: &mut Client<UnixStream>,
        container_id: &str,
        exec_id: Option<&str>,
        sig: i32,
        all: bool,
    ) {
        client
            .call_ok(&Request::Signal {
                container_id: container_id.into(),
                exec_id: exec_id.map(Into::into),
                signal: sig,
                all,
            })
            .unwrap_or_else(|e| panic!("signal {sig} to {container_id}: {e}\nagent output:\n{}", self.log()));
    }

    /// Every process in the agent's PID namespace but the agent.
    pub fn descendants(&self) -> Vec<ProcInfo> {
        self.process.as_ref().map(|p| descendants(p.pid)).unwrap_or_default()
    }

    fn ask_to_shut_down(&self) -> Result<(), String> {
        let s = UnixStream::connect(self.socket()).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client::handshake(s, "agent-tier").map_err(|e| e.to_string())?;
        c.call_ok(&Request::Shutdown).map_err(|e| e.to_string())
    }

    /// `shutdown`, which must answer `ok`, then the agent's exit (bounded).
    pub fn shutdown(&mut self) -> ExitStatus {
        assert!(
            self.is_running(),
            "the agent already exited ({:?})\n{}",
            self.exited,
            self.log()
        );
        if let Err(e) = self.ask_to_shut_down() {
            panic!("shutdown: {e}\nagent output:\n{}", self.log());
        }
        match wait_for_exit(&mut self.child, Duration::from_secs(30)) {
            Some(st) => {
                self.exited = Some(st);
                st
            }
            None => panic!("the agent did not exit within 30 s of shutdown\n{}", self.log()),
        }
    }
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a cgroup tree bottom-up; a cgroup that still holds processes
/// cannot go, which is the point.
fn remove_cgroup(dir: &Path) -> Result<(), String> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path())?;
        }
    }
    // Processes killed a moment ago may still be leaving.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(format!(
                    "cannot remove cgroup {}: {e}; processes in it: {:?}",
                    dir.display(),
                    procs.split_whitespace().collect::<Vec<_>>()
                ));
            }
        }
    }
}

impl Drop for Agent {
    /// Shuts the agent down and checks that nothing of it is left: the
    /// `unshare` process, the agent, its cgroups.
    fn drop(&mut self) {
        let mut problems = Vec::new();
        if self.exited.is_none() {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.exited = Some(st);
                    problems.push(format!("the agent had died during the test ({st})"));
                }
                _ => {
                    if let Err(e) = self.ask_to_shut_down() {
                        problems.push(format!("shutdown failed: {e}"));
                    }
                    match wait_for_exit(&mut self.child, Duration::from_secs(30)) {
                        Some(st) => self.exited = Some(st),
                        None => {
                            problems.push("the agent did not exit within 30 s of shutdown; killed it".into());
                            let _ = self.child.kill();
                            let _ = self.child.wait();
                        }
                    }
                }
            }
        }
        if let Some(p) = &self.process {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !p.is_gone() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if !p.is_gone() {
                problems.push(format!("the agent (host pid {}) outlived unshare", p.pid));
            }
        }
        if let Err(e) = remove_cgroup(&self.cgroup) {
            problems.push(e);
        }
        let panicking = thread::panicking();
        if problems.is_empty() && !panicking {
            return;
        }
        let report = format!(
            "{}\n--- agent output ({}) ---\n{}",
            problems.join("\n"),
            self.dir.path().join("agent.log").display(),
            self.log()
        );
        if panicking {
            eprintln!("{report}");
        } else {
            panic!("{report}");
        }
    }
}

/// Writes all of `bytes`, ignoring a peer that already hung up: hostile
/// tests look at what the agent does, not at whether it read everything.
pub fn write_lossy(s: &mut UnixStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}
