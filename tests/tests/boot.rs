//! boot tier: the project's kernel, booted by bulkhead-vmm, runs a
//! busybox init from a test-built initramfs. Each boot takes minutes on a
//! PVM host, so every boot carries several checks and boots never overlap.

use std::path::Path;
use std::sync::Mutex;

use bulkhead_tests::initramfs::busybox_initramfs;
use bulkhead_tests::{busybox, kernel, require_kvm, run_vmm, text};

/// Boots compete for the same two cores; run them one at a time.
static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

const GUEST_CHECKS: &str = env!("GUEST_CHECKS");
/// A guard against a hung guest; far above a normal emulated boot.
const BOOT_TIMEOUT_SECS: &str = "900";

fn init_script(forks: u32) -> String {
    format!(
        r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "BULKHEAD-BOOT-MARKER uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime) cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
/bin/guest_checks seccomp
/bin/guest_checks forks {forks}
echo "BULKHEAD-INIT-DONE"
/bin/busybox reboot -f
"#
    )
}

struct Boot {
    status: Option<i32>,
    console: String,
    stderr: String,
}

fn boot(dir: &Path, vcpus: u8, forks: u32) -> Boot {
    boot_image(&kernel(), dir, vcpus, forks)
}

fn boot_image(kernel: &Path, dir: &Path, vcpus: u8, forks: u32) -> Boot {
    require_kvm();
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let checks = std::fs::read(GUEST_CHECKS).unwrap();
    let initrd = dir.join(format!("initrd-{vcpus}.cpio"));
    std::fs::write(
        &initrd,
        busybox_initramfs(&busybox(), &[("guest_checks", &checks)], &init_script(forks)),
    )
    .unwrap();
    let vcpus = vcpus.to_string();
    let out = run_vmm([
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        &vcpus,
        "--mem-mib",
        "128",
        "--timeout",
        BOOT_TIMEOUT_SECS,
    ]);
    let b = Boot {
        status: out.status.code(),
        console: text(&out.stdout),
        stderr: text(&out.stderr),
    };
    eprintln!(
        "--- console ({vcpus} vCPUs) ---\n{}\n--- vmm stderr ---\n{}",
        b.console, b.stderr
    );
    b
}

fn assert_userspace_ran(b: &Boot, cpus: u32) {
    let c = &b.console;
    assert!(c.contains("Run /init as init process"), "kernel did not reach init");
    assert!(c.contains("BULKHEAD-BOOT-MARKER uptime="), "init printed no marker");
    assert!(c.contains(&format!("cpus={cpus}")), "init did not see {cpus} CPUs");
    // A seccomp filter takes effect: on PVM hosts this goes through the
    // project's syscall patch, so it proves the normal entry work runs.
    assert!(c.contains("SECCOMP-ERRNO-OK"), "seccomp ERRNO rule did not apply");
    assert!(c.contains("SECCOMP-KILL-OK"), "seccomp KILL rule did not apply");
    assert!(c.contains("FORKS-OK"), "short-lived processes failed");
    assert!(c.contains("BULKHEAD-INIT-DONE"));
    assert!(!c.contains("Kernel panic"), "kernel panicked");
    // The guest rebooted through the i8042 and the VMM exited cleanly.
    assert_eq!(b.status, Some(0), "vmm stderr: {}", b.stderr);
}

#[test]
fn kernel_boots_to_busybox_init_on_one_vcpu() {
    let dir = tempfile::tempdir().unwrap();
    let b = boot(dir.path(), 1, 20);
    assert_userspace_ran(&b, 1);
}

#[test]
fn two_vcpus_come_online_and_run_user_space() {
    let dir = tempfile::tempdir().unwrap();
    let b = boot(dir.path(), 2, 100);
    assert!(
        b.console.contains("smp: Brought up 1 node, 2 CPUs"),
        "the second vCPU did not come online"
    );
    assert_userspace_ran(&b, 2);
}

#[test]
fn bzimage_boots_through_the_64bit_boot_protocol() {
    // build.sh installs the bzImage of the same kernel next to vmlinux.
    let bzimage = kernel().with_file_name("bzImage");
    assert!(bzimage.is_file(), "{} is missing", bzimage.display());
    let dir = tempfile::tempdir().unwrap();
    let b = boot_image(&bzimage, dir.path(), 1, 5);
    assert_userspace_ran(&b, 1);
}
