//! Helpers shared by the end-to-end tiers: find the built binaries, require
//! KVM (a tier that cannot run fails with the reason; it never passes
//! silently), and run the VMM with its output captured.

pub mod agent;
pub mod containerd;
pub mod initramfs;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use bulkhead_vmm::host::HostKind;

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The `bulkhead-vmm` binary under test: `$BULKHEAD_VMM`, or the workspace's
/// debug build (scripts/test builds it before running the tests).
pub fn vmm_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/bulkhead-vmm"));
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p bulkhead-vmm`, or run scripts/test)",
        path.display()
    );
    path
}

/// The static agent built for the guest: `$BULKHEAD_GUEST_AGENT`, or what
/// scripts/build-guest (run by scripts/test) leaves in the target directory.
pub fn guest_agent() -> PathBuf {
    let p = std::env::var_os("BULKHEAD_GUEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("x86_64-unknown-linux-gnu/release/bulkhead-agent"));
    assert!(
        p.is_file(),
        "{} is missing: build the static agent (scripts/build-guest, run by scripts/test)",
        p.display()
    );
    p
}

/// The agent's initramfs, written into `dir`.
pub fn guest_initramfs(dir: &Path) -> PathBuf {
    let out = dir.join("initramfs.cpio");
    bulkhead::initramfs::build_agent_initramfs(&guest_agent(), &out).expect("cannot build the agent's initramfs");
    out
}

/// What a sandbox boots: the project's kernel, the VMM under test, and the
/// agent's initramfs written into `dir`.
pub fn sandbox_artifacts(dir: &Path) -> bulkhead_runtime::paths::Artifacts {
    bulkhead_runtime::paths::Artifacts {
        kernel: kernel(),
        initramfs: guest_initramfs(dir),
        vmm: vmm_bin(),
    }
}

/// Fails the calling test, with the reason, where KVM cannot run guests.
pub fn require_kvm() -> HostKind {
    let kind = HostKind::detect();
    assert_ne!(
        kind,
        HostKind::NoKvm,
        "this tier needs a usable /dev/kvm (read-write); none here"
    );
    kind
}

/// Runs the VMM with `args` to completion and captures everything.
pub fn run_vmm<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start bulkhead-vmm")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The project's guest kernel: `$BULKHEAD_KERNEL`, or whatever
/// `kernel-config/build.sh` prints (it builds only when the cache misses).
pub fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("BULKHEAD_KERNEL") {
        return PathBuf::from(k);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-config/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed; see its output above",
        script.display()
    );
    let path = text(&out.stdout).lines().last().map(str::trim).map(PathBuf::from);
    match path {
        Some(p) if p.is_file() => p,
        other => panic!("{} printed no kernel path (last line: {other:?})", script.display()),
    }
}

/// Debian's static busybox, which the tests put into initramfs images.
pub fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox is missing: install Debian's busybox-static")
}
