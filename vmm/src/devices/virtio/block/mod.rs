//! virtio-blk backed by a raw image file.

mod device;
pub mod request;

pub use device::{Block, BlockConfig, BlockError};
