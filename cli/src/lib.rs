//! The `bulkhead` command line as a library: find the artifacts, check the
//! host, prepare the root filesystem image, boot a sandbox (the VMM process
//! and its run directory) and drive the guest agent through it. The boot
//! tier uses [`sandbox::Sandbox`] directly.

pub mod agent_conn;
pub mod default_rootfs;
pub mod host_check;
pub mod initramfs;
pub mod paths;
pub mod process;
pub mod rootfs;
pub mod run;
pub mod rundir;
pub mod sandbox;
pub mod signals;
pub mod stdio;
pub mod template;
pub mod tty;
pub mod util;
pub mod vm;
pub mod vmm_api;

/// How this side names itself in the protocol handshake.
pub const SOFTWARE: &str = concat!("bulkhead ", env!("CARGO_PKG_VERSION"));

/// Exit status when the sandbox itself failed (as `docker run` uses 125).
pub const EXIT_SANDBOX_FAILED: i32 = 125;
