//! Capability names (OCI spells them `CAP_*`) to bit sets.

use bulkhead_protocol::messages::Capabilities;

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {0:?}")]
    Unknown(String),
    #[error("ambient {0} is not also permitted and inheritable")]
    Ambient(String),
}

/// In kernel numbering order (linux/capability.h), up to 6.1's last.
const NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

pub fn number(name: &str) -> Option<u32> {
    let bare = name.strip_prefix("CAP_")?;
    NAMES.iter().position(|n| *n == bare).map(|i| i as u32)
}

/// The highest capability this kernel knows, so the bounding set drop
/// covers capabilities newer than our table.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
        .min(63)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

fn bits(names: &[String]) -> Result<u64, CapsError> {
    names.iter().try_fold(0u64, |acc, n| {
        number(n)
            .map(|b| acc | (1 << b))
            .ok_or_else(|| CapsError::Unknown(n.clone()))
    })
}

impl CapSets {
    pub fn from_names(c: &Capabilities) -> Result<CapSets, CapsError> {
        let s = CapSets {
            bounding: bits(&c.bounding)?,
            effective: bits(&c.effective)?,
            permitted: bits(&c.permitted)?,
            inheritable: bits(&c.inheritable)?,
            ambient: bits(&c.ambient)?,
        };
        if let Some(bad) = c.ambient.iter().find(|n| {
            let b = 1u64 << number(n).unwrap_or(0);
            s.permitted & b == 0 || s.inheritable & b == 0
        }) {
            return Err(CapsError::Ambient(bad.clone()));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(number("CAP_CHOWN"), Some(0));
        assert_eq!(number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(number("CHOWN"), None);
        assert_eq!(number("CAP_FLY"), None);
    }

    #[test]
    fn sets_and_ambient_rule() {
        let c = Capabilities {
            bounding: vec!["CAP_KILL".into(), "CAP_CHOWN".into()],
            permitted: vec!["CAP_KILL".into()],
            ambient: vec!["CAP_KILL".into()],
            ..Default::default()
        };
        assert!(matches!(CapSets::from_names(&c), Err(CapsError::Ambient(_))));
        let ok = Capabilities {
            inheritable: vec!["CAP_KILL".into()],
            ..c
        };
        let s = CapSets::from_names(&ok).unwrap();
        assert_eq!(s.bounding, 0b100001);
        assert_eq!(s.ambient, 1 << 5);
        assert!(CapSets::from_names(&Capabilities {
            effective: vec!["CAP_NOPE".into()],
            ..Default::default()
        })
        .is_err());
    }
}
