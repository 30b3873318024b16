//! `containerd-shim-bulkhead-v2`: the containerd runtime v2 shim. One shim
//! process serves one pod (or one lone container) and owns its microVM.
//!
//! containerd runs the binary three ways: `start` (print the ttrpc address
//! of a shim, starting one when the pod has none), `delete` (clean up after
//! a shim that is gone) and, from our own `start`, as the server.

mod config;
mod disks;
mod events;
mod io;
mod pod;
mod process;
mod rootfs;
mod spec;
mod task;

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{bail, Context as _};
use containerd_shim::Flags;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::shim_ttrpc::{create_task, Task};
use containerd_shim_protos::ttrpc::Server;

use crate::task::Service;

/// The fd the server inherits its listening socket on.
const LISTENER_FD: i32 = 3;
/// Passes the configuration path from `start` to the server it spawns.
const CONFIG_ENV: &str = "BULKHEAD_SHIM_CONFIG";
const TTRPC_ADDRESS_ENV: &str = "TTRPC_ADDRESS";
const ANN_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const ANN_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// A stale socket is one nobody answers on within this.
const SOCKET_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// Set when the shim should stop serving.
#[derive(Default)]
pub struct ExitSignal {
    done: Mutex<bool>,
    cond: Condvar,
    /// The socket containerd reaches this shim on.
    socket: Option<PathBuf>,
}

impl ExitSignal {
    /// One that also unlinks `socket` when signalled.
    pub fn removing(socket: PathBuf) -> Self {
        ExitSignal {
            socket: Some(socket),
            ..Default::default()
        }
    }

    pub fn signal(&self) {
        // Unlinked before Shutdown is answered: containerd may start a new
        // shim for the same id at once (another runtime's shim too), and
        // its `start` must not find this one's socket and connect to a
        // shim that is going away.
        if let Some(p) = &self.socket {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::debug!("removing {}: {e}", p.display());
            }
        }
        *lock(&self.done) = true;
        self.cond.notify_all();
    }
    pub fn wait(&self) {
        let mut d = lock(&self.done);
        while !*d {
            d = self.cond.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A lock a panicking thread left behind still guards good data here.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let result = containerd_shim::parse(&args[1..])
        .map_err(anyhow::Error::from)
        .and_then(|flags| dispatch(&flags));
    if let Err(e) = result {
        // containerd shows this to the user (start) or logs it.
        eprintln!("containerd-shim-bulkhead-v2: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(flags: &Flags) -> anyhow::Result<()> {
    if flags.version {
        println!("containerd-shim-bulkhead-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.namespace.is_empty() {
        bail!("-namespace is required");
    }
    match flags.action.as_str() {
        "start" => start(flags),
        "delete" => delete(flags),
        "" if !flags.socket.is_empty() => serve(flags),
        other => bail!("unknown action {other:?}"),
    }
}

/// The runtime options containerd pipes to `start` (a protobuf `Any`).
fn runtime_options_config_path() -> anyhow::Result<Option<PathBuf>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut buf = Vec::new();
    stdin.lock().take(1 << 20).read_to_end(&mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    let any = Any::parse_from_bytes(&buf).context("runtime options")?;
    Ok(config::config_path_from_options(&any.type_url, &any.value)?)
}

/// The pod this container belongs to: CRI's sandbox id for a pod's
/// workload container, else the container itself.
fn grouping(bundle: &Path, id: &str) -> String {
    let ann = std::fs::read(bundle.join("config.json"))
        .map(|b| spec::annotations(&b))
        .unwrap_or_default();
    match (ann.get(ANN_CONTAINER_TYPE), ann.get(ANN_SANDBOX_ID)) {
        (Some(t), Some(sandbox)) if t == "container" && !sandbox.is_empty() => sandbox.clone(),
        _ => id.to_string(),
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn start(flags: &Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    let config = runtime_options_config_path()?.or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    let group = grouping(&bundle, &flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = Path::new(socket_path(&address));

    let alive = UnixStream::connect(path).is_ok_and(|s| s.set_read_timeout(Some(SOCKET_PROBE)).is_ok());
    if !alive {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("stale socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
        let fd = listener.as_raw_fd();
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "-namespace",
            &flags.namespace,
            "-id",
            &flags.id,
            "-address",
            &flags.address,
        ])
        .args(["-publish-binary", &flags.publish_binary, "-socket", &address])
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if flags.debug {
            cmd.arg("-debug");
        }
        // Unset, the server reads the default path, which may be absent.
        match &config {
            Some(path) => cmd.env(CONFIG_ENV, path),
            None => cmd.env_remove(CONFIG_ENV),
        };
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setsid, dup2, fcntl) on fds we own.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: containerd's signals to us are not its.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears close-on-exec on the new fd, but does
                // nothing when the listener already is that fd.
                let rc = if fd == LISTENER_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, LISTENER_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("start the shim server")?;
        std::fs::write(bundle.join("shim.pid"), child.id().to_string())?;
    }
    std::fs::write(bundle.join("address"), &address)?;
    // containerd 1.6 reads stdout and stderr together: only the address.
    let mut out = std::io::stdout().lock();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Cleans up after a shim that is gone: its VMM died with it (it is bound
/// to the shim's life), so what may remain is the run directory, a build
/// mount and the socket.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        PathBuf::from(&flags.bundle)
    };
    rootfs::cleanup_build_mount(&bundle);
    if let Ok(dir) = std::fs::read_to_string(bundle.join(pod::RUN_DIR_FILE)) {
        let dir = PathBuf::from(dir.trim());
        if dir.is_absolute() && dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("cannot remove {}: {e}", dir.display());
            }
        }
    }
    if let Ok(dirs) = std::fs::read_to_string(bundle.join(pod::CGROUP_FILE)) {
        // The VMM died with its shim (PR_SET_PDEATHSIG); dropping removes.
        drop(bulkhead_runtime::host_cgroup::HostCgroup::adopt(
            dirs.lines().map(PathBuf::from),
        ));
    }
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = Path::new(socket_path(address.trim()));
        // The pod's shim serves the socket for all of its containers: keep
        // it while that shim lives. Ask the process table first: a shim
        // that was just killed can look alive to a connect for a moment.
        let gone = match shim_alive(&bundle) {
            Some(alive) => !alive,
            None => UnixStream::connect(path).is_err(),
        };
        if path.exists() && gone {
            let _ = std::fs::remove_file(path);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let resp = containerd_shim_protos::api::DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: containerd_shim_protos::protobuf::MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    resp.write_to_writer(&mut out)?;
    out.flush()?;
    Ok(())
}

/// Whether the shim recorded in the bundle's `shim.pid` still runs: a
/// process of this binary that is not a zombie. `None` when there is no
/// record to go by.
fn shim_alive(bundle: &Path) -> Option<bool> {
    let pid: u32 = std::fs::read_to_string(bundle.join("shim.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return Some(false);
    };
    // The state follows the parenthesised command name, which may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z" | "X" | "x")) {
        return Some(false);
    }
    // The pid may have been reused by another program. By name, so that a
    // shim whose binary was upgraded under it still counts.
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_string())
    };
    let same_binary = match (std::fs::read_link(proc_dir.join("exe")), std::env::current_exe()) {
        (Ok(exe), Ok(me)) => name(&exe).is_some() && name(&exe) == name(&me),
        _ => false,
    };
    Some(same_binary)
}

/// Logs go to the `log` FIFO containerd opened in the bundle, which it
/// copies into its own log.
fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open("log");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    match fifo {
        Ok(f) => builder.with_writer(std::sync::Mutex::new(f)).init(),
        Err(_) => builder.with_writer(std::io::stderr).init(),
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO without a reader must not block the shim's start.
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// The crate generates the Task service under containerd 2's package name
/// (`containerd.task.v3`); containerd 1.6 calls the same messages as
/// `containerd.task.v2`, so the handlers are registered under that name.
fn task_v2_methods<V>(methods: std::collections::HashMap<String, V>) -> std::collections::HashMap<String, V> {
    methods
        .into_iter()
        .map(|(k, v)| (k.replace("/containerd.task.v3.Task/", "/containerd.task.v2.Task/"), v))
        .collect()
}

fn serve(flags: &Flags) -> anyhow::Result<()> {
    init_logging(flags.debug);
    // stderr is /dev/null: a panic (which aborts the shim) must reach
    // containerd's log through ours.
    std::panic::set_hook(Box::new(|info| tracing::error!("shim panic: {info}")));
    let config = match std::env::var_os(CONFIG_ENV) {
        Some(path) => config::ConfigSource::Named(PathBuf::from(path)),
        None => config::ConfigSource::Default,
    };
    let ttrpc = std::env::var(TTRPC_ADDRESS_ENV).context("TTRPC_ADDRESS is not set")?;
    let publisher = containerd_shim::publisher::RemotePublisher::new(&ttrpc)?;
    let exit = Arc::new(ExitSignal::removing(PathBuf::from(socket_path(&flags.socket))));
    let task: Arc<dyn Task + Send + Sync> = Arc::new(Service::new(&flags.namespace, publisher, config, exit.clone()));
    // The inherited listener is not close-on-exec: without this every VMM
    // the shim starts would hold containerd's socket for this shim, and
    // after a crash `delete` would find it still answering and keep it.
    // SAFETY: F_SETFD on a descriptor this process owns.
    if unsafe { libc::fcntl(LISTENER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("marking the listener close-on-exec");
    }
    let mut server = Server::new()
        .add_listener(LISTENER_FD)?
        .register_service(task_v2_methods(create_task(task)));
    server.start()?;
    tracing::info!("serving {} for {}", flags.socket, flags.id);
    exit.wait();
    // Let the Shutdown answer leave before the server goes.
    std::thread::sleep(std::time::Duration::from_millis(100));
    server.shutdown();
    let _ = std::fs::remove_file(socket_path(&flags.socket));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_liveness_from_the_pid_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(shim_alive(d.path()), None, "no record");
        std::fs::write(d.path().join("shim.pid"), std::process::id().to_string()).unwrap();
        assert_eq!(shim_alive(d.path()), Some(true), "this very binary runs");
        std::fs::write(d.path().join("shim.pid"), "1").unwrap();
        assert_eq!(shim_alive(d.path()), Some(false), "pid 1 is another program");
        std::fs::write(d.path().join("shim.pid"), "4194304").unwrap();
        assert_eq!(shim_alive(d.path()), Some(false), "no such process");
        // A zombie: a child that exited and is not reaped yet.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(d.path().join("shim.pid"), child.id().to_string()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while shim_alive(d.path()) == Some(true) {
            assert!(std::time::Instant::now() < deadline, "the child never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(shim_alive(d.path()), Some(false), "a zombie is gone");
        child.wait().unwrap();
    }
}
