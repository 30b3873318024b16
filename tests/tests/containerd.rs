//! containerd tier: a private containerd (Debian's 1.6) drives the shim
//! with `ctr`. The shim starts pods from a sandbox template: the first pod
//! builds it (one cold boot), every later one restores it. Boots and
//! restores are slow on PVM hosts, so the scenarios share few sandboxes:
//! one `ctr run --rm`; one pod shaped as CRI makes them (a pause container
//! of its own image, then app containers of another image grouped into its
//! VM by the CRI annotations) that gets execs, ps, metrics, pause/resume,
//! two app containers at once, an OOM kill, a TTY, a containerd restart and
//! a kill; one pod whose VMM is killed, running next to it; one pod whose
//! guest stops answering (its VMM stopped) and is still killed and
//! deleted; one pod whose shim is killed; one `ctr run` with no runtime
//! configuration at all.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::containerd::{
    children_matching, kill9, pids_matching, require_containerd, shim_update, Containerd, KillOnDrop, IMAGE,
    PAUSE_IMAGE, RUNTIME,
};
use bulkhead_tests::{kernel, require_kvm, text, vmm_bin};

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// A watchdog for steps that wait on the guest: generous, so that it only
/// turns a hang into a failure (nothing here asserts on time).
const PATIENCE: Duration = Duration::from_secs(300);

/// The task's STATUS column in `ctr task ls`, or `None` when it is not listed.
/// `ctr run -d --null-io` flags for CRI's `kind` ("sandbox" or
/// "container") of pod `pod`, annotated as CRI annotates them.
fn detached_in_pod(kind: &str, pod: &str) -> Vec<String> {
    vec![
        "-d".into(),
        "--null-io".into(),
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The host cgroup directories of container `id` (cgroupsPath
/// /default/<id>) that exist, on v1 or v2.
fn host_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["memory/", "cpu/", "cpuacct/", "pids/", ""]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}default/{id}")))
        .filter(|d| d.is_dir())
        .collect()
}

/// The first of `names` found in container `id`'s host cgroup (v1's
/// memory hierarchy first, then v2's), as a number.
fn host_cgroup_number(id: &str, names: &[&str]) -> u64 {
    host_cgroup_text(id, names)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn host_cgroup_text(id: &str, names: &[&str]) -> Option<String> {
    host_cgroup_dirs(id)
        .iter()
        .find_map(|d| names.iter().find_map(|n| std::fs::read_to_string(d.join(n)).ok()))
}

fn task_status(ctd: &Containerd, id: &str) -> Option<String> {
    let ls = ok(&ctd.ctr(&["task", "ls"]), "task ls");
    ls.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
    })
}

/// Polls until `done` holds, failing with `what` past [`PATIENCE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VMM serving container `id`: the one `bulkhead-vmm` child of its shim.
fn vmm_of(ctd: &Containerd, id: &str) -> (u32, u32) {
    let shim = ctd
        .shim_pid(id)
        .unwrap_or_else(|| panic!("no shim.pid in {}", ctd.bundle(id).display()));
    let vmms = children_matching(shim, "bulkhead-vmm");
    assert_eq!(vmms.len(), 1, "shim {shim} of {id} has VMM children {vmms:?}");
    (shim, vmms[0])
}

/// Runs `shell_cmd` under `script(1)`, so that it has a terminal, with a
/// stdin held open until it ends; returns its exit code and output.
fn under_terminal(shell_cmd: &str) -> (Option<i32>, String) {
    let mut child = KillOnDrop(
        Command::new("script")
            .args(["-qec", shell_cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script(1) from util-linux"),
    );
    let mut out = child.0.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait for script") {
            break s;
        }
        assert!(Instant::now() < deadline, "`{shell_cmd}` under a terminal did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().expect("reader");
    (status.code(), text(&out))
}

/// `/dev/pts/N` somewhere in `s`.
fn names_a_pts(s: &str) -> bool {
    s.match_indices("/dev/pts/")
        .any(|(i, m)| s[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn containerd_runs_pods_in_vms_and_leaves_nothing_behind() {
    require_kvm();
    require_containerd();
    let scratch = tempfile::tempdir().unwrap();
    let initramfs = bulkhead_tests::guest_initramfs(scratch.path());
    let mut ctd = Containerd::start(&kernel(), &initramfs, &vmm_bin());
    let cfg = ctd.config_path().to_string_lossy().into_owned();
    let events_out = ctd.dir.path().join("events.log");
    let events = KillOnDrop(
        ctd.ctr_cmd(&["events"])
            .stdout(std::fs::File::create(&events_out).unwrap())
            .spawn()
            .unwrap(),
    );

    // 1: output, stderr and the exit code through `ctr run --rm`; with
    // `--read-only` (OCI root.readonly) the root refuses writes, /dev/shm not.
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &["--rm", "--read-only"],
        "a1",
        &[
            "sh",
            "-c",
            "echo hello; echo oops >&2; touch /x 2>/dev/null || echo ro-root; touch /dev/shm/x && echo shm; exit 3",
        ],
    ));
    assert_eq!(o.status.code(), Some(3), "{}{}", text(&o.stdout), text(&o.stderr));
    assert_eq!(text(&o.stdout), "hello\nro-root\nshm\n");
    assert!(text(&o.stderr).contains("oops"), "{}", text(&o.stderr));

    // A host bind mount (a volume) cannot reach the guest: refused with a
    // reason before any VM starts, not dropped.
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &["--rm", "--mount", "type=bind,src=/tmp,dst=/data,options=rbind:ro"],
        "m1",
        &["true"],
    ));
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("/tmp -> /data") && text(&o.stderr).contains("not supported"),
        "{}",
        text(&o.stderr)
    );
    let _ = ctd.ctr(&["container", "rm", "m1"]);

    // With no runtime configuration at all (no --runtime-config-path and
    // no /etc/bulkhead/config.toml) the shim runs on its defaults: the
    // artifacts beside it, the caches under /var/lib/bulkhead.
    assert!(
        !Path::new("/etc/bulkhead/config.toml").exists(),
        "this step needs /etc/bulkhead/config.toml absent (the package installs one)"
    );
    let log_path = ctd.dir.path().join("containerd.log");
    let counts = |log: &str| {
        (
            log.matches("restoring the sandbox VM").count(),
            log.matches("building the root filesystem image").count(),
        )
    };
    let before_d1 = counts(&std::fs::read_to_string(&log_path).unwrap_or_default());
    let mut no_cfg = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, "d1"];
    no_cfg.extend_from_slice(&["echo", "defaults"]);
    let o = ctd.ctr(&no_cfg);
    assert_eq!(text(&o.stdout), "defaults\n", "{}", text(&o.stderr));
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The shim says which it used (its log reaches containerd's).
    let log = read_trimmed(&log_path);
    // Its template and image caches are the host's, which may already
    // hold them: what it added to the counts below is set aside.
    let after_d1 = counts(&log);
    let d1_added = (after_d1.0 - before_d1.0, after_d1.1 - before_d1.1);
    assert!(log.contains("no configuration file at /etc/bulkhead/config.toml: using the defaults"));
    let beside = format!("sandbox from kernel {}", ctd.dir.path().join("bin/vmlinux").display());
    assert!(log.contains(&beside), "no {beside:?} in containerd's log");

    // 2: a pod as CRI starts one: its sandbox container runs the pause
    // image (its own entrypoint), and what can be done to it.
    const IN_POD_B1: [&str; 4] = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=b1",
    ];
    let b1_flags = detached_in_pod("sandbox", "b1");
    ok(
        &ctd.ctr(&ctd.run_image_args(&cfg, &strs(&b1_flags), PAUSE_IMAGE, "b1", &[])),
        "run -d b1 (pause)",
    );
    let o = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e0",
        "b1",
        "sh",
        "-c",
        "cat /image-name; ps -o args",
    ]);
    let out = text(&o.stdout);
    assert!(
        out.starts_with("pause\n") && out.contains("sleep 2147483647"),
        "{out}{}",
        text(&o.stderr)
    );
    let o = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "b1",
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "in-exec\n");
    let o = ctd.ctr(&["task", "exec", "--exec-id", "e2", "b1", "false"]);
    assert_eq!(o.status.code(), Some(1));
    let ps = ok(&ctd.ctr(&["task", "ps", "b1"]), "ps");
    assert!(ps.lines().count() >= 2, "{ps}");
    let m = ok(&ctd.ctr(&["task", "metrics", "b1"]), "metrics");
    assert!(m.contains("memory") || m.contains("pids"), "{m}");
    ok(&ctd.ctr(&["task", "pause", "b1"]), "pause");
    assert!(ok(&ctd.ctr(&["task", "ls"]), "ls").contains("PAUSED"));
    ok(&ctd.ctr(&["task", "resume", "b1"]), "resume");
    let o = ctd.ctr(&["task", "exec", "--exec-id", "e3", "b1", "echo", "after-resume"]);
    assert_eq!(text(&o.stdout), "after-resume\n", "{}", text(&o.stderr));

    // An app container of another image in the same pod: same shim, same
    // VM, its own root (the image goes to a spare disk while the VM runs).
    let vmms_before = pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len();
    let mut rm_in_pod = vec!["--rm"];
    rm_in_pod.extend(IN_POD_B1);
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &rm_in_pod,
        "b2",
        &["sh", "-c", "echo second; test -e /image-name || echo app-image"],
    ));
    assert_eq!(text(&o.stdout), "second\napp-image\n", "{}", text(&o.stderr));
    assert_eq!(
        pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len(),
        vmms_before
    );

    // Two app containers at once next to the pause container; one is
    // killed by the OOM killer under its memory limit (a string that
    // doubles until it breaks 16 MiB), which containerd hears as TaskOOM.
    let b4_flags = detached_in_pod("container", "b1");
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &strs(&b4_flags), "b4", &["sleep", "1000"])),
        "run -d b4",
    );
    let mut oom_in_pod = vec!["--rm", "--memory-limit", "16777216"];
    oom_in_pod.extend(IN_POD_B1);
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &oom_in_pod,
        "b5",
        &["awk", "BEGIN { s = \"x\"; while (1) s = s s }"],
    ));
    assert_eq!(o.status.code(), Some(137), "{}{}", text(&o.stdout), text(&o.stderr));
    let o = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e4",
        "b4",
        "sh",
        "-c",
        "test -e /image-name || echo app",
    ]);
    assert_eq!(text(&o.stdout), "app\n", "{}", text(&o.stderr));
    // Update: new limits for b4's cgroup in the guest, as containerd sends
    // them (CRI's UpdateContainerResources); a bad one is refused.
    shim_update(&ctd, "b4", r#"{"memory":{"limit":50331648},"pids":{"limit":99}}"#).unwrap();
    let o = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e6",
        "b4",
        "cat",
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/pids.max",
    ]);
    assert_eq!(text(&o.stdout), "50331648\n99\n", "{}", text(&o.stderr));
    let e = shim_update(&ctd, "b4", r#"{"memory":{"limit":4096}}"#).unwrap_err();
    assert!(e.contains("below 1 MiB"), "{e}");
    let o = ctd.ctr(&["task", "exec", "--exec-id", "e5", "b1", "cat", "/image-name"]);
    assert_eq!(text(&o.stdout), "pause\n", "{}", text(&o.stderr));
    ok(&ctd.ctr(&["task", "kill", "-s", "SIGKILL", "b4"]), "kill b4");
    wait_until("b4 STOPPED", || task_status(&ctd, "b4").as_deref() == Some("STOPPED"));
    ok(&ctd.ctr(&["task", "delete", "b4"]), "task delete b4");
    ok(&ctd.ctr(&["container", "rm", "b4"]), "container rm b4");
    assert_eq!(
        pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len(),
        vmms_before
    );

    // A TTY container in the same pod: `ctr run -t` needs a terminal.
    let sock = ctd.dir.path().join("c.sock");
    let (code, out) = under_terminal(&format!(
        "ctr --address {} run -t --rm --runtime {RUNTIME} --runtime-config-path {cfg} \
         --annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id=b1 \
         {IMAGE} b3 sh -c 'tty; exit 7'",
        sock.display()
    ));
    assert_eq!(code, Some(7), "{out}");
    assert!(names_a_pts(&out), "tty printed no /dev/pts/N: {out:?}");
    assert_eq!(
        pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len(),
        vmms_before
    );

    // containerd restarts; the shim keeps serving. The event subscription
    // ends with it: a second one covers what follows.
    ctd.restart();
    let events_after = ctd.dir.path().join("events-after-restart.log");
    let events2 = KillOnDrop(
        ctd.ctr_cmd(&["events"])
            .stdout(std::fs::File::create(&events_after).unwrap())
            .spawn()
            .unwrap(),
    );
    let ls = ok(&ctd.ctr(&["task", "ls"]), "ls after restart");
    assert!(ls.contains("b1") && ls.contains("RUNNING"), "{ls}");

    // 3 starts next to pod b1: two pods, two shims, two VMs at once.
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &["-d", "--null-io"], "v1", &["sleep", "1000"])),
        "run -d v1",
    );
    let (b1_shim, b1_vmm) = vmm_of(&ctd, "b1");
    let (v1_shim, v1_vmm) = vmm_of(&ctd, "v1");
    assert!(b1_shim != v1_shim && b1_vmm != v1_vmm, "b1 and v1 share a shim or VM");
    let o = ctd.ctr(&["task", "exec", "--exec-id", "v", "v1", "echo", "v1-alive"]);
    assert_eq!(text(&o.stdout), "v1-alive\n", "{}", text(&o.stderr));
    // v1's VMM runs in the cgroup containerd named (cgroupsPath
    // /default/v1), capped at its 256 MiB of RAM plus the VMM's 128.
    let cg = std::fs::read_to_string(format!("/proc/{v1_vmm}/cgroup")).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.ends_with(":/default/v1") && (l.contains(":memory:") || l.starts_with("0::"))),
        "{cg}"
    );
    let limit = host_cgroup_text("v1", &["memory.limit_in_bytes", "memory.max"]);
    assert_eq!(limit.as_deref().map(str::trim), Some("402653184"), "{cg}");
    // v1 founded its pod, so its task metrics are the host cgroup's: the
    // host's limit, and the memory the host counts for the VM (read
    // around the call; an idle VM's moves little), not the guest's.
    let host_memory = || host_cgroup_number("v1", &["memory.usage_in_bytes", "memory.current"]);
    let before = host_memory();
    let metrics = ok(&ctd.ctr(&["task", "metrics", "--format", "json", "v1"]), "metrics v1");
    let after = host_memory();
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap_or_else(|e| panic!("{e}: {metrics}"));
    assert_eq!(m["memory"]["usage_limit"], 402_653_184u64, "{metrics}");
    let usage = m["memory"]["usage"].as_u64().unwrap_or(0);
    assert!(
        usage > 0 && usage >= before.min(after) / 2 && usage <= before.max(after) * 2,
        "memory usage {usage}, the host cgroup's {before}..{after}: {metrics}"
    );
    assert!(m["pids"]["current"].as_u64().unwrap_or(0) >= 3, "{metrics}");
    // The VMM has network, IPC and UTS namespaces of its own.
    for kind in ["net", "ipc", "uts"] {
        let ns = |pid| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        assert_ne!(ns(v1_vmm), ns(v1_shim), "{kind} namespace");
    }

    // stdin through an exec, ended by CloseIO at EOF.
    let mut cat = KillOnDrop(
        ctd.ctr_cmd(&["task", "exec", "--exec-id", "e7", "b1", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    {
        use std::io::Write;
        let mut stdin = cat.0.stdin.take().unwrap();
        stdin.write_all(b"through-stdin\n").unwrap();
    }
    let mut out = String::new();
    cat.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "through-stdin\n");
    wait_until("the stdin exec ends", || cat.0.try_wait().unwrap().is_some());

    // Kill every process of the container with a signal: status 128 + 15.
    ok(
        &ctd.ctr(&["task", "kill", "--all", "-s", "SIGTERM", "b1"]),
        "kill --all",
    );
    let mut stopped = false;
    for _ in 0..300 {
        let ls = ok(&ctd.ctr(&["task", "ls"]), "ls");
        if ls.contains("STOPPED") {
            stopped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(stopped);
    ok(&ctd.ctr(&["task", "delete", "b1"]), "task delete");
    ok(&ctd.ctr(&["container", "rm", "b1"]), "container rm");

    // 3: the VMM dies under a running task: TaskExit with a non-zero
    // status, STOPPED, and delete leaves nothing.
    kill9(v1_vmm);
    wait_until("v1 STOPPED after its VMM died", || {
        task_status(&ctd, "v1").as_deref() == Some("STOPPED")
    });
    ok(&ctd.ctr(&["task", "delete", "v1"]), "task delete v1");
    ok(&ctd.ctr(&["container", "rm", "v1"]), "container rm v1");
    assert_eq!(host_cgroup_dirs("v1"), Vec::<PathBuf>::new(), "v1's host cgroup left");

    // A guest that stops answering (its VMM stopped): SIGKILL through
    // containerd gets no answer within agent_timeout_secs, so the shim
    // ends the VM, and the pod can still be deleted.
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &["-d", "--null-io"], "h1", &["sleep", "1000"])),
        "run -d h1",
    );
    let (_, h1_vmm) = vmm_of(&ctd, "h1");
    // SAFETY: kill(2) on the VMM the shim started for h1.
    assert_eq!(unsafe { libc::kill(h1_vmm as libc::pid_t, libc::SIGSTOP) }, 0);
    // Its task metrics still come once the guest's answer is overdue: the
    // host cgroup's, which a guest cannot withhold.
    let metrics = ok(
        &ctd.ctr(&["task", "metrics", "--format", "json", "h1"]),
        "metrics h1 (hung)",
    );
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap_or_else(|e| panic!("{e}: {metrics}"));
    let h1_limit = host_cgroup_number("h1", &["memory.limit_in_bytes", "memory.max"]);
    assert!(h1_limit > 0 && m["memory"]["usage_limit"] == h1_limit, "{metrics}");
    assert!(m["memory"]["usage"].as_u64().unwrap_or(0) > 0, "{metrics}");
    ok(
        &ctd.ctr(&["task", "kill", "-s", "SIGKILL", "h1"]),
        "task kill h1 (hung guest)",
    );
    wait_until("h1 STOPPED after its hung VM was ended", || {
        task_status(&ctd, "h1").as_deref() == Some("STOPPED")
    });
    ok(&ctd.ctr(&["task", "delete", "h1"]), "task delete h1");
    ok(&ctd.ctr(&["container", "rm", "h1"]), "container rm h1");
    assert!(
        !Path::new(&format!("/proc/{h1_vmm}")).exists(),
        "h1's VMM {h1_vmm} is still there"
    );
    let log = std::fs::read_to_string(ctd.dir.path().join("containerd.log")).unwrap_or_default();
    assert!(
        log.contains("the guest agent did not answer signal within 20 s: killing the sandbox VM for SIGKILL to h1"),
        "no hung-guest line in containerd's log"
    );

    // A guest that stops answering a Create in its pod (same image, so no
    // disk to attach): the call fails within create_timeout_secs, the VM
    // is ended, the pod's sandbox task stops and the pod can be deleted.
    let h2_flags = detached_in_pod("sandbox", "h2");
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &strs(&h2_flags), "h2", &["sleep", "1000"])),
        "run -d h2",
    );
    let (_, h2_vmm) = vmm_of(&ctd, "h2");
    // SAFETY: kill(2) on the VMM the shim started for h2.
    assert_eq!(unsafe { libc::kill(h2_vmm as libc::pid_t, libc::SIGSTOP) }, 0);
    let h2a_flags = detached_in_pod("container", "h2");
    let late = ctd.ctr(&ctd.run_args(&cfg, &strs(&h2a_flags), "h2a", &["true"]));
    assert!(!late.status.success(), "a create in a hung pod succeeded");
    let said = text(&late.stderr);
    assert!(
        said.contains("the guest agent did not answer create within 20 s: the sandbox VM was ended"),
        "{said}"
    );
    wait_until("h2 STOPPED after its VM was ended", || {
        task_status(&ctd, "h2").as_deref() == Some("STOPPED")
    });
    let _ = ctd.ctr(&["container", "rm", "h2a"]);
    ok(&ctd.ctr(&["task", "delete", "h2"]), "task delete h2");
    ok(&ctd.ctr(&["container", "rm", "h2"]), "container rm h2");
    assert!(
        !Path::new(&format!("/proc/{h2_vmm}")).exists(),
        "h2's VMM {h2_vmm} is still there"
    );

    // 4: the shim is killed: containerd runs the binary's `delete`, after
    // which no shim, VMM, socket, mount or run directory of it remains.
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &["-d", "--null-io"], "k1", &["sleep", "1000"])),
        "run -d k1",
    );
    let (shim, vmm) = vmm_of(&ctd, "k1");
    let bundle = ctd.bundle("k1");
    let address = read_trimmed(&bundle.join("address"));
    let socket = PathBuf::from(address.strip_prefix("unix://").unwrap_or(&address));
    let run_dir = PathBuf::from(read_trimmed(&bundle.join("bulkhead-run-dir")));
    assert!(socket.exists() && run_dir.is_dir(), "{socket:?} {run_dir:?}");
    kill9(shim);
    // containerd may clean up the dead shim's task itself first.
    let _ = ctd.ctr(&["task", "delete", "k1"]);
    wait_until("k1's task gone", || task_status(&ctd, "k1").is_none());
    ok(&ctd.ctr(&["container", "rm", "k1"]), "container rm k1");
    wait_until("k1's VMM gone", || {
        !Path::new(&format!("/proc/{vmm}/cmdline")).exists()
            || std::fs::read(format!("/proc/{vmm}/cmdline")).is_ok_and(|c| c.is_empty())
    });
    // containerd cleans up after a dead shim in the background (it runs the
    // shim binary's `delete`), racing the ctr commands above: wait for the
    // clean-up to finish rather than catch it half-way.
    let deadline = Instant::now() + PATIENCE;
    while socket.exists() {
        if Instant::now() > deadline {
            // Who still listens there (a leaked descriptor would show here).
            let ss = Command::new("ss").args(["-xlp"]).output().map(|o| text(&o.stdout));
            let holders: Vec<String> = ss
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&*socket.to_string_lossy()))
                .map(String::from)
                .collect();
            panic!(
                "the dead shim's socket {} stays; listeners: {holders:?}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until("the dead shim's run directory removed", || !run_dir.exists());
    wait_until("the dead shim's VMM cgroup removed", || {
        host_cgroup_dirs("k1").is_empty()
    });
    wait_until("the dead shim's bundle removed", || !bundle.exists());
    assert!(ctd.mounts_left().is_empty(), "{:?}", ctd.mounts_left());

    // Events, in order, for a1 and the exec.
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(events);
    drop(events2);
    let ev = std::fs::read_to_string(&events_out).unwrap();
    let order = |id: &str, topics: &[&str]| {
        let seen: Vec<&str> = ev
            .lines()
            .filter(|l| l.contains(&format!("\"{id}\"")))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
            .collect();
        let mut it = seen.iter();
        for t in topics {
            assert!(it.any(|s| s == t), "{id}: {t} missing or out of order in {seen:?}");
        }
    };
    order("a1", &["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]);
    order("e1", &["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]);
    order("b5", &["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]);
    assert!(
        ev.lines().any(|l| l.contains("/tasks/oom") && l.contains("\"b5\"")),
        "no TaskOOM for b5 in {ev}"
    );
    assert!(ev.contains("/tasks/paused") && ev.contains("/tasks/resumed"), "{ev}");
    // The dead VMM's task ended with the shim's "VM gone" status.
    let ev2 = std::fs::read_to_string(&events_after).unwrap();
    let v1_exit: Vec<&str> = ev2
        .lines()
        .filter(|l| l.contains("/tasks/exit") && l.contains("\"container_id\":\"v1\",\"id\":\"v1\""))
        .collect();
    assert_eq!(v1_exit.len(), 1, "{ev2}");
    assert!(v1_exit[0].contains("\"exit_status\":255"), "{}", v1_exit[0]);

    // Every pod came from the template: one was built, nothing booted cold.
    let log = std::fs::read_to_string(ctd.dir.path().join("containerd.log")).unwrap_or_default();
    let (restores, image_builds) = counts(&log);
    assert_eq!(d1_added.0, 1, "d1 restores a template of its own");
    assert_eq!(
        restores - d1_added.0,
        6,
        "a1, b1, v1, h1, h2, k1 restore the template; the log:\n{log}"
    );
    assert!(!log.contains("booting the sandbox VM cold"), "{log}");
    // Root images are built once per image (the app's and the pause
    // image) and then come from the cache.
    assert_eq!(image_builds - d1_added.1, 2, "{log}");
    let templates: Vec<_> = std::fs::read_dir(ctd.dir.path().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(templates.len(), 1, "{templates:?}");

    // Nothing of ours remains: shims, VMMs, mounts, loop devices, run
    // directories, host cgroups.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let leaks = ctd.leaks();
    assert!(leaks.is_empty(), "left behind:\n{}", leaks.join("\n"));
}
