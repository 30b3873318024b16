//! Loading the kernel and initrd, and describing memory to the guest.

pub mod cmdline;
pub mod loader;
pub mod params;
