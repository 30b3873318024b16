//! OCI device rules (`linux.resources.devices`) as a cgroup v2 device
//! program, attached to the container's cgroup before anything runs in it.
//! Without it, a container root with CAP_MKNOD (containerd's default, as
//! Docker's) could make a node for the pod's disks or the console in its
//! `/dev` and open it.
//!
//! Rules are checked last first, and the first that matches decides, as
//! with cgroup v1's list where a later rule overrides an earlier one; a
//! device no rule matches is allowed, so a spec's leading "deny all" is
//! what makes the rest an allow list. An allow rule matches when it grants
//! every access asked for, a deny rule when it forbids any of them.
//!
//! As runc does, the nodes every container gets (null, zero, full, random,
//! urandom, tty, ptmx, the ptys) and mknod stay allowed after the spec's
//! rules: CRI gives its pause container "deny all" alone, and a shell
//! there cannot even start a background job, which reads /dev/null.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use bulkhead_protocol::messages::DeviceRule;

/// One `struct bpf_insn`: registers are dst in the low nibble, src high.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const LDX_MEM_W: u8 = 0x61;
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_X: u8 = 0xbc;
const ALU64_MOV_K: u8 = 0xb7;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const EXIT: u8 = 0x95;

/// `bpf_cgroup_dev_ctx.access_type`: the type in the low 16 bits, the
/// access asked for above them.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

const R0: u8 = 0;
const R1: u8 = 1;
/// Device type, access, major, minor.
const TYPE: u8 = 2;
const ACCESS: u8 = 3;
const MAJOR: u8 = 4;
const MINOR: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

fn access_bits(access: &str) -> u32 {
    access.chars().fold(0, |bits, c| {
        bits | match c {
            'm' => ACC_MKNOD,
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            _ => 0,
        }
    })
}

/// Appended to every spec's rules (runc's "allowed devices").
fn always_allowed() -> Vec<DeviceRule> {
    let rule = |kind: char, major: Option<u32>, minor: Option<u32>, access: &str| DeviceRule {
        allow: true,
        kind,
        major,
        minor,
        access: access.into(),
    };
    let mut rules = vec![
        rule('c', None, None, "m"),
        rule('b', None, None, "m"),
        rule('c', Some(136), None, "rwm"),
    ];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
        rules.push(rule('c', Some(major), Some(minor), "rwm"));
    }
    rules
}

/// The program for `rules` (which the protocol has validated) followed by
/// [`always_allowed`].
pub fn program(spec_rules: &[DeviceRule]) -> Vec<Insn> {
    let rules: Vec<DeviceRule> = spec_rules.iter().cloned().chain(always_allowed()).collect();
    let mut p = vec![
        insn(LDX_MEM_W, TYPE, R1, 0, 0),
        insn(ALU32_AND_K, TYPE, 0, 0, 0xffff),
        insn(LDX_MEM_W, ACCESS, R1, 0, 0),
        insn(ALU32_RSH_K, ACCESS, 0, 0, 16),
        insn(LDX_MEM_W, MAJOR, R1, 4, 0),
        insn(LDX_MEM_W, MINOR, R1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // Majors and minors are 12 and 20 bits: a larger one matches no
        // device (and would not fit the signed immediate).
        let number = |n: Option<u32>| n.map(|v| i32::try_from(v).map_err(|_| ()));
        let (Ok(major), Ok(minor)) = (number(rule.major).transpose(), number(rule.minor).transpose()) else {
            continue;
        };
        // Jumps to "next rule" have off = usize::MAX until the block's
        // length is known.
        let mut block: Vec<Insn> = Vec::new();
        let skip = |code: u8, reg: u8, imm: i32| insn(code, reg, 0, i16::MAX, imm);
        match rule.kind {
            'b' => block.push(skip(JNE_K, TYPE, DEV_BLOCK)),
            'c' => block.push(skip(JNE_K, TYPE, DEV_CHAR)),
            _ => {}
        }
        let mask = access_bits(&rule.access);
        if mask != ACC_ALL {
            block.push(insn(ALU32_MOV_X, R1, ACCESS, 0, 0));
            if rule.allow {
                // Anything asked for outside the rule: not this rule.
                block.push(insn(ALU32_AND_K, R1, 0, 0, (!mask & ACC_ALL) as i32));
                block.push(skip(JNE_K, R1, 0));
            } else {
                // Nothing asked for that the rule forbids: not this rule.
                block.push(insn(ALU32_AND_K, R1, 0, 0, mask as i32));
                block.push(skip(JEQ_K, R1, 0));
            }
        }
        if let Some(m) = major {
            block.push(skip(JNE_K, MAJOR, m));
        }
        if let Some(m) = minor {
            block.push(skip(JNE_K, MINOR, m));
        }
        block.push(insn(ALU64_MOV_K, R0, 0, 0, i32::from(rule.allow)));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        let mut matches_all = true;
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.off == i16::MAX {
                ins.off = (len - i - 1) as i16;
                matches_all = false;
            }
        }
        p.extend(block);
        if matches_all {
            // Nothing after it could run, and the verifier refuses
            // unreachable code.
            return p;
        }
    }
    p.push(insn(ALU64_MOV_K, R0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// `union bpf_attr`, as far as these two commands use it; the rest zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn call(&self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: bpf() reads `size` bytes of the attribute union, which
        // this buffer holds; pointers in it point at live data.
        let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_ptr(), self.0.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }
}

/// Room for the verifier's account of a refused program.
const VERIFIER_LOG_BYTES: usize = 1 << 16;

/// Loads `prog`; with `log`, the verifier writes why it refuses it there.
fn load(prog: &[Insn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_PROG_TYPE_CGROUP_DEVICE);
    attr.put_u32(4, prog.len() as u32);
    attr.put_u64(8, prog.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    if let Some(log) = log {
        attr.put_u32(24, 1);
        attr.put_u32(28, log.len() as u32);
        attr.put_u64(32, log.as_mut_ptr() as u64);
    }
    let fd = attr.call(BPF_PROG_LOAD)?;
    // SAFETY: bpf() returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the program for `rules` and attaches it to the cgroup at `dir`.
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> io::Result<()> {
    let prog = program(rules);
    // The log costs a buffer per container: only a refusal, which the
    // deterministic verifier repeats, asks for it.
    let prog_fd = load(&prog, None).map_err(|e| {
        let mut log = vec![0u8; VERIFIER_LOG_BYTES];
        let _ = load(&prog, Some(&mut log));
        let end = log.iter().position(|b| *b == 0).unwrap_or(0);
        io::Error::new(
            e.kind(),
            format!("loading: {e}: {}", String::from_utf8_lossy(&log[..end])),
        )
    })?;
    let cgroup = File::open(dir)?;
    let mut at = Attr::new();
    at.put_u32(0, cgroup.as_raw_fd() as u32);
    at.put_u32(4, prog_fd.as_raw_fd() as u32);
    at.put_u32(8, BPF_CGROUP_DEVICE);
    at.call(BPF_PROG_ATTACH)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `p` for one device access the way the kernel's interpreter
    /// does, for the instructions `program` emits.
    fn run(p: &[Insn], kind: i32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = (usize::from(i.regs & 0xf), usize::from(i.regs >> 4));
            pc += 1;
            let imm = i.imm as i64 as u64;
            let jump = |taken: bool| if taken { i.off as usize } else { 0 };
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1);
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_AND_K => r[dst] = u64::from(r[dst] as u32 & i.imm as u32),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                ALU32_MOV_X => r[dst] = u64::from(r[src] as u32),
                ALU64_MOV_K => r[dst] = imm,
                JEQ_K => pc += jump(r[dst] == imm),
                JNE_K => pc += jump(r[dst] != imm),
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn rule(allow: bool, kind: char, major: Option<u32>, minor: Option<u32>, access: &str) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access: access.into(),
        }
    }

    /// containerd's default for a container: deny everything, then mknod
    /// of any node and the usual character devices.
    #[test]
    fn containerds_default_rules_allow_the_usual_nodes_only() {
        let rules = [
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', None, None, "m"),
            rule(true, 'b', None, None, "m"),
            rule(true, 'c', Some(1), Some(3), "rwm"),
            rule(true, 'c', Some(136), None, "rwm"),
            rule(true, 'c', Some(5), Some(0), "rw"),
        ];
        let p = program(&rules);
        let (r, w, m) = (ACC_READ, ACC_WRITE, ACC_MKNOD);
        assert_eq!(run(&p, DEV_CHAR, r | w, 1, 3), 1, "/dev/null");
        assert_eq!(run(&p, DEV_CHAR, r, 136, 7), 1, "a pty");
        assert_eq!(run(&p, DEV_BLOCK, m, 254, 0), 1, "mknod of a disk node");
        assert_eq!(run(&p, DEV_BLOCK, r, 254, 0), 0, "opening /dev/vda");
        assert_eq!(run(&p, DEV_CHAR, w, 4, 64), 0, "the console's ttyS0");
        assert_eq!(run(&p, DEV_CHAR, r | w, 5, 0), 1, "/dev/tty");
        assert_eq!(run(&p, DEV_CHAR, m, 5, 0), 1, "mknod via the c *:* m rule");
        assert_eq!(run(&p, DEV_CHAR, r | w, 5, 1), 0, "the console is in no rule");
        // The leading deny-all ends the program: no unreachable code.
        assert_eq!(p.last().map(|i| (i.code, i.imm)), Some((EXIT, 0)));
        assert_eq!(p[p.len() - 2], insn(ALU64_MOV_K, R0, 0, 0, 0));
    }

    #[test]
    fn a_later_deny_overrides_and_no_rule_allows() {
        let p = program(&[]);
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 254, 0), 1);
        // Deny-all alone, as CRI's pause has it: the standard nodes stay.
        let p = program(&[rule(false, 'a', None, None, "rwm")]);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3), 1, "/dev/null");
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 254, 0), 0);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 4, 64), 0);
        let p = program(&[
            rule(true, 'a', None, None, "rwm"),
            rule(false, 'b', Some(254), None, "w"),
        ]);
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 254, 0), 1, "reading stays allowed");
        assert_eq!(
            run(&p, DEV_BLOCK, ACC_READ | ACC_WRITE, 254, 1),
            0,
            "any write is denied"
        );
        assert_eq!(run(&p, DEV_BLOCK, ACC_WRITE, 253, 0), 1, "another major");
        // A minor no device can have matches nothing.
        let p = program(&[
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', Some(1), Some(u32::MAX), "rwm"),
        ]);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 11), 0);
    }
}
