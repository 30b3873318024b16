//! `bulkhead run` flags to the protocol's OCI process: arguments, the
//! environment (defaults, then `-e` in order), working directory, user and
//! terminal, checked before any VM boots.

use bulkhead_protocol::defaults;
use bulkhead_protocol::messages::{Process, User};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("no command given: bulkhead run [OPTIONS] -- CMD [ARGS...]")]
    NoCommand,
    #[error("-e {0:?}: expected KEY=VALUE (or KEY to pass the host's value)")]
    Env(String),
    #[error("-u {0:?}: expected a numeric UID or UID:GID (user names are not resolved)")]
    User(String),
    #[error("-w {0:?}: the working directory must be an absolute path")]
    Workdir(String),
}

/// The flags that shape the process.
#[derive(Clone, Debug, Default)]
pub struct ProcessFlags {
    pub args: Vec<String>,
    /// `-e` entries in order: `KEY=VALUE`, or `KEY` for the host's value.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub hostname: String,
}

/// `UID` or `UID:GID`; a lone UID gets the group of the same number (as
/// `nobody`, 65534:65534, has).
pub fn parse_user(s: &str) -> Result<User, FlagError> {
    let bad = || FlagError::User(s.to_string());
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?),
        None => {
            let u = s.parse().map_err(|_| bad())?;
            (u, u)
        }
    };
    Ok(User {
        uid,
        gid,
        ..Default::default()
    })
}

/// Applies `-e` entries over `base`: a later entry for the same key
/// replaces the earlier one in place. `KEY` alone takes the host's value
/// and is skipped when the host has none, as `docker run -e KEY` does.
pub fn merge_env(
    base: Vec<(String, String)>,
    flags: &[String],
    host: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, FlagError> {
    let mut env = base;
    for e in flags {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match host(e) {
                Some(v) => (e.clone(), v),
                None => continue,
            },
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(FlagError::Env(e.clone()));
        }
        match env.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// The process for `flags`; `host` reads the host's environment.
pub fn build_process(flags: &ProcessFlags, host: impl Fn(&str) -> Option<String>) -> Result<Process, FlagError> {
    if flags.args.is_empty() {
        return Err(FlagError::NoCommand);
    }
    let user = match &flags.user {
        Some(u) => parse_user(u)?,
        None => User::default(),
    };
    let cwd = match &flags.workdir {
        Some(w) if w.starts_with('/') => w.clone(),
        Some(w) => return Err(FlagError::Workdir(w.clone())),
        None => "/".into(),
    };
    let home = if user.uid == 0 { "/root" } else { "/" };
    let mut base = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), flags.hostname.clone()),
        ("HOME".to_string(), home.to_string()),
    ];
    if flags.tty {
        base.push(("TERM".into(), "xterm".into()));
    }
    let env = merge_env(base, &flags.env, host)?;
    Ok(Process {
        args: flags.args.clone(),
        env,
        cwd,
        capabilities: Some(defaults::capabilities(user.uid)),
        user,
        terminal: flags.tty,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> ProcessFlags {
        ProcessFlags {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            hostname: "box".into(),
            ..Default::default()
        }
    }

    fn no_host(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        let p = build_process(&flags(), no_host).unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(
            p.env,
            [
                format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=box".into(),
                "HOME=/root".into()
            ]
        );
        assert_eq!((p.cwd.as_str(), p.user.uid, p.user.gid, p.terminal), ("/", 0, 0, false));
        assert_eq!(
            p.capabilities.as_ref().unwrap().effective.len(),
            defaults::CAPABILITIES.len()
        );
        p.validate().unwrap();
        assert_eq!(
            build_process(&ProcessFlags::default(), no_host),
            Err(FlagError::NoCommand)
        );
    }

    #[test]
    fn env_flags_override_in_place_and_pass_through() {
        let f = ProcessFlags {
            env: vec![
                "PATH=/bin".into(),
                "A=1".into(),
                "B=x=y".into(),
                "A=2".into(),
                "FROM_HOST".into(),
                "UNSET_ON_HOST".into(),
                "EMPTY=".into(),
            ],
            tty: true,
            ..flags()
        };
        let host = |k: &str| (k == "FROM_HOST").then(|| "h".to_string());
        let p = build_process(&f, host).unwrap();
        assert_eq!(
            p.env,
            [
                "PATH=/bin",
                "HOSTNAME=box",
                "HOME=/root",
                "TERM=xterm",
                "A=2",
                "B=x=y",
                "FROM_HOST=h",
                "EMPTY="
            ]
        );
        assert!(p.terminal);
        for bad in ["=v", "A=\0"] {
            let f = ProcessFlags {
                env: vec![bad.into()],
                ..flags()
            };
            assert_eq!(build_process(&f, no_host), Err(FlagError::Env(bad.into())));
        }
    }

    #[test]
    fn user_and_workdir() {
        assert_eq!(
            parse_user("1000").unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                ..Default::default()
            }
        );
        assert_eq!((parse_user("5:6").unwrap().uid, parse_user("5:6").unwrap().gid), (5, 6));
        for bad in ["nobody", "1:", ":1", "-1", "1:2:3", ""] {
            assert_eq!(parse_user(bad), Err(FlagError::User(bad.into())), "{bad}");
        }
        let f = ProcessFlags {
            user: Some("65534".into()),
            workdir: Some("/tmp".into()),
            ..flags()
        };
        let p = build_process(&f, no_host).unwrap();
        assert_eq!((p.user.uid, p.cwd.as_str()), (65534, "/tmp"));
        assert!(p.env.contains(&"HOME=/".to_string()));
        assert!(
            p.capabilities.unwrap().effective.is_empty(),
            "non-root: no effective caps"
        );
        let f = ProcessFlags {
            workdir: Some("tmp".into()),
            ..flags()
        };
        assert_eq!(build_process(&f, no_host), Err(FlagError::Workdir("tmp".into())));
    }
}
