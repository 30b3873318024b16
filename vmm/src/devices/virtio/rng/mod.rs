//! virtio-rng: entropy from the host's `getrandom`.

mod device;

pub use device::Rng;
