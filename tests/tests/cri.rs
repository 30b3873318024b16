//! CRI tier: containerd's own CRI plugin (what a kubelet talks to) runs a
//! pod through the `bulkhead` runtime handler, as a Kubernetes
//! RuntimeClass selects it: the pod sandbox (the pause image), one app
//! container of another image with its log, an exec, a second app
//! container sharing the pod's PID namespace (pod semantics: one hostname,
//! one IPC namespace and /dev/shm, PID 1 the container's own workload or
//! the pause), then stop and remove, after which no shim, VMM or mount of
//! ours remains. The CRI
//! client is `tests/cri/cri_smoke.py` (Python grpcio, stubs generated from
//! `tests/cri/cri_subset.proto` at test time).

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_tests::containerd::{require_containerd, Containerd, IMAGE};
use bulkhead_tests::{kernel, require_kvm, text, vmm_bin};

fn cri_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cri")
}

#[test]
fn cri_runs_a_pod_through_the_runtime_handler() {
    require_kvm();
    require_containerd();
    let scratch = tempfile::tempdir().unwrap();
    let stubs = scratch.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let gen = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(cri_dir())
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg("cri_subset.proto")
        .output()
        .expect("python3");
    assert!(
        gen.status.success(),
        "generating the CRI stubs (scripts/setup installs grpcio-tools): {}",
        text(&gen.stderr)
    );
    let initramfs = bulkhead_tests::guest_initramfs(scratch.path());
    let ctd = Containerd::start_cri(&kernel(), &initramfs, &vmm_bin());
    let logs = scratch.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    // The pod's host cgroup, as a kubelet names one per pod; the shim
    // makes it, as runc would, and leaves it (the kubelet's to remove).
    let cgroup_parent = format!("/bulkhead-cri-{}", std::process::id());
    let _pod_cgroup = PodCgroup(cgroup_parent.clone());
    let out = Command::new("python3")
        .arg(cri_dir().join("cri_smoke.py"))
        .arg(ctd.dir.path().join("c.sock"))
        .arg("bulkhead")
        .arg(IMAGE)
        .arg(&logs)
        .arg(&cgroup_parent)
        .env("CRI_STUBS", &stubs)
        .output()
        .expect("python3");
    let log = std::fs::read_to_string(ctd.dir.path().join("containerd.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "CRI client: {}{}\ncontainerd log:\n{log}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(seen["state"], "CONTAINER_RUNNING", "{seen}");
    assert_eq!(seen["exec"]["stdout"], "exec-ok\n", "{seen}");
    assert_eq!(seen["exec"]["exit_code"], 4, "{seen}");
    // CRI's log format: "<time> stdout F <line>"; the app sees its own
    // image, not the pause image (which has /image-name).
    let app_log = seen["log"].as_str().unwrap_or_default();
    assert!(
        app_log.contains(" stdout F from-cri") && app_log.contains(" stdout F app-root"),
        "{app_log:?}"
    );
    // Both app containers see the sandbox's hostname and its UTS and IPC
    // namespaces, and a file the first put in /dev/shm.
    let view = |name: &str| -> Vec<String> {
        assert_eq!(seen[name]["exit_code"], 0, "{seen}");
        let out = seen[name]["stdout"].as_str().unwrap_or_default();
        out.lines().map(str::to_string).collect()
    };
    let (app, second) = (view("app_view"), view("second_view"));
    assert_eq!(app[0], "smoke", "the sandbox's hostname: {seen}");
    assert!(app[1].starts_with("uts:[") && app[2].starts_with("ipc:["), "{seen}");
    assert_eq!(app[..3], second[..3], "one UTS and IPC namespace for the pod: {seen}");
    assert_eq!(second.get(4).map(String::as_str), Some("pod-shm"), "{seen}");
    // PID 1 is the container's own workload, or the pause where the pod's
    // PID namespace is shared.
    assert_eq!(app[3], "sleep 1000 ", "{seen}");
    assert_eq!(second[3], "/bin/sh /pause ", "{seen}");
    assert_eq!(seen["bridge_net_admin"]["stdout"], "bridge-made\ndone\n", "{seen}");
    assert_eq!(
        seen["bridge_default"]["stdout"], "Operation not permitted\ndone\n",
        "{seen}"
    );
    // readOnlyRootFilesystem and RuntimeDefault seccomp: the root refuses
    // writes and unshare is denied, where an unfiltered container may.
    assert_eq!(seen["unfiltered"]["stdout"], "userns-made\nprobed\n", "{seen}");
    let locked = seen["locked"]["stdout"].as_str().unwrap_or_default();
    assert!(
        locked.starts_with("Read-only file system\n")
            && !locked.contains("userns-made")
            && locked.ends_with("probed\n"),
        "{seen}"
    );
    assert_eq!(seen["state_after_stop"], "CONTAINER_EXITED", "{seen}");
    // One VM for the pod: the sandbox and the app container shared it, the
    // app's image attached to a spare disk while the VM ran.
    assert_eq!(log.matches("restoring the sandbox VM").count(), 1, "{log}");
    assert!(log.contains(" as disk 1"), "{log}");
    eprintln!("the CRI client saw: {seen}");
    // The pod's stats are the host's: containerd reads the pod's host
    // cgroup, which holds the VMM, so a guest cannot understate them.
    let stats = &seen["pod_stats"];
    let (before, after) = (
        stats["host_before"].as_u64().unwrap_or(0),
        stats["host_after"].as_u64().unwrap_or(0),
    );
    assert!(before > 0 && after > 0, "no host cgroup for the pod's VMM: {stats}");
    let usage = stats["usage_bytes"]
        .as_u64()
        .or_else(|| stats["working_set_bytes"].as_u64())
        .unwrap_or(0);
    assert!(
        usage >= before.min(after) / 2 && usage <= before.max(after) * 2,
        "the pod's memory {usage}, its VMM's host cgroup {before}..{after}: {stats}"
    );
    assert!(stats["cpu_nanos"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(
        stats["containers"]
            .as_array()
            .is_some_and(|c| c.contains(&stats["app"])),
        "{stats}"
    );

    std::thread::sleep(std::time::Duration::from_secs(2));
    let leaks = ctd.leaks();
    assert!(leaks.is_empty(), "left behind:\n{}", leaks.join("\n"));
    // The sandbox's cgroup went with it.
    let left: Vec<_> = pod_cgroup_dirs(&cgroup_parent)
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "host cgroups left: {left:?}");
}

/// The pod's host cgroup in each hierarchy there is one in.
fn pod_cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    ["memory", "cpu", "cpuacct", "pids", ""]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join(parent.trim_start_matches('/')))
        .filter(|d| d.is_dir())
        .collect()
}

/// Removes the pod's host cgroup, a kubelet's job, however the test ends
/// (children first, should a failure have left the sandbox's).
struct PodCgroup(String);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in pod_cgroup_dirs(&self.0) {
            for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(child.path());
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
