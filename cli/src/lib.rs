//! The `bulkhead` command line: arguments, the terminal, signals, and the
//! embedded default root filesystem. Everything about running a sandbox
//! is `bulkhead_runtime`'s.

pub mod containerd_check;
pub mod copy_in;
pub mod default_rootfs;
pub mod initramfs;
pub mod process;
pub mod run;
pub mod signals;
pub mod tty;
pub mod version;

/// Exit status when the sandbox itself failed (as `docker run` uses 125).
pub const EXIT_SANDBOX_FAILED: i32 = 125;
