//! `bulkhead check`: can this host run sandboxes, and if not, why not. The
//! same diagnosis runs before every `bulkhead run`, which refuses at once
//! with the same words rather than failing minutes into a boot.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::paths::{self, Artifact, ArtifactFlags, Artifacts, PathError};

/// The kernel parameter the project's PVM patches add; its name in the
/// kernel image tells that the image carries them.
pub const PVM_PATCH_MARKER: &[u8] = b"bulkhead.no_int3_selftest";

/// What a PVM host means for the user, said wherever it matters.
pub const PVM_NOTE: &str = "this host has no hardware virtualization (PVM): sandboxes run, but the guest kernel \
is emulated on this host: boots take tens of seconds to minutes and system calls are slow; this is not the \
product's speed.";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmAccess {
    Usable,
    Missing,
    /// Present but not openable read-write (usually permissions).
    Denied(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V flags in /proc/cpuinfo.
    Hardware,
    /// KVM from the `kvm_pvm` module, no VT-x/AMD-V.
    Pvm,
    /// Neither; a nested set-up may still offer a working /dev/kvm.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelPvm {
    Present,
    Absent,
    /// Could not tell (a compressed bzImage, or a read error).
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub kvm: KvmAccess,
    pub host: HostKind,
    /// Informational: the VMM serves vsock itself over a Unix socket.
    pub vhost_vsock: bool,
    /// Informational: the guest always uses its own cgroup v2.
    pub host_cgroup_v2: bool,
    pub kernel: Result<PathBuf, PathError>,
    /// `None` when there is no kernel to look at.
    pub kernel_pvm: Option<KernelPvm>,
    pub initramfs: Result<PathBuf, PathError>,
    pub vmm: Result<PathBuf, PathError>,
}

/// Looks at the host and the artifacts.
pub fn diagnose(flags: &ArtifactFlags) -> CheckReport {
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => KvmAccess::Usable,
        Err(e) if e.kind() == io::ErrorKind::NotFound => KvmAccess::Missing,
        Err(e) => KvmAccess::Denied(e.to_string()),
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let host = classify_host(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists());
    let kernel = paths::locate(Artifact::Kernel, flags);
    let kernel_pvm = kernel.as_ref().ok().map(|k| kernel_has_pvm_changes(k));
    CheckReport {
        kvm,
        host,
        vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        host_cgroup_v2: Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        kernel,
        kernel_pvm,
        initramfs: paths::locate(Artifact::Initramfs, flags),
        vmm: paths::locate(Artifact::Vmm, flags),
    }
}

pub fn classify_host(cpuinfo: &str, pvm_module: bool) -> HostKind {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|f| f == "vmx" || f == "svm");
    match (hw, pvm_module) {
        (true, _) => HostKind::Hardware,
        (false, true) => HostKind::Pvm,
        (false, false) => HostKind::Unknown,
    }
}

/// Searches the kernel image for [`PVM_PATCH_MARKER`], in chunks so the
/// whole image is never held at once.
pub fn kernel_has_pvm_changes(kernel: &Path) -> KernelPvm {
    match search_file(kernel, PVM_PATCH_MARKER) {
        Ok(Found::Yes) => KernelPvm::Present,
        Ok(Found::No { bzimage: false }) => KernelPvm::Absent,
        Ok(Found::No { bzimage: true }) => {
            KernelPvm::Unknown("a compressed bzImage; give the vmlinux next to it to check".into())
        }
        Err(e) => KernelPvm::Unknown(format!("cannot read it: {e}")),
    }
}

enum Found {
    Yes,
    No { bzimage: bool },
}

fn search_file(path: &Path, needle: &[u8]) -> io::Result<Found> {
    const CHUNK: usize = 1 << 20;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; CHUNK + needle.len()];
    let mut kept = 0; // bytes carried over from the previous chunk
    let mut first = true;
    let mut bzimage = false;
    loop {
        let n = f.read(&mut buf[kept..])?;
        if n == 0 {
            return Ok(Found::No { bzimage });
        }
        let len = kept + n;
        if first {
            // The x86 boot protocol's header signature.
            bzimage = len >= 0x206 && &buf[0x202..0x206] == b"HdrS";
            first = false;
        }
        if buf[..len].windows(needle.len()).any(|w| w == needle) {
            return Ok(Found::Yes);
        }
        kept = (needle.len() - 1).min(len);
        buf.copy_within(len - kept..len, 0);
    }
}

impl CheckReport {
    /// Why sandboxes cannot run here; empty when they can.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match &self.kvm {
            KvmAccess::Usable => {}
            KvmAccess::Missing => p.push(
                "/dev/kvm is missing: load kvm_intel or kvm_amd (or kvm_pvm on a host without VT-x/AMD-V)".into(),
            ),
            KvmAccess::Denied(e) => p.push(format!(
                "/dev/kvm cannot be opened read-write ({e}): add this user to the kvm group or run as root"
            )),
        }
        for r in [&self.kernel, &self.initramfs, &self.vmm] {
            if let Err(e) = r {
                p.push(format!("{e}; run scripts/setup"));
            }
        }
        if self.host == HostKind::Pvm && self.kernel_pvm == Some(KernelPvm::Absent) {
            p.push(
                "this is a PVM host and the guest kernel lacks the project's PVM changes (no \
                 bulkhead.no_int3_selftest parameter): it would stop early in boot; use the kernel that \
                 kernel-config/build.sh builds"
                    .into(),
            );
        }
        p
    }

    pub fn can_run(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn emulated(&self) -> bool {
        self.host == HostKind::Pvm
    }

    /// The artifacts, when all three were found.
    pub fn artifacts(&self) -> Option<Artifacts> {
        Some(Artifacts {
            kernel: self.kernel.clone().ok()?,
            initramfs: self.initramfs.clone().ok()?,
            vmm: self.vmm.clone().ok()?,
        })
    }

    /// Plain words, one finding a line, then the verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let kvm = match &self.kvm {
            KvmAccess::Usable => "usable (read-write)".to_string(),
            KvmAccess::Missing => "missing".to_string(),
            KvmAccess::Denied(e) => format!("present but not usable: {e}"),
        };
        let host = match self.host {
            HostKind::Hardware => "hardware virtualization (VT-x/AMD-V)",
            HostKind::Pvm => "PVM (kvm_pvm loaded, no VT-x/AMD-V): the guest kernel is emulated",
            HostKind::Unknown => "unknown (no vmx/svm CPU flag, no kvm_pvm module)",
        };
        let vsock = format!(
            "served by bulkhead-vmm through a Unix socket; no host vhost-vsock module is needed \
             (/dev/vhost-vsock {})",
            if self.vhost_vsock { "exists" } else { "is absent" }
        );
        let cgroup = if self.host_cgroup_v2 {
            "cgroup v2 (informational: the guest always uses its own cgroup v2)"
        } else {
            "cgroup v1 or hybrid (informational: the guest always uses its own cgroup v2)"
        };
        let found = |r: &Result<PathBuf, PathError>| match r {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("NOT FOUND: {e}"),
        };
        let mut kernel = found(&self.kernel);
        match &self.kernel_pvm {
            Some(KernelPvm::Present) => kernel.push_str(" (carries the PVM changes)"),
            Some(KernelPvm::Absent) => kernel.push_str(" (without the PVM changes)"),
            Some(KernelPvm::Unknown(why)) => {
                let _ = write!(kernel, " (PVM changes: cannot tell, {why})");
            }
            None => {}
        }
        for (name, value) in [
            ("/dev/kvm", kvm.as_str()),
            ("host", host),
            ("vsock", &vsock),
            ("host cgroups", cgroup),
            ("guest kernel", &kernel),
            ("initramfs", &found(&self.initramfs)),
            ("VMM", &found(&self.vmm)),
        ] {
            let _ = writeln!(s, "{name:<14}{value}");
        }
        s.push('\n');
        let problems = self.problems();
        if problems.is_empty() {
            s.push_str("Sandboxes can run on this host.\n");
            if self.emulated() {
                let _ = writeln!(s, "Note: {PVM_NOTE}");
            }
            if self.host == HostKind::Unknown {
                s.push_str("Note: /dev/kvm works, but the CPU shows no VT-x/AMD-V and kvm_pvm is not loaded.\n");
            }
        } else {
            s.push_str("Sandboxes cannot run on this host:\n");
            for p in problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            kvm: KvmAccess::Usable,
            host: HostKind::Pvm,
            vhost_vsock: false,
            host_cgroup_v2: true,
            kernel: Ok("/k/vmlinux".into()),
            kernel_pvm: Some(KernelPvm::Present),
            initramfs: Ok("/k/initramfs.cpio".into()),
            vmm: Ok("/k/bulkhead-vmm".into()),
        }
    }

    #[test]
    fn pvm_host_that_can_run_says_so_and_warns() {
        let r = report();
        assert!(r.can_run());
        let text = r.render();
        assert!(text.contains("Sandboxes can run on this host."), "{text}");
        assert!(text.contains("boots take tens of seconds to minutes"), "{text}");
        assert!(text.contains("/k/vmlinux (carries the PVM changes)"), "{text}");
        assert!(text.contains("/dev/vhost-vsock is absent"), "{text}");
    }

    #[test]
    fn blocking_problems_are_listed() {
        let r = CheckReport {
            kvm: KvmAccess::Denied("Permission denied".into()),
            kernel_pvm: Some(KernelPvm::Absent),
            initramfs: Err(PathError::NotFound {
                what: Artifact::Initramfs,
                looked: vec!["--initramfs (not given)".into()],
            }),
            ..report()
        };
        assert!(!r.can_run());
        assert_eq!(r.problems().len(), 3);
        let text = r.render();
        assert!(text.contains("Sandboxes cannot run on this host:"), "{text}");
        assert!(text.contains("kvm group"), "{text}");
        assert!(text.contains("lacks the project's PVM changes"), "{text}");
        assert!(text.contains("initramfs (guest agent) not found"), "{text}");
        assert!(!text.contains("Note:"), "{text}");
        // The same kernel is fine on a hardware host.
        let hw = CheckReport {
            host: HostKind::Hardware,
            kernel_pvm: Some(KernelPvm::Absent),
            ..report()
        };
        assert!(hw.can_run());
    }

    #[test]
    fn host_kinds_and_marker_search() {
        assert_eq!(classify_host("flags\t: fpu vmx sse\n", false), HostKind::Hardware);
        assert_eq!(classify_host("flags\t: fpu sse\n", true), HostKind::Pvm);
        assert_eq!(classify_host("flags\t: fpu sse\n", false), HostKind::Unknown);
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        // The marker straddles the 1 MiB chunk boundary.
        let mut bytes = vec![0u8; (1 << 20) - 5];
        bytes.extend_from_slice(PVM_PATCH_MARKER);
        bytes.extend_from_slice(&[0; 100]);
        std::fs::write(&k, &bytes).unwrap();
        assert_eq!(kernel_has_pvm_changes(&k), KernelPvm::Present);
        std::fs::write(&k, vec![1u8; 3 << 20]).unwrap();
        assert_eq!(kernel_has_pvm_changes(&k), KernelPvm::Absent);
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&k, &bz).unwrap();
        assert!(matches!(kernel_has_pvm_changes(&k), KernelPvm::Unknown(_)));
    }
}
