//! The OCI runtime spec's `linux.seccomp` object, as JSON, and the meaning
//! of its names: actions, comparison operators, filter flags.

use serde::Deserialize;

use crate::SeccompError;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub default_action: String,
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub flags: Option<Vec<String>>,
    #[serde(default)]
    pub listener_path: Option<String>,
    #[serde(default)]
    pub syscalls: Option<Vec<SyscallRule>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyscallRule {
    pub names: Vec<String>,
    pub action: String,
    #[serde(default)]
    pub errno_ret: Option<u32>,
    #[serde(default)]
    pub args: Option<Vec<ArgRule>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArgRule {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

/// `SECCOMP_RET_*` values.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_KILL_THREAD: u32 = 0x0000_0000;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_TRACE: u32 = 0x7ff0_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;

/// `SECCOMP_FILTER_FLAG_*` the guest applies.
pub const FLAG_LOG: u32 = 2;
pub const FLAG_SPEC_ALLOW: u32 = 4;

const EPERM: u32 = 1;
/// The largest errno the kernel returns from a system call.
const MAX_ERRNO: u32 = 4095;

/// The `SECCOMP_RET_*` value of an OCI action; `errno` is the rule's
/// `errnoRet` (or the profile's `defaultErrnoRet`).
pub fn action(name: &str, errno: Option<u32>) -> Result<u32, SeccompError> {
    let with_errno = |base: u32| match errno {
        Some(e) if e > MAX_ERRNO => Err(SeccompError::Field(format!("errnoRet {e}: above {MAX_ERRNO}"))),
        Some(e) => Ok(base | e),
        None => Ok(base | EPERM),
    };
    match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Ok(RET_KILL_THREAD),
        "SCMP_ACT_KILL_PROCESS" => Ok(RET_KILL_PROCESS),
        "SCMP_ACT_TRAP" => Ok(RET_TRAP),
        "SCMP_ACT_ERRNO" => with_errno(RET_ERRNO),
        "SCMP_ACT_TRACE" => with_errno(RET_TRACE),
        "SCMP_ACT_LOG" => Ok(RET_LOG),
        "SCMP_ACT_ALLOW" => Ok(RET_ALLOW),
        "SCMP_ACT_NOTIFY" => Err(SeccompError::Unsupported(
            "SCMP_ACT_NOTIFY: a seccomp agent on the host cannot reach a guest's system calls".into(),
        )),
        other => Err(SeccompError::Field(format!("unknown action {other:?}"))),
    }
}

/// The filter flags of the profile; TSYNC changes nothing for a process
/// that has one thread when the filter is loaded.
pub fn flags(names: &[String]) -> Result<u32, SeccompError> {
    let mut flags = 0;
    for n in names {
        flags |= match n.as_str() {
            "SECCOMP_FILTER_FLAG_TSYNC" => 0,
            "SECCOMP_FILTER_FLAG_LOG" => FLAG_LOG,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => FLAG_SPEC_ALLOW,
            other => return Err(SeccompError::Unsupported(format!("filter flag {other}"))),
        };
    }
    Ok(flags)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    MaskedEq,
}

pub fn cmp(name: &str) -> Result<Cmp, SeccompError> {
    Ok(match name {
        "SCMP_CMP_NE" => Cmp::Ne,
        "SCMP_CMP_LT" => Cmp::Lt,
        "SCMP_CMP_LE" => Cmp::Le,
        "SCMP_CMP_EQ" => Cmp::Eq,
        "SCMP_CMP_GE" => Cmp::Ge,
        "SCMP_CMP_GT" => Cmp::Gt,
        "SCMP_CMP_MASKED_EQ" => Cmp::MaskedEq,
        other => return Err(SeccompError::Field(format!("unknown comparison {other:?}"))),
    })
}
