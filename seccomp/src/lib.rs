//! Compiles an OCI seccomp profile (`linux.seccomp`) into the classic BPF
//! program the guest loads before a container's workload runs.
//!
//! Our own builder rather than `seccompiler`: an OCI profile gives each
//! rule its own action (allow, errno with its value, kill, trap, log,
//! trace) under one default, where a seccompiler filter has a single match
//! action; and libseccomp would be C on the host. The semantics follow
//! runc with libseccomp: arguments are compared as 64-bit values, the
//! conditions of one rule must all hold, conditions repeated on one
//! argument are alternatives, names the table does not know are skipped.

pub mod bpf;
pub mod profile;
mod syscalls;

use std::collections::BTreeMap;

use bpf::{Asm, Insn, To, JEQ_K, JGE_K, JGT_K};
use profile::{Cmp, Profile};

pub use profile::{FLAG_LOG, FLAG_SPEC_ALLOW};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("linux.seccomp: {0}")]
    Field(String),
    #[error("linux.seccomp: not supported in the sandbox's guest: {0}")]
    Unsupported(String),
    #[error("linux.seccomp: {0}")]
    Bpf(#[from] bpf::BpfError),
    #[error("linux.seccomp: the program has {0} instructions; the kernel takes at most {MAX_INSNS}")]
    TooLong(usize),
}

/// `BPF_MAXINSNS`.
pub const MAX_INSNS: usize = 4096;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// x32 system calls carry this bit on x86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const ENOSYS: u32 = 38;

/// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARGS: u32 = 16;

/// A compiled profile.
#[derive(Debug)]
pub struct Program {
    pub filter: Vec<Insn>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: u32,
    /// Names in the profile that are no x86_64 system call.
    pub unknown: Vec<String>,
}

/// The number of an x86_64 system call.
pub fn syscall_number(name: &str) -> Option<u32> {
    syscalls::X86_64
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| syscalls::X86_64[i].1)
}

#[derive(Clone, Copy, Debug)]
struct Cond {
    arg: u32,
    cmp: Cmp,
    value: u64,
    value_two: u64,
}

/// One system call's rules: conditional ones in profile order, then the
/// action of an unconditional rule, if any.
#[derive(Default)]
struct Rules {
    conditional: Vec<(Vec<Cond>, u32)>,
    unconditional: Option<u32>,
}

pub fn compile(p: &Profile) -> Result<Program, SeccompError> {
    if p.listener_path.as_deref().is_some_and(|l| !l.is_empty()) {
        return Err(SeccompError::Unsupported(
            "listenerPath: a seccomp agent on the host cannot reach a guest's system calls".into(),
        ));
    }
    if let Some(archs) = p.architectures.as_deref().filter(|a| !a.is_empty()) {
        if !archs.iter().any(|a| a == "SCMP_ARCH_X86_64") {
            return Err(SeccompError::Unsupported(format!(
                "architectures {archs:?}: the guest runs x86_64 only"
            )));
        }
    }
    let default = profile::action(&p.default_action, p.default_errno_ret)?;
    let flags = profile::flags(p.flags.as_deref().unwrap_or_default())?;
    let mut by_nr: BTreeMap<u32, Rules> = BTreeMap::new();
    let mut unknown = Vec::new();
    for rule in p.syscalls.as_deref().unwrap_or_default() {
        let action = profile::action(&rule.action, rule.errno_ret.or(p.default_errno_ret))?;
        let conds = conditions(rule.args.as_deref().unwrap_or_default())?;
        for name in &rule.names {
            let Some(nr) = syscall_number(name) else {
                unknown.push(name.clone());
                continue;
            };
            let rules = by_nr.entry(nr).or_default();
            if conds.is_empty() {
                match rules.unconditional {
                    Some(a) if a != action => {
                        return Err(SeccompError::Field(format!(
                            "{name} has two unconditional rules with different actions"
                        )))
                    }
                    _ => rules.unconditional = Some(action),
                }
            } else {
                rules.conditional.extend(conds.iter().map(|c| (c.clone(), action)));
            }
        }
    }
    // A call whose only rule is the default needs no code.
    by_nr.retain(|_, r| !(r.conditional.is_empty() && r.unconditional.is_none_or(|a| a == default)));
    let filter = emit(&by_nr, default)?;
    if filter.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    unknown.sort();
    unknown.dedup();
    Ok(Program { filter, flags, unknown })
}

/// A rule's `args` as alternatives, each a list of conditions that must
/// all hold: one list, unless some argument is named twice, when (as runc
/// does) each condition stands alone.
fn conditions(args: &[profile::ArgRule]) -> Result<Vec<Vec<Cond>>, SeccompError> {
    let mut conds = Vec::with_capacity(args.len());
    for a in args {
        if a.index > 5 {
            return Err(SeccompError::Field(format!("argument index {} (0 to 5)", a.index)));
        }
        conds.push(Cond {
            arg: a.index,
            cmp: profile::cmp(&a.op)?,
            value: a.value,
            value_two: a.value_two,
        });
    }
    if conds.is_empty() {
        return Ok(Vec::new());
    }
    let repeated = conds
        .iter()
        .enumerate()
        .any(|(i, c)| conds[..i].iter().any(|d| d.arg == c.arg));
    Ok(if repeated {
        conds.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conds]
    })
}

fn emit(by_nr: &BTreeMap<u32, Rules>, default: u32) -> Result<Vec<Insn>, SeccompError> {
    let mut a = Asm::default();
    // Another ABI's numbers would mean other calls: end the process.
    a.load(ARCH);
    a.cond(JEQ_K, AUDIT_ARCH_X86_64, To::Skip(1), To::Next);
    a.ret(profile::RET_KILL_PROCESS);
    a.load(NR);
    // The guest kernel has no x32 ABI; answer as it would, whatever the
    // profile allows.
    a.cond(JGE_K, X32_SYSCALL_BIT, To::Next, To::Skip(1));
    a.ret(profile::RET_ERRNO | ENOSYS);
    let blocks: Vec<_> = by_nr.keys().map(|_| a.label()).collect();
    for (nr, block) in by_nr.keys().zip(&blocks) {
        a.cond(JEQ_K, *nr, To::Next, To::Skip(1));
        a.ja(*block);
    }
    a.ret(default);
    for (rules, block) in by_nr.values().zip(blocks) {
        a.place(block);
        for (conds, action) in &rules.conditional {
            let fail = a.label();
            for c in conds {
                condition(&mut a, c, fail);
            }
            a.ret(*action);
            a.place(fail);
        }
        a.ret(rules.unconditional.unwrap_or(default));
    }
    Ok(a.finish()?)
}

/// Falls through when `c` holds, jumps to `fail` when it does not; a
/// 64-bit argument is compared high word first.
fn condition(a: &mut Asm, c: &Cond, fail: bpf::Label) {
    let lo = ARGS + 8 * c.arg;
    let hi = lo + 4;
    let (vhi, vlo) = ((c.value >> 32) as u32, c.value as u32);
    let pass = a.label();
    let (p, f) = (To::At(pass), To::At(fail));
    match c.cmp {
        Cmp::Eq | Cmp::Ne => {
            let (same, differ) = if c.cmp == Cmp::Eq { (p, f) } else { (f, p) };
            a.load(hi);
            a.cond(JEQ_K, vhi, To::Next, differ);
            a.load(lo);
            a.cond(JEQ_K, vlo, same, differ);
        }
        Cmp::MaskedEq => {
            let (whi, wlo) = ((c.value_two >> 32) as u32, c.value_two as u32);
            a.load(hi);
            a.and(vhi);
            a.cond(JEQ_K, whi, To::Next, f);
            a.load(lo);
            a.and(vlo);
            a.cond(JEQ_K, wlo, p, f);
        }
        Cmp::Gt | Cmp::Ge | Cmp::Lt | Cmp::Le => {
            // `above` is true for Gt/Ge; Lt/Le are their negations.
            let (low_op, above, below) = match c.cmp {
                Cmp::Gt => (JGT_K, p, f),
                Cmp::Ge => (JGE_K, p, f),
                Cmp::Lt => (JGE_K, f, p),
                _ => (JGT_K, f, p),
            };
            a.load(hi);
            a.cond(JGT_K, vhi, above, To::Next);
            a.cond(JEQ_K, vhi, To::Next, below);
            a.load(lo);
            a.cond(low_op, vlo, above, below);
        }
    }
    a.place(pass);
}

#[cfg(test)]
mod tests;
