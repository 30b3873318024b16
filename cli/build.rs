//! Embeds a static busybox for the default root filesystem: copies it into
//! OUT_DIR and records its applet list, so `bulkhead run -- echo hello`
//! needs no image from the user.

use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_BUSYBOX: &str = "/bin/busybox";
const PT_INTERP: u32 = 3;

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// True when the ELF file asks for a dynamic loader; such a busybox would
/// not run in a root filesystem that has no libc.
fn is_dynamic(elf: &[u8]) -> Option<bool> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None; // not a little-endian ELF64
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().ok()?)).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(off..off + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=BULKHEAD_BUSYBOX");
    let src = std::env::var_os("BULKHEAD_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX));
    println!("cargo:rerun-if-changed={}", src.display());

    let bytes = std::fs::read(&src).unwrap_or_else(|e| {
        fail(&format!(
            "cannot read {} ({e}): the default root filesystem embeds a static busybox; \
             install Debian's `busybox-static` package (apt-get install busybox-static) \
             or point BULKHEAD_BUSYBOX at a static busybox",
            src.display()
        ))
    });
    match is_dynamic(&bytes) {
        Some(false) => {}
        Some(true) => fail(&format!(
            "{} is dynamically linked; the default root filesystem has no libc. \
             Install Debian's `busybox-static` package instead of `busybox`",
            src.display()
        )),
        None => fail(&format!("{} is not an x86_64 ELF executable", src.display())),
    }

    let list = Command::new(&src).arg("--list").output().unwrap_or_else(|e| {
        fail(&format!("cannot run {} --list: {e}", src.display()));
    });
    if !list.status.success() {
        fail(&format!("{} --list failed: {}", src.display(), list.status));
    }
    let applets: Vec<&str> = std::str::from_utf8(&list.stdout)
        .unwrap_or_else(|_| fail("busybox --list printed something that is not UTF-8"))
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .collect();
    if applets.is_empty() {
        fail(&format!("{} --list printed no applets", src.display()));
    }

    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is not set")));
    write(&out.join("busybox"), &bytes);
    write(&out.join("busybox-applets.txt"), (applets.join("\n") + "\n").as_bytes());
}

fn write(path: &Path, bytes: &[u8]) {
    if let Err(e) = std::fs::write(path, bytes) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}
