//! kvm tier, control API: the real bulkhead-vmm under /dev/kvm with
//! `--api-sock`, driven by a minimal HTTP client written here (a Unix
//! stream and formatted requests), as `curl --unix-socket` would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::{require_kvm, text, vmm_bin};

/// Prints '.' on the serial console forever.
const SERIAL_LOOP: &str = env!("GUEST_SERIAL_LOOP");

/// An upper bound for things that take milliseconds, so that a broken VMM
/// fails the test instead of hanging it; never a performance claim.
const PATIENCE: Duration = Duration::from_secs(60);

struct Vm {
    child: Option<Child>,
    api: PathBuf,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(extra: &[&str]) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        let serial = dir.path().join("console.log");
        let child = Command::new(vmm_bin())
            .args(["--kernel", SERIAL_LOOP, "--mem-mib", "32", "--no-rng"])
            .args(extra)
            .arg("--api-sock")
            .arg(&api)
            .arg("--serial")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut vm = Vm {
            child: Some(child),
            api,
            serial,
            _dir: dir,
        };
        let api = vm.api.clone();
        vm.wait_for("the API socket to appear", || api.exists());
        vm
    }

    /// Polls `cond` until it holds; fails with the VMM's stderr if the VMM
    /// ends first or it never does.
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!("the VMM ended ({status}) while waiting for {what}: {}", self.stderr());
            }
            assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    fn serial_len(&self) -> u64 {
        std::fs::metadata(&self.serial).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until the console has grown past `len`: the guest runs.
    fn wait_for_output_beyond(&mut self, len: u64) {
        let serial = self.serial.clone();
        self.wait_for("the serial console to grow", || {
            std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) > len
        });
    }

    fn terminate(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stderr))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request on its own connection: the status and the body.
fn call(sock: &Path, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    raw(sock, req.as_bytes())
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
fn assert_console_still(vm: &Vm) {
    let before = vm.serial_len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.serial_len(), before, "the guest wrote to the console while paused");
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_go_on() {
    require_kvm();
    // Two vCPUs: the second waits for INIT/SIPI inside KVM_RUN, so only the
    // kick signal can get it out to park.
    let mut vm = Vm::start(&["--vcpus", "2", "--timeout", "300"]);
    vm.wait_for_output_beyond(0);

    let (status, body) = call(&vm.api, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["mem_mib"], 32);
    assert!(info["version"].is_string());

    for round in 0..2 {
        let (status, body) = call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
        assert_eq!(status, 204, "round {round}: {body}");
        assert_console_still(&vm);
        assert_eq!(json(&call(&vm.api, "GET", "/", None).1)["state"], "Paused");
        // Idempotent, and still nothing runs.
        assert_eq!(call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
        assert_console_still(&vm);

        let (status, body) = call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
        assert_eq!(status, 204, "round {round}: {body}");
        assert_eq!(json(&call(&vm.api, "GET", "/", None).1)["state"], "Running");
        let len = vm.serial_len();
        vm.wait_for_output_beyond(len);
    }

    let (status, body) = call(&vm.api, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let m = json(&body);
    assert!(m["vcpu_exits"]["io"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(m["paused"], false);
    assert!(m["uptime_ms"].is_u64(), "{body}");
    assert!(m["rss_bytes"].as_u64().unwrap() > 0, "{body}");

    // Refusals leave the VMM running.
    let (status, body) = raw(&vm.api, b"\x00\x01 not http at all\r\n\r\n");
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["fault_message"].is_string());
    assert_eq!(
        call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Paused","now":1}"#)).0,
        400
    );
    assert_eq!(call(&vm.api, "GET", "/nowhere", None).0, 404);
    assert_eq!(call(&vm.api, "DELETE", "/vm", None).0, 405);
    let (status, body) = call(&vm.api, "PUT", "/snapshot/create", Some("{}"));
    assert_eq!(status, 400, "{body}");
    let fault = json(&body)["fault_message"].as_str().unwrap_or_default().to_string();
    assert!(fault.contains("snapshot_path"), "{fault}");
    let len = vm.serial_len();
    vm.wait_for_output_beyond(len);
    assert_eq!(json(&call(&vm.api, "GET", "/", None).1)["state"], "Running");

    // A paused VM still ends on SIGTERM, and takes its socket with it.
    assert_eq!(call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    let (code, stderr) = vm.terminate();
    assert_eq!(code, Some(128 + 15), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(!vm.api.exists(), "the API socket was left behind");
}

#[test]
fn a_paused_vm_still_times_out() {
    require_kvm();
    let mut vm = Vm::start(&["--timeout", "10"]);
    assert_eq!(call(&vm.api, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    let child = vm.child.take().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
    assert!(!vm.api.exists(), "the API socket was left behind");
}

#[test]
fn a_stalled_client_does_not_hold_up_the_vm() {
    require_kvm();
    let mut vm = Vm::start(&["--timeout", "300"]);
    // Half a request, then silence: the vCPUs run on meanwhile.
    let mut stalled = UnixStream::connect(&vm.api).unwrap();
    stalled.write_all(b"GET / HT").unwrap();
    let len = vm.serial_len();
    vm.wait_for_output_beyond(len);
    // The API gives up on the silent client and serves the next one.
    let (status, body) = call(&vm.api, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let mut answer = String::new();
    stalled.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
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
