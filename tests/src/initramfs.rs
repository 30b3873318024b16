//! A small writer for the kernel's initramfs format (cpio "newc"),
//! reproducible (fixed inode numbers, times and owners) and able to hold
//! device nodes without root or mknod.

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    pub fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (mode & 0o7777), (0, 0), data);
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The boot tier's initramfs: busybox, the guest_checks program, a
/// /dev/console node (the kernel opens it for init's stdio) and `init`.
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
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..6 + (i + 1) * 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"#!/bin/sh\n").char_dev("dev/console", 5, 1);
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(field(&out, 1), S_IFREG | 0o755);
        assert_eq!(field(&out, 6), 10);
        assert_eq!(field(&out, 11), 5); // "init" + NUL
                                        // Walk the archive.
        let mut off = 0;
        let mut names = vec![];
        while off < out.len() {
            let h = &out[off..];
            assert_eq!(&h[..6], b"070701");
            let namesize = field(h, 11) as usize;
            let filesize = field(h, 6) as usize;
            let name = std::str::from_utf8(&h[110..110 + namesize - 1]).unwrap().to_string();
            if name == "dev/console" {
                assert_eq!((field(h, 9), field(h, 10)), (5, 1));
            }
            let data_start = (110 + namesize + 3) & !3;
            off += (data_start + filesize + 3) & !3;
            names.push(name);
        }
        assert_eq!(names, ["init", "dev/console", "TRAILER!!!"]);
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn output_is_reproducible() {
        let a = busybox_initramfs(b"bb", &[], "#!/bin/sh\n");
        let b = busybox_initramfs(b"bb", &[], "#!/bin/sh\n");
        assert_eq!(a, b);
    }
}
