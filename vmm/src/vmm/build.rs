//! Building a VM: from a configuration (a cold boot: kernel, boot
//! parameters, vCPUs at their entry) or from a snapshot (memory mapped
//! from its file, every component's state put back). Both prepare the
//! host and create the devices the same way, then hand the VM to
//! [`super::run`].

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use tracing::info;
use vm_memory::{Bytes, GuestAddress};

use super::run::{run_vm, Running};
use super::virtio_devices::{create_virtio_devices, VirtioDevices};
use super::{event_loop_err, RestoreConfig, RunOutcome, VmmError};
use crate::api::ApiListener;
use crate::arch::cpu_template::{CpuTemplate, TemplateTables};
use crate::arch::layout::{CMDLINE_START, MMIO_GAP_START};
use crate::arch::mptable;
use crate::arch::regs::EntryMode;
use crate::boot::cmdline;
use crate::boot::loader;
use crate::boot::params;
use crate::config::{BlockConfig, ConfigError, DeviceSet, SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::console_file::{BoundedFile, CONSOLE_MAX_BYTES};
use crate::devices::legacy::serial::SerialOut;
use crate::devices::manager::DeviceManager;
use crate::host::HostKind;
use crate::seccomp::SeccompPolicy;
use crate::signals::TerminationSignals;
use crate::snapshot::{self as snap, SavedConfig, SnapshotError};
use crate::vcpu::{BootEntry, Vcpu};
use crate::vm::Vm;

/// Resolved settings that the VM is built from.
pub struct BootPlan {
    pub host: HostKind,
    pub template: CpuTemplate,
    pub cmdline: String,
}

impl BootPlan {
    /// `device_params` are the `virtio_mmio.device=` entries of the VM's devices.
    pub fn new(config: &VmConfig, host: HostKind, device_params: &[String]) -> Result<Self, VmmError> {
        let template = config.cpu_template.unwrap_or_else(|| CpuTemplate::for_host(host));
        let mut extra = template.kernel_params();
        extra.extend_from_slice(device_params);
        let cmdline = cmdline::compose(config.cmdline.as_deref(), &extra)?;
        Ok(BootPlan {
            host,
            template,
            cmdline,
        })
    }
}

fn open_serial(serial: &SerialOutput) -> Result<Option<SerialOut>, VmmError> {
    Ok(match serial {
        SerialOutput::Off => None,
        SerialOutput::Stdout => Some(Box::new(std::io::stdout())),
        SerialOutput::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Some(Box::new(BoundedFile::new(f, CONSOLE_MAX_BYTES)))
        }
    })
}

/// What every VM needs from the host before it is built, cold or
/// restored: termination signals routed to the event loop (before
/// anything that leaves state behind, so a signal ends the run through
/// the normal exit path), a usable KVM, and the control API's socket,
/// bound now so that a bad path fails before the guest runs.
struct HostPrep {
    signals: TerminationSignals,
    host: HostKind,
    api_listener: Option<ApiListener>,
}

fn prepare_host(api_socket: Option<&Path>) -> Result<HostPrep, VmmError> {
    let signals = TerminationSignals::block().map_err(event_loop_err)?;
    let host = HostKind::detect();
    if host == HostKind::NoKvm {
        return Err(VmmError::NoKvm(
            "/dev/kvm is missing or not accessible (load kvm_intel, kvm_amd or kvm_pvm, and check permissions)",
        ));
    }
    // Dropping it (any way out) removes the socket file.
    let api_listener = api_socket.map(ApiListener::bind).transpose()?;
    Ok(HostPrep {
        signals,
        host,
        api_listener,
    })
}

/// A VM with its buses and devices, before its guest state is set: what
/// a cold boot and a restore build alike.
struct Machine {
    vm: Arc<Vm>,
    devices: DeviceManager,
    virtio: VirtioDevices,
}

impl Machine {
    fn new(vm: Vm, serial: &SerialOutput, set: &DeviceSet) -> Result<Machine, VmmError> {
        let vm = Arc::new(vm);
        let mut devices = DeviceManager::new(&vm.fd, open_serial(serial)?)?;
        let virtio = create_virtio_devices(set, &vm, &mut devices)?;
        Ok(Machine { vm, devices, virtio })
    }

    /// vCPU `id`, wired to the buses and guest memory.
    fn vcpu(&self, id: u8) -> Result<Vcpu, VmmError> {
        Ok(Vcpu::new(
            &self.vm.fd,
            id,
            self.devices.pio_bus.clone(),
            self.devices.mmio_bus.clone(),
            self.vm.memory.clone(),
        )?)
    }

    /// Runs the VM until it ends.
    fn run(
        self,
        prep: HostPrep,
        vcpus: Vec<Vcpu>,
        timeout_secs: Option<u64>,
        saved: SavedConfig,
        seccomp: SeccompPolicy,
    ) -> Result<RunOutcome, VmmError> {
        run_vm(Running {
            vm: self.vm,
            devices: self.devices,
            virtio: self.virtio,
            vcpus,
            signals: prep.signals,
            api_listener: prep.api_listener,
            timeout_secs,
            saved,
            host: prep.host,
            seccomp,
        })
    }
}

/// Validates `config`, boots the VM and blocks until it ends.
pub fn boot(config: &VmConfig, seccomp: SeccompPolicy) -> Result<RunOutcome, VmmError> {
    crate::config::validate(config)?;
    let prep = prepare_host(config.api_socket.as_deref())?;
    let host = prep.host;
    let mem_size = u64::from(config.mem_mib) << 20;
    let machine = Machine::new(Vm::create(mem_size)?, &config.serial, &config.devices())?;
    let (vm, devices) = (&machine.vm, &machine.devices);
    let plan = BootPlan::new(config, host, devices.cmdline_entries())?;
    info!(host = %host, template = %plan.template, cmdline = %plan.cmdline, "booting");

    let kernel = loader::load_kernel(&vm.memory, &config.kernel)?;
    let mut cmdline_bytes = plan.cmdline.clone().into_bytes();
    cmdline_bytes.push(0);
    vm.memory
        .write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(VmmError::CmdlineWrite)?;

    let initrd = match &config.initrd {
        Some(path) => {
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(MMIO_GAP_START - 1);
            Some(loader::load_initrd(&vm.memory, path, kernel.end, max)?)
        }
        None => None,
    };
    match kernel.mode {
        EntryMode::Linux64 => {
            params::write_linux_params(&vm.memory, mem_size, plan.cmdline.len(), initrd, kernel.setup_header)?
        }
        EntryMode::Pvh => params::write_pvh_params(&vm.memory, mem_size, initrd)?,
    }
    mptable::setup(&vm.memory, config.vcpus)?;

    let supported = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::Cpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = machine.vcpu(index)?;
        let boot = (index == 0).then_some(BootEntry {
            mode: kernel.mode,
            entry: kernel.entry,
        });
        vcpu.configure(&supported, plan.template, config.vcpus, boot)?;
        vcpus.push(vcpu);
    }

    let saved = SavedConfig {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        cpu_template: plan.template,
        devices: config.devices(),
    };
    machine.run(prep, vcpus, config.timeout_secs, saved, seccomp)
}

/// Checks that `new` can stand in for the saved disks.
fn replace_disks(saved: &[BlockConfig], new: &[BlockConfig]) -> Result<(), ConfigError> {
    if saved.len() != new.len() {
        return Err(ConfigError::Invalid {
            field: "disks",
            message: format!("the snapshot has {} disks; {} were given", saved.len(), new.len()),
        });
    }
    for (i, (s, n)) in saved.iter().zip(new).enumerate() {
        if s.read_only != n.read_only {
            return Err(ConfigError::Invalid {
                field: "disks",
                message: format!(
                    "disk {i} was {} in the snapshot; a replacement keeps that",
                    if s.read_only { "read-only" } else { "writable" }
                ),
            });
        }
    }
    Ok(())
}

/// Rebuilds the VM saved in `rc.snapshot_dir`, with its memory mapped
/// privately from the snapshot's memory file, and runs it until it ends.
pub fn restore(rc: &RestoreConfig, seccomp: SeccompPolicy) -> Result<RunOutcome, VmmError> {
    let bad = |source: SnapshotError| VmmError::BadSnapshot {
        dir: rc.snapshot_dir.clone(),
        source,
    };
    let state = snap::read_state_file(&rc.snapshot_dir).map_err(bad)?;
    if let Some(d) = &rc.disks {
        replace_disks(&state.config.devices.disks, d)?;
    }
    if rc.vsock.is_some() && state.config.devices.vsock.is_none() {
        return Err(ConfigError::Invalid {
            field: "vsock",
            message: "the snapshot has no vsock device to attach a socket to".into(),
        }
        .into());
    }
    if rc.timeout_secs == Some(0) {
        return Err(ConfigError::Invalid {
            field: "timeout_secs",
            message: "must be at least 1 second".into(),
        }
        .into());
    }
    let prep = prepare_host(rc.api_socket.as_deref())?;
    let memory = snap::memory::map_private(&rc.snapshot_dir.join(snap::MEMORY_FILE), &state.memory).map_err(bad)?;
    let vm = Vm::with_memory(memory)?;
    // The interrupt controllers, PIT and clock before any vCPU exists.
    vm.restore_state(&state.vm)?;

    let mut saved = state.config.clone();
    if let Some(v) = &rc.vsock {
        saved.devices.vsock = Some(v.clone());
    }
    if let Some(d) = &rc.disks {
        saved.devices.disks = d.clone();
    }
    let machine = Machine::new(vm, &rc.serial, &saved.devices)?;
    let devices = &machine.devices;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for vs in &state.vcpus {
        let vcpu = machine.vcpu(vs.id)?;
        vcpu.restore_state(vs)?;
        vcpus.push(vcpu);
    }
    // Devices last: re-activating them may raise interrupts, which must
    // reach the restored local APICs rather than be overwritten by them.
    lock(&devices.serial)
        .restore_state(&state.serial)
        .map_err(VmmError::Restore)?;
    for (transport, ts) in devices.transports.iter().zip(&state.virtio) {
        lock(transport).restore_state(ts).map_err(VmmError::Restore)?;
    }
    info!(
        dir = %rc.snapshot_dir.display(),
        vcpus = saved.vcpus,
        mem_mib = saved.mem_mib,
        "restored from the snapshot"
    );
    machine.run(prep, vcpus, rc.timeout_secs, saved, seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_disks_must_match_in_number_and_mode() {
        let d = |p: &str, ro| BlockConfig {
            path: p.into(),
            read_only: ro,
        };
        let saved = [d("/placeholder", true)];
        replace_disks(&saved, &[d("/root.ext4", true)]).unwrap();
        let e = replace_disks(&saved, &[d("/root.ext4", false)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-only in the snapshot"), "{e}");
        let e = replace_disks(&saved, &[]).unwrap_err().to_string();
        assert!(e.contains("has 1 disks; 0 were given"), "{e}");
    }

    #[test]
    fn plan_picks_template_from_host_and_appends_its_params() {
        let mut c = VmConfig::new("/k");
        c.cmdline = Some("console=ttyS0 -- init-arg".into());
        let p = BootPlan::new(&c, HostKind::Pvm, &[]).unwrap();
        assert_eq!(p.template, CpuTemplate::Pvm);
        assert!(
            p.cmdline.starts_with("console=ttyS0 noxsave clearcpuid=cx16,"),
            "{}",
            p.cmdline
        );
        assert!(
            p.cmdline
                .contains(" bulkhead.no_int3_selftest GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"),
            "{}",
            p.cmdline
        );
        assert!(p.cmdline.ends_with(" -- init-arg"), "{}", p.cmdline);
        let p = BootPlan::new(
            &c,
            HostKind::HardwareVirtualization,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert_eq!(p.template, CpuTemplate::Host);
        assert_eq!(
            p.cmdline,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 -- init-arg"
        );
        c.cpu_template = Some(CpuTemplate::Pvm);
        let p = BootPlan::new(&c, HostKind::HardwareVirtualization, &[]).unwrap();
        assert_eq!(p.template, CpuTemplate::Pvm, "--cpu-template overrides detection");
    }
}
