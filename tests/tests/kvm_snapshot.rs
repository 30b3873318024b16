//! kvm tier, snapshots: a tiny guest that prints a counter is paused,
//! snapshotted through the API and restored twice at once by the real
//! binary. Restored copies continue the count (a fresh boot would restart
//! it), the memory file is unchanged afterwards (it is mapped privately),
//! and damaged snapshots are refused with exit status 2.

use std::path::{Path, PathBuf};

use bulkhead_tests::vmm::VmmChild;
use bulkhead_tests::{require_kvm, run_vmm, text};

/// Prints an incrementing counter, one 8-digit hex line at a time.
const COUNTER: &str = env!("GUEST_SERIAL_COUNTER");

/// The counter values of the complete lines after the first newline (the
/// first line may be the tail of one the snapshot interrupted).
fn values_after_first_line(console: &str) -> Vec<u32> {
    let Some((_, rest)) = console.split_once('\n') else {
        return Vec::new();
    };
    rest.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| u32::from_str_radix(l.trim_end(), 16).unwrap_or_else(|e| panic!("{e}: {l:?} in {console:?}")))
        .collect()
}

/// The last complete counter line of a console.
fn last_complete_value(console: &str) -> u32 {
    let end = console.rfind('\n').expect("a complete line");
    let line = console[..end].rsplit('\n').next().unwrap();
    u32::from_str_radix(line, 16).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Boots the counter guest, lets it count, pauses it and snapshots it into
/// `dir/snap`; returns the last counter value printed before the pause.
fn take_snapshot(dir: &Path, vcpus: &str) -> (PathBuf, u32) {
    let args = ["--kernel", COUNTER, "--mem-mib", "32", "--no-rng", "--vcpus", vcpus];
    let mut vm = VmmChild::spawn(&args, &dir.join("boot.api"), &dir.join("boot.console"));
    vm.wait_for_lines(20);
    let snap = dir.join("snap");
    let body = format!(r#"{{"snapshot_path":"{}"}}"#, snap.display());

    let (status, fault) = vm.call("PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 400, "{fault}");
    assert!(fault.contains("must be paused"), "{fault}");
    assert!(!snap.join("state").exists());

    let (status, fault) = vm.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(status, 204, "{fault}");
    let (status, fault) = vm.call("PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{fault}");
    let last = last_complete_value(&vm.console());
    vm.kill();
    assert!(snap.join("state").is_file() && snap.join("memory").is_file());
    assert_eq!(std::fs::metadata(snap.join("memory")).unwrap().len(), 32 << 20);
    (snap, last)
}

#[test]
fn two_restores_at_once_continue_from_the_snapshot_and_leave_the_memory_file_alone() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (snap, last) = take_snapshot(dir.path(), "2");
    let memory_before = std::fs::read(snap.join("memory")).unwrap();

    let restore = |name: &str| {
        let args = [std::ffi::OsStr::new("--restore"), snap.as_os_str()];
        VmmChild::spawn(
            &args,
            &dir.path().join(format!("{name}.api")),
            &dir.path().join(format!("{name}.console")),
        )
    };
    let mut a = restore("a");
    // The other from a restore configuration file, as the runtime starts it.
    let config = dir.path().join("b.json");
    let rc = bulkhead_vmm_api::config::RestoreConfig::new(&snap);
    std::fs::write(&config, serde_json::to_string(&rc).unwrap()).unwrap();
    let args = [std::ffi::OsStr::new("--restore-config"), config.as_os_str()];
    let mut b = VmmChild::spawn(&args, &dir.path().join("b.api"), &dir.path().join("b.console"));
    a.wait_for_lines(10);
    b.wait_for_lines(10);

    for vm in [&a, &b] {
        let console = vm.console();
        let values = values_after_first_line(&console);
        // The interrupted line (or, at a line boundary, the next one) comes
        // first; the next complete line is two past the last one printed.
        assert_eq!(
            values.first().copied(),
            Some(last + 2),
            "a restored guest continues the count from {last:#x}, not from zero: {console:?}"
        );
        for pair in values.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "consecutive values: {console:?}");
        }
        let (status, info) = vm.call("GET", "/", None);
        assert_eq!(status, 200);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            (info["state"].as_str(), info["vcpus"].as_u64()),
            (Some("Running"), Some(2))
        );
        assert_eq!(info["mem_mib"], 32);
    }
    // A restored VM can be paused and snapshotted again.
    let (status, fault) = a.call("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(status, 204, "{fault}");
    let again = dir.path().join("again");
    let body = format!(r#"{{"snapshot_path":"{}"}}"#, again.display());
    let (status, fault) = a.call("PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{fault}");
    a.kill();
    b.kill();

    assert!(
        std::fs::read(snap.join("memory")).unwrap() == memory_before,
        "the memory file was written: restores must map it privately"
    );
    let perms = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(perms.len(), 32 << 20);
}

#[test]
fn damaged_snapshots_are_refused_with_exit_status_2_and_the_reason() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (snap, _) = take_snapshot(dir.path(), "1");
    let state = std::fs::read(snap.join("state")).unwrap();

    let restore_with = |edit: &dyn Fn(&Path)| {
        let copy = dir.path().join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir(&copy).unwrap();
        std::fs::write(copy.join("state"), &state).unwrap();
        std::fs::copy(snap.join("memory"), copy.join("memory")).unwrap();
        edit(&copy);
        let out = run_vmm([
            "--restore".as_ref(),
            copy.as_os_str(),
            "--serial".as_ref(),
            "off".as_ref(),
            "--timeout".as_ref(),
            "30".as_ref(),
        ]);
        (out.status.code(), text(&out.stderr))
    };

    let (code, err) = restore_with(&|d| {
        let mut s = std::fs::read(d.join("state")).unwrap();
        let mid = s.len() / 2;
        s[mid] ^= 0x20;
        std::fs::write(d.join("state"), s).unwrap();
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("corrupt") && err.contains("checksum"), "{err}");

    let (code, err) = restore_with(&|d| {
        let mut s = std::fs::read(d.join("state")).unwrap();
        s[8..12].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(d.join("state"), s).unwrap();
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("format version 99"), "{err}");

    let (code, err) = restore_with(&|d| {
        let s = std::fs::read(d.join("state")).unwrap();
        std::fs::write(d.join("state"), &s[..s.len() - 10]).unwrap();
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("truncated"), "{err}");

    let (code, err) = restore_with(&|d| {
        let f = std::fs::OpenOptions::new().write(true).open(d.join("memory")).unwrap();
        f.set_len(1 << 20).unwrap();
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("memory file") && err.contains("1048576 bytes"), "{err}");

    let (code, err) = restore_with(&|d| std::fs::remove_file(d.join("state")).unwrap());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("state"), "{err}");

    // The undamaged copy restores (and runs until the timeout ends it).
    let out = run_vmm([
        "--restore".as_ref(),
        snap.as_os_str(),
        "--kernel".as_ref(),
        COUNTER.as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2), "--restore takes no boot settings");
}
