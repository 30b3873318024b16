//! Writes a small busybox initramfs (uncompressed cpio: the fastest to
//! unpack under emulation) whose init prints a marker and reboots.
//! Usage: mkinitramfs OUTPUT [INIT_SCRIPT]

use bulkhead_tests::initramfs::busybox_initramfs;

const DEFAULT_INIT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "Hello from a Bulkhead guest: $(/bin/busybox uname -sr), uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime) s"
/bin/busybox reboot -f
"#;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(output) = args.get(1) else {
        eprintln!("usage: mkinitramfs OUTPUT [INIT_SCRIPT]");
        return std::process::ExitCode::from(2);
    };
    let init = match args.get(2) {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mkinitramfs: cannot read {path}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => DEFAULT_INIT.to_string(),
    };
    let busybox = match std::fs::read("/bin/busybox") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mkinitramfs: cannot read /bin/busybox (install busybox-static): {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(output, busybox_initramfs(&busybox, &[], &init)) {
        eprintln!("mkinitramfs: cannot write {output}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
