//! The boot tier's initramfs images, written with the CLI's reproducible
//! cpio "newc" writer (`bulkhead::initramfs`).

pub use bulkhead::initramfs::Cpio;

/// The boot tier's initramfs: busybox, extra programs, a /dev/console node
/// (the kernel opens it for init's stdio), /dev/null and `init`.
pub fn busybox_initramfs(busybox: &[u8], extra_bin: &[(&str, &[u8])], init_script: &str) -> Vec<u8> {
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.char_dev("dev/null", 1, 3);
    c.file("bin/busybox", 0o755, busybox);
    c.symlink("bin/sh", "busybox");
    for (name, data) in extra_bin {
        c.file(&format!("bin/{name}"), 0o755, data);
    }
    c.file("init", 0o755, init_script.as_bytes());
    c.finish().expect("an initramfs entry over 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_reproducible() {
        let a = busybox_initramfs(b"bb", &[], "#!/bin/sh\n");
        let b = busybox_initramfs(b"bb", &[], "#!/bin/sh\n");
        assert_eq!(a, b);
        assert_eq!(&a[..6], b"070701");
    }
}
