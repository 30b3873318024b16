//! A private containerd for the containerd tier: its own config, root,
//! state and sockets under a temp dir, the shim on its PATH, and a small
//! busybox OCI image built here and imported. Dropping it stops containerd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "bulkhead.test/busybox:latest";
/// A pod's infrastructure image as CRI uses it (Kubernetes' `pause`): a
/// different image from the app's, whose entrypoint `/pause` sleeps, with
/// `/image-name` saying which image a container sees.
pub const PAUSE_IMAGE: &str = "bulkhead.test/pause:1";
pub const RUNTIME: &str = "io.containerd.bulkhead.v2";
const APPLETS: &[&str] = &[
    "sh", "echo", "true", "false", "sleep", "cat", "ls", "ps", "id", "test", "hostname", "tty", "awk",
];

pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Fails with the reason when the host cannot run this tier.
pub fn require_containerd() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the containerd tier needs root");
    for bin in ["containerd", "ctr"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "`{bin}` is missing: install Debian's containerd (scripts/setup)");
    }
}

/// The shim under test (built with the workspace).
pub fn shim_bin() -> PathBuf {
    let p = crate::target_dir().join("debug/containerd-shim-bulkhead-v2");
    assert!(
        p.is_file(),
        "{} is missing: `cargo build -p containerd-shim-bulkhead-v2`",
        p.display()
    );
    p
}

fn sha256_hex(b: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("piped").write_all(b)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    crate::text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Writes an OCI image layout tarball named `name` of busybox and its
/// applets, plus `files` (path, contents, mode), running `cmd` by default.
pub fn build_image(dir: &Path, name: &str, files: &[(&str, &str, u32)], cmd: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let layer_root = dir.join("layer");
    std::fs::create_dir_all(layer_root.join("bin")).unwrap();
    std::fs::write(layer_root.join("bin/busybox"), crate::busybox()).unwrap();
    std::fs::set_permissions(
        layer_root.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", layer_root.join("bin").join(a)).unwrap();
    }
    for (path, contents, mode) in files {
        let p = layer_root.join(path);
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
    }
    let layer_tar = dir.join("layer.tar");
    let st = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-C"])
        .arg(&layer_root)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let oci = dir.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha256_hex(b);
        std::fs::write(blobs.join(&d), b).unwrap();
        (format!("sha256:{d}"), b.len())
    };
    let (ld, ls) = put(&std::fs::read(&layer_tar).unwrap());
    let config = serde_json::json!({"architecture":"amd64","os":"linux",
        "config":{"Env":["PATH=/bin"],"Cmd":cmd},"rootfs":{"type":"layers","diff_ids":[ld]}});
    let (cd, cs) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cs},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":ld,"size":ls}]});
    let (md, ms) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":md,"size":ms,"annotations":{"org.opencontainers.image.ref.name":"latest","io.containerd.image.name":name}}]});
    std::fs::write(oci.join("index.json"), index.to_string()).unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let tarball = dir.join("image.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    tarball
}

impl Containerd {
    /// Starts containerd with the shim on its PATH and `bulkhead.toml`
    /// (kernel, initramfs, VMM, cache and run directories under the temp dir).
    pub fn start(kernel: &Path, initramfs: &Path, vmm: &Path) -> Containerd {
        Self::start_with(kernel, initramfs, vmm, false)
    }

    /// [`Containerd::start`] with the CRI plugin on: runtime handler
    /// `bulkhead` is our shim, the pod sandbox image is [`PAUSE_IMAGE`], no
    /// CNI (pods use the node's network), and the images are also in the
    /// `k8s.io` namespace, where CRI looks for them.
    pub fn start_cri(kernel: &Path, initramfs: &Path, vmm: &Path) -> Containerd {
        Self::start_with(kernel, initramfs, vmm, true)
    }

    fn start_with(kernel: &Path, initramfs: &Path, vmm: &Path, cri: bool) -> Containerd {
        let dir = tempfile::Builder::new().prefix("bh-ctd").tempdir_in("/tmp").unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::copy(shim_bin(), d.join("bin/containerd-shim-bulkhead-v2")).unwrap();
        // A private copy: the template key hashes the VMM, and a rebuild of
        // the workspace's binary during the tier would (rightly) make the
        // shim build a second template.
        let vmm_copy = d.join("bin/bulkhead-vmm");
        std::fs::copy(vmm, &vmm_copy).unwrap();
        let vmm = vmm_copy.as_path();
        // Beside the shim too, where it finds them with no configuration
        // at all, as in the package's layout.
        std::os::unix::fs::symlink(kernel, d.join("bin/vmlinux")).unwrap();
        std::os::unix::fs::symlink(initramfs, d.join("bin/initramfs.cpio")).unwrap();
        std::fs::write(
            d.join("bulkhead.toml"),
            format!(
                "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\ncache_dir = {:?}\nrun_dir = {:?}\nmemory_mib = 256\n\
                 boot = \"template\"\ntemplate_dir = {:?}\nagent_timeout_secs = 20\ncreate_timeout_secs = 20\n",
                kernel,
                initramfs,
                vmm,
                d.join("cache"),
                d.join("run"),
                d.join("templates")
            ),
        )
        .unwrap();
        let plugins = if cri {
            for sub in ["cni/bin", "cni/conf"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
            }
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = {PAUSE_IMAGE:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = {:?}\n  conf_dir = {:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"bulkhead\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead]\n  runtime_type = {RUNTIME:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead.options]\n  ConfigPath = {:?}\n",
                d.join("cni/bin"),
                d.join("cni/conf"),
                d.join("bulkhead.toml"),
            )
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        };
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n{plugins}[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
                d.join("root"),
                d.join("state"),
                d.join("c.sock"),
                d.join("c.sock.ttrpc")
            ),
        )
        .unwrap();
        let mut c = Containerd { dir, child: None };
        c.spawn();
        let app = build_image(&c.dir.path().join("image-app"), IMAGE, &[], &["sh"]);
        let pause = build_image(
            &c.dir.path().join("image-pause"),
            PAUSE_IMAGE,
            &[
                // As the real pause: PID 1 that ends on SIGTERM or SIGINT.
                (
                    "pause",
                    "#!/bin/sh\ntrap 'exit 0' TERM INT\nsleep 2147483647 &\nwait\n",
                    0o755,
                ),
                ("image-name", "pause\n", 0o644),
            ],
            &["/pause"],
        );
        let namespaces: &[&str] = if cri { &["default", "k8s.io"] } else { &["default"] };
        for ns in namespaces {
            for image in [&app, &pause] {
                let out = c.ctr(&["-n", ns, "image", "import", image.to_str().unwrap()]);
                assert!(out.status.success(), "image import: {}", crate::text(&out.stderr));
            }
        }
        c
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            // The shims inherit containerd's environment: only the
            // configuration (or its absence) may choose their artifacts.
            .env_remove("BULKHEAD_KERNEL")
            .env_remove("BULKHEAD_INITRAMFS")
            .env_remove("BULKHEAD_VMM")
            .env_remove("BULKHEAD_SHIM_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.join("c.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}",
                d.join("containerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Stops containerd (the shims keep running) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the containerd we started and have not reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("bulkhead.toml")
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.dir.path().join("c.sock")).args(args);
        c.stdin(Stdio::null());
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// `ctr run` with our runtime and this tier's configuration.
    pub fn run_args<'a>(&'a self, cfg: &'a str, extra: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        self.run_image_args(cfg, extra, IMAGE, id, cmd)
    }

    /// [`Containerd::run_args`] for another image.
    pub fn run_image_args<'a>(
        &'a self,
        cfg: &'a str,
        extra: &[&'a str],
        image: &'a str,
        id: &'a str,
        cmd: &[&'a str],
    ) -> Vec<&'a str> {
        let mut v = vec!["run", "--runtime", RUNTIME, "--runtime-config-path", cfg];
        v.extend_from_slice(extra);
        v.push(image);
        v.push(id);
        v.extend_from_slice(cmd);
        v
    }

    /// Everything of Bulkhead's this containerd's pods may have left, one
    /// line each: processes naming our directory (shims, VMMs, clients)
    /// other than containerd itself, mounts under it, loop devices backed
    /// by files under it, sandbox run directories, the host cgroups the
    /// shims said they made, and any under containerd's `default`
    /// namespace (the parent itself is not ours).
    /// Caches (images, templates) grow by design and are not counted.
    pub fn leaks(&self) -> Vec<String> {
        let ours = format!("{}/", self.dir.path().display());
        let me = std::process::id();
        let containerd = self.child.as_ref().map(Child::id);
        let mut left: Vec<String> = pids_matching(&ours)
            .into_iter()
            .filter(|p| *p != me && Some(*p) != containerd)
            .map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!("process {p}: {}", crate::text(&cmd).replace('\0', " "))
            })
            .collect();
        left.extend(self.mounts_left().into_iter().map(|m| format!("mount: {m}")));
        for dev in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let backing = std::fs::read_to_string(dev.path().join("loop/backing_file")).unwrap_or_default();
            if backing.starts_with(&ours) {
                left.push(format!("loop device {:?}: {}", dev.file_name(), backing.trim()));
            }
        }
        for e in std::fs::read_dir(self.dir.path().join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            left.push(format!("run directory entry {}", e.path().display()));
        }
        // Wherever a shim said it put a VMM (CRI's paths included).
        let log = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        for line in log.lines() {
            let Some((_, dirs)) = line.split_once("the sandbox VMM runs in the host cgroup ") else {
                continue;
            };
            for d in dirs.split(", ") {
                let d = d.trim_end_matches(|c: char| c == '"' || c.is_whitespace());
                if Path::new(d).exists() {
                    left.push(format!("host cgroup {d}"));
                }
            }
        }
        // And any left under containerd's default namespace, where ctr's
        // containers go (the parent itself is not ours).
        for hierarchy in ["", "memory/", "cpu/", "cpuacct/", "pids/"] {
            let p = Path::new("/sys/fs/cgroup").join(hierarchy).join("default");
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    left.push(format!("host cgroup {}", e.path().display()));
                }
            }
        }
        left
    }

    /// Paths of ours still mounted.
    pub fn mounts_left(&self) -> Vec<String> {
        let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let me = self.dir.path().to_string_lossy().into_owned();
        m.lines()
            .filter(|l| l.contains(&me) && !l.contains("/root/io.containerd.snapshotter"))
            .map(String::from)
            .collect()
    }
}

/// Pids of running processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// The parent pid of `pid`, from `/proc/PID/stat` (the field after the
/// command name, which may itself hold spaces and parentheses).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Running children of `pid` whose command line contains `needle`.
pub fn children_matching(pid: u32, needle: &str) -> Vec<u32> {
    pids_matching(needle)
        .into_iter()
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

/// SIGKILLs `pid` (a process this test started, directly or through containerd).
pub fn kill9(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one
    // of this test's processes, found by its command line.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

impl Containerd {
    /// The task bundle containerd made for container `id` (where the shim
    /// writes `shim.pid`, `address` and the sandbox's run directory).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id)
    }

    /// The shim serving container `id`, from its bundle's `shim.pid`.
    pub fn shim_pid(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.bundle(id).join("shim.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// A child process (such as `ctr events`) killed when the test ends, also
/// when it fails half-way.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // A test that failed half-way may leave shims (their VMMs die
        // with them), VMMs and ctr clients: every process naming our
        // directory goes.
        let me = std::process::id();
        let ours = format!("{}/", self.dir.path().display());
        for pid in pids_matching(&ours) {
            if pid != me {
                kill9(pid);
            }
        }
        // Snapshot mounts containerd made under its root, and a shim's
        // build mount in a bundle: anything mounted under our directory.
        let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = m
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|p| p.starts_with(ours.as_str()))
            .collect();
        // Innermost first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Calls the shim of container `id` as containerd does, with an
/// `UpdateTaskRequest` carrying OCI `LinuxResources` JSON (containerd 1.6's
/// `ctr` has no `task update`); returns the shim's error in words.
pub fn shim_update(ctd: &Containerd, id: &str, resources_json: &str) -> Result<(), String> {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::{Message, MessageField};
    use containerd_shim_protos::ttrpc;
    use containerd_shim_protos::ttrpc::proto::RequestInit;

    let address = std::fs::read_to_string(ctd.bundle(id).join("address")).map_err(|e| e.to_string())?;
    let client = ttrpc::Client::connect(address.trim()).map_err(|e| e.to_string())?;
    let update = UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources_json.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut req = ttrpc::Request::init_request(
        "containerd.task.v2.Task".into(),
        "Update".into(),
        30_000_000_000,
        Vec::new(),
    );
    req.set_payload(update.write_to_bytes().map_err(|e| e.to_string())?);
    client.request(req).map(|_| ()).map_err(|e| e.to_string())
}
