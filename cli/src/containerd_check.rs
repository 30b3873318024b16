//! The containerd side of `bulkhead check`: can containerd start our shim,
//! does its CRI plugin have a runtime handler for it, and is its version
//! one we support. Each gap is named with the line that closes it. These
//! findings do not change `check`'s exit status: `bulkhead run` needs no
//! containerd.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The runtime type containerd resolves to `containerd-shim-bulkhead-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.bulkhead.v2";
pub const SHIM_BINARY: &str = "containerd-shim-bulkhead-v2";
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// What systemd gives a service when its unit sets no PATH.
const SYSTEMD_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// containerd releases whose shim v2 task API this shim serves (tested
/// against 1.6).
const SUPPORTED: &[(u32, u32)] = &[(1, 6), (1, 7)];

/// What the CRI plugin's configuration says about our runtime.
#[derive(Debug, PartialEq, Eq)]
pub enum Handler {
    /// Handler names whose `runtime_type` is ours.
    Configured(Vec<String>),
    Missing,
    /// The CRI plugin is listed in `disabled_plugins`.
    CriDisabled,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// Finds our runtime handler in a containerd configuration (version 2's
/// `plugins."io.containerd.grpc.v1.cri"`, or version 1's `plugins.cri`).
pub fn find_handler(text: &str, path: &Path) -> Result<Handler, CheckError> {
    let doc: toml::Table = text.parse().map_err(|source| CheckError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    let version = doc.get("version").and_then(toml::Value::as_integer).unwrap_or(1);
    let cri_id = if version >= 2 {
        "io.containerd.grpc.v1.cri"
    } else {
        "cri"
    };
    let disabled = doc
        .get("disabled_plugins")
        .and_then(toml::Value::as_array)
        .is_some_and(|list| list.iter().any(|p| p.as_str() == Some(cri_id)));
    if disabled {
        return Ok(Handler::CriDisabled);
    }
    let runtimes = doc
        .get("plugins")
        .and_then(|p| p.get(cri_id))
        .and_then(|c| c.get("containerd"))
        .and_then(|c| c.get("runtimes"))
        .and_then(toml::Value::as_table);
    let names: Vec<String> = runtimes
        .into_iter()
        .flatten()
        .filter(|(_, r)| r.get("runtime_type").and_then(toml::Value::as_str) == Some(RUNTIME_TYPE))
        .map(|(name, _)| name.clone())
        .collect();
    Ok(if names.is_empty() {
        Handler::Missing
    } else {
        Handler::Configured(names)
    })
}

/// The lines that add a handler named `bulkhead`.
pub fn handler_snippet() -> String {
    format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead]\n  runtime_type = \"{RUNTIME_TYPE}\"\n"
    )
}

/// `major.minor` from `containerd --version` output
/// (`containerd github.com/containerd/containerd 1.6.20~ds1 ...`).
pub fn parse_version(output: &str) -> Option<(u32, u32)> {
    let word = output.split_whitespace().nth(2)?;
    let mut parts = word.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor.parse().ok()?))
}

/// A running containerd: its executable and its PATH.
struct Running {
    exe: PathBuf,
    path: Option<String>,
}

fn running_containerd() -> Option<Running> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        let is_containerd = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == "containerd");
        if !is_containerd {
            continue;
        }
        let Ok(exe) = std::fs::read_link(dir.join("exe")) else {
            continue;
        };
        let path = std::fs::read(dir.join("environ")).ok().and_then(|env| {
            env.split(|&b| b == 0)
                .find_map(|var| var.strip_prefix(b"PATH="))
                .map(|p| String::from_utf8_lossy(p).into_owned())
        });
        return Some(Running { exe, path });
    }
    None
}

fn which(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The containerd section of `bulkhead check`.
pub fn report(config: &Path) -> String {
    let mut out = String::from("containerd (for the runtime class; `bulkhead run` does not need it):\n");
    let running = running_containerd();
    let binary = running
        .as_ref()
        .map(|r| r.exe.clone())
        .or_else(|| which("containerd", &std::env::var("PATH").unwrap_or_default()));
    let Some(binary) = binary else {
        out.push_str("  containerd: not installed (apt-get install containerd)\n");
        return out;
    };
    let version = Command::new(&binary).arg("--version").output();
    match version
        .as_ref()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    {
        Some(text) => match parse_version(&text) {
            Some(v) if SUPPORTED.contains(&v) => {
                let _ = writeln!(out, "  version: {}.{} (supported; tested with 1.6)", v.0, v.1);
            }
            Some(v) => {
                let _ = writeln!(
                    out,
                    "  version: {}.{} is not supported: use containerd 1.6 or 1.7 (the shim v2 task API)",
                    v.0, v.1
                );
            }
            None => {
                let _ = writeln!(out, "  version: cannot tell from {:?}", text.trim());
            }
        },
        None => {
            let _ = writeln!(out, "  version: `{} --version` did not run", binary.display());
        }
    }

    // containerd looks the shim up on its own PATH, then beside itself.
    let (path, whose) = match running.as_ref().and_then(|r| r.path.clone()) {
        Some(p) => (p, "the running containerd's PATH"),
        None => (SYSTEMD_DEFAULT_PATH.to_string(), "containerd's PATH under systemd"),
    };
    let beside = binary.parent().map(|d| d.join(SHIM_BINARY)).filter(|p| p.is_file());
    match which(SHIM_BINARY, &path).or(beside) {
        Some(p) => {
            let _ = writeln!(out, "  shim: {}", p.display());
        }
        None => {
            let mine = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(SHIM_BINARY)))
                .filter(|p| p.is_file());
            let link = mine.map_or_else(
                || format!("install {SHIM_BINARY} into /usr/local/bin"),
                |m| format!("ln -s {} /usr/local/bin/", m.display()),
            );
            let _ = writeln!(out, "  shim: MISSING: {SHIM_BINARY} is not on {whose} ({path}); {link}");
        }
    }

    let text = match std::fs::read_to_string(config) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = writeln!(
                out,
                "  config: {} does not exist (containerd's built-in defaults)",
                config.display()
            );
            Ok(String::new())
        }
        Err(source) => Err(CheckError::Read {
            path: config.to_owned(),
            source,
        }),
    };
    match text.and_then(|t| find_handler(&t, config)) {
        Ok(Handler::Configured(names)) => {
            let _ = writeln!(
                out,
                "  CRI runtime handler: {} in {}",
                names.join(", "),
                config.display()
            );
        }
        Ok(Handler::Missing) => {
            let _ = write!(
                out,
                "  CRI runtime handler: MISSING: no runtime with runtime_type = \"{RUNTIME_TYPE}\" in {} \
                 (`ctr run --runtime {RUNTIME_TYPE}` works without one; Kubernetes needs it); add, under \
                 `version = 2`:\n{}",
                config.display(),
                indent(&handler_snippet())
            );
        }
        Ok(Handler::CriDisabled) => {
            let _ = writeln!(
                out,
                "  CRI runtime handler: the CRI plugin is disabled in {} (disabled_plugins); remove it there for Kubernetes",
                config.display()
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  CRI runtime handler: {e}");
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_in_version_2_and_1_configs() {
        let p = Path::new("c.toml");
        assert_eq!(find_handler("", p).unwrap(), Handler::Missing);
        let v2 = format!("version = 2\n{}", handler_snippet());
        assert_eq!(
            find_handler(&v2, p).unwrap(),
            Handler::Configured(vec!["bulkhead".into()])
        );
        let v1 = format!("[plugins.cri.containerd.runtimes.vm]\n  runtime_type = \"{RUNTIME_TYPE}\"\n");
        assert_eq!(find_handler(&v1, p).unwrap(), Handler::Configured(vec!["vm".into()]));
        let runc_only = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  \
                         runtime_type = \"io.containerd.runc.v2\"\n";
        assert_eq!(find_handler(runc_only, p).unwrap(), Handler::Missing);
        let off = "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
        assert_eq!(find_handler(off, p).unwrap(), Handler::CriDisabled);
        assert!(find_handler("version = [", p)
            .unwrap_err()
            .to_string()
            .contains("c.toml"));
    }

    #[test]
    fn containerd_versions() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n";
        assert_eq!(parse_version(debian), Some((1, 6)));
        assert_eq!(
            parse_version("containerd containerd.io v1.7.13 7c3aca7\n"),
            Some((1, 7))
        );
        assert_eq!(parse_version("containerd"), None);
    }
}
