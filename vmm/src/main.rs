//! `bulkhead-vmm`: boot a kernel in a KVM microVM and show its console.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use bulkhead_vmm::config::{
    parse_disk, parse_vsock, BlockConfig, CpuTemplate, RestoreConfig, SerialOutput, VmConfig, VsockConfig,
};
use bulkhead_vmm::host::HostKind;
use bulkhead_vmm::seccomp::SeccompPolicy;
use bulkhead_vmm::vmm::{self, VmmError};
use bulkhead_vmm_api::exit::VmmExit;
use bulkhead_vmm_api::jail::JailConfig;

#[derive(Parser, Debug)]
#[command(name = "bulkhead-vmm", version, about = "Boot a Linux kernel in a KVM microVM.", after_help = EXIT_HELP)]
struct Args {
    /// Kernel image: an ELF vmlinux (PVH entry when present) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial RAM disk (an uncompressed cpio boots fastest).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line; the CPU template's parameters are appended.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N")]
    mem_mib: Option<u32>,
    /// Serial console: stdout, off, or a file path.
    #[arg(long, value_name = "stdout|PATH|off")]
    serial: Option<SerialOutput>,
    /// CPU template (host, pvm); detected from the host when absent.
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<CpuTemplate>,
    /// End the VM with an error after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// A virtio-blk disk backed by a raw image: PATH[,ro]. Repeatable; the
    /// first is /dev/vda.
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<BlockConfig>,
    /// virtio-vsock: the guest's CID and the host-side Unix socket.
    #[arg(long, value_name = "CID,UDS_PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Leave out the virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
    /// Serve the control API (HTTP/1.1, JSON bodies) on this Unix socket;
    /// the path must not exist. Removed when the VMM exits.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// JSON file with the same settings (field names: kernel, initrd,
    /// cmdline, vcpus, mem_mib, serial, cpu_template, timeout_secs, disks,
    /// vsock, rng, api_socket);
    /// flags given on the command line override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Start from a snapshot directory (its `state` and `memory` files)
    /// instead of booting; only --api-sock, --vsock, --serial, --timeout and
    /// --disk go with it (each --disk replaces the saved disk at its place,
    /// with the same read-only flag). The memory file is mapped privately
    /// and never written.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "cpu_template", "no_rng", "config"]
    )]
    restore: Option<PathBuf>,
    /// JSON file for a restore (field names: snapshot_dir, api_socket,
    /// vsock, serial, timeout_secs, disks); restore flags given as well
    /// override it.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "cpu_template", "no_rng", "config", "restore"]
    )]
    restore_config: Option<PathBuf>,
    /// Run without the per-thread seccomp filters. For debugging only: a
    /// device-model bug the guest exploits could then make any call.
    #[arg(long)]
    no_seccomp: bool,
    /// JSON file naming the jail to enter before anything else (needs
    /// root): a root of its own holding only the listed files and
    /// /dev/kvm, and the uid and gid the guest runs under (field names:
    /// root, uid, gid, paths: [{path, writable}]).
    #[arg(long, value_name = "PATH")]
    jail: Option<PathBuf>,
}

const EXIT_HELP: &str = "Exit status: 0 guest reboot or shutdown, 1 VMM error, 2 invalid configuration \
or an unusable snapshot, 3 KVM internal error (e.g. an instruction the emulator cannot run), 4 guest triple fault, 5 timeout. \
Killed by SIGSYS: a thread made a system call its seccomp filter refuses (the log names it).";

impl Args {
    /// A restore's configuration, when the flags ask for one.
    fn restore_config(&self) -> Result<Option<RestoreConfig>, VmmError> {
        let mut rc = match (&self.restore_config, &self.restore) {
            (Some(path), _) => RestoreConfig::from_json_file(path)?,
            (None, Some(dir)) => RestoreConfig::new(dir),
            (None, None) => return Ok(None),
        };
        if self.api_sock.is_some() {
            rc.api_socket = self.api_sock.clone();
        }
        if self.vsock.is_some() {
            rc.vsock = self.vsock.clone();
        }
        if let Some(s) = &self.serial {
            rc.serial = s.clone();
        }
        if self.timeout.is_some() {
            rc.timeout_secs = self.timeout;
        }
        if !self.disks.is_empty() {
            rc.disks = Some(self.disks.clone());
        }
        Ok(Some(rc))
    }

    fn into_config(self) -> Result<VmConfig, VmmError> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_json_file(path)?,
            None => VmConfig::new(self.kernel.clone().ok_or_else(|| {
                VmmError::Config(bulkhead_vmm::config::ConfigError::invalid(
                    "kernel",
                    "required (give --kernel PATH or --config PATH)",
                ))
            })?),
        };
        if let Some(k) = self.kernel {
            config.kernel = k;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd;
        }
        if self.cmdline.is_some() {
            config.cmdline = self.cmdline;
        }
        if let Some(v) = self.vcpus {
            config.vcpus = v;
        }
        if let Some(m) = self.mem_mib {
            config.mem_mib = m;
        }
        if let Some(s) = self.serial {
            config.serial = s;
        }
        if self.cpu_template.is_some() {
            config.cpu_template = self.cpu_template;
        }
        if self.timeout.is_some() {
            config.timeout_secs = self.timeout;
        }
        if !self.disks.is_empty() {
            config.disks = self.disks;
        }
        if self.vsock.is_some() {
            config.vsock = self.vsock;
        }
        if self.no_rng {
            config.rng = false;
        }
        if self.api_sock.is_some() {
            config.api_socket = self.api_sock;
        }
        Ok(config)
    }
}

/// Each vsock connection holds a descriptor; a soft limit of 1024 (common,
/// and what Go parents restore) would run out before the connection limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the initialised rlimit; raising the soft
        // limit up to the hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

fn main() -> ExitCode {
    raise_fd_limit();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG").unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = match e.downcast_ref::<VmmError>() {
                Some(VmmError::Config(_) | VmmError::BadSnapshot { .. }) => VmmExit::BadConfig,
                _ => VmmExit::Error,
            }
            .code();
            report(format_args!("{e:#}"));
            ExitCode::from(code)
        }
    }
}

/// The last word on stderr. Never `eprintln!`: it panics when the write
/// fails, and a jailed VMM's log stops at its file-size cap (a guest can
/// fill it with warnings), which would turn any exit into an abort.
fn report(what: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "bulkhead-vmm: error: {what}");
}

/// Enters the jail, if there is one, once the configuration is read (it
/// may lie outside) and before anything it names is opened.
fn enter(jail: Option<&JailConfig>) -> anyhow::Result<()> {
    if let Some(jail) = jail {
        // What the jail hides, asked first.
        HostKind::detect();
        bulkhead_vmm::api::routes::open_statm();
        bulkhead_vmm::jail::enter(jail)?;
    }
    Ok(())
}

fn run() -> anyhow::Result<u8> {
    let args = Args::parse();
    // Filters::compile warns, loudly, when this is off.
    let seccomp = SeccompPolicy::from_flag(args.no_seccomp);
    let jail = args.jail.as_deref().map(JailConfig::from_json_file).transpose()?;
    let outcome = match args.restore_config()? {
        Some(rc) => {
            enter(jail.as_ref())?;
            vmm::restore(&rc, seccomp)
        }
        None => {
            let config = args.into_config()?;
            enter(jail.as_ref())?;
            vmm::boot(&config, seccomp)
        }
    }
    .map_err(anyhow::Error::from)?;
    let code = outcome.stopped.exit_code();
    if code == 0 {
        tracing::info!(
            unhandled_pio = outcome.unhandled_pio,
            unhandled_mmio = outcome.unhandled_mmio,
            "{}",
            outcome.stopped
        );
    } else {
        report(format_args!("{}", outcome.stopped));
    }
    Ok(code)
}
