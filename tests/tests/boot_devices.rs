//! boot tier, devices: the project's kernel mounts its root filesystem from
//! our virtio-blk (read-write, then read-only), reads entropy from our
//! virtio-rng, and talks to the host over our virtio-vsock in both
//! directions. Two boots carry all of it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_protocol::guest_env::PVM_GLIBC_TUNABLE;
use bulkhead_tests::{busybox, kernel, require_kvm, run_vmm, text, HostKind};

static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());
const GUEST_CHECKS: &str = env!("GUEST_CHECKS");
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// An ext4 image made with `mkfs.ext4 -d` from a directory holding busybox,
/// guest_checks and `/sbin/init`.
fn ext4_image(dir: &Path, name: &str, init: &str) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("bin/busybox"), busybox()).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::copy(GUEST_CHECKS, root.join("bin/guest_checks")).unwrap();
    std::fs::write(root.join("sbin/init"), init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["bin/busybox", "bin/guest_checks", "sbin/init"] {
        std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let img = dir.join(format!("{name}.ext4"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 is missing: install e2fsprogs");
    assert!(out.status.success(), "mkfs.ext4: {}", text(&out.stderr));
    img
}

fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Reads a file out of an ext4 image with debugfs, after the VM is gone.
fn debugfs_cat(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(img)
        .output()
        .expect("debugfs is missing: install e2fsprogs");
    text(&out.stdout)
}

const RW_INIT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "BULKHEAD-DISK-MARKER"
echo "INIT-GLIBC-TUNABLES ${GLIBC_TUNABLES}"
echo "ROOT-MOUNT $(/bin/busybox grep ' / ' /proc/mounts)"
echo "written-by-guest" > /guest-wrote-this
/bin/busybox sync
echo "RNG-CURRENT $(/bin/busybox cat /sys/class/misc/hw_random/rng_current)"
rng() { /bin/busybox dd if=/dev/hwrng bs=16 count=1 2>/dev/null | /bin/busybox od -An -tx1 | /bin/busybox tr -d ' \n'; }
echo "RNG-BYTES $(rng)"
# Pipelines switch between processes, which is where unswitched vector
# registers corrupt glibc's copies: without the tunable, most of them fail.
ok=0; for i in 1 2 3 4; do r=$(rng); [ ${#r} -eq 32 ] && ok=$((ok+1)); done
echo "PIPELINES-OK $ok/4"
echo "VDB-HEAD $(/bin/busybox dd if=/dev/vdb bs=16 count=1 2>/dev/null)"
/bin/busybox dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null && echo "VDB-WRITE-ALLOWED" || echo "VDB-WRITE-REFUSED"
/bin/guest_checks vsock-listen 1024 &
/bin/guest_checks vsock-connect 5000 hello-from-guest
wait
echo "BULKHEAD-INIT-DONE"
/bin/busybox reboot -f
"#;

const RO_INIT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "ROOT-MOUNT $(/bin/busybox grep ' / ' /proc/mounts)"
/bin/busybox touch /should-not-exist 2>/dev/null && echo "ROOT-WRITE-ALLOWED" || echo "ROOT-WRITE-REFUSED"
echo "BULKHEAD-INIT-DONE"
/bin/busybox reboot -f
"#;

/// The host end of the guest-initiated connection: `<uds>_5000` answers once.
fn serve_guest_connection(uds: &Path) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        s.write_all(b"hi-from-host").unwrap();
        got
    })
}

/// The host-initiated connection: retries `CONNECT 1024` until the guest
/// listens (the guest resets the attempt before that), then exchanges a line.
fn connect_to_guest(uds: PathBuf, vm_done: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<(String, String)>> {
    std::thread::spawn(move || {
        while !vm_done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(300));
            let Ok(mut s) = UnixStream::connect(&uds) else { continue };
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            if s.write_all(b"CONNECT 1024\n").is_err() {
                continue;
            }
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut ok = String::new();
            if r.read_line(&mut ok).unwrap_or(0) == 0 || !ok.starts_with("OK ") {
                continue;
            }
            s.write_all(b"ping\n").unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            return Some((ok, reply));
        }
        None
    })
}

#[test]
fn root_on_virtio_blk_with_rng_and_vsock() {
    let host = require_kvm();
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = ext4_image(dir.path(), "rw", RW_INIT);
    let data = dir.path().join("data.img");
    std::fs::write(&data, [b"read-only-data!!".as_slice(), &[7u8; 4096 - 16]].concat()).unwrap();
    let data_before = digest(&data);
    let uds = dir.path().join("v.sock");

    let from_guest = serve_guest_connection(&uds);
    let vm_done = Arc::new(AtomicBool::new(false));
    let to_guest = connect_to_guest(uds.clone(), vm_done.clone());
    let kernel = kernel();
    let out = run_vmm([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cmdline".as_ref(),
        format!("{CMDLINE} root=/dev/vda rw").as_ref(),
        "--disk".as_ref(),
        root.as_os_str(),
        "--disk".as_ref(),
        format!("{},ro", data.display()).as_ref(),
        "--vsock".as_ref(),
        format!("3,{}", uds.display()).as_ref(),
        "--timeout".as_ref(),
        "900".as_ref(),
    ]);
    vm_done.store(true, Ordering::SeqCst);
    let c = text(&out.stdout);
    eprintln!("--- console ---\n{c}\n--- vmm stderr ---\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "vmm failed");

    assert!(
        c.contains("VFS: Mounted root (ext4 filesystem) on device 254:0"),
        "root not mounted from vda"
    );
    assert!(c.contains("ROOT-MOUNT /dev/root / ext4 rw"), "root is not read-write");
    // On PVM the kernel does not switch the vector registers glibc would
    // use, so init (this busybox shell and its pipelines) must be told.
    let tunables = c
        .lines()
        .find_map(|l| l.strip_prefix("INIT-GLIBC-TUNABLES"))
        .unwrap_or("");
    if host == HostKind::Pvm {
        assert_eq!(
            tunables.trim(),
            PVM_GLIBC_TUNABLE,
            "init's GLIBC_TUNABLES on a PVM host"
        );
    } else {
        assert_eq!(
            tunables.trim(),
            "",
            "GLIBC_TUNABLES set on a host that switches every register"
        );
    }
    assert!(!c.contains("failed with error"), "a virtio driver failed to probe");
    assert!(
        c.contains("RNG-CURRENT virtio_rng.0"),
        "virtio-rng is not the guest's hwrng"
    );
    let rng = c.lines().find_map(|l| l.strip_prefix("RNG-BYTES ")).unwrap_or("");
    assert_eq!(rng.trim().len(), 32, "16 bytes from /dev/hwrng");
    assert_ne!(rng.trim(), "0".repeat(32));
    assert!(c.contains("PIPELINES-OK 4/4"), "a guest pipeline failed");
    assert!(c.contains("VDB-HEAD read-only-data!!"), "second disk not readable");
    assert!(
        c.contains("VDB-WRITE-REFUSED"),
        "write to the read-only disk was allowed"
    );
    assert_eq!(digest(&data), data_before, "read-only image changed");
    assert_eq!(
        debugfs_cat(&root, "/guest-wrote-this"),
        "written-by-guest\n",
        "guest write did not reach the image"
    );

    // vsock, guest to host: <uds>_5000 got the guest's message and answered.
    assert_eq!(from_guest.join().unwrap(), "hello-from-guest");
    assert!(
        c.contains("VSOCK-CONNECT-OK reply=hi-from-host"),
        "guest did not get the host's reply"
    );
    // vsock, host to guest: CONNECT/OK handshake, then a line each way.
    let (ok, reply) = to_guest.join().unwrap().expect("host never connected to the guest");
    assert!(
        ok.starts_with("OK ") && ok.trim()["OK ".len()..].parse::<u32>().is_ok(),
        "{ok:?}"
    );
    assert_eq!(reply, "echo:ping\n");
    assert!(c.contains("VSOCK-LISTEN-OK got=ping"));
    assert!(c.contains("BULKHEAD-INIT-DONE"));
    assert!(!uds.exists(), "the vsock socket was left behind");
}

#[test]
fn read_only_disk_mounts_read_only_and_stays_unchanged() {
    require_kvm();
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = ext4_image(dir.path(), "ro", RO_INIT);
    let before = digest(&root);
    let kernel = kernel();
    let out = run_vmm([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cmdline".as_ref(),
        format!("{CMDLINE} root=/dev/vda ro").as_ref(),
        "--disk".as_ref(),
        format!("{},ro", root.display()).as_ref(),
        "--no-rng".as_ref(),
        "--timeout".as_ref(),
        "900".as_ref(),
    ]);
    let c = text(&out.stdout);
    eprintln!("--- console ---\n{c}\n--- vmm stderr ---\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        c.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:0"),
        "not mounted read-only"
    );
    assert!(c.contains("ROOT-WRITE-REFUSED"));
    assert!(c.contains("BULKHEAD-INIT-DONE"));
    assert_eq!(digest(&root), before, "read-only image changed");
}
