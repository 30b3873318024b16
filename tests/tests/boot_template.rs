//! Boot tier for sandbox templates: one template is built (a cold boot,
//! paused and snapshotted with the agent waiting), then sandboxes are
//! restored from it. Restored sandboxes must be unique (random bytes,
//! clock), keep their writes to themselves and leave the template's memory
//! file untouched; a snapshot taken while an agent stream is open restores
//! with a working agent. `bench_template_against_cold` (ignored; run it
//! with `--ignored --nocapture`) prints the figures for restore against
//! cold boot and the host memory of N restored sandboxes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_protocol::messages::Request;
use bulkhead_runtime::paths::Artifacts;
use bulkhead_runtime::rootfs::{ImageCache, RootfsImage};
use bulkhead_runtime::sandbox::{self, Sandbox, SandboxConfig};
use bulkhead_runtime::template::{self, BuildOptions, Template, TemplateCache};
use bulkhead_tests::agent::{sh, sha256};
use bulkhead_tests::{require_kvm, sandbox_artifacts, target_dir};
use bulkhead_vmm_api::client::ApiClient;

/// Generous bounds for boots under PVM emulation; never timing claims.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Two spare disks, for images attached while the guest runs.
const SHAPE: template::Shape = template::Shape {
    vcpus: sandbox::DEFAULT_VCPUS,
    mem_mib: sandbox::DEFAULT_MEM_MIB,
    spare_disks: 2,
};

struct Fixture {
    dir: tempfile::TempDir,
    artifacts: Artifacts,
    /// What `$BULKHEAD_CACHE` is for the CLI runs.
    cache_root: PathBuf,
    image: RootfsImage,
    template: Template,
    /// Cold boot to agent-ready plus pause and snapshot.
    build_time: Duration,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let artifacts = sandbox_artifacts(dir.path());
        let cache_root = dir.path().join("cache");
        let image =
            bulkhead::default_rootfs::default_image(&ImageCache::new(cache_root.join("rootfs")), &mut |_| {}).unwrap();
        let cache = TemplateCache::new(cache_root.join("templates"));
        let opts = BuildOptions {
            runtime_root: Some(runtime(dir.path(), "build")),
            boot_timeout: Some(BOOT_TIMEOUT),
            keep_console: Some(dir.path().join("template-console.log")),
        };
        let mut built = false;
        let t0 = Instant::now();
        let template = cache
            .ensure(&artifacts, SHAPE, &opts, &mut |_| built = true, &mut |_| Ok(()))
            .unwrap_or_else(|e| {
                let console = std::fs::read_to_string(dir.path().join("template-console.log")).unwrap_or_default();
                panic!("template build: {e}\nconsole:\n{console}")
            });
        let build_time = t0.elapsed();
        assert!(built, "a fresh cache must build");
        eprintln!("template built in {:.1} s", build_time.as_secs_f64());
        // A second ensure finds it and checks it, without a build.
        let again = cache
            .ensure(
                &artifacts,
                SHAPE,
                &opts,
                &mut |_| panic!("rebuilt a usable template"),
                &mut |_| Ok(()),
            )
            .unwrap();
        assert_eq!(again, template);
        assert!(
            !template.dir().join("placeholder.img").exists(),
            "the placeholder disk stays behind"
        );
        // The jailed VMM that wrote it handed it back: later VMMs map it.
        for e in std::fs::read_dir(template.dir()).unwrap() {
            let m = e.unwrap().metadata().unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "template files belong to root");
        }
        Fixture {
            artifacts,
            cache_root,
            image,
            template,
            build_time,
            dir,
        }
    })
}

fn runtime(base: &Path, name: &str) -> PathBuf {
    let d = base.join("run").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(name: &str, template: Option<Template>) -> SandboxConfig {
    let f = fixture();
    let mut cfg = SandboxConfig::new(f.artifacts.clone(), f.image.clone());
    cfg.runtime_root = Some(runtime(f.dir.path(), name));
    cfg.boot_timeout = Some(BOOT_TIMEOUT);
    cfg.restore_from = template.map(|t| t.dir().to_path_buf());
    cfg.spare_disks = SHAPE.spare_disks;
    cfg.api_socket = true;
    cfg
}

fn restore(name: &str) -> Sandbox {
    let cfg = config(name, Some(fixture().template.clone()));
    Sandbox::boot(&cfg).unwrap_or_else(|e| panic!("restore {name}: {e}"))
}

/// Runs `script` in the container `id` and returns its stdout (status 0).
fn exec(sb: &Sandbox, id: &str, script: &str) -> String {
    let out = sb.exec(id, sh(script), None).unwrap();
    assert_eq!(out.status, 0, "{script}: {}", out.stderr_text());
    out.stdout_text()
}

fn start_long(sb: &Sandbox) {
    let mut c = sb.client().unwrap();
    let spec = sb.container("long", sh("exec sleep 100000"));
    let _streams = sb.create(&mut c, spec, Default::default()).unwrap();
    sb.start(&mut c, "long").unwrap();
}

/// Two sandboxes restored at once from one template: both run commands,
/// read different random bytes, see the host's time, keep their writes to
/// themselves; the template's files are unchanged afterwards.
#[test]
fn restored_sandboxes_are_unique_and_isolated() {
    let f = fixture();
    let memory_before = sha256(&f.template.memory_path());
    let state_before = sha256(&f.template.dir().join(template::STATE_FILE));
    let t0 = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| restore("a"));
        let b = s.spawn(|| restore("b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("two restores at once: {:?}", t0.elapsed());

    for sb in [&a, &b] {
        start_long(sb);
    }
    let random: Vec<String> = [&a, &b]
        .iter()
        .map(|sb| exec(sb, "long", "head -c 32 /dev/urandom | od -An -tx1"))
        .collect();
    for r in &random {
        assert!(r.split_whitespace().count() == 32, "not 32 bytes: {r:?}");
    }
    assert_ne!(
        random[0], random[1],
        "two restored sandboxes read the same random bytes"
    );

    // The template's clock is as old as the template; the reseed sets it.
    for sb in [&a, &b] {
        let guest: i64 = exec(sb, "long", "date +%s").trim().parse().unwrap();
        let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((guest - host).abs() < 300, "guest clock {guest}, host {host}");
    }

    assert_eq!(exec(&a, "long", "echo a > /tmp/x && cat /tmp/x"), "a\n");
    assert_eq!(exec(&b, "long", "cat /tmp/x 2>/dev/null; echo $?"), "1\n");
    assert_eq!(exec(&a, "long", "cat /tmp/x"), "a\n");

    // A fresh container of each sees the real root image, not the placeholder.
    let out = b.run_process(sh("test -x /bin/busybox && echo root-ok"), None).unwrap();
    assert_eq!(out.stdout_text(), "root-ok\n", "{}", out.stderr_text());

    for sb in [a, b] {
        let status = sb.shutdown().unwrap();
        assert!(status.success(), "VMM after shutdown: {status}");
    }
    assert_eq!(
        sha256(&f.template.memory_path()),
        memory_before,
        "the template's memory changed"
    );
    assert_eq!(sha256(&f.template.dir().join(template::STATE_FILE)), state_before);
}

/// A busybox root with `/marker` holding `marker` and `pad` more bytes in
/// `/pad`, as a cached ext4 image.
fn marked_image(name: &str, marker: &str, pad: usize) -> RootfsImage {
    let f = fixture();
    let root = f.dir.path().join("roots").join(name);
    std::fs::create_dir_all(&root).unwrap();
    bulkhead::default_rootfs::materialize(&root).unwrap();
    std::fs::write(root.join("marker"), marker).unwrap();
    std::fs::write(root.join("pad"), vec![7u8; pad]).unwrap();
    let cache = ImageCache::new(f.cache_root.join("rootfs"));
    cache.image_for_dir(&root, &mut |_| {}).unwrap()
}

/// Runs `script` in a new container whose root is on `disk` (holding
/// `image`), then deletes the container; returns its stdout.
fn run_on_disk(sb: &Sandbox, id: &str, image: &RootfsImage, disk: u8, script: &str) -> String {
    let spec = sandbox::container_on_disk(id, sh(script), image, disk).unwrap();
    let out = sb.run_container(spec, None).unwrap();
    assert_eq!(out.status, 0, "{script} on disk {disk}: {}", out.stderr_text());
    sb.client()
        .unwrap()
        .call_ok(&Request::Delete {
            container_id: id.into(),
        })
        .unwrap();
    out.stdout_text()
}

/// Spare disks take images while the guest runs: a container on one sees
/// that image, the same disk given another image of the same size shows the
/// new contents (no stale cached blocks), a larger one its full size, and
/// the root disk is unaffected. Bad requests are refused with a reason.
#[test]
fn spare_disks_take_new_images_while_the_guest_runs() {
    let b = marked_image("b", "bee", 0);
    let c = marked_image("c", "sea", 0);
    let d = marked_image("d", "dee", 3 << 20);
    let size = |i: &RootfsImage| std::fs::metadata(&i.path).unwrap().len();
    assert_eq!(size(&b), size(&c), "same-size images test the cache flush");
    assert!(size(&d) > size(&b));
    let sb = restore("spare");
    start_long(&sb);

    sb.attach_image(1, &b.path).unwrap();
    assert_eq!(run_on_disk(&sb, "on-b", &b, 1, "cat /marker"), "bee");
    sb.detach_image(1).unwrap();
    sb.attach_image(1, &c.path).unwrap();
    assert_eq!(run_on_disk(&sb, "on-c", &c, 1, "cat /marker"), "sea");
    sb.attach_image(2, &d.path).unwrap();
    assert_eq!(
        run_on_disk(&sb, "on-d", &d, 2, "cat /marker; wc -c < /pad"),
        format!("dee{}\n", 3 << 20)
    );
    // The root disk and its running container are untouched.
    assert_eq!(exec(&sb, "long", "test -e /marker || echo no-marker"), "no-marker\n");

    let e = sb.attach_image(3, &b.path).unwrap_err().to_string();
    assert!(e.contains("no spare disk 3: this sandbox has 2"), "{e}");
    let e = sb
        .attach_image(1, Path::new("/nonexistent.img"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent.img") && e.contains("No such file"), "{e}");
    // The VMM itself opens only what its jail holds.
    let e = sb
        .api()
        .unwrap()
        .replace_drive(1, Path::new("/etc/hostname"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("400") && e.contains("cannot open"), "{e}");
    // Refused: disk 1 still has image c.
    assert_eq!(run_on_disk(&sb, "on-c-again", &c, 1, "cat /marker"), "sea");
    let status = sb.shutdown().unwrap();
    assert!(status.success(), "VMM after shutdown: {status}");
}

/// A snapshot of a sandbox whose agent is serving a blocking request (an
/// open vsock stream) restores with that stream gone and new ones working.
#[test]
fn snapshot_with_an_open_stream_restores_with_a_working_agent() {
    let f = fixture();
    let snap = f.dir.path().join("open-stream-snapshot");
    std::fs::create_dir(&snap).unwrap();
    let mut cfg = config("open-stream", Some(f.template.clone()));
    cfg.api_socket = true;
    // The jailed VMM writes only where its jail lets it.
    cfg.snapshot_into = Some(snap.clone());
    let sb = Sandbox::boot(&cfg).unwrap();
    sb.lend_for_snapshot(&snap).unwrap();
    let mut waiting = sb.client().unwrap();
    let waiter = std::thread::spawn(move || waiting.call(&Request::NextOomEvent));
    // The request reaches the agent and blocks there (a round trip on
    // another stream is well past it).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sb.run_process(sh("echo busy"), None).unwrap().stdout_text(), "busy\n");
    assert!(!waiter.is_finished());

    let api = ApiClient::new(sb.api_socket_path().unwrap(), Duration::from_secs(120));
    api.pause().unwrap();
    api.snapshot(&snap).unwrap();
    drop(sb);
    // The old stream ends with its VMM.
    assert!(waiter.join().unwrap().is_err(), "the blocked call outlived its VM");

    let restored = Sandbox::boot(&config("open-stream-2", Some(Template::at(&snap)))).unwrap();
    // The transport reset dropped the stream; the agent still listens.
    // (The snapshot's guest already ran `run-1`: new ids from here on.)
    let out = restored
        .run_container(restored.container("after-1", sh("echo hello")), None)
        .unwrap();
    assert_eq!((out.status, out.stdout_text().as_str()), (0, "hello\n"));
    let mut c = restored.client().unwrap();
    let waiter = std::thread::spawn(move || c.call(&Request::NextOomEvent));
    let out = restored
        .run_container(restored.container("after-2", sh("echo again")), None)
        .unwrap();
    assert_eq!(out.stdout_text(), "again\n");
    assert!(!waiter.is_finished());
    assert!(restored.shutdown().unwrap().success());
    assert!(waiter.join().unwrap().is_err());
}

/// Every non-directory under `root`, relative to it.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// As the jail's uid, in the VM directory `dir` (reached through a
/// descriptor opened as root, so that only `dir`'s own permissions
/// count), tries what a VMM that broke out of its device models might:
/// the errno of each of symlinkat, renameat of `console`, unlinkat of
/// `socket`, and an append to `console` (0 when it worked).
fn as_jail_uid(uid: u32, gid: u32, dir: &Path, console: &str, socket: &str) -> [i32; 4] {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(dir).unwrap();
    let c = |s: &str| CString::new(s).unwrap();
    let (target, planted, console, moved, socket) = (c("/etc/shadow"), c("planted"), c(console), c("moved"), c(socket));
    let mut pipe = [0; 2];
    // SAFETY: pipe writes two descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child makes system calls on memory prepared before the
    // fork, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let d = dir.as_raw_fd();
            let errno = |r: libc::c_int| if r < 0 { *libc::__errno_location() } else { 0 };
            let mut out = [-1i32; 4];
            if libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(gid, gid, gid) == 0
                && libc::setresuid(uid, uid, uid) == 0
            {
                out[0] = errno(libc::symlinkat(target.as_ptr(), d, planted.as_ptr()));
                out[1] = errno(libc::renameat(d, console.as_ptr(), d, moved.as_ptr()));
                out[2] = errno(libc::unlinkat(d, socket.as_ptr(), 0));
                let fd = libc::openat(d, console.as_ptr(), libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW);
                out[3] = errno(fd);
                if fd >= 0 {
                    out[3] = errno(libc::write(fd, b"\n".as_ptr().cast(), 1) as libc::c_int);
                }
            }
            libc::write(pipe[1], out.as_ptr().cast(), std::mem::size_of_val(&out));
            libc::_exit(0);
        }
    }
    // SAFETY: closes our copy of the write end; reads into an owned array.
    let mut out = [0i32; 4];
    unsafe {
        libc::close(pipe[1]);
        let n = libc::read(pipe[0], out.as_mut_ptr().cast(), std::mem::size_of_val(&out));
        libc::close(pipe[0]);
        assert_eq!(n as usize, std::mem::size_of_val(&out));
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    out
}

/// The runtime jails every VMM: its own mount, network, IPC and UTS
/// namespaces; a root holding only the template, the root image, its VM
/// directory and /dev/kvm; a uid and gid of its own per sandbox; no
/// capabilities, no new privileges, its seccomp filters. Host files it
/// could open before are out of its reach, its control API's included.
#[test]
fn every_vmm_is_jailed_apart() {
    let f = fixture();
    let a = restore("jail-a");
    let b = restore("jail-b");
    let field = |status: &str, key: &str| -> Vec<String> {
        let line = status.lines().find_map(|l| l.strip_prefix(key));
        line.unwrap_or_else(|| panic!("no {key}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let mut ids = Vec::new();
    for sb in [&a, &b] {
        let pid = sb.vmm_pid();
        let (uid, gid) = sb.jail_identity().expect("a root runtime jails its VMMs");
        assert_ne!(uid, 0);
        ids.push(uid);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(field(&status, "Uid:"), vec![uid.to_string(); 4]);
        assert_eq!(field(&status, "Gid:"), vec![gid.to_string(); 4]);
        assert!(field(&status, "Groups:").is_empty());
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&status, cap), ["0000000000000000"], "{cap}");
        }
        assert_eq!(field(&status, "NoNewPrivs:"), ["1"]);
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let fsize = sandbox::VMM_LOG_MAX_BYTES.to_string();
        assert_eq!(
            field(&limits, "Max file size"),
            [fsize.as_str(), fsize.as_str(), "bytes"]
        );
        assert_eq!(field(&limits, "Max core file size"), ["0", "0", "bytes"]);
        assert_eq!(field(&status, "Seccomp:"), ["2"]);
        for ns in ["pid", "mnt", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            assert_ne!(
                theirs,
                std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
                "{ns}"
            );
        }
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let files = files_under(&root);
        let rel = |p: &Path| p.strip_prefix("/").unwrap().to_path_buf();
        let allowed = [
            PathBuf::from("dev/kvm"),
            rel(f.template.dir()),
            rel(&f.image.path),
            rel(&sb.run_dir().join("vm")),
        ];
        for file in &files {
            assert!(
                allowed.iter().any(|a| file.starts_with(a)),
                "{} in the jail",
                file.display()
            );
        }
        for needed in [&allowed[0], &allowed[2], &rel(sb.vsock_path())] {
            assert!(files.contains(needed), "{} missing from {files:?}", needed.display());
        }
        assert!(Path::new("/etc/hostname").exists() && !root.join("etc/hostname").exists());
        // What the runtime reads, creates or connects to in the VM
        // directory, the VMM cannot swap for a link: it may write its
        // console, nothing else.
        let vm_dir = sb.run_dir().join("vm");
        let console = sb.console_path().file_name().unwrap().to_str().unwrap();
        let vsock = sb.vsock_path().file_name().unwrap().to_str().unwrap();
        assert_eq!(
            as_jail_uid(uid, gid, &vm_dir, console, vsock),
            [libc::EACCES, libc::EACCES, libc::EACCES, 0],
            "planting a link, moving the console, removing the socket, appending to the console"
        );
        let e = sb
            .api()
            .unwrap()
            .replace_drive(2, Path::new("/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("400") && e.contains("cannot open"), "{e}");
        // Nor can it write anywhere on the host but its VM directory.
        let target = f.dir.path().join(format!("snapshot-from-{pid}"));
        std::fs::create_dir(&target).unwrap();
        sb.set_paused(true).unwrap();
        let e = sb.api().unwrap().snapshot(&target).unwrap_err().to_string();
        sb.set_paused(false).unwrap();
        assert!(e.contains("400") || e.contains("500"), "{e}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{e}");
    }
    assert_ne!(ids[0], ids[1], "two sandboxes share a uid");
    // Both still serve.
    for sb in [&a, &b] {
        start_long(sb);
        assert_eq!(exec(sb, "long", "echo up"), "up\n");
    }
}

/// A VMM thread that makes a call its seccomp filter refuses ends the
/// sandbox at once. The refused call is the VMM's debug-build test hook
/// (sysinfo, 99, from a vCPU thread), switched on by a wrapper around the
/// VMM under test. The runtime's error says "seccomp violation" and which
/// call; no VMM and no run directory entry is left.
#[test]
fn a_seccomp_violation_ends_the_sandbox_and_names_the_call() {
    require_kvm();
    let f = fixture();
    let wrapper = f.dir.path().join("vmm-refused-call");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nBULKHEAD_VMM_TEST_FORBIDDEN_SYSCALL=vcpu exec '{}' \"$@\"\n",
            f.artifacts.vmm.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cfg = config("seccomp", Some(f.template.clone()));
    cfg.artifacts.vmm = wrapper;
    let e = match Sandbox::boot(&cfg) {
        Ok(_) => panic!("the sandbox came up although its VMM broke its filter"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("the sandbox's VM stopped: seccomp violation"), "{e}");
    assert!(
        e.contains("seccomp violation: system call 99 (") && e.contains(" on the vcpu thread"),
        "{e}"
    );
    let root = cfg.runtime_root.unwrap();
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert!(left.is_empty(), "{left:?} left in {}", root.display());
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn summary(samples: &[Duration]) -> String {
    let mut s = samples.to_vec();
    s.sort();
    let all: Vec<String> = s.iter().map(|d| millis(*d)).collect();
    format!("median {} [{}]", millis(s[s.len() / 2]), all.join(", "))
}

/// Sum of `Pss` and `Rss` (KiB) over the VMMs' smaps_rollup.
fn pss_rss_kib(pids: &[u32]) -> (u64, u64) {
    let mut pss = 0;
    let mut rss = 0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "Pss:" => pss += v,
                "Rss:" => rss += v,
                _ => {}
            }
        }
    }
    (pss, rss)
}

fn cli_run(name: &str, cold: bool) -> Duration {
    let f = fixture();
    let bin = target_dir().join("debug/bulkhead");
    let mut c = Command::new(bin);
    c.env("BULKHEAD_KERNEL", &f.artifacts.kernel)
        .env("BULKHEAD_INITRAMFS", &f.artifacts.initramfs)
        .env("BULKHEAD_VMM", &f.artifacts.vmm)
        .env("BULKHEAD_CACHE", &f.cache_root)
        .env("XDG_RUNTIME_DIR", runtime(f.dir.path(), name))
        .args(["run", "-q"]);
    if cold {
        c.arg("--cold");
    }
    c.args(["--", "true"]);
    let t0 = Instant::now();
    let out = c.output().unwrap();
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("template"),
        "the run did not use the template: {stderr}"
    );
    took
}

/// Figures for the notes: restore against cold boot to agent-ready,
/// `bulkhead run -- true` both ways, and the host memory of N restored
/// sandboxes. Prints; asserts nothing about time.
#[test]
#[ignore = "benchmark: cargo test --test boot_template -- --ignored --nocapture"]
fn bench_template_against_cold() {
    let f = fixture();
    let runs = |n: usize, name: &str, template: Option<Template>, jail: bool| -> Vec<Duration> {
        (0..n)
            .map(|i| {
                let mut cfg = config(&format!("{name}-{i}"), template.clone());
                cfg.jail = jail;
                let t0 = Instant::now();
                let sb = Sandbox::boot(&cfg).unwrap();
                let took = t0.elapsed();
                drop(sb);
                took
            })
            .collect()
    };
    let restored = runs(10, "bench-restore", Some(f.template.clone()), true);
    let unjailed = runs(10, "bench-unjailed", Some(f.template.clone()), false);
    let cold = runs(2, "bench-cold", None, true);
    let run_tpl: Vec<Duration> = (0..5).map(|i| cli_run(&format!("cli-tpl-{i}"), false)).collect();
    let run_cold: Vec<Duration> = (0..2).map(|i| cli_run(&format!("cli-cold-{i}"), true)).collect();

    // The jail's own host memory: its root tmpfs (the VMM's PSS is
    // measured below, jailed as always).
    let sb = restore("bench-jail-root");
    let root = std::ffi::CString::new(format!("/proc/{}/root", sb.vmm_pid())).unwrap();
    // SAFETY: statvfs is plain data; all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    let r = unsafe { libc::statvfs(root.as_ptr(), &mut st) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let jail_root = ((st.f_blocks - st.f_bfree) * st.f_frsize / 1024, st.f_files - st.f_ffree);
    drop(sb);

    let mut mem = Vec::new();
    for n in [1usize, 5, 10] {
        let sbs: Vec<Sandbox> = (0..n).map(|i| restore(&format!("pss-{n}-{i}"))).collect();
        for sb in &sbs {
            assert_eq!(sb.run_process(sh("echo ok"), None).unwrap().stdout_text(), "ok\n");
        }
        let pids: Vec<u32> = sbs.iter().map(|s| s.vmm_pid()).collect();
        let (pss, rss) = pss_rss_kib(&pids);
        mem.push((n, pss, rss));
        drop(sbs);
    }

    let host = bulkhead_tests::HostKind::detect();
    eprintln!("== template benchmark ({host:?} host, 1 vCPU, 256 MiB) ==");
    eprintln!("template build (cold boot + snapshot): {}", millis(f.build_time));
    eprintln!("restore to agent-ready (reseed included): {}", summary(&restored));
    eprintln!("the same without the jail:                {}", summary(&unjailed));
    eprintln!("jail root tmpfs: {} KiB in {} inodes", jail_root.0, jail_root.1);
    eprintln!("cold boot to agent-ready:                 {}", summary(&cold));
    eprintln!("bulkhead run -- true, template:           {}", summary(&run_tpl));
    eprintln!("bulkhead run -- true, --cold:             {}", summary(&run_cold));
    for (n, pss, rss) in mem {
        eprintln!(
            "N={n:>2} restored sandboxes: PSS sum {:.1} MiB ({:.1} MiB each), RSS sum {:.1} MiB",
            pss as f64 / 1024.0,
            pss as f64 / 1024.0 / n as f64,
            rss as f64 / 1024.0
        );
    }
}

/// Processes that spin on the host's CPUs until dropped.
struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    fn start(n: usize) -> CpuHogs {
        CpuHogs(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("cannot start a CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One sandbox's share of a load round: restore, create and start a
/// container, exec into it and check the output; the sandbox is killed
/// when dropped.
fn load_one(name: &str) -> Result<(), String> {
    let cfg = config(name, Some(fixture().template.clone()));
    let sb = Sandbox::boot(&cfg).map_err(|e| format!("restore: {e}"))?;
    load_steps(&sb).map_err(|e| {
        // The guest's and the VMM's view, for whoever investigates.
        let keep = fixture().dir.path().join("load-failures").join(name);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(sb.run_dir().join("vmm.log"), keep.join("vmm.log"));
        let _ = std::fs::copy(sb.console_path(), keep.join("console.log"));
        format!(
            "{e}\nlogs kept in {}\nconsole:\n  {}",
            keep.display(),
            sb.console_tail(15).join("\n  ")
        )
    })
}

fn load_steps(sb: &Sandbox) -> Result<(), String> {
    let mut c = sb.client().map_err(|e| format!("client: {e}"))?;
    let spec = sb.container("long", sh("echo started; exec sleep 100000"));
    let streams = sb
        .create(&mut c, spec, Default::default())
        .map_err(|e| format!("create: {e}"))?;
    sb.start(&mut c, "long").map_err(|e| format!("start: {e}"))?;
    let out = sb
        .exec("long", sh("echo exec-ok"), None)
        .map_err(|e| format!("exec: {e}"))?;
    if (out.status, out.stdout_text().as_str()) != (0, "exec-ok\n") {
        return Err(format!("exec gave {} {:?}", out.status, out.stdout_text()));
    }
    drop(streams);
    Ok(())
}

/// Containers start on a CPU-starved host: rounds of 6 sandboxes restored
/// at once while two CPU hogs spin, each creating a container and exec'ing
/// into it. No step of the start path may give up on a short timer.
/// `BULKHEAD_LOAD_ROUNDS` rounds (default 2, about 4 minutes each on a
/// 2-core PVM host); 10 rounds, 60 starts, make a 1-in-20 failure show
/// with 95% odds.
#[test]
fn containers_start_under_cpu_load() {
    const SANDBOXES: usize = 6;
    let rounds: usize = std::env::var("BULKHEAD_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    fixture();
    let _hogs = CpuHogs::start(2);
    let mut failures = Vec::new();
    for round in 0..rounds {
        let t0 = Instant::now();
        let results: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..SANDBOXES)
                .map(|i| {
                    let name = format!("load-{round}-{i}");
                    s.spawn(move || {
                        let r = load_one(&name);
                        (name, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| ("?".into(), Err("panicked".into()))))
                .collect()
        });
        let failed: Vec<_> = results.into_iter().filter(|(_, r)| r.is_err()).collect();
        eprintln!(
            "load round {round}: {} of {SANDBOXES} failed, {:.1} s",
            failed.len(),
            t0.elapsed().as_secs_f64()
        );
        failures.extend(failed);
    }
    eprintln!(
        "load: {} failures in {} sandbox starts",
        failures.len(),
        rounds * SANDBOXES
    );
    assert!(failures.is_empty(), "failed under load: {failures:#?}");
}
