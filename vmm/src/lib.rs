//! Bulkhead's virtual machine monitor: one KVM microVM per sandbox.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod harden;
pub mod host;
pub mod jail;
pub mod kvm_bytes;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod socket_file;
pub mod vcpu;
pub mod vm;
pub mod vmm;
