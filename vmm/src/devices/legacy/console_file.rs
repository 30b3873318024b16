//! The serial console's file, kept under a byte budget: a guest that
//! writes forever must not fill the host's disk or tmpfs. At the budget
//! the older half goes (the newest output, a panic say, is what a reader
//! wants), a first line counts what went, and the file stays one file, so
//! whoever tails it by path keeps working.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

pub use bulkhead_vmm_api::config::CONSOLE_MAX_BYTES;

pub struct BoundedFile {
    file: File,
    len: u64,
    max: u64,
    dropped: u64,
    /// The count line at the file's start, which is not guest output.
    note_len: u64,
}

impl BoundedFile {
    /// `file` is written from offset 0 (the caller truncated it). `max`
    /// is at least a few KiB: half of it must hold a line and the count.
    pub fn new(file: File, max: u64) -> BoundedFile {
        BoundedFile {
            file,
            len: 0,
            max: max.max(4096),
            dropped: 0,
            note_len: 0,
        }
    }

    /// Keeps the newest half, from a line start, after the count line.
    fn compact(&mut self) -> io::Result<()> {
        let keep = self.max / 2;
        let from = self.len - keep.min(self.len);
        let mut tail = vec![0u8; (self.len - from) as usize];
        self.file.read_exact_at(&mut tail, from)?;
        let cut = tail.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.dropped += (from + cut as u64).saturating_sub(self.note_len);
        let note = format!("[bulkhead-vmm: {} earlier console bytes dropped]\n", self.dropped);
        self.note_len = note.len() as u64;
        self.file.write_all_at(note.as_bytes(), 0)?;
        self.file.write_all_at(&tail[cut..], note.len() as u64)?;
        self.len = (note.len() + tail.len() - cut) as u64;
        self.file.set_len(self.len)
    }
}

impl Write for BoundedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len > 0 && self.len + buf.len() as u64 > self.max {
            self.compact()?;
        }
        let room = (self.max - self.len) as usize;
        let take = &buf[..buf.len().min(room)];
        self.file.write_all_at(take, self.len)?;
        self.len += take.len() as u64;
        Ok(take.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(max: u64) -> (tempfile::NamedTempFile, BoundedFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let b = BoundedFile::new(f.reopen().unwrap(), max);
        (f, b)
    }

    #[test]
    fn small_output_is_kept_whole() {
        let (f, mut b) = bounded(8192);
        b.write_all(b"Linux version 6.1\nRun /init\n").unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), b"Linux version 6.1\nRun /init\n");
    }

    #[test]
    fn endless_output_stays_under_the_budget_and_keeps_the_newest() {
        let (f, mut b) = bounded(8192);
        for i in 0..10_000 {
            // A byte at a time, as the UART hands them over.
            for byte in format!("line {i}\n").bytes() {
                b.write_all(&[byte]).unwrap();
            }
            assert!(f.as_file().metadata().unwrap().len() <= 8192);
        }
        let text = std::fs::read_to_string(f.path()).unwrap();
        let mut lines = text.lines();
        let first = lines.next().unwrap();
        assert!(
            first.starts_with("[bulkhead-vmm: ") && first.ends_with(" earlier console bytes dropped]"),
            "{first}"
        );
        let rest: Vec<&str> = lines.collect();
        assert_eq!(rest.last(), Some(&"line 9999"));
        // Whole lines only, in order, with nothing missing after the cut.
        let first_kept: usize = rest[0].strip_prefix("line ").unwrap().parse().unwrap();
        for (k, l) in rest.iter().enumerate() {
            assert_eq!(*l, format!("line {}", first_kept + k));
        }
        let dropped: u64 = first
            .trim_start_matches("[bulkhead-vmm: ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let all: u64 = (0..10_000).map(|i| format!("line {i}\n").len() as u64).sum();
        let kept: u64 = rest.iter().map(|l| l.len() as u64 + 1).sum();
        assert_eq!(dropped + kept, all);
    }

    #[test]
    fn a_write_larger_than_the_budget_is_cut_not_refused() {
        let (f, mut b) = bounded(4096);
        let n = b.write(&[b'x'; 10_000]).unwrap();
        assert!(n > 0 && n <= 4096, "{n}");
        b.write_all(&[b'y'; 10_000]).unwrap();
        assert!(f.as_file().metadata().unwrap().len() <= 4096);
    }
}
