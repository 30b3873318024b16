//! Device models and the manager that puts them on the buses.

pub mod bus;
pub mod legacy;
pub mod manager;
pub mod virtio;
