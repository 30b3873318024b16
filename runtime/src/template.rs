//! Sandbox templates: a guest booted once with its agent waiting, paused and
//! snapshotted, so later sandboxes of the same configuration restore it in
//! milliseconds instead of booting. One template per (kernel, initramfs,
//! VMM binary, vCPUs, memory) under `<cache>/templates/<key>/`, where the
//! key hashes the three files' bytes and the numbers; `meta.json` records
//! the inputs and is checked on every use, so a changed file, another
//! bulkhead version or a damaged directory means a rebuild, never a restore
//! of something else.
//!
//! The template boots with a large sparse placeholder as its read-only root
//! disk: the guest reads the disk's capacity once at boot, and a restore
//! swaps in the real root image (`--disk`), which must fit in it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::paths::Artifacts;
use crate::rootfs::{FsType, RootfsImage};
use crate::sandbox::{BootProgress, Sandbox, SandboxConfig, SandboxError};
use crate::util;
use bulkhead_vmm_api::client::{ApiCallError, ApiClient};

/// Bumped whenever what a template holds, or how it is built, changes.
pub const TEMPLATE_FORMAT: u32 = 2;
/// The placeholder root disk's size: the capacity every restored guest
/// sees, so any root image up to this size can replace it.
pub const PLACEHOLDER_BYTES: u64 = 64 << 30;
pub const META_FILE: &str = "meta.json";
/// The VMM's snapshot files.
pub use bulkhead_vmm_api::snapshot::{MEMORY_FILE, STATE_FILE};
const PLACEHOLDER_FILE: &str = "placeholder.img";
const BULKHEAD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Bounds each control API answer (a pause or a snapshot of a few hundred
/// MiB of mostly-zero memory takes well under a second even under PVM).
const API_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no cache directory: set BULKHEAD_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("booting the template's VM: {0}")]
    Boot(#[from] SandboxError),
    #[error("the template's VM has no control API socket")]
    NoApi,
    #[error(transparent)]
    Api(#[from] ApiCallError),
    #[error("cannot write {path}: {source}")]
    Meta { path: PathBuf, source: serde_json::Error },
    #[error("the root image {path} ({size} bytes) is larger than a template's disk ({PLACEHOLDER_BYTES} bytes)")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("a concurrent build left {dir} unusable: {reason}")]
    LostRace { dir: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One input file as `meta.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    /// Where it was when the template was built (for people; not checked).
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

impl InputFile {
    fn read(path: &Path) -> Result<InputFile, TemplateError> {
        let (size, hash) = hash_file(path).map_err(io_err(path))?;
        Ok(InputFile {
            path: path.to_path_buf(),
            size,
            sha256: util::hex(&hash),
        })
    }

    /// Same bytes, wherever they are now.
    fn same_content(&self, other: &InputFile) -> bool {
        self.size == other.size && self.sha256 == other.sha256
    }
}

/// The VM a template holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Read-only disks after the root one, for images attached later
    /// (`PATCH /drives/{index}`); a restore must bring as many.
    pub spare_disks: u8,
}

impl Shape {
    /// A VM with only its root disk.
    pub fn new(vcpus: u8, mem_mib: u32) -> Shape {
        Shape {
            vcpus,
            mem_mib,
            spare_disks: 0,
        }
    }
}

/// Everything a template depends on, and the key derived from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateMeta {
    pub format: u32,
    pub bulkhead_version: String,
    pub key: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub spare_disks: u8,
    pub kernel: InputFile,
    pub initramfs: InputFile,
    pub vmm: InputFile,
}

impl TemplateMeta {
    /// Hashes the artifacts as they are now.
    pub fn for_inputs(artifacts: &Artifacts, shape: Shape) -> Result<TemplateMeta, TemplateError> {
        let kernel = InputFile::read(&artifacts.kernel)?;
        let initramfs = InputFile::read(&artifacts.initramfs)?;
        let vmm = InputFile::read(&artifacts.vmm)?;
        Ok(Self::from_files(kernel, initramfs, vmm, shape))
    }

    fn from_files(kernel: InputFile, initramfs: InputFile, vmm: InputFile, shape: Shape) -> TemplateMeta {
        let key = template_key(&kernel.sha256, &initramfs.sha256, &vmm.sha256, shape);
        TemplateMeta {
            format: TEMPLATE_FORMAT,
            bulkhead_version: BULKHEAD_VERSION.into(),
            key,
            vcpus: shape.vcpus,
            mem_mib: shape.mem_mib,
            spare_disks: shape.spare_disks,
            kernel,
            initramfs,
            vmm,
        }
    }

    /// Why a template recorded as `self` cannot stand in for `wanted`.
    fn mismatch(&self, wanted: &TemplateMeta) -> Option<String> {
        if self.format != wanted.format {
            return Some(format!("template format {} (want {})", self.format, wanted.format));
        }
        if self.bulkhead_version != wanted.bulkhead_version {
            return Some(format!(
                "built by bulkhead {} (this is {})",
                self.bulkhead_version, wanted.bulkhead_version
            ));
        }
        if (self.vcpus, self.mem_mib) != (wanted.vcpus, wanted.mem_mib) {
            return Some(format!(
                "{} vCPUs and {} MiB (want {} and {})",
                self.vcpus, self.mem_mib, wanted.vcpus, wanted.mem_mib
            ));
        }
        if self.spare_disks != wanted.spare_disks {
            return Some(format!(
                "{} spare disks (want {})",
                self.spare_disks, wanted.spare_disks
            ));
        }
        for (what, have, want) in [
            ("kernel", &self.kernel, &wanted.kernel),
            ("initramfs", &self.initramfs, &wanted.initramfs),
            ("VMM", &self.vmm, &wanted.vmm),
        ] {
            if !have.same_content(want) {
                return Some(format!("the {what} changed since it was built"));
            }
        }
        // Last: a changed input changes the key too, and says more.
        if self.key != wanted.key {
            return Some("its key differs from its directory's".into());
        }
        None
    }
}

/// The template key: SHA-256 over the format, the three files' hashes and
/// the VM's size, as hex.
pub fn template_key(kernel_sha: &str, initramfs_sha: &str, vmm_sha: &str, shape: Shape) -> String {
    let mut h = Sha256::new();
    h.update(b"bulkhead-template\0");
    h.update(TEMPLATE_FORMAT.to_le_bytes());
    for s in [kernel_sha, initramfs_sha, vmm_sha] {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update([shape.vcpus]);
    h.update(shape.mem_mib.to_le_bytes());
    h.update([shape.spare_disks]);
    util::hex(&h.finalize())
}

fn hash_file(path: &Path) -> io::Result<(u64, [u8; 32])> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().into()))
}

/// A checked template directory a sandbox can be restored from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    dir: PathBuf,
}

impl Template {
    /// A snapshot directory used as it is, unchecked (tests, and snapshots
    /// taken by hand).
    pub fn at(dir: impl Into<PathBuf>) -> Template {
        Template { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

/// What checking a template directory decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Usable,
    /// Nothing there yet.
    Missing,
    /// Something there, but not to be trusted: why.
    Rebuild(String),
}

/// Decides whether `dir` holds a usable template for `wanted`.
pub fn check_dir(dir: &Path, wanted: &TemplateMeta) -> Check {
    if !dir.exists() {
        return Check::Missing;
    }
    let meta_path = dir.join(META_FILE);
    let meta: TemplateMeta = match std::fs::read(&meta_path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => return Check::Rebuild(format!("{}: {e}", meta_path.display())),
        },
        Err(e) => return Check::Rebuild(format!("{}: {e}", meta_path.display())),
    };
    if let Some(why) = meta.mismatch(wanted) {
        return Check::Rebuild(why);
    }
    for f in [STATE_FILE, MEMORY_FILE] {
        if !dir.join(f).is_file() {
            return Check::Rebuild(format!("{} is missing", dir.join(f).display()));
        }
    }
    Check::Usable
}

/// How a template build boots its VM.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Where the build's run directory goes; `None`: the default.
    pub runtime_root: Option<PathBuf>,
    pub boot_timeout: Option<Duration>,
    pub keep_console: Option<PathBuf>,
}

/// `<cache>/templates`.
#[derive(Clone, Debug)]
pub struct TemplateCache {
    dir: PathBuf,
}

impl TemplateCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TemplateCache { dir: dir.into() }
    }

    /// `$BULKHEAD_CACHE/templates`, else `$XDG_CACHE_HOME/bulkhead/templates`,
    /// else `~/.cache/bulkhead/templates` (as the root image cache).
    pub fn default_location() -> Result<Self, TemplateError> {
        let base = util::cache_base().ok_or(TemplateError::NoCacheDir)?;
        Ok(TemplateCache::new(base.join("templates")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checked template for this configuration, built first when it
    /// is missing or cannot be trusted. `on_build` is told (with the reason
    /// for a rebuild) before the slow part; `watch` sees the build's boot
    /// as [`Sandbox::boot_with`]'s does and may end it.
    pub fn ensure(
        &self,
        artifacts: &Artifacts,
        shape: Shape,
        opts: &BuildOptions,
        on_build: &mut dyn FnMut(Option<&str>),
        watch: &mut dyn FnMut(&BootProgress) -> Result<(), String>,
    ) -> Result<Template, TemplateError> {
        let wanted = TemplateMeta::for_inputs(artifacts, shape)?;
        let dir = self.dir.join(&wanted.key);
        match check_dir(&dir, &wanted) {
            Check::Usable => {
                tracing::debug!("template {} is usable", dir.display());
                return Ok(Template { dir });
            }
            Check::Missing => on_build(None),
            Check::Rebuild(why) => {
                tracing::info!("rebuilding template {}: {why}", dir.display());
                on_build(Some(&why));
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err(&self.dir))?;
        let tmp = BuildDir::create(&self.dir)?;
        build_snapshot(tmp.path(), artifacts, shape, opts, watch)?;
        let meta_path = tmp.path().join(META_FILE);
        let json = serde_json::to_vec_pretty(&wanted).map_err(|source| TemplateError::Meta {
            path: meta_path.clone(),
            source,
        })?;
        util::create_new(&meta_path, 0o600, None)
            .and_then(|mut f| f.write_all(&json))
            .map_err(io_err(&meta_path))?;
        self.install(tmp, &dir, &wanted)?;
        Ok(Template { dir })
    }

    /// Moves a finished build to `dir`, first moving aside an untrusted
    /// directory there. Losing a race to a concurrent builder is fine as
    /// long as the winner's template checks out.
    fn install(&self, tmp: BuildDir, dir: &Path, wanted: &TemplateMeta) -> Result<(), TemplateError> {
        if let Check::Rebuild(_) = check_dir(dir, wanted) {
            let aside = self
                .dir
                .join(format!(".stale-{}", util::random_hex(8).map_err(io_err(dir))?));
            match std::fs::rename(dir, &aside) {
                Ok(()) => {
                    // Sandboxes restored from it keep their mappings.
                    if let Err(e) = std::fs::remove_dir_all(&aside) {
                        tracing::warn!("cannot remove the old template {}: {e}", aside.display());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
        match std::fs::rename(tmp.path(), dir) {
            Ok(()) => {
                tmp.keep();
                Ok(())
            }
            // Another builder got there first (rename(2) refuses to
            // replace a non-empty directory).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                match check_dir(dir, wanted) {
                    Check::Usable => {
                        tracing::debug!("a concurrent build installed {} first", dir.display());
                        Ok(())
                    }
                    Check::Missing => Err(TemplateError::LostRace {
                        dir: dir.to_path_buf(),
                        reason: "it vanished".into(),
                    }),
                    Check::Rebuild(reason) => Err(TemplateError::LostRace {
                        dir: dir.to_path_buf(),
                        reason,
                    }),
                }
            }
            Err(e) => Err(io_err(dir)(e)),
        }
    }
}

/// A build's directory inside the cache, removed unless it was installed.
struct BuildDir {
    path: PathBuf,
    keep: bool,
}

impl BuildDir {
    fn create(parent: &Path) -> Result<BuildDir, TemplateError> {
        let name = format!(
            ".build-{}-{}",
            std::process::id(),
            util::random_hex(8).map_err(io_err(parent))?
        );
        let path = parent.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(&path))?;
        Ok(BuildDir { path, keep: false })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::debug!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Boots cold with a placeholder root, waits for the agent, pauses and
/// snapshots into `out` (`state` and `memory`), and kills the VM.
fn build_snapshot(
    out: &Path,
    artifacts: &Artifacts,
    shape: Shape,
    opts: &BuildOptions,
    watch: &mut dyn FnMut(&BootProgress) -> Result<(), String>,
) -> Result<(), TemplateError> {
    let placeholder = out.join(PLACEHOLDER_FILE);
    // Sparse: zeros cost no disk. Nothing in the guest reads it before a
    // restore swaps the real image in.
    File::create(&placeholder)
        .and_then(|f| f.set_len(PLACEHOLDER_BYTES))
        .map_err(io_err(&placeholder))?;
    let cfg = SandboxConfig {
        vcpus: shape.vcpus,
        mem_mib: shape.mem_mib,
        spare_disks: shape.spare_disks,
        runtime_root: opts.runtime_root.clone(),
        boot_timeout: opts.boot_timeout,
        keep_console: opts.keep_console.clone(),
        api_socket: true,
        snapshot_into: Some(out.to_path_buf()),
        ..SandboxConfig::new(
            artifacts.clone(),
            RootfsImage {
                path: placeholder.clone(),
                fstype: FsType::Ext4,
            },
        )
    };
    let started = std::time::Instant::now();
    let sandbox = Sandbox::boot_with(&cfg, watch)?;
    tracing::debug!("template VM ready after {:?}", started.elapsed());
    // No agent stream open at snapshot time: restored guests start with
    // the agent waiting in accept, not serving a host that is gone.
    drop(sandbox.client()?);
    let api = sandbox.api_socket_path().ok_or(TemplateError::NoApi)?.to_path_buf();
    let api = ApiClient::new(api, API_TIMEOUT);
    api.pause()?;
    sandbox.lend_for_snapshot(out)?;
    let jailed = sandbox.jail_identity().is_some();
    api.snapshot(out)?;
    // Every later VMM maps this memory: none may own it. Taken back once
    // the VMM is gone and before its uid is, which may go to another
    // sandbox next.
    sandbox.kill_vmm()?;
    if jailed {
        crate::jail::reclaim(out, &[STATE_FILE, MEMORY_FILE, PLACEHOLDER_FILE]).map_err(io_err(out))?;
    }
    // Removes its run directory, then releases its uid.
    drop(sandbox);
    std::fs::remove_file(&placeholder).map_err(io_err(&placeholder))?;
    tracing::debug!("template snapshot written after {:?}", started.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sha: &str) -> InputFile {
        InputFile {
            path: "/x".into(),
            size: 10,
            sha256: sha.into(),
        }
    }

    fn meta() -> TemplateMeta {
        TemplateMeta::from_files(file("k"), file("i"), file("v"), Shape::new(1, 256))
    }

    #[test]
    fn key_changes_with_every_input() {
        let s = Shape::new(1, 256);
        let base = template_key("k", "i", "v", s);
        assert_eq!(base, template_key("k", "i", "v", s), "deterministic");
        for other in [
            template_key("K", "i", "v", s),
            template_key("k", "I", "v", s),
            template_key("k", "i", "V", s),
            template_key("k", "i", "v", Shape::new(2, 256)),
            template_key("k", "i", "v", Shape::new(1, 512)),
            template_key("k", "i", "v", Shape { spare_disks: 3, ..s }),
            // No ambiguity between adjacent fields.
            template_key("ki", "", "v", s),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn key_follows_file_bytes() {
        let d = tempfile::tempdir().unwrap();
        let a = Artifacts {
            kernel: d.path().join("k"),
            initramfs: d.path().join("i"),
            vmm: d.path().join("v"),
        };
        for p in [&a.kernel, &a.initramfs, &a.vmm] {
            std::fs::write(p, b"one").unwrap();
        }
        let m1 = TemplateMeta::for_inputs(&a, Shape::new(1, 256)).unwrap();
        std::fs::write(&a.initramfs, b"two").unwrap();
        let m2 = TemplateMeta::for_inputs(&a, Shape::new(1, 256)).unwrap();
        assert_ne!(m1.key, m2.key);
        assert_eq!(m1.mismatch(&m2).unwrap(), "the initramfs changed since it was built");
        // Moving a file keeps its template.
        let moved = d.path().join("k2");
        std::fs::rename(&a.kernel, &moved).unwrap();
        let m3 = TemplateMeta::for_inputs(&Artifacts { kernel: moved, ..a }, Shape::new(1, 256)).unwrap();
        assert_eq!(m3.key, m2.key);
        assert_eq!(m3.mismatch(&m2), None);
    }

    fn write_template(dir: &Path, m: &TemplateMeta) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(META_FILE), serde_json::to_vec(m).unwrap()).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"s").unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"m").unwrap();
    }

    #[test]
    fn check_decides_use_or_rebuild() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("t");
        let want = meta();
        assert_eq!(check_dir(&dir, &want), Check::Missing);
        write_template(&dir, &want);
        assert_eq!(check_dir(&dir, &want), Check::Usable);

        let rebuild = |m: TemplateMeta| {
            write_template(&dir, &m);
            match check_dir(&dir, &want) {
                Check::Rebuild(why) => why,
                other => panic!("{other:?} for {m:?}"),
            }
        };
        let mut m = want.clone();
        m.vmm.sha256 = "other".into();
        assert!(rebuild(m).contains("VMM changed"));
        let mut m = want.clone();
        m.bulkhead_version = "0.0.0-old".into();
        assert!(rebuild(m).contains("bulkhead 0.0.0-old"));
        let mut m = want.clone();
        m.format = TEMPLATE_FORMAT + 1;
        assert!(rebuild(m).contains("format"));
        let mut m = want.clone();
        m.mem_mib = 512;
        assert!(rebuild(m).contains("512 MiB"));
        let mut m = want.clone();
        m.spare_disks = 7;
        assert!(rebuild(m).contains("7 spare disks (want 0)"));
        let mut m = want.clone();
        m.key = "elsewhere".into();
        assert!(rebuild(m).contains("key"));

        // Damaged: a missing snapshot file, or a meta.json that is not one.
        write_template(&dir, &want);
        std::fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
        assert!(matches!(check_dir(&dir, &want), Check::Rebuild(w) if w.contains("memory is missing")));
        write_template(&dir, &want);
        std::fs::write(dir.join(META_FILE), b"{\"format\": 1, trunc").unwrap();
        assert!(matches!(check_dir(&dir, &want), Check::Rebuild(w) if w.contains("meta.json")));
        std::fs::remove_file(dir.join(META_FILE)).unwrap();
        assert!(matches!(check_dir(&dir, &want), Check::Rebuild(_)));
        // An empty directory (say, a half-removed one) is not a template.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(check_dir(&dir, &want), Check::Rebuild(_)));
    }

    #[test]
    fn install_replaces_a_damaged_template_and_accepts_a_winner() {
        let d = tempfile::tempdir().unwrap();
        let cache = TemplateCache::new(d.path());
        let want = meta();
        let dir = d.path().join(&want.key);
        // A damaged template is moved aside and replaced.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"old").unwrap();
        let tmp = BuildDir::create(d.path()).unwrap();
        write_template(tmp.path(), &want);
        let tmp_path = tmp.path().to_path_buf();
        cache.install(tmp, &dir, &want).unwrap();
        assert_eq!(check_dir(&dir, &want), Check::Usable);
        assert!(!tmp_path.exists());
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), b"s");
        // A second build losing the race uses the first one's and cleans up.
        let tmp = BuildDir::create(d.path()).unwrap();
        write_template(tmp.path(), &want);
        std::fs::write(tmp.path().join(STATE_FILE), b"second").unwrap();
        let tmp_path = tmp.path().to_path_buf();
        cache.install(tmp, &dir, &want).unwrap();
        assert!(!tmp_path.exists());
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), b"s");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
