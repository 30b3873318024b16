//! Building a VM from a configuration or a snapshot ([`build`]), running
//! it ([`run`]), and saying how it ended.

mod build;
mod run;
mod virtio_devices;

use std::path::PathBuf;

pub use bulkhead_vmm_api::config::RestoreConfig;
use bulkhead_vmm_api::exit::VmmExit;

pub use build::{boot, restore, BootPlan};

use crate::api::ApiError;
use crate::arch::cpu_template::CpuTemplate;
use crate::arch::mptable::MpTableError;
use crate::boot::cmdline::CmdlineError;
use crate::boot::loader::LoaderError;
use crate::boot::params::ParamsError;
use crate::config::ConfigError;
use crate::devices::manager::DeviceError;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::vsock::VsockError;
use crate::host::HostKind;
use crate::signals;
use crate::snapshot::SnapshotError;
use crate::vcpu::control::ControlError;
use crate::vcpu::exit_info::VcpuStop;
use crate::vcpu::VcpuError;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot run a VM on this host: {0}")]
    NoKvm(&'static str),
    #[error(transparent)]
    Harden(#[from] crate::harden::HardenError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read KVM's supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile { path: String, source: std::io::Error },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot create the entropy device: {0}")]
    Rng(std::io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    VcpuControl(#[from] ControlError),
    /// The snapshot cannot be used: unreadable, corrupt, another format
    /// version, or not matching its memory file.
    #[error("cannot restore from {dir}: {source}")]
    BadSnapshot { dir: PathBuf, source: SnapshotError },
    #[error("cannot restore the device state: {0}")]
    Restore(String),
}

fn event_loop_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::EventLoop(e.to_string())
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    Guest(VcpuStop),
    Timeout(u64),
    /// SIGINT, SIGTERM or SIGHUP reached the VMM.
    Signal(i32),
}

impl Stopped {
    /// The VMM's exit status ([`VmmExit`]); 128 + the signal for a
    /// termination signal.
    pub fn exit_code(&self) -> u8 {
        let exit = match self {
            Stopped::Guest(VcpuStop::Reset) | Stopped::Guest(VcpuStop::Halted { .. }) => VmmExit::Stopped,
            Stopped::Guest(VcpuStop::InternalError { .. }) => VmmExit::KvmInternal,
            Stopped::Guest(VcpuStop::TripleFault { .. }) => VmmExit::TripleFault,
            Stopped::Timeout(_) => VmmExit::Timeout,
            Stopped::Signal(sig) => return 128 + *sig as u8,
            Stopped::Guest(_) => VmmExit::Error,
        };
        exit.code()
    }

    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Guest(s) => s.fmt(f),
            Stopped::Timeout(secs) => {
                write!(f, "the guest did not finish within the {secs} s timeout")
            }
            Stopped::Signal(sig) => write!(f, "stopped by {}", signals::name(*sig)),
        }
    }
}

/// What the run produced, for the caller to report.
#[derive(Debug)]
pub struct RunOutcome {
    pub stopped: Stopped,
    pub template: CpuTemplate,
    pub host: HostKind,
    pub unhandled_pio: u64,
    pub unhandled_mmio: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        use crate::vcpu::exit_info::GuestLocation;
        assert_eq!(Stopped::Guest(VcpuStop::Reset).exit_code(), 0);
        let at = GuestLocation::default();
        assert_eq!(
            Stopped::Guest(VcpuStop::TripleFault { cpu: 0, at: at.clone() }).exit_code(),
            4
        );
        assert_eq!(
            Stopped::Guest(VcpuStop::InternalError {
                cpu: 0,
                suberror: 1,
                at
            })
            .exit_code(),
            3
        );
        assert_eq!(Stopped::Timeout(3).exit_code(), 5);
        assert_eq!(Stopped::Guest(VcpuStop::FailEntry { cpu: 0, reason: 1 }).exit_code(), 1);
    }
}
