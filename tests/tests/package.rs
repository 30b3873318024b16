//! Packaging tier: the Debian package that `scripts/package` builds (run by
//! scripts/test before the tests), installed with dpkg into a throwaway
//! root: its file list and conffile, the installed `bulkhead` finding only
//! the installed artifacts (`--version`, `check`, one cold `run`), `check`
//! naming a missing containerd runtime handler until one is added, then an
//! upgrade that keeps the user's configuration, a removal that keeps the
//! configuration and caches, and a purge that leaves nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bulkhead_tests::{require_kvm, target_dir, text};

/// What the package installs (directories aside).
const FILES: &[&str] = &[
    "/etc/bulkhead/config.toml",
    "/usr/bin/bulkhead",
    "/usr/bin/bulkhead-vmm",
    "/usr/bin/containerd-shim-bulkhead-v2",
    "/usr/lib/bulkhead/initramfs.cpio",
    "/usr/lib/bulkhead/vmlinux",
    "/usr/lib/bulkhead/vmlinux.key",
    "/usr/share/bash-completion/completions/bulkhead",
    "/usr/share/doc/bulkhead/README.md",
    "/usr/share/doc/bulkhead/containerd-config.toml",
    "/usr/share/doc/bulkhead/copyright",
    "/usr/share/doc/bulkhead/runtimeclass.yaml",
    "/usr/share/man/man1/bulkhead-check.1.gz",
    "/usr/share/man/man1/bulkhead-completions.1.gz",
    "/usr/share/man/man1/bulkhead-run.1.gz",
    "/usr/share/man/man1/bulkhead.1.gz",
];

/// The newest package scripts/package wrote.
fn package() -> PathBuf {
    let dir = target_dir().join("debian");
    let newest = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
    });
    newest.unwrap_or_else(|| panic!("no .deb in {}: run scripts/package (scripts/test does)", dir.display()))
}

/// A dpkg database in an empty directory, and dpkg pointed at it.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::Builder::new().prefix("bh-pkg").tempdir().unwrap();
        for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("var/lib/dpkg/status"), "").unwrap();
        Root { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    /// dpkg on this root: maintainer scripts run without chroot (with
    /// $DPKG_ROOT set), dependencies are not there to satisfy, and the log
    /// stays out of the host's /var/log.
    fn dpkg(&self, args: &[&str]) -> Output {
        let root = self.dir.path();
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", root.join("dpkg.log").display()))
            .args(["--force-depends", "--force-script-chrootless", "--force-confold"])
            .args(args)
            .output()
            .expect("run dpkg")
    }

    fn dpkg_ok(&self, args: &[&str]) -> String {
        let o = self.dpkg(args);
        assert!(
            o.status.success(),
            "dpkg {args:?}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    /// Every file and symlink under the root outside dpkg's own files.
    fn files(&self) -> BTreeSet<String> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let rel = format!("/{}", p.strip_prefix(base).unwrap().display());
                if rel.starts_with("/var/lib/dpkg") || rel == "/dpkg.log" {
                    continue;
                }
                if e.file_type().unwrap().is_dir() {
                    walk(&p, base, out);
                } else {
                    out.insert(rel);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    /// The installed `bulkhead`, with nothing from the environment to
    /// point it at the workspace's artifacts.
    fn bulkhead(&self, args: &[&str], cache: &Path) -> Output {
        Command::new(self.path("/usr/bin/bulkhead"))
            .args(args)
            .env_remove("BULKHEAD_KERNEL")
            .env_remove("BULKHEAD_INITRAMFS")
            .env_remove("BULKHEAD_VMM")
            .env("BULKHEAD_CACHE", cache)
            .output()
            .expect("run the installed bulkhead")
    }
}

/// The package with its version replaced, as a later release would be.
fn with_version(deb: &Path, version: &str, scratch: &Path) -> PathBuf {
    let tree = scratch.join("repack");
    let st = Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree).status().unwrap();
    assert!(st.success());
    let control = tree.join("DEBIAN/control");
    let old = std::fs::read_to_string(&control).unwrap();
    let new: String = old
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(old, new, "no Version field in the package");
    std::fs::write(&control, new).unwrap();
    let out = scratch.join(format!("bulkhead_{version}.deb"));
    let o = Command::new("dpkg-deb")
        .arg("-b")
        .arg(&tree)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    out
}

#[test]
fn the_package_installs_runs_upgrades_and_purges_cleanly() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the packaging tier needs root (dpkg --root)"
    );
    let deb = package();
    let root = Root::new();
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");

    root.dpkg_ok(&["--install", deb.to_str().unwrap()]);
    let want: BTreeSet<String> = FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(root.files(), want, "installed files");
    let listed = root.dpkg_ok(&["--listfiles", "bulkhead"]);
    for f in FILES {
        assert!(listed.lines().any(|l| l == *f), "dpkg -L does not list {f}");
    }
    let q = Command::new("dpkg-query")
        .arg(format!("--root={}", root.dir.path().display()))
        .args(["--showformat=${Conffiles}", "--show", "bulkhead"])
        .output()
        .unwrap();
    assert!(
        text(&q.stdout).contains("/etc/bulkhead/config.toml "),
        "conffiles: {}",
        text(&q.stdout)
    );

    // The installed binaries find the installed artifacts, and say so.
    let lib = root.path("/usr/lib/bulkhead");
    let o = root.bulkhead(&["--version"], &cache);
    let version = text(&o.stdout);
    assert!(o.status.success(), "{version}{}", text(&o.stderr));
    let key = std::fs::read_to_string(lib.join("vmlinux.key")).unwrap();
    assert!(
        version.contains(&format!("kernel: {} ({})", key.trim(), lib.join("vmlinux").display())),
        "{version}"
    );
    let agent = format!(
        "agent: bulkhead-agent {} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        bulkhead_protocol::handshake::PROTOCOL_VERSION
    );
    assert!(version.contains(&agent), "{version}");

    let ctd_config = scratch.path().join("containerd.toml");
    std::fs::write(&ctd_config, "version = 2\n").unwrap();
    let check = |what: &str| {
        let o = root.bulkhead(&["check", "--containerd-config", ctd_config.to_str().unwrap()], &cache);
        let out = text(&o.stdout);
        assert!(o.status.success(), "check ({what}): {out}{}", text(&o.stderr));
        assert!(
            out.contains(&format!("guest kernel  {}", lib.join("vmlinux").display())),
            "{out}"
        );
        assert!(
            out.contains(&format!("initramfs     {}", lib.join("initramfs.cpio").display())),
            "{out}"
        );
        out
    };
    let out = check("no handler");
    assert!(out.contains("CRI runtime handler: MISSING"), "{out}");
    assert!(
        out.contains("runtime_type = \"io.containerd.bulkhead.v2\""),
        "the line to add: {out}"
    );
    let snippet = std::fs::read_to_string(root.path("/usr/share/doc/bulkhead/containerd-config.toml")).unwrap();
    std::fs::write(&ctd_config, format!("version = 2\n{snippet}")).unwrap();
    let out = check("the packaged handler added");
    assert!(!out.contains("MISSING: no runtime"), "{out}");
    assert!(out.contains("CRI runtime handler: bulkhead in"), "{out}");

    let o = root.bulkhead(&["run", "--cold", "-q", "--", "echo", "from the package"], &cache);
    assert_eq!(text(&o.stdout), "from the package\n", "{}", text(&o.stderr));
    assert!(o.status.success(), "{}", text(&o.stderr));

    // An upgrade keeps the operator's edit of the conffile.
    let config = root.path("/etc/bulkhead/config.toml");
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("vcpus = 2\n");
    std::fs::write(&config, &edited).unwrap();
    let caches = root.path("/var/lib/bulkhead/templates/some-key");
    std::fs::create_dir_all(&caches).unwrap();
    std::fs::write(caches.join("meta.json"), "{}").unwrap();
    let next = with_version(&deb, "99.0.0-1", scratch.path());
    root.dpkg_ok(&["--install", next.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    let status = root.dpkg_ok(&["--status", "bulkhead"]);
    assert!(status.contains("Version: 99.0.0-1"), "{status}");

    // Removal keeps the configuration and the caches; purge removes them.
    root.dpkg_ok(&["--remove", "bulkhead"]);
    let left: BTreeSet<String> = root.files();
    let want: BTreeSet<String> = [
        "/etc/bulkhead/config.toml",
        "/var/lib/bulkhead/templates/some-key/meta.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(left, want, "after dpkg --remove");
    root.dpkg_ok(&["--purge", "bulkhead"]);
    assert_eq!(root.files(), BTreeSet::new(), "after dpkg --purge");
    assert!(!root.path("/var/lib/bulkhead").exists());
    assert!(!root.path("/etc/bulkhead").exists());
}
