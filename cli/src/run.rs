//! `bulkhead run`: check the host, prepare the root image, boot a
//! [`Sandbox`], run one container process attached to our terminal or
//! pipes, forward signals and window changes, and return its exit status.
//! Every path out removes the run directory and leaves no VMM behind.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use bulkhead_protocol::messages::{CreateContainer, Request};

use bulkhead_runtime::host_check::{self, CheckReport};
use bulkhead_runtime::paths::ArtifactFlags;
use bulkhead_runtime::rootfs::{self, ImageCache};
use bulkhead_runtime::sandbox::{self, AgentClient, BootProgress, Sandbox, SandboxConfig, SandboxError};
use bulkhead_runtime::start::{self, BootMode, Observer};
use bulkhead_runtime::stdio::{self, StdioPlan};
use bulkhead_runtime::template::TemplateCache;

use crate::copy_in::{self, CopyInError, PlannedVolume};
use crate::default_rootfs;
use crate::process::{self, ProcessFlags};
use crate::signals::{self, SignalFd};
use crate::tty::{self, RawMode};
use crate::EXIT_SANDBOX_FAILED;

/// The container's id inside its sandbox.
pub const CONTAINER_ID: &str = "main";
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// After `exited`, how long the last output may take to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub artifacts: ArtifactFlags,
    /// A directory or an ext4/erofs image; `None`: the embedded default.
    pub rootfs: Option<PathBuf>,
    /// `--read-only`: the container's `/` is read-only.
    pub read_only: bool,
    /// `--init`: a helper PID 1 forwards signals to the command.
    pub init: bool,
    pub cpus: u8,
    pub memory_mib: u32,
    pub process: ProcessFlags,
    /// `-i`: forward our stdin (otherwise the process reads /dev/null).
    pub interactive: bool,
    /// `-q`: no progress messages.
    pub quiet: bool,
    pub keep_console: Option<PathBuf>,
    /// `--cold`: boot the kernel instead of restoring a template.
    pub cold: bool,
    pub copy_in: CopyInFlags,
}

/// `--secret`, `--volume`, `--tmpfs`.
#[derive(Clone, Debug, Default)]
pub struct CopyInFlags {
    pub secrets: Vec<String>,
    pub volumes: Vec<String>,
    pub tmpfs: Vec<String>,
}

/// What the flags copy in, checked and read before a VM starts; the
/// container's mounts for it added.
fn plan_copy_in(flags: &CopyInFlags, container: &mut CreateContainer) -> Result<Vec<PlannedVolume>, CopyInError> {
    let user = &container.process.user;
    let mut planned: Vec<PlannedVolume> = copy_in::secrets(&flags.secrets, user.uid, user.gid)?
        .into_iter()
        .collect();
    for (i, v) in flags.volumes.iter().enumerate() {
        planned.push(copy_in::volume(v, i)?);
    }
    container.mounts.extend(planned.iter().map(PlannedVolume::mount));
    for t in &flags.tmpfs {
        container.mounts.push(copy_in::tmpfs(t)?);
    }
    Ok(planned)
}

fn say(msg: &str) {
    let _ = writeln!(io::stderr(), "bulkhead: {msg}");
}

/// Runs the command; returns the exit status for the process to exit with:
/// the workload's, or 125 when the sandbox failed.
pub fn run(opts: RunOptions) -> i32 {
    match run_inner(&opts) {
        Ok(status) => status,
        Err(Failure { message, code }) => {
            if !message.is_empty() {
                say(&message);
            }
            code
        }
    }
}

struct Failure {
    message: String,
    code: i32,
}

impl Failure {
    fn sandbox(e: impl std::fmt::Display) -> Failure {
        Failure {
            message: e.to_string(),
            code: EXIT_SANDBOX_FAILED,
        }
    }
}

fn refuse(report: &CheckReport) -> Failure {
    let mut message = String::from("this host cannot run sandboxes:");
    for p in report.problems() {
        message.push_str("\n  - ");
        message.push_str(&p);
    }
    message.push_str("\n(`bulkhead check` shows the whole diagnosis)");
    Failure {
        message,
        code: EXIT_SANDBOX_FAILED,
    }
}

fn run_inner(opts: &RunOptions) -> Result<i32, Failure> {
    let report = host_check::diagnose(&opts.artifacts);
    let artifacts = match report.artifacts() {
        Some(a) if report.can_run() => a,
        _ => return Err(refuse(&report)),
    };

    // Everything the user typed is checked before a VM boots.
    let process = process::build_process(&opts.process, |k| std::env::var(k).ok()).map_err(Failure::sandbox)?;

    // Signals are blocked before any thread exists, so all inherit it.
    let mut wanted = signals::FORWARDED.to_vec();
    wanted.push(libc::SIGWINCH);
    let sigs = SignalFd::block(&wanted).map_err(|e| Failure::sandbox(format!("signal set-up: {e}")))?;

    let cache = ImageCache::default_location().map_err(Failure::sandbox)?;
    let quiet = opts.quiet;
    let mut on_build = |image: &std::path::Path| {
        if !quiet {
            say(&format!("building the root filesystem image {}…", image.display()));
        }
    };
    let image = match &opts.rootfs {
        Some(spec) => rootfs::resolve(spec, &cache, &mut on_build),
        None => default_rootfs::default_image(&cache, &mut on_build),
    }
    .map_err(|e| Failure::sandbox(format!("root filesystem: {e}")))?;

    let mut container = sandbox::container_spec(CONTAINER_ID, process, &image);
    container.hostname = Some(opts.process.hostname.clone());
    container.root.readonly = opts.read_only;
    container.init = opts.init;
    let volumes = plan_copy_in(&opts.copy_in, &mut container).map_err(Failure::sandbox)?;
    container.validate().map_err(Failure::sandbox)?;
    let cfg = SandboxConfig {
        vcpus: opts.cpus,
        mem_mib: opts.memory_mib,
        keep_console: opts.keep_console.clone(),
        call_timeout: Some(sandbox::DEFAULT_CALL_TIMEOUT),
        host_cgroup: own_cgroup(),
        ..SandboxConfig::new(artifacts, image)
    };

    let mut progress = Progress {
        sigs: &sigs,
        quiet,
        emulated: report.emulated(),
        interrupted: None,
        next_report: PROGRESS_EVERY,
    };
    let mode = if opts.cold { BootMode::Cold } else { BootMode::Template };
    let started = TemplateCache::default_location()
        .map_err(|e| Failure::sandbox(format!("sandbox templates: {e}")))
        .and_then(|templates| {
            start::start(&cfg, mode, &templates, &mut progress).map_err(|e| Failure {
                message: e.to_string(),
                code: progress.interrupted.map_or(EXIT_SANDBOX_FAILED, |s| 128 + s),
            })
        });
    let sandbox = match started {
        Ok((sb, how)) => {
            tracing::debug!("sandbox started: {how:?}");
            sb
        }
        Err(f) => return Err(f),
    };
    let status = attach(&sandbox, volumes, container, &sigs, opts.interactive);
    // Stop the VM whatever happened; the workload's status is the answer.
    let result = match status {
        Ok(code) => Ok(code),
        Err(e) => Err(Failure::sandbox(e)),
    };
    if let Err(e) = sandbox.shutdown() {
        tracing::warn!("shutting the sandbox down: {e}");
    }
    result
}

/// What the user sees while the sandbox starts: a line per slow step,
/// the boot's progress every [`PROGRESS_EVERY`], and Ctrl-C.
struct Progress<'a> {
    sigs: &'a SignalFd,
    quiet: bool,
    /// A PVM host: the guest kernel runs in an emulator.
    emulated: bool,
    /// The signal that ended the start, for the exit status.
    interrupted: Option<i32>,
    /// When the next "still booting" line is due (each boot counts its own time).
    next_report: Duration,
}

impl Observer for Progress<'_> {
    fn building_template(&mut self, why: Option<&str>) {
        if !self.quiet {
            match why {
                None => say("building a sandbox template (first use; boots cold once)…"),
                Some(why) => say(&format!("rebuilding the sandbox template ({why}); boots cold once…")),
            }
        }
        self.booting_cold();
    }

    fn falling_back(&mut self, reason: &str) {
        // Never silently: the user should know why this run is slow.
        say(&format!("{reason}; booting cold"));
    }

    fn booting_cold(&mut self) {
        self.next_report = PROGRESS_EVERY;
        if !self.quiet {
            say("booting sandbox…");
            if self.emulated {
                say(
                    "this host has no hardware virtualization (PVM): the guest kernel is emulated, so the boot takes \
                     tens of seconds to minutes",
                );
            }
        }
    }

    fn watch(&mut self, p: &BootProgress) -> Result<(), String> {
        while let Some(sig) = self.sigs.read() {
            if sig != libc::SIGWINCH {
                self.interrupted = Some(sig);
                return Err(format!("interrupted by {} while booting", signals::name(sig)));
            }
        }
        if !self.quiet && p.elapsed >= self.next_report {
            // The next multiple of the period, however late this call is.
            let periods = p.elapsed.as_secs() / PROGRESS_EVERY.as_secs() + 1;
            self.next_report = PROGRESS_EVERY * periods as u32;
            let line = p.last_console_line().unwrap_or_default();
            say(&format!("still booting ({} s): {line}", p.elapsed.as_secs()));
        }
        Ok(())
    }
}

/// Creates and starts the container, attaches stdio, forwards signals
/// until it exits; returns its exit status.
fn attach(
    sandbox: &Sandbox,
    volumes: Vec<PlannedVolume>,
    container: CreateContainer,
    sigs: &SignalFd,
    interactive: bool,
) -> Result<i32, SandboxError> {
    let tty = container.process.terminal;
    let plan = StdioPlan {
        stdin: interactive,
        tty,
    };
    let mut control = sandbox.request_client("create")?;
    for mut v in volumes {
        let mut requests = v.take_requests();
        let sent = requests.iter().try_for_each(|r| control.call_ok(r));
        copy_in::wipe_requests(&mut requests);
        sent?;
    }
    let streams = sandbox.create(&mut control, container, plan)?;
    let mut waiter = sandbox.client()?;

    // Raw mode before the process starts, so no keystroke is cooked.
    let stdin_fd = io::stdin().as_raw_fd();
    let raw = if tty && interactive && tty::is_terminal(stdin_fd) {
        Some(RawMode::enable(stdin_fd)?)
    } else {
        None
    };

    let mut outputs = Vec::new();
    let input_to = match (&streams.stdin, &streams.stdout) {
        (Some(s), _) => Some(s.try_clone()?),
        (None, Some(s)) if tty && interactive => Some(s.try_clone()?),
        _ => None,
    };
    if let Some(s) = streams.stdout {
        outputs.push(stdio::copy_out(s, io::stdout(), "stdout")?);
    }
    if let Some(s) = streams.stderr {
        outputs.push(stdio::copy_out(s, io::stderr(), "stderr")?);
    }
    drop(streams.stdin);

    sandbox.start(&mut control, CONTAINER_ID)?;
    if let Some(to) = input_to {
        // Never joined: a read of our stdin may block until we exit.
        stdio::copy_in(io::stdin(), to)?;
    }
    if tty {
        resize(&mut control);
    }

    let (done_rx, done_tx) = UnixStream::pair()?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("wait".into()).spawn(move || {
        let r = waiter.wait(CONTAINER_ID, None);
        let _ = tx.send(r);
        drop(done_tx); // wakes the poll below
    })?;

    loop {
        let mut fds = [
            libc::pollfd {
                fd: sigs.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: done_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        while let Some(sig) = sigs.read() {
            if sig == libc::SIGWINCH {
                if tty {
                    resize(&mut control);
                }
                continue;
            }
            let req = Request::Signal {
                container_id: CONTAINER_ID.into(),
                exec_id: None,
                signal: sig,
                all: false,
            };
            if let Err(e) = control.call_ok(&req) {
                tracing::debug!("forwarding {}: {e}", signals::name(sig));
            }
        }
        match rx.try_recv() {
            Ok(Ok(status)) => {
                drain(outputs);
                drop(raw);
                return Ok(status);
            }
            Ok(Err(e)) => {
                drop(raw);
                return Err(sandbox.explain(e));
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => {
                drop(raw);
                return Err(sandbox.explain(io::Error::other("the wait thread ended without an answer")));
            }
        }
    }
}

/// Sends our terminal's size (the process's terminal starts at it).
fn resize(control: &mut AgentClient) {
    let fd = [io::stdin().as_raw_fd(), io::stdout().as_raw_fd()]
        .into_iter()
        .find(|fd| tty::is_terminal(*fd));
    let Some((rows, cols)) = fd.and_then(tty::window_size) else {
        return;
    };
    let req = Request::ResizeTty {
        container_id: CONTAINER_ID.into(),
        exec_id: None,
        rows,
        cols,
    };
    if let Err(e) = control.call_ok(&req) {
        tracing::debug!("resize: {e}");
    }
}

/// Waits (bounded) for the output threads to reach EOF.
fn drain(outputs: Vec<std::thread::JoinHandle<u64>>) {
    let (tx, rx) = mpsc::channel();
    let n = outputs.len();
    for h in outputs {
        let tx = tx.clone();
        let _ = std::thread::Builder::new().spawn(move || {
            let _ = tx.send(h.join());
        });
    }
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if rx.recv_timeout(left).is_err() {
            tracing::warn!("the process's output did not end within {} s", DRAIN_TIMEOUT.as_secs());
            return;
        }
    }
}

/// A host cgroup of this run's own, capped to the VM's size, where this
/// process may make one (as root); otherwise the VMM stays in ours.
fn own_cgroup() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root.then(|| format!("/bulkhead/run-{}", std::process::id()))
}
