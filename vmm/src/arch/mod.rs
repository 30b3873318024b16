//! x86_64 specifics: memory layout, CPUID, boot CPU state, MP table.

pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
