//! kvm tier, control API: the real bulkhead-vmm under /dev/kvm with
//! `--api-sock`, driven by the API client of `bulkhead-vmm-api`, and by raw
//! bytes where a test sends something no client would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::vmm::{VmmChild, PATIENCE};
use bulkhead_tests::{require_kvm, text, vmm_bin};

/// Prints '.' on the serial console forever.
const SERIAL_LOOP: &str = env!("GUEST_SERIAL_LOOP");

fn start(extra: &[&str]) -> VmmChild {
    let mut args = vec!["--kernel", SERIAL_LOOP, "--mem-mib", "32", "--no-rng"];
    args.extend_from_slice(extra);
    VmmChild::in_temp_dir(&args)
}

/// Sends `bytes` as they are and reads the one response.
fn raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    if status != 204 {
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
        assert_eq!(len.parse::<usize>().unwrap(), body.len(), "{out}");
    }
    (status, body.to_string())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The console stands still across a wait: nothing runs the guest.
fn assert_console_still(vm: &VmmChild) {
    let before = vm.serial_len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.serial_len(), before, "the guest wrote to the console while paused");
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_go_on() {
    require_kvm();
    // Two vCPUs: the second waits for INIT/SIPI inside KVM_RUN, so only the
    // kick signal can get it out to park.
    let mut vm = start(&["--vcpus", "2", "--timeout", "300"]);
    vm.wait_for_output_beyond(0);

    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["mem_mib"], 32);
    assert!(info["version"].is_string());

    for round in 0..2 {
        let (status, body) = vm.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
        assert_eq!(status, 204, "round {round}: {body}");
        assert_console_still(&vm);
        assert_eq!(json(&vm.call("GET", "/", None).1)["state"], "Paused");
        // Idempotent, and still nothing runs.
        assert_eq!(vm.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
        assert_console_still(&vm);

        let (status, body) = vm.call("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
        assert_eq!(status, 204, "round {round}: {body}");
        assert_eq!(json(&vm.call("GET", "/", None).1)["state"], "Running");
        let len = vm.serial_len();
        vm.wait_for_output_beyond(len);
    }

    let (status, body) = vm.call("GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let m = json(&body);
    assert!(m["vcpu_exits"]["io"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(m["paused"], false);
    assert!(m["uptime_ms"].is_u64(), "{body}");
    assert!(m["rss_bytes"].as_u64().unwrap() > 0, "{body}");

    // Refusals leave the VMM running.
    let (status, body) = raw(vm.api.socket(), b"\x00\x01 not http at all\r\n\r\n");
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["fault_message"].is_string());
    assert_eq!(vm.call("PATCH", "/vm", Some(r#"{"state":"Paused","now":1}"#)).0, 400);
    assert_eq!(vm.call("GET", "/nowhere", None).0, 404);
    assert_eq!(vm.call("DELETE", "/vm", None).0, 405);
    let (status, body) = vm.call("PUT", "/snapshot/create", Some("{}"));
    assert_eq!(status, 400, "{body}");
    let fault = json(&body)["fault_message"].as_str().unwrap_or_default().to_string();
    assert!(fault.contains("snapshot_path"), "{fault}");
    let len = vm.serial_len();
    vm.wait_for_output_beyond(len);
    assert_eq!(json(&vm.call("GET", "/", None).1)["state"], "Running");

    // A paused VM still ends on SIGTERM, and takes its socket with it.
    assert_eq!(vm.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    let (code, stderr) = vm.terminate();
    assert_eq!(code, Some(128 + 15), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(!vm.api.socket().exists(), "the API socket was left behind");
}

#[test]
fn a_paused_vm_still_times_out() {
    require_kvm();
    let mut vm = start(&["--timeout", "10"]);
    assert_eq!(vm.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    let (code, stderr) = vm.wait();
    assert_eq!(code, Some(5), "{stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
    assert!(!vm.api.socket().exists(), "the API socket was left behind");
}

#[test]
fn a_stalled_client_does_not_hold_up_the_vm() {
    require_kvm();
    let mut vm = start(&["--timeout", "300"]);
    // Half a request, then silence: the vCPUs run on meanwhile.
    let mut stalled = UnixStream::connect(vm.api.socket()).unwrap();
    stalled.write_all(b"GET / HT").unwrap();
    let len = vm.serial_len();
    vm.wait_for_output_beyond(len);
    // The API gives up on the silent client and serves the next one.
    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let mut answer = String::new();
    stalled.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
}

/// `Key:\tvalue` lines of a /proc status file.
fn status_fields(path: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// What a guest that took over the VMM would hold once it runs: no
/// capability in any thread, no way to gain one, no core file, few
/// descriptors, and guest memory left out of any dump.
#[test]
fn the_vmm_holds_no_privilege_while_the_guest_runs() {
    require_kvm();
    let mut vm = start(&["--vcpus", "2", "--timeout", "300"]);
    vm.wait_for_output_beyond(0);
    assert_eq!(vm.call("GET", "/", None).0, 200);
    let proc_dir = format!("/proc/{}", vm.pid());
    let tasks: Vec<_> = std::fs::read_dir(format!("{proc_dir}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    // The event loop, two vCPUs and the API's listener at least.
    assert!(tasks.len() >= 4, "{tasks:?}");
    for task in &tasks {
        let f = status_fields(&task.join("status"));
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                f[set],
                "0000000000000000",
                "{set} of {} ({})",
                task.display(),
                f["Name"]
            );
        }
        assert_eq!(f["NoNewPrivs"], "1", "{}", task.display());
        // Mode 2: a filter, one per thread (each installs its own).
        assert_eq!(f["Seccomp"], "2", "{} ({})", task.display(), f["Name"]);
        assert_eq!(f["Seccomp_filters"], "1", "{} ({})", task.display(), f["Name"]);
    }
    let limits = std::fs::read_to_string(format!("{proc_dir}/limits")).unwrap();
    let limit = |name: &str| -> (String, String) {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        let mut cols = line[name.len()..].split_whitespace();
        (cols.next().unwrap().into(), cols.next().unwrap().into())
    };
    assert_eq!(limit("Max core file size"), ("0".into(), "0".into()), "{limits}");
    let (soft, hard) = limit("Max open files");
    assert!(
        soft.parse::<u64>().unwrap() <= 4096 && hard.parse::<u64>().unwrap() <= 4096,
        "{limits}"
    );
    // The 32 MiB of guest RAM is one mapping, marked "dd" (do not dump).
    let smaps = std::fs::read_to_string(format!("{proc_dir}/smaps")).unwrap();
    let mut size = 0;
    let mut guest_ram_flags = Vec::new();
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Size:") {
            size = kb.trim().trim_end_matches(" kB").parse().unwrap();
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if size == 32 * 1024 {
                guest_ram_flags.push(flags.to_string());
            }
        }
    }
    assert!(!guest_ram_flags.is_empty(), "no 32 MiB mapping in the VMM");
    for flags in &guest_ram_flags {
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "guest RAM would be dumped: {flags}"
        );
    }
    let (code, stderr) = vm.terminate();
    assert_eq!(code, Some(128 + 15), "{stderr}");
}

#[test]
fn an_existing_api_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("api.sock");
    std::fs::write(&taken, b"").unwrap();
    let out = Command::new(vmm_bin())
        .args(["--kernel", SERIAL_LOOP, "--api-sock"])
        .arg(&taken)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`api_socket`") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert!(taken.exists(), "someone else's file must stay");
}

/// The system call the VMM's debug-build test hook makes (sysinfo on
/// x86_64), which no thread's filter allows.
const FORBIDDEN_SYSCALL: u32 = 99;

/// A refused call from any thread kind ends the VMM with SIGSYS, and its
/// log says which call on which thread; nothing else runs after it.
#[test]
fn a_refused_system_call_on_any_thread_ends_the_vmm_with_sigsys() {
    require_kvm();
    for kind in ["vmm", "vcpu", "api"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(vmm_bin())
            .args([
                "--kernel",
                SERIAL_LOOP,
                "--mem-mib",
                "32",
                "--no-rng",
                "--timeout",
                "60",
            ])
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .arg("--serial")
            .arg(dir.path().join("console.log"))
            .env("BULKHEAD_VMM_TEST_FORBIDDEN_SYSCALL", kind)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {:?}: {stderr}",
            out.status
        );
        let says = format!("seccomp violation: system call {FORBIDDEN_SYSCALL} (");
        assert!(stderr.contains(&says), "{kind}: {stderr}");
        assert!(stderr.contains(&format!(" on the {kind} thread")), "{kind}: {stderr}");
        assert_eq!(
            bulkhead_vmm_api::exit::describe(out.status),
            "seccomp violation: a VMM thread made a system call its filter refuses (killed by SIGSYS)"
        );
    }
}

#[test]
fn no_seccomp_runs_unfiltered_and_says_so() {
    require_kvm();
    let mut vm = start(&["--no-seccomp", "--timeout", "300"]);
    vm.wait_for_output_beyond(0);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap();
    for task in tasks {
        let f = status_fields(&task.unwrap().path().join("status"));
        assert_eq!(f["Seccomp"], "0", "{}", f["Name"]);
    }
    let (code, stderr) = vm.terminate();
    assert_eq!(code, Some(128 + 15), "{stderr}");
    assert!(
        stderr.contains("SECCOMP IS OFF (--no-seccomp)") && stderr.contains("for debugging only"),
        "{stderr}"
    );
}
