//! virtio-blk backed by a raw image file.

mod device;
pub mod drives;
pub mod request;

pub use device::{Block, BlockConfig, BlockError};
pub use drives::{Drive, DriveError, Drives};
