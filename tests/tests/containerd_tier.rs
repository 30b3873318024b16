//! containerd tier: a private containerd (Debian's 1.6) drives the shim
//! with `ctr`. Boots are slow on PVM hosts, so the scenarios share two
//! sandboxes: one `ctr run --rm`, and one long-running pod that gets execs,
//! ps, metrics, pause/resume, a second container (grouped into the same VM
//! by the CRI annotations), a containerd restart and a kill.

use std::path::PathBuf;

use bulkhead_tests::containerd::{pids_matching, require_containerd, Containerd};
use bulkhead_tests::{kernel, require_kvm, target_dir, text, vmm_bin};

fn initramfs(dir: &std::path::Path) -> PathBuf {
    let agent = std::env::var_os("BULKHEAD_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("x86_64-unknown-linux-gnu/release/bulkhead-agent"));
    assert!(
        agent.is_file(),
        "{} is missing: run scripts/build-guest",
        agent.display()
    );
    let out = dir.join("initramfs.cpio");
    bulkhead::initramfs::build_agent_initramfs(&agent, &out).unwrap();
    out
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

#[test]
fn containerd_runs_pods_in_vms_and_leaves_nothing_behind() {
    require_kvm();
    require_containerd();
    let scratch = tempfile::tempdir().unwrap();
    let initramfs = initramfs(scratch.path());
    let mut ctd = Containerd::start(&kernel(), &initramfs, &vmm_bin());
    let cfg = ctd.config_path().to_string_lossy().into_owned();
    let events_out = ctd.dir.path().join("events.log");
    let mut events = ctd
        .ctr_cmd(&["events"])
        .stdout(std::fs::File::create(&events_out).unwrap())
        .spawn()
        .unwrap();

    // 1: output, stderr and the exit code through `ctr run --rm`.
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &["--rm"],
        "a1",
        &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
    ));
    assert_eq!(o.status.code(), Some(3), "{}{}", text(&o.stdout), text(&o.stderr));
    assert_eq!(text(&o.stdout), "hello\n");
    assert!(text(&o.stderr).contains("oops"), "{}", text(&o.stderr));

    // 2: a long-running container and what can be done to it.
    ok(
        &ctd.ctr(&ctd.run_args(&cfg, &["-d", "--null-io"], "b1", &["sleep", "1000"])),
        "run -d",
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

    // A second container in the same pod: same shim, same VM.
    let vmms_before = pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len();
    let o = ctd.ctr(&ctd.run_args(
        &cfg,
        &[
            "--rm",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=b1",
        ],
        "b2",
        &["sh", "-c", "echo second"],
    ));
    assert_eq!(text(&o.stdout), "second\n", "{}", text(&o.stderr));
    assert_eq!(
        pids_matching(&ctd.dir.path().join("run").to_string_lossy()).len(),
        vmms_before
    );

    // containerd restarts; the shim keeps serving.
    ctd.restart();
    let ls = ok(&ctd.ctr(&["task", "ls"]), "ls after restart");
    assert!(ls.contains("b1") && ls.contains("RUNNING"), "{ls}");

    // Kill with a signal: status 128 + 15.
    ok(&ctd.ctr(&["task", "kill", "-s", "SIGTERM", "b1"]), "kill");
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

    // Events, in order, for a1 and the exec.
    std::thread::sleep(std::time::Duration::from_secs(1));
    // SAFETY: kill(2) on the ctr we started.
    unsafe { libc::kill(events.id() as libc::pid_t, libc::SIGTERM) };
    let _ = events.wait();
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
    assert!(ev.contains("/tasks/paused") && ev.contains("/tasks/resumed"), "{ev}");

    // Nothing of ours remains: shims, VMMs, mounts, run directories.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let dir = ctd.dir.path().to_string_lossy().into_owned();
    assert!(pids_matching(&format!("{dir}/bin/containerd-shim-bulkhead-v2")).is_empty());
    assert!(pids_matching(&format!("{dir}/run")).is_empty());
    assert!(ctd.mounts_left().is_empty(), "{:?}", ctd.mounts_left());
    let run_left: Vec<_> = std::fs::read_dir(ctd.dir.path().join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(run_left.is_empty(), "{run_left:?}");
}
