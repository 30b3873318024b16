//! bulkhead-agent: PID 1 of a Bulkhead guest. See README.md for its
//! contract with the host.

mod agent;
mod caps;
mod cgroup;
mod child;
mod ctl;
mod devices;
mod disk;
mod init;
mod oom;
mod plan;
mod reseed;
mod server;
mod stdio;
mod transport;
mod vector_state;
mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;

use agent::{Agent, Config};
use bulkhead_protocol::stdio::STDIO_PORT;
use bulkhead_protocol::AGENT_PORT;
use transport::Transport;

#[derive(Parser, Debug)]
#[command(name = "bulkhead-agent", version, about = "PID 1 of a Bulkhead guest")]
struct Args {
    /// Debug builds only: serve on DIR/agent.sock instead of vsock, as a
    /// host process (the agent tier). Stdio goes to DIR/agent.sock_<port>.
    #[cfg(debug_assertions)]
    #[arg(long, value_name = "DIR")]
    listen_unix: Option<PathBuf>,
    /// Where /dev/vdX names resolve (listener mode).
    #[cfg(debug_assertions)]
    #[arg(long, value_name = "DIR")]
    dev_dir: Option<PathBuf>,
    /// The cgroup v2 directory containers go under (listener mode).
    #[cfg(debug_assertions)]
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// Where container mounts live (listener mode).
    #[cfg(debug_assertions)]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// PID 1 with no 0/1/2 would hand those numbers to the first files it opens.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries; open returns a new descriptor.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            }
        }
    }
}

/// SIGCHLD is taken by the reaper thread with sigwaitinfo, so it must be
/// blocked in every thread: block it before any thread starts.
fn block_sigchld() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn reap_forever(agent: Arc<Agent>) {
    // SAFETY: sigwaitinfo/waitpid on stack data.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(&set, &mut info);
            loop {
                let mut status = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
                agent.reaped(pid, status);
            }
        }
    }
}

/// Whether this kernel leaves vector state unswitched that user space can
/// use (PVM hosts): then workloads get the glibc tunable too.
fn unswitched_vector_state() -> bool {
    let c = vector_state::unswitched_components();
    if c != 0 {
        tracing::warn!(
            "this kernel does not switch XCR0 components {c:#x} between tasks (PVM host): \
             workloads get {}; other code using AVX can see other processes' vector data",
            vector_state::TUNABLE
        );
    }
    c != 0
}

struct Mode {
    config: Config,
    pid1: bool,
}

fn mode(args: &Args) -> anyhow::Result<Mode> {
    #[cfg(debug_assertions)]
    if let Some(dir) = &args.listen_unix {
        let state_dir = args.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let cgroup_root = args
            .cgroup_root
            .clone()
            .context("--listen-unix needs --cgroup-root (a cgroup v2 directory to create)")?;
        std::fs::create_dir_all(&cgroup_root).with_context(|| format!("creating {}", cgroup_root.display()))?;
        cgroup::enable_controllers(&cgroup_root);
        return Ok(Mode {
            config: Config {
                transport: Transport::Unix(dir.clone()),
                state_dir,
                dev_dir: args.dev_dir.clone().unwrap_or_else(|| PathBuf::from("/dev")),
                cgroup_root,
                glibc_tunable: false,
            },
            pid1: false,
        });
    }
    let _ = args;
    // SAFETY: getpid has no side effects.
    if unsafe { libc::getpid() } != 1 {
        bail!("bulkhead-agent runs as PID 1 of a Bulkhead guest (debug builds also have --listen-unix)");
    }
    init::boot()?;
    let root = PathBuf::from("/sys/fs/cgroup");
    let on = cgroup::enable_controllers(&root);
    let cgroup_root = root.join("containers");
    std::fs::create_dir_all(&cgroup_root).context("creating the containers' cgroup")?;
    cgroup::enable_controllers(&cgroup_root);
    tracing::info!(controllers = ?on, "cgroup v2 ready");
    Ok(Mode {
        config: Config {
            transport: Transport::Vsock,
            state_dir: PathBuf::from("/run/bulkhead"),
            dev_dir: PathBuf::from("/dev"),
            cgroup_root,
            glibc_tunable: unswitched_vector_state(),
        },
        pid1: true,
    })
}

fn run(args: Args) -> anyhow::Result<bool> {
    let m = mode(&args)?;
    let listener = m
        .config
        .transport
        .listen(AGENT_PORT)
        .context("listening for the host")?;
    let stdio_listener = m
        .config
        .transport
        .listen(STDIO_PORT)
        .context("listening for stdio streams")?;
    let agent = Arc::new(Agent::new(m.config).context("agent state")?);
    let attached = agent.attached.clone();
    std::thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || attached.serve(stdio_listener))?;
    let reaper = agent.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reap_forever(reaper))?;
    let oom = agent.clone();
    std::thread::Builder::new()
        .name("oom".into())
        .spawn(move || oom.oom.run())?;
    tracing::info!("{} ready", server::SOFTWARE);
    server::serve(agent, listener);
    Ok(m.pid1)
}

/// PID 1 starts with 1024 open files; every exec holds a few while it runs
/// and request streams hold one each, so a busy pod would run out.
fn raise_open_files() {
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit reads the struct; failure leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

fn main() {
    // Before any thread or allocation-heavy work: a re-exec starts over.
    vector_state::reexec_if_needed();
    ensure_std_fds();
    raise_open_files();
    block_sigchld();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();
    // The kernel hands init every command-line word it does not know
    // (`nomodule`, say): as the guest's PID 1, take no arguments at all.
    let args = match Args::try_parse() {
        Ok(a) => a,
        // SAFETY: getpid has no side effects.
        Err(_) if unsafe { libc::getpid() } == 1 => Args::parse_from(["bulkhead-agent"]),
        Err(e) => e.exit(),
    };
    // SAFETY: getpid has no side effects.
    let pid1 = unsafe { libc::getpid() } == 1 && {
        #[cfg(debug_assertions)]
        {
            args.listen_unix.is_none()
        }
        #[cfg(not(debug_assertions))]
        {
            true
        }
    };
    match run(args) {
        Ok(true) => init::power_off(),
        Ok(false) => {}
        Err(e) => {
            tracing::error!("{e:#}");
            if pid1 {
                init::power_off();
            }
            std::process::exit(1);
        }
    }
}
