//! Boot tier for the agent and `bulkhead run`: real VMs with the project's
//! kernel and the agent's initramfs. Boots are slow on PVM hosts, so the
//! checks share one sandbox wherever the protocol allows (several
//! containers and execs in one VM), and the CLI itself boots twice.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bulkhead_protocol::messages::{Process, Request, Resources, Response};
use bulkhead_runtime::paths::Artifacts;
use bulkhead_runtime::rootfs::{self, ImageCache};
use bulkhead_runtime::sandbox::{Sandbox, SandboxConfig};
use bulkhead_runtime::stdio::StdioPlan;
use bulkhead_tests::agent::{sh, sha256};
use bulkhead_tests::{require_kvm, sandbox_artifacts, target_dir};

struct Fixture {
    _dir: tempfile::TempDir,
    artifacts: Artifacts,
    cache: ImageCache,
    runtime: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let artifacts = sandbox_artifacts(dir.path());
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).unwrap();
        Fixture {
            artifacts,
            cache: ImageCache::new(dir.path().join("cache")),
            runtime,
            _dir: dir,
        }
    })
}

fn bulkhead_bin() -> PathBuf {
    let p = target_dir().join("debug/bulkhead");
    assert!(p.is_file(), "{} is missing: cargo build -p bulkhead", p.display());
    p
}

/// `bulkhead` with the shared artifacts and cache, and a runtime directory
/// of the calling test's own, so tests running at once see only their runs.
fn cli(runtime: &Path) -> Command {
    let f = fixture();
    let mut c = Command::new(bulkhead_bin());
    c.env("BULKHEAD_KERNEL", &f.artifacts.kernel)
        .env("BULKHEAD_INITRAMFS", &f.artifacts.initramfs)
        .env("BULKHEAD_VMM", &f.artifacts.vmm)
        .env("XDG_CACHE_HOME", f.cache.dir().parent().unwrap().join("xdg-cache"))
        .env("XDG_RUNTIME_DIR", runtime);
    c
}

fn runtime_dir(name: &str) -> PathBuf {
    let d = fixture().runtime.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Nothing of a finished run is left: no run directory, no VMM.
fn assert_nothing_left(runtime: &Path) {
    let left: Vec<_> = std::fs::read_dir(runtime.join("bulkhead"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run directories left behind: {left:?}");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ours = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains("bulkhead-vmm") && l.contains(&*runtime.to_string_lossy()))
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(ours.is_empty(), "VMMs left running: {ours:?}");
}

#[test]
fn run_echo_hello() {
    let rt = runtime_dir("echo");
    let out = cli(&rt).args(["run", "--", "echo", "hello"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("booting"), "no progress shown: {stderr}");
    assert_nothing_left(&rt);
}

/// `--secret`, `--volume` and `--tmpfs`: a file and a kubelet-style
/// directory (its `..data` symlink swap layout) are copied into guest
/// memory and mounted read-only, a tmpfs is made; the secret's content is
/// found in no file on the host afterwards. (Named to start after
/// `run_echo_hello`, which must be the run that builds the shared
/// template, to show its progress lines.)
#[test]
fn run_with_secrets_volumes_and_tmpfs() {
    let rt = runtime_dir("copy-in");
    let src = tempfile::tempdir().unwrap();
    let marker = format!(
        "secret-marker-{}-{}",
        std::process::id(),
        rt.display().to_string().len()
    );
    let secret = src.path().join("token");
    std::fs::write(&secret, &marker).unwrap();
    let vol = src.path().join("config");
    std::fs::create_dir_all(vol.join("..2026_12_02/sub")).unwrap();
    std::fs::write(vol.join("..2026_12_02/game.properties"), "lives=3\n").unwrap();
    std::fs::write(vol.join("..2026_12_02/sub/private"), "x").unwrap();
    std::fs::set_permissions(
        vol.join("..2026_12_02/sub/private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_12_02", vol.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/game.properties", vol.join("game.properties")).unwrap();
    let script = "stat -c '%a %u' /run/secrets/token; cat /run/secrets/token; echo; \
                  cat /etc/game/game.properties; readlink /etc/game/..data; \
                  stat -c '%a %u' /etc/game/..data/sub/private; \
                  touch /etc/game/new 2>&1 | grep -o 'Read-only file system'; \
                  echo scratch > /scratch/f && cat /scratch/f; \
                  grep ' /scratch ' /proc/mounts | grep -o 'size=1024k'";
    let out = cli(&rt)
        .args(["run", "-q", "-u", "1000:1000"])
        .arg("--secret")
        .arg(format!("token={}", secret.display()))
        .arg("--volume")
        .arg(format!("{}:/etc/game:ro", vol.display()))
        .args(["--tmpfs", "/scratch:1m", "--", "sh", "-c", script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("400 1000\n{marker}\nlives=3\n..2026_12_02\n600 0\nRead-only file system\nscratch\nsize=1024k\n"),
        "stderr: {stderr}"
    );
    assert_nothing_left(&rt);
    // The secret crossed as messages into guest memory: no file of ours on
    // the host (caches, templates, run directories) holds it.
    let mut holding = Vec::new();
    let mut dirs = vec![fixture()._dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let (path, kind) = (e.path(), e.file_type().unwrap());
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                    holding.push(path);
                }
            }
        }
    }
    assert!(holding.is_empty(), "the secret is on the host's disk in {holding:?}");

    // Refused before any VM starts, naming the problem.
    std::os::unix::fs::symlink("/etc/shadow", vol.join("escape")).unwrap();
    let out = cli(&rt)
        .args(["run", "-q", "--volume"])
        .arg(format!("{}:/etc/game:ro", vol.display()))
        .args(["--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("could lead out of the volume"), "{stderr}");
    let out = cli(&rt)
        .args(["run", "-q", "--volume", "/tmp:/data", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only read-only volumes"), "{stderr}");
    assert_nothing_left(&rt);
}

/// stdin reaches the workload, and Ctrl-C (SIGINT to `bulkhead`) reaches a
/// workload that traps it; its exit code comes back.
#[test]
fn run_forwards_stdin_and_sigint() {
    let script = "read line; echo got:$line; trap 'echo INT; exit 9' INT; echo ready; while :; do sleep 1; done";
    let rt = runtime_dir("sigint");
    let mut child = cli(&rt)
        .args(["run", "-q", "-i", "--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line == "ready" {
            break;
        }
    }
    assert_eq!(seen, ["got:abc", "ready"]);
    // The VMM, and only it, runs in the run's own host cgroup.
    let cgroup = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|root| PathBuf::from(format!("{root}/bulkhead/run-{}", child.id())))
        .find(|d| d.is_dir())
        .expect("no host cgroup for the run");
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert_eq!(procs.lines().count(), 1, "{procs}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", procs.trim())).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("bulkhead-vmm"),
        "{cmdline:?}"
    );
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(rest, ["INT"], "stderr: {err}");
    assert_eq!(status.code(), Some(9), "stderr: {err}");
    assert_nothing_left(&rt);
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}

/// One VM, many checks: exit codes, kill -9, stdin, exec into a running
/// container, a read-only root, an OOM kill with its event, stats, TTY.
#[test]
fn one_sandbox_many_containers() {
    let f = fixture();
    let image = bulkhead::default_rootfs::default_image(&f.cache, &mut |_| {}).unwrap();
    let before = sha256(&image.path);
    let mut cfg = SandboxConfig::new(f.artifacts.clone(), image.clone());
    cfg.runtime_root = Some(f.runtime.join("lib"));
    cfg.boot_timeout = Some(Duration::from_secs(600));
    let t0 = std::time::Instant::now();
    // Progress on stderr: on a PVM host each step takes seconds.
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let sb = Sandbox::boot(&cfg).unwrap();
    step("agent ready");

    let out = sb.run_process(sh("echo out; echo err >&2; exit 3"), None).unwrap();
    assert_eq!(
        (out.status, out.stdout_text().as_str(), out.stderr_text().as_str()),
        (3, "out\n", "err\n")
    );

    step("exit code");
    let out = sb.run_process(sh("cat; echo; echo done"), Some(b"ping")).unwrap();
    assert_eq!((out.status, out.stdout_text().as_str()), (0, "ping\ndone\n"));

    step("stdin");
    // The overlay takes writes; the next container starts from the image.
    let out = sb.run_process(sh("echo x > /bin/new && cat /bin/new"), None).unwrap();
    assert_eq!(
        (out.status, out.stdout_text().as_str()),
        (0, "x\n"),
        "{}",
        out.stderr_text()
    );
    let out = sb.run_process(sh("test -e /bin/new; echo $?"), None).unwrap();
    assert_eq!(out.stdout_text(), "1\n");

    step("overlay");
    // A pod in the real guest: a sandbox container, and one that joins its
    // IPC and UTS namespaces; both under the default device rules, so a
    // node made for the VM's disk cannot be opened.
    let mut c = sb.client().unwrap();
    // As the test pause image (and the real pause): ends on TERM or INT.
    let mut pause = sb.container("pod-pause", sh("trap 'exit 0' TERM INT; sleep 1000 & wait"));
    pause.hostname = Some("pod-host".into());
    let pause_io = sb.create(&mut c, pause, StdioPlan::default()).unwrap();
    sb.start(&mut c, "pod-pause").unwrap();
    let script = "hostname; readlink /proc/self/ns/ipc; d=$(cat /sys/block/vda/dev); \
                  mknod /dev/vdx b ${d%:*} ${d#*:} && echo made; head -c1 /dev/vdx 2>&1 | grep -o 'Operation not permitted'; \
                  mknod /dev/serial c 4 64 && (echo x > /dev/serial) 2>&1 | grep -o 'Operation not permitted'";
    let mut app = sb.container("pod-app", sh(script));
    app.join.ipc = Some("pod-pause".into());
    app.join.uts = Some("pod-pause".into());
    let out = sb.run_container(app, None).unwrap();
    let ipc = sb.exec("pod-pause", sh("readlink /proc/self/ns/ipc"), None).unwrap();
    assert_eq!(
        ipc.status,
        0,
        "the pod's sandbox container ended: {}",
        ipc.stderr_text()
    );
    assert_eq!(
        out.stdout_text(),
        format!(
            "pod-host\n{}made\nOperation not permitted\nOperation not permitted\n",
            ipc.stdout_text()
        ),
        "{}",
        out.stderr_text()
    );
    c.call_ok(&Request::Signal {
        container_id: "pod-pause".into(),
        exec_id: None,
        signal: libc::SIGKILL,
        all: false,
    })
    .unwrap();
    assert_eq!(c.wait("pod-pause", None).unwrap(), 137);
    drop(pause_io);
    step("pod namespaces and device rules");
    let out = sb
        .run_process(
            Process {
                terminal: true,
                ..sh("tty")
            },
            None,
        )
        .unwrap();
    assert!(out.stdout_text().starts_with("/dev/pts/"), "{out:?}");

    step("tty");
    // A long-running container: exec into it, stats, then kill -9.
    let mut c = sb.client().unwrap();
    let mut spec = sb.container("long", sh("echo started; exec sleep 100000"));
    spec.hostname = Some("long-box".into());
    let _streams = sb.create(&mut c, spec, Default::default()).unwrap();
    sb.start(&mut c, "long").unwrap();
    // The exec shares the container's UTS and PID namespaces: its hostname,
    // and its `ps` shows the workload as PID 1.
    let ex = sb.exec("long", sh("hostname; ps -o pid,args"), None).unwrap();
    assert_eq!(ex.status, 0, "{}", ex.stderr_text());
    let text = ex.stdout_text();
    assert!(text.starts_with("long-box\n"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "sleep", "100000"]),
        "{text}"
    );
    step("exec");
    match c
        .call(&Request::Stats {
            container_id: "long".into(),
        })
        .unwrap()
    {
        Response::Stats { stats } => {
            assert_eq!(stats.pids_current, 1, "the workload alone: {stats:?}");
            assert!(stats.memory_current_bytes > 0, "{stats:?}");
        }
        other => panic!("{other:?}"),
    }
    c.call_ok(&Request::Signal {
        container_id: "long".into(),
        exec_id: None,
        signal: libc::SIGKILL,
        all: false,
    })
    .unwrap();
    assert_eq!(c.wait("long", None).unwrap(), 137);

    step("kill -9");
    // OOM: an 8 MiB limit and a string that doubles until it breaks it.
    // The memory comes from page faults alone: pushing bytes through pipes
    // costs minutes of emulated kernel copies and reclaim on a PVM host.
    let mut oom_client = sb.client().unwrap();
    let waiter = std::thread::spawn(move || oom_client.call(&Request::NextOomEvent).unwrap());
    let hog = Process {
        args: vec!["awk".into(), "BEGIN { s = \"x\"; while (1) s = s s }".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let mut spec = sb.container("hog", hog);
    spec.resources = Resources {
        memory_max_bytes: Some(8 << 20),
        ..Default::default()
    };
    let out = sb.run_container(spec, None).unwrap();
    assert_eq!(out.status, 137, "{out:?}");
    assert_eq!(
        waiter.join().unwrap(),
        Response::Oom {
            container_id: "hog".into()
        }
    );

    step("oom");
    let status = sb.shutdown().unwrap();
    assert!(status.success(), "VMM after shutdown: {status}");
    assert_eq!(sha256(&image.path), before, "the read-only root image changed");
    assert_eq!(rootfs::detect_image(&image.path).unwrap(), image.fstype);
    let left: Vec<_> = std::fs::read_dir(f.runtime.join("lib"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run directories left behind: {left:?}");
}
