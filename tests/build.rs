//! Assembles the kvm-tier guests (tests/guests/*.S) into small ELF images
//! that bulkhead-vmm boots through its own 64-bit set-up.

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &[
    "serial_reset",
    "long_mode",
    "triple_fault",
    "int3",
    "spin",
    "serial_loop",
    "serial_counter",
    "touch_ram",
    "vsock_rx_flood",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("guests");
    println!("cargo:rerun-if-changed={}", src.join("common.h").display());
    for name in GUESTS {
        let input = src.join(format!("{name}.S"));
        let output = out.join(format!("{name}.elf"));
        println!("cargo:rerun-if-changed={}", input.display());
        let status = Command::new("gcc")
            .args([
                "-nostdlib",
                "-static",
                "-no-pie",
                "-Wl,--build-id=none",
                "-Wl,-Ttext=0x200000",
            ])
            .arg("-I")
            .arg(&src)
            .arg("-o")
            .arg(&output)
            .arg(&input)
            .status()
            .unwrap_or_else(|e| panic!("cannot run gcc to assemble the kvm-tier guests: {e}"));
        assert!(status.success(), "gcc failed on {}", input.display());
        println!("cargo:rustc-env=GUEST_{}={}", name.to_uppercase(), output.display());
    }

    // A static user-space program for the boot tier's init.
    let input = src.join("guest_checks.c");
    let output = out.join("guest_checks");
    println!("cargo:rerun-if-changed={}", input.display());
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&output)
        .arg(&input)
        .status()
        .unwrap_or_else(|e| panic!("cannot run gcc to build guest_checks: {e}"));
    assert!(
        status.success(),
        "gcc failed on {} (is libc6-dev installed?)",
        input.display()
    );
    println!("cargo:rustc-env=GUEST_CHECKS={}", output.display());
}
