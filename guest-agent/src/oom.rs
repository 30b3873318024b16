//! Out-of-memory events: inotify on each container's `memory.events`, so
//! nothing polls (every system call is expensive in an emulated guest).

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

struct Watch {
    id: String,
    file: PathBuf,
    seen: u64,
}

pub struct OomWatch {
    inotify: OwnedFd,
    watches: Mutex<HashMap<i32, Watch>>,
    events: Mutex<VecDeque<String>>,
    ready: Condvar,
}

const MAX_QUEUED: usize = 256;

fn oom_kills(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

impl OomWatch {
    pub fn new() -> io::Result<OomWatch> {
        // SAFETY: returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OomWatch {
            // SAFETY: new and ours.
            inotify: unsafe { OwnedFd::from_raw_fd(fd) },
            watches: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        })
    }

    /// Starts watching a container's `memory.events`; a kernel without the
    /// memory controller has no such file and no OOM events to report.
    pub fn watch(&self, id: &str, file: &Path) {
        let Ok(c) = CString::new(file.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: a NUL-terminated path on our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            tracing::debug!(container = id, "no memory.events to watch");
            return;
        }
        let w = Watch {
            id: id.to_string(),
            file: file.to_path_buf(),
            seen: oom_kills(file),
        };
        self.watches.lock().unwrap_or_else(|p| p.into_inner()).insert(wd, w);
    }

    pub fn forget(&self, id: &str) {
        let mut w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|wd, watch| {
            if watch.id == id {
                // SAFETY: removing a watch of ours.
                unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), *wd) };
                false
            } else {
                true
            }
        });
    }

    /// The watcher thread's loop.
    pub fn run(&self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a stack buffer of the given size.
            let n = unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!("OOM watcher stopped");
                return;
            }
            let mut off = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while off + header <= n as usize {
                // SAFETY: a complete header lies at off; read it unaligned.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                off += header + ev.len as usize;
                self.check(ev.wd);
            }
        }
    }

    fn check(&self, wd: i32) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = watches.get_mut(&wd) else {
            return;
        };
        let now = oom_kills(&w.file);
        if now > w.seen {
            w.seen = now;
            tracing::warn!(container = %w.id, "out of memory: a process was killed");
            let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() < MAX_QUEUED {
                q.push_back(w.id.clone());
            }
            self.ready.notify_all();
        }
    }

    /// Blocks until the next OOM kill; returns the container's id.
    pub fn next(&self) -> String {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}
