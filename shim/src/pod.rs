//! The pod's VM: started on the pod's first container (the runtime's one
//! start path), its disks (one root image each, attached while it runs),
//! pause and resume, and its end.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_runtime::rootfs::RootfsImage;
use bulkhead_runtime::sandbox::{Sandbox, SandboxConfig, SandboxError};
use bulkhead_runtime::start;
use bulkhead_runtime::template::TemplateCache;

use crate::config::Config;
use crate::disks::{Claim, DiskSlots, DisksFull};
use crate::events::Events;
use crate::lock;

/// Written into the bundle so that `delete` finds a dead shim's sandbox.
pub const RUN_DIR_FILE: &str = "bulkhead-run-dir";
/// In the same bundle: the VMM's host cgroup directories, one per line,
/// for `delete` to remove after a shim died.
pub const CGROUP_FILE: &str = "bulkhead-cgroup";

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("the sandbox VM is not running")]
    NotRunning,
    #[error("{0}")]
    Sizing(String),
    #[error("{0}")]
    Artifacts(String),
    #[error("sandbox boot: {0}")]
    Boot(SandboxError),
    #[error(transparent)]
    DisksFull(#[from] DisksFull),
    #[error("attaching the root image: {0}")]
    Attach(SandboxError),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// The container whose Create asks for the pod's sandbox, as its bundle
/// describes it.
#[derive(Clone, Copy)]
pub struct Asking<'a> {
    pub container_id: &'a str,
    pub annotations: &'a HashMap<String, String>,
    pub cgroups_path: Option<&'a str>,
    pub bundle: &'a Path,
}

#[derive(Default)]
pub struct Pod {
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// Which VM disk holds which root image; set with the sandbox.
    disks: Mutex<Option<DiskSlots>>,
    paused: AtomicBool,
    /// The container whose Create started the VM (CRI's sandbox, or a
    /// lone `ctr run` container).
    founder: Mutex<Option<String>>,
}

impl Pod {
    pub fn sandbox(&self) -> Result<Arc<Sandbox>, PodError> {
        lock(&self.sandbox).clone().ok_or(PodError::NotRunning)
    }

    pub fn is_founder(&self, container_id: &str) -> bool {
        lock(&self.founder).as_deref() == Some(container_id)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The sandbox for a container whose root image is `image`, and the
    /// disk that image is on: the pod's first container boots the VM with
    /// its image as disk 0; a later container's image is attached to a
    /// spare disk unless the pod already has it. The caller owns one use
    /// of the disk (see [`Pod::release_disk`]).
    pub fn ensure_sandbox(
        &self,
        asking: &Asking<'_>,
        cfg: &Config,
        image: &RootfsImage,
        events: &Events,
    ) -> Result<(Arc<Sandbox>, u8), PodError> {
        let mut slot = lock(&self.sandbox);
        if let Some(sb) = slot.as_ref() {
            let disk = self.claim_disk(sb, image)?;
            return Ok((sb.clone(), disk));
        }
        let Asking {
            container_id,
            annotations,
            cgroups_path,
            bundle,
        } = *asking;
        let (vcpus, mem_mib) = cfg.sizing(annotations).map_err(|e| PodError::Sizing(e.to_string()))?;
        let artifacts = cfg.artifacts().map_err(|e| PodError::Artifacts(e.to_string()))?;
        tracing::info!(
            "sandbox from kernel {}, initramfs {}, VMM {} (configuration {})",
            artifacts.kernel.display(),
            artifacts.initramfs.display(),
            artifacts.vmm.display(),
            cfg.origin.display()
        );
        let sc = SandboxConfig {
            vcpus,
            mem_mib,
            runtime_root: Some(cfg.run_dir.clone()),
            api_socket: true,
            spare_disks: cfg.spare_disks,
            call_timeout: Some(cfg.create_timeout()),
            host_cgroup: cgroups_path.map(str::to_string),
            ..SandboxConfig::new(artifacts, image.clone())
        };
        // The template, built on first use, or cold; the log says which.
        let templates = TemplateCache::new(&cfg.template_dir);
        let (sb, _) = start::start(&sc, cfg.boot, &templates, &mut start::Quiet).map_err(PodError::Boot)?;
        let sb = Arc::new(sb);
        if let Err(e) = std::fs::write(bundle.join(RUN_DIR_FILE), sb.run_dir().as_os_str().as_encoded_bytes()) {
            tracing::warn!("cannot record the run directory in the bundle: {e}");
        }
        if let Some(cg) = sb.host_cgroup() {
            let dirs: Vec<String> = cg.dirs().iter().map(|d| d.display().to_string()).collect();
            tracing::info!("the sandbox VMM runs in the host cgroup {}", dirs.join(", "));
            if let Err(e) = std::fs::write(bundle.join(CGROUP_FILE), dirs.join("\n")) {
                tracing::warn!("cannot record the host cgroup in the bundle: {e}");
            }
        }
        events.watch_oom(&sb);
        let mut disks = DiskSlots::new(&image.path, cfg.spare_disks);
        let disk = match disks.claim(&image.path) {
            Ok(Claim::Attached(d)) => d,
            _ => {
                return Err(PodError::Internal(
                    "disk 0 does not hold the image the VM started with".into(),
                ))
            }
        };
        *lock(&self.disks) = Some(disks);
        *lock(&self.founder) = Some(container_id.to_string());
        *slot = Some(sb.clone());
        Ok((sb, disk))
    }

    /// One more use of `image` in the running VM: the disk that has it, or
    /// a spare disk it is attached to now.
    fn claim_disk(&self, sb: &Sandbox, image: &RootfsImage) -> Result<u8, PodError> {
        let mut guard = lock(&self.disks);
        let disks = guard
            .as_mut()
            .ok_or_else(|| PodError::Internal("the sandbox has no disk table".into()))?;
        match disks.claim(&image.path)? {
            Claim::Attached(d) => Ok(d),
            Claim::Attach(d) => match sb.attach_image(d, &image.path) {
                Ok(()) => {
                    tracing::info!("attached {} as disk {d}", image.path.display());
                    Ok(d)
                }
                Err(e) => {
                    disks.abandon(d);
                    Err(PodError::Attach(e))
                }
            },
        }
    }

    /// One use of `disk` fewer; the last use of a spare disk empties it, so
    /// the VMM no longer holds the image (the guest has unmounted it).
    pub fn release_disk(&self, disk: u8) {
        // Sandbox, then disks: `ensure_sandbox`'s order.
        let sb = lock(&self.sandbox).clone();
        let mut guard = lock(&self.disks);
        let Some(disks) = guard.as_mut() else { return };
        if let (Some(d), Some(sb)) = (disks.release(disk), sb) {
            if let Err(e) = sb.detach_image(d) {
                tracing::warn!("cannot empty disk {d}: {e}");
            }
        }
    }

    /// Pauses or resumes the whole VM: its containers share the vCPUs.
    pub fn set_paused(&self, paused: bool) -> Result<(), PodError> {
        self.sandbox()?.set_paused(paused)?;
        self.paused.store(paused, Ordering::SeqCst);
        Ok(())
    }

    /// Kills the VM's process but keeps the sandbox: its waiters see the
    /// VM gone (their processes exit with 255) and `shutdown` reaps it.
    pub fn kill_vm(&self) {
        let sb = lock(&self.sandbox).clone();
        if let Some(Err(e)) = sb.map(|sb| sb.kill_vmm()) {
            tracing::warn!("killing the sandbox VM: {e}");
        }
    }

    /// Ends the VM (its run directory goes with it).
    pub fn shutdown(&self) {
        let sb = lock(&self.sandbox).take();
        lock(&self.disks).take();
        if let Some(sb) = sb {
            match Arc::try_unwrap(sb) {
                // Dropping kills the VMM and removes its run directory;
                // the guest holds nothing worth a clean shutdown.
                Ok(sb) => drop(sb),
                Err(sb) => {
                    // A waiter still holds it: kill the VM through its
                    // handle (never a reused pid), as kill_vm does.
                    if let Err(e) = sb.kill_vmm() {
                        tracing::warn!("killing the sandbox VM: {e}");
                    }
                }
            }
        }
    }
}
