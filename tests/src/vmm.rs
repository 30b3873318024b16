//! The real `bulkhead-vmm` as a child process with its control API, for
//! the kvm tiers that drive a running VM (the API and snapshot tiers).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_vmm_api::client::ApiClient;

use crate::{text, vmm_bin};

/// Bounds waits for things that take milliseconds, so a broken VMM fails
/// the test instead of hanging it; never a performance claim.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct VmmChild {
    child: Option<Child>,
    pub api: ApiClient,
    pub serial: PathBuf,
    /// A directory of its own, when it got one.
    _dir: Option<tempfile::TempDir>,
}

impl VmmChild {
    /// Starts the VMM with `args`, its API on `api` and its console in
    /// `serial`; returns once the API socket is there.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], api: &Path, serial: &Path) -> VmmChild {
        let child = Command::new(vmm_bin())
            .args(args)
            .arg("--api-sock")
            .arg(api)
            .arg("--serial")
            .arg(serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut vm = VmmChild {
            child: Some(child),
            api: ApiClient::new(api, PATIENCE),
            serial: serial.to_path_buf(),
            _dir: None,
        };
        let sock = api.to_path_buf();
        vm.wait_for("the API socket to appear", || sock.exists());
        vm
    }

    /// [`VmmChild::spawn`] with its socket and console in a temporary
    /// directory that lives as long as it.
    pub fn in_temp_dir<S: AsRef<OsStr>>(args: &[S]) -> VmmChild {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = Self::spawn(args, &dir.path().join("api.sock"), &dir.path().join("console.log"));
        vm._dir = Some(dir);
        vm
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// One request: the status and the body.
    pub fn call(&self, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
        let a = self.api.request(method, target, body).unwrap_or_else(|e| panic!("{e}"));
        (a.status, a.body)
    }

    /// Polls `cond` until it holds; fails with the VMM's stderr if the VMM
    /// ends first or it never does.
    pub fn wait_for(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if let Ok(Some(status)) = self.child.as_mut().map_or(Ok(None), |c| c.try_wait()) {
                panic!("the VMM ended ({status}) while waiting for {what}: {}", self.stderr());
            }
            assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    pub fn console(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// Bytes the guest has written to its console, counting those the
    /// VMM's console budget has dropped since.
    pub fn serial_len(&self) -> u64 {
        console_written(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// Waits until the console has grown past `len`: the guest runs.
    pub fn wait_for_output_beyond(&mut self, len: u64) {
        let serial = self.serial.clone();
        self.wait_for("the serial console to grow", || {
            console_written(&std::fs::read(&serial).unwrap_or_default()) > len
        });
    }

    /// Waits until the console holds at least `n` newlines.
    pub fn wait_for_lines(&mut self, n: usize) {
        let serial = self.serial.clone();
        self.wait_for(&format!("{n} console lines"), || {
            std::fs::read(&serial)
                .map(|b| b.iter().filter(|c| **c == b'\n').count() >= n)
                .unwrap_or(false)
        });
    }

    /// SIGTERM, then the exit code and stderr.
    pub fn terminate(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().expect("the VMM runs");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stderr))
    }

    /// Waits for the VMM to end by itself: the exit code and stderr.
    pub fn wait(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().expect("the VMM runs");
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stderr))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a console file stands for: its bytes, or, once the VMM's budget
/// has dropped some, those dropped (its first line counts them) plus the
/// rest after that line.
pub fn console_written(file: &[u8]) -> u64 {
    let dropped = file
        .strip_prefix(b"[bulkhead-vmm: ")
        .and_then(|rest| rest.iter().position(|b| *b == b'\n').map(|end| (rest, end)))
        .and_then(|(rest, end)| {
            let line = std::str::from_utf8(&rest[..end]).ok()?;
            let count = line
                .strip_suffix(" earlier console bytes dropped]")?
                .parse::<u64>()
                .ok()?;
            Some((count, "[bulkhead-vmm: ".len() + end + 1))
        });
    match dropped {
        Some((count, note)) => count + (file.len() - note) as u64,
        None => file.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_written_counts_what_the_budget_dropped() {
        assert_eq!(super::console_written(b"...."), 4);
        assert_eq!(
            super::console_written(b"[bulkhead-vmm: 1000 earlier console bytes dropped]\n.."),
            1002
        );
    }
}
