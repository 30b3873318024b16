//! The kernel's initramfs format (cpio "newc", uncompressed: the project's
//! kernel has no decompressors, and an uncompressed archive unpacks fastest
//! under emulation), written reproducibly: fixed inode numbers, times and
//! owners, so the same input bytes give the same archive. Device nodes need
//! no root or mknod.

use std::io::Write;
use std::path::{Path, PathBuf};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const MAGIC: &[u8; 6] = b"070701";

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("initramfs entry {0:?} is larger than the cpio format allows (4 GiB)")]
    TooLarge(String),
    #[error("cannot read the agent binary {path}: {source}")]
    ReadAgent { path: PathBuf, source: std::io::Error },
    #[error("{path} is empty; build the agent first")]
    EmptyAgent { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// An archive being written; [`Cpio::finish`] adds the trailer.
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    error: Option<InitramfsError>,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    pub fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            next_ino: 1,
            error: None,
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let (Ok(size), Ok(namesize)) = (u32::try_from(data.len()), u32::try_from(name.len() + 1)) else {
            self.error.get_or_insert(InitramfsError::TooLarge(name.into()));
            return;
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime
            size, 0, // device major
            0, // device minor
            rdev.0, rdev.1, namesize, 0, // check
        ];
        self.buf.extend_from_slice(MAGIC);
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

    /// A character device node, mode 0600.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
        self
    }

    pub fn finish(mut self) -> Result<Vec<u8>, InitramfsError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        Ok(self.buf)
    }
}

/// The guest's boot image: the agent as `/init`, the directories it mounts
/// on, and `/dev/console`, which the kernel opens for init's stdio before
/// any devtmpfs exists. Entries in sorted order, parents first.
pub fn agent_initramfs(agent: &[u8]) -> Result<Vec<u8>, InitramfsError> {
    enum Kind<'a> {
        Dir,
        File(&'a [u8]),
        Console,
    }
    let mut entries: Vec<(&str, Kind)> = ["dev", "proc", "sys", "run", "tmp", "mnt"]
        .into_iter()
        .map(|d| (d, Kind::Dir))
        .collect();
    entries.push(("dev/console", Kind::Console));
    entries.push(("init", Kind::File(agent)));
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut c = Cpio::new();
    for (name, kind) in entries {
        match kind {
            Kind::Dir => c.dir(name),
            Kind::File(data) => c.file(name, 0o755, data),
            Kind::Console => c.char_dev(name, 5, 1),
        };
    }
    c.finish()
}

/// Reads the agent binary and writes the initramfs to `out` (through a
/// temporary file and a rename, so a reader never sees half an archive).
pub fn build_agent_initramfs(agent_binary: &Path, out: &Path) -> Result<(), InitramfsError> {
    let agent = std::fs::read(agent_binary).map_err(|source| InitramfsError::ReadAgent {
        path: agent_binary.to_path_buf(),
        source,
    })?;
    if agent.is_empty() {
        return Err(InitramfsError::EmptyAgent {
            path: agent_binary.to_path_buf(),
        });
    }
    let archive = agent_initramfs(&agent)?;
    let write_err = |source| InitramfsError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&archive).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, out));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const HEADER_LEN: usize = 110;

    #[derive(Debug, PartialEq, Eq)]
    pub struct Entry {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// A strict newc reader for the tests.
    pub fn parse(archive: &[u8]) -> Vec<Entry> {
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..6 + (i + 1) * 8]).unwrap(), 16).unwrap()
        };
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let h = &archive[off..];
            assert_eq!(&h[..6], MAGIC, "at offset {off}");
            let namesize = field(h, 11) as usize;
            let filesize = field(h, 6) as usize;
            let name = std::str::from_utf8(&h[HEADER_LEN..HEADER_LEN + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(h[HEADER_LEN + namesize - 1], 0);
            let data_start = (HEADER_LEN + namesize + 3) & !3;
            let data = h[data_start..data_start + filesize].to_vec();
            off += (data_start + filesize + 3) & !3;
            if name == "TRAILER!!!" {
                assert_eq!(off, archive.len());
                return out;
            }
            out.push(Entry {
                name,
                ino: field(h, 0),
                mode: field(h, 1),
                uid: field(h, 2),
                gid: field(h, 3),
                mtime: field(h, 5),
                rdev: (field(h, 9), field(h, 10)),
                data,
            });
        }
    }

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"#!/bin/sh\n")
            .char_dev("dev/console", 5, 1)
            .symlink("sh", "busybox");
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let e = parse(&out);
        assert_eq!(e[0].mode, S_IFREG | 0o755);
        assert_eq!(e[0].data, b"#!/bin/sh\n");
        assert_eq!(e[1].rdev, (5, 1));
        assert_eq!(e[2].data, b"busybox");
    }

    #[test]
    fn agent_initramfs_is_reproducible_and_complete() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        std::fs::write(&agent, b"\x7fELF pretend agent").unwrap();
        let (a, b) = (d.path().join("a.cpio"), d.path().join("b.cpio"));
        build_agent_initramfs(&agent, &a).unwrap();
        build_agent_initramfs(&agent, &b).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap());

        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "init", "mnt", "proc", "run", "sys", "tmp"]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!((e.uid, e.gid, e.mtime, e.ino), (0, 0, 0, i as u32 + 1), "{}", e.name);
        }
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by_name("init").mode, S_IFREG | 0o755);
        assert_eq!(by_name("init").data, b"\x7fELF pretend agent");
        assert_eq!(by_name("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert_eq!(by_name("tmp").mode, S_IFDIR | 0o755);

        std::fs::write(&agent, b"").unwrap();
        assert!(matches!(
            build_agent_initramfs(&agent, &a),
            Err(InitramfsError::EmptyAgent { .. })
        ));
        assert!(build_agent_initramfs(&d.path().join("missing"), &a)
            .unwrap_err()
            .to_string()
            .contains("cannot read the agent binary"));
    }
}
