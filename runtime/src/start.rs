//! One start path for every front end: restore the sandbox template for
//! the configuration (building it on first use), or boot cold when asked
//! to, or when the template cannot be built or restored, saying why. The
//! CLI and the shim differ only in how they show progress ([`Observer`]).

use std::path::PathBuf;

use crate::sandbox::{BootProgress, Sandbox, SandboxConfig, SandboxError};
use crate::template::{self, BuildOptions, Shape, Template, TemplateCache, TemplateError};

/// How a sandbox's VM should start (`"template"` or `"cold"` in
/// configuration files).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// From the template for the configuration, built on first use; cold
    /// when that fails.
    #[default]
    Template,
    /// Boot the kernel every time.
    Cold,
}

/// How a sandbox did start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// Restored from the template in this directory.
    Template(PathBuf),
    /// Booted; `fallback` says why the template was not used, when one was
    /// wanted.
    Cold { fallback: Option<String> },
}

/// What a front end hears while a sandbox starts. Every event is also
/// logged here through `tracing`.
pub trait Observer {
    /// A template is being built (a cold boot, once); `why` is `None` on
    /// first use, else what made the old one unusable.
    fn building_template(&mut self, _why: Option<&str>) {}
    /// The template will not be used: `reason`, and a cold boot follows.
    fn falling_back(&mut self, _reason: &str) {}
    /// A cold boot starts (announced, since it is slow on PVM hosts).
    fn booting_cold(&mut self) {}
    /// Called while waiting for the guest; an error ends the start with
    /// [`SandboxError::Aborted`] and no fallback.
    fn watch(&mut self, _progress: &BootProgress) -> Result<(), String> {
        Ok(())
    }
}

/// An observer that only logs.
pub struct Quiet;
impl Observer for Quiet {}

/// Starts a sandbox for `cfg` (whose `restore_from` this sets) the way
/// `mode` says, with templates in `templates`.
pub fn start(
    cfg: &SandboxConfig,
    mode: BootMode,
    templates: &TemplateCache,
    observer: &mut dyn Observer,
) -> Result<(Sandbox, Started), SandboxError> {
    let (vcpus, mem_mib) = (cfg.vcpus, cfg.mem_mib);
    let mut fallback = None;
    if mode == BootMode::Template {
        let found = find_template(cfg, templates, observer);
        let why = match found {
            Ok(t) => {
                tracing::info!(
                    "restoring the sandbox VM ({vcpus} vCPUs, {mem_mib} MiB) from the template {}",
                    t.dir().display()
                );
                let restored = Sandbox::boot_with(
                    &SandboxConfig {
                        restore_from: Some(t.dir().to_path_buf()),
                        ..cfg.clone()
                    },
                    |p| observer.watch(p),
                );
                match restored {
                    Ok(sb) => return Ok((sb, Started::Template(t.dir().to_path_buf()))),
                    Err(e @ SandboxError::Aborted(_)) => return Err(e),
                    Err(e) => format!("cannot restore the sandbox template ({e})"),
                }
            }
            Err(TemplateError::Boot(e @ SandboxError::Aborted(_))) => return Err(e),
            Err(e) => format!("cannot use a sandbox template ({e})"),
        };
        tracing::warn!("{why}; booting cold");
        observer.falling_back(&why);
        fallback = Some(why);
    }
    tracing::info!("booting the sandbox VM cold ({vcpus} vCPUs, {mem_mib} MiB)");
    observer.booting_cold();
    let cold = SandboxConfig {
        restore_from: None,
        ..cfg.clone()
    };
    let sb = Sandbox::boot_with(&cold, |p| observer.watch(p))?;
    Ok((sb, Started::Cold { fallback }))
}

/// The checked template for `cfg`, built (a cold boot, once) when missing
/// or stale.
fn find_template(
    cfg: &SandboxConfig,
    templates: &TemplateCache,
    observer: &mut dyn Observer,
) -> Result<Template, TemplateError> {
    // The guest sees the template placeholder's capacity, not the image's.
    let size = std::fs::metadata(&cfg.rootfs.path).map(|m| m.len()).unwrap_or(0);
    if size > template::PLACEHOLDER_BYTES {
        return Err(TemplateError::TooLarge {
            path: cfg.rootfs.path.clone(),
            size,
        });
    }
    let opts = BuildOptions {
        runtime_root: cfg.runtime_root.clone(),
        ..Default::default()
    };
    let shape = Shape {
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        spare_disks: cfg.spare_disks,
    };
    // Both callbacks speak to the observer; ensure() never nests them.
    let observer = std::cell::RefCell::new(observer);
    let dir = templates.dir();
    let mut on_build = |why: Option<&str>| {
        match why {
            None => tracing::info!(
                "building the sandbox template in {} (first use; boots cold once)",
                dir.display()
            ),
            Some(why) => tracing::info!("rebuilding the sandbox template ({why}); boots cold once"),
        }
        observer.borrow_mut().building_template(why);
    };
    let mut watch = |p: &BootProgress| observer.borrow_mut().watch(p);
    templates.ensure(&cfg.artifacts, shape, &opts, &mut on_build, &mut watch)
}
