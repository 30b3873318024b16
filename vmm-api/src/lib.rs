//! What `bulkhead-vmm` and the programs that start it agree on, with no
//! KVM in sight: the VM configuration it takes (as JSON or flags), the
//! control API's request and response bodies and a client for it, the
//! snapshot directory's file names, and what its exit statuses mean.
//! The VMM, the runtime and the tests all use these types, so the two
//! sides of the process boundary cannot drift apart.

pub mod client;
pub mod config;
pub mod control;
pub mod exit;
pub mod jail;
pub mod peer;
pub mod snapshot;
