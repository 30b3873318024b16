//! A small assembler for classic BPF as seccomp runs it: forward jumps to
//! labels, resolved once the program is laid out. Conditional jumps reach
//! at most 255 instructions, so the compiler keeps them local and crosses
//! longer distances with `ja`, whose offset is 32 bits.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    #[error("a conditional jump spans {0} instructions; classic BPF allows 255")]
    TooFar(usize),
    #[error("a jump to a label that was never placed")]
    Unplaced,
    #[error("a backward jump, which classic BPF cannot express")]
    Backward,
}

/// One `struct sock_filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

pub const LD_W_ABS: u16 = 0x20;
pub const ALU_AND_K: u16 = 0x54;
pub const JA: u16 = 0x05;
pub const JEQ_K: u16 = 0x15;
pub const JGT_K: u16 = 0x25;
pub const JGE_K: u16 = 0x35;
pub const RET_K: u16 = 0x06;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Where a conditional jump goes when its test is true or false.
#[derive(Clone, Copy, Debug)]
pub enum To {
    Next,
    Skip(u8),
    At(Label),
}

enum Op {
    Plain(Insn),
    Cond { code: u16, k: u32, jt: To, jf: To },
    Ja(Label),
    Place(Label),
}

#[derive(Default)]
pub struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

impl Asm {
    pub fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    pub fn place(&mut self, l: Label) {
        self.ops.push(Op::Place(l));
    }

    pub fn load(&mut self, offset: u32) {
        self.plain(LD_W_ABS, offset);
    }

    pub fn and(&mut self, mask: u32) {
        self.plain(ALU_AND_K, mask);
    }

    pub fn ret(&mut self, value: u32) {
        self.plain(RET_K, value);
    }

    pub fn cond(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.ops.push(Op::Cond { code, k, jt, jf });
    }

    pub fn ja(&mut self, l: Label) {
        self.ops.push(Op::Ja(l));
    }

    fn plain(&mut self, code: u16, k: u32) {
        self.ops.push(Op::Plain(Insn { code, jt: 0, jf: 0, k }));
    }

    /// Lays the program out and resolves every jump.
    pub fn finish(self) -> Result<Vec<Insn>, BpfError> {
        let mut at: Vec<Option<usize>> = vec![None; self.labels];
        let mut pos = 0;
        for op in &self.ops {
            match op {
                Op::Place(Label(l)) => at[*l] = Some(pos),
                _ => pos += 1,
            }
        }
        let offset = |from: usize, l: Label| -> Result<usize, BpfError> {
            let to = at[l.0].ok_or(BpfError::Unplaced)?;
            to.checked_sub(from + 1).ok_or(BpfError::Backward)
        };
        let short = |from: usize, to: To| -> Result<u8, BpfError> {
            match to {
                To::Next => Ok(0),
                To::Skip(n) => Ok(n),
                To::At(l) => {
                    let off = offset(from, l)?;
                    u8::try_from(off).map_err(|_| BpfError::TooFar(off))
                }
            }
        };
        let mut out = Vec::with_capacity(pos);
        for op in self.ops {
            let here = out.len();
            match op {
                Op::Place(_) => {}
                Op::Plain(i) => out.push(i),
                Op::Cond { code, k, jt, jf } => out.push(Insn {
                    code,
                    jt: short(here, jt)?,
                    jf: short(here, jf)?,
                    k,
                }),
                Op::Ja(l) => {
                    let off = offset(here, l)?;
                    out.push(Insn {
                        code: JA,
                        jt: 0,
                        jf: 0,
                        k: u32::try_from(off).map_err(|_| BpfError::TooFar(off))?,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Runs `prog` on one `struct seccomp_data` the way the kernel does, for
/// tests of what a compiled profile decides.
#[cfg(test)]
pub fn run(prog: &[Insn], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_le_bytes());
    data.extend_from_slice(&arch.to_le_bytes());
    data.extend_from_slice(&0u64.to_le_bytes());
    for a in args {
        data.extend_from_slice(&a.to_le_bytes());
    }
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = prog[pc];
        pc += 1;
        let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
        match i.code {
            LD_W_ABS => {
                let o = i.k as usize;
                acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
            }
            ALU_AND_K => acc &= i.k,
            JA => pc += i.k as usize,
            JEQ_K => pc += jump(acc == i.k),
            JGT_K => pc += jump(acc > i.k),
            JGE_K => pc += jump(acc >= i.k),
            RET_K => return i.k,
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_resolve_to_forward_offsets() {
        let mut a = Asm::default();
        let end = a.label();
        a.load(0);
        a.cond(JEQ_K, 7, To::At(end), To::Next);
        a.ret(1);
        a.place(end);
        a.ret(2);
        let p = a.finish().unwrap();
        assert_eq!(
            p[1],
            Insn {
                code: JEQ_K,
                jt: 1,
                jf: 0,
                k: 7
            }
        );
        assert_eq!(run(&p, 7, 0, [0; 6]), 2);
        assert_eq!(run(&p, 8, 0, [0; 6]), 1);
    }

    #[test]
    fn far_conditional_jumps_and_unplaced_labels_are_errors() {
        let mut a = Asm::default();
        let far = a.label();
        a.cond(JEQ_K, 0, To::At(far), To::Next);
        for _ in 0..300 {
            a.ret(0);
        }
        a.place(far);
        assert_eq!(a.finish(), Err(BpfError::TooFar(300)));
        let mut a = Asm::default();
        let nowhere = a.label();
        a.ja(nowhere);
        assert_eq!(a.finish(), Err(BpfError::Unplaced));
    }
}
