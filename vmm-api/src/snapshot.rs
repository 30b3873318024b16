//! A snapshot directory: what `PUT /snapshot/create` writes and
//! `--restore` reads.

/// The VM's state (vCPUs, devices, configuration), checksummed.
pub const STATE_FILE: &str = "state";
/// Guest memory, sparse; restores map it privately and never write it.
pub const MEMORY_FILE: &str = "memory";
