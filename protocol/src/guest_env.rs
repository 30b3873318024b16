//! The guest environment both sides agree on, outside the wire protocol.

/// `GLIBC_TUNABLES` for guests whose kernel switches only FXSAVE state (PVM
/// hosts): glibc must stay off YMM, ZMM and opmask registers, which other
/// tasks would overwrite at a context switch. The VMM gives it to the
/// guest's init on the kernel command line; the agent adds it to every
/// process it starts.
pub const PVM_GLIBC_TUNABLE: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512CD,-AVX512DQ,-AVX512BW,\
-AVX512VL,-AVX512ER,-AVX512PF,-AVX_VNNI,-FMA,-FMA4,-XOP,-AVX_Fast_Unaligned_Load";
