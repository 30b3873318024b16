//! `bulkhead`: run a command in a microVM sandbox, or check this host.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use bulkhead::process::ProcessFlags;
use bulkhead::run::{self, CopyInFlags, RunOptions};
use bulkhead::{containerd_check, default_rootfs, initramfs, version};
use bulkhead_runtime::host_check;
use bulkhead_runtime::paths::ArtifactFlags;
use bulkhead_runtime::sandbox;

#[derive(Parser, Debug)]
#[command(
    name = "bulkhead",
    about = "Run commands in KVM microVM sandboxes.",
    disable_version_flag = true,
    arg_required_else_help = true
)]
struct Cli {
    /// Print the version, and the guest kernel's key and the agent's
    /// version of the artifacts a sandbox would start from.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a sandbox, run CMD in it, and exit with CMD's exit status
    /// (125 when the sandbox itself failed).
    Run(Box<RunArgs>),
    /// Say whether this host can run sandboxes, and why not; then whether
    /// containerd can run them.
    Check(CheckArgs),
    /// Write a shell completion script to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages into DIR (used to build the package).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write the guest's initramfs around the agent binary (used by
    /// scripts/setup).
    #[command(hide = true)]
    BuildInitramfs {
        #[arg(long, value_name = "PATH")]
        agent: PathBuf,
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ArtifactArgs {
    /// Guest kernel (default: $BULKHEAD_KERNEL, else vmlinux next to bulkhead).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Guest initramfs with the agent (default: $BULKHEAD_INITRAMFS, else
    /// initramfs.cpio next to bulkhead).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// The VMM binary (default: $BULKHEAD_VMM, else bulkhead-vmm next to bulkhead).
    #[arg(long, value_name = "PATH", hide = true)]
    vmm: Option<PathBuf>,
}

impl From<ArtifactArgs> for ArtifactFlags {
    fn from(a: ArtifactArgs) -> Self {
        ArtifactFlags {
            kernel: a.kernel,
            initramfs: a.initramfs,
            vmm: a.vmm,
        }
    }
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    artifacts: ArtifactArgs,
    /// containerd's configuration, for its CRI runtime handler.
    #[arg(long, value_name = "PATH", default_value = containerd_check::DEFAULT_CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    artifacts: ArtifactArgs,
    /// Root filesystem: a directory (imaged and cached) or an ext4/erofs
    /// image (default: a small busybox system built in).
    #[arg(long, value_name = "DIR|IMAGE")]
    rootfs: Option<PathBuf>,
    /// Mount the container's root filesystem read-only (its /proc, /dev
    /// and other mounts keep their own options).
    #[arg(long)]
    read_only: bool,
    /// vCPUs.
    #[arg(long, value_name = "N", default_value_t = sandbox::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u8).range(1..=32))]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = sandbox::DEFAULT_MEM_MIB,
          value_parser = clap::value_parser!(u32).range(64..=262_144))]
    memory: u32,
    /// Set an environment variable (KEY=VALUE), or pass the host's (KEY).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User: UID or UID:GID.
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    user: Option<String>,
    /// Run a helper init as PID 1 that forwards signals to the command and
    /// reaps orphans (otherwise the command is PID 1 and, as under runc,
    /// gets only the signals it handles, and SIGKILL).
    #[arg(long)]
    init: bool,
    /// Give the command a terminal.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Forward stdin (otherwise the command reads /dev/null).
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// The sandbox's host name.
    #[arg(long, value_name = "NAME", default_value = default_rootfs::HOSTNAME)]
    hostname: String,
    /// No progress messages.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Keep the guest console log at PATH.
    #[arg(long, value_name = "PATH")]
    keep_console: Option<PathBuf>,
    /// Boot the guest kernel instead of restoring the sandbox template
    /// (built and cached on first use).
    #[arg(long)]
    cold: bool,
    /// Copy FILE into the guest's memory as /run/secrets/NAME (mode 0400,
    /// the command's user); never written to a disk.
    #[arg(long = "secret", value_name = "NAME=FILE")]
    secrets: Vec<String>,
    /// Copy a host directory into the guest's memory, read-only at
    /// GUESTPATH (at most 8 MiB; symlinks leading out of it are refused).
    #[arg(long = "volume", value_name = "HOSTDIR:GUESTPATH:ro")]
    volumes: Vec<String>,
    /// A fresh tmpfs at PATH in the guest, SIZE as 64m.
    #[arg(long = "tmpfs", value_name = "PATH[:SIZE]")]
    tmpfs: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // With no arguments at all, clap has printed the help already.
    let (false, Some(command)) = (cli.version, cli.command) else {
        emit(&version::report(&ArtifactFlags::default()));
        return ExitCode::SUCCESS;
    };
    let code = match command {
        Command::Run(a) => run::run(run_options(*a)),
        Command::Check(a) => {
            let report = host_check::diagnose(&a.artifacts.into());
            emit(&report.render());
            emit(&containerd_check::report(&a.containerd_config));
            i32::from(!report.can_run())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "bulkhead", &mut std::io::stdout());
            0
        }
        Command::Man { dir } => match write_man_pages(&dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bulkhead: error: {e:#}");
                1
            }
        },
        Command::BuildInitramfs { agent, out } => match build_initramfs(&agent, &out) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bulkhead: error: {e:#}");
                1
            }
        },
    };
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

fn run_options(a: RunArgs) -> RunOptions {
    RunOptions {
        artifacts: a.artifacts.into(),
        rootfs: a.rootfs,
        read_only: a.read_only,
        init: a.init,
        cpus: a.cpus,
        memory_mib: a.memory,
        process: ProcessFlags {
            args: a.command,
            env: a.env,
            workdir: a.workdir,
            user: a.user,
            tty: a.tty,
            hostname: a.hostname,
        },
        interactive: a.interactive,
        quiet: a.quiet,
        keep_console: a.keep_console,
        cold: a.cold,
        copy_in: CopyInFlags {
            secrets: a.secrets,
            volumes: a.volumes,
            tmpfs: a.tmpfs,
        },
    }
}

fn build_initramfs(agent: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    initramfs::build_agent_initramfs(agent, out).with_context(|| format!("building {}", out.display()))
}

/// `bulkhead.1` and one page per subcommand (`bulkhead-run.1`, ...).
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("bulkhead".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names take `&'static str`; this command runs once and exits.
        let name: &'static str = Box::leak(format!("bulkhead-{}", sub.get_name()).into_boxed_str());
        pages.push((name.to_string(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes a report to stdout; a reader that went away (`| head`) is not an
/// error worth a panic.
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
