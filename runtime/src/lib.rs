//! Bulkhead's host runtime: everything the `bulkhead` CLI and the
//! containerd shim both do to run a sandbox. The front ends keep only
//! their own concerns (a command line and a terminal; containerd's Task
//! API); the sandbox lives here.
//!
//! - [`start`]: one start path, from a template or cold, with the fallback.
//! - [`sandbox`]: one running VM, its run directory and its agent.
//! - [`template`]: booted-and-snapshotted guests, cached by their inputs.
//! - [`rootfs`]: root filesystem images and their content cache.
//! - [`vmm_process`]: the VMM child process, started with a typed
//!   configuration and bound to our lifetime.
//! - [`agent_conn`], [`stdio`]: the agent's request and stdio streams.
//! - [`host_check`], [`paths`], [`rundir`]: the host, the artifacts, and
//!   per-sandbox directories.
//! - [`jail`]: the VMM's identity per sandbox, and images shown to it.
//!
//! Dependencies point one way: `start` uses `template` and `sandbox`,
//! `template` uses `sandbox`, and `sandbox` knows neither.

pub mod agent_conn;
pub mod host_cgroup;
pub mod host_check;
pub mod jail;
pub mod paths;
pub mod rootfs;
pub mod rundir;
pub mod sandbox;
pub mod spawn;
pub mod start;
pub mod stdio;
pub mod template;
pub mod util;
pub mod vmm_process;

/// How the host side names itself in the protocol handshake.
pub const SOFTWARE: &str = concat!("bulkhead ", env!("CARGO_PKG_VERSION"));
