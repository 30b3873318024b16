//! A process's stdio: pipes (or a pty) on the process side, host streams on
//! the other, and one copying thread per direction. The host opens the
//! streams beforehand ([`Attached`]); a request names them by token.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bulkhead_protocol::frame;
use bulkhead_protocol::messages::StdioTokens;
use bulkhead_protocol::stdio::{Attach, Attached as Answer};

use crate::transport::{shutdown_write, Listener, MAX_REQUEST_STREAMS};

/// Streams kept at most before the oldest is dropped: three for every
/// request stream the agent serves at once.
pub const MAX_ATTACHED: usize = 3 * MAX_REQUEST_STREAMS;

/// Stdio streams the host attached and no request has named yet.
#[derive(Default)]
pub struct Attached {
    streams: Mutex<VecDeque<(String, File)>>,
}

impl Attached {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(String, File)>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts stdio streams until the listener fails for good: reads each
    /// one's [`Attach`], keeps it, answers. One at a time: the host sends
    /// its `Attach` with the connection.
    pub fn serve(self: Arc<Self>, listener: Listener) {
        loop {
            let mut s = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::warn!("stdio: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("stdio accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
            };
            let attach = frame::recv::<Attach, _>(&mut s)
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate().map(|()| a).map_err(|e| e.to_string()));
            match attach {
                Ok(a) => {
                    let answer = s.try_clone();
                    self.keep(a.token, s);
                    if let Ok(mut w) = answer {
                        let _ = frame::send(&mut w, &Answer::Ok);
                    }
                }
                Err(message) => {
                    tracing::warn!("stdio stream refused: {message}");
                    let _ = frame::send(&mut s, &Answer::Error { message });
                }
            }
        }
    }

    /// Keeps a stream under `token`, first dropping streams whose host end
    /// is gone and, when full, the oldest.
    fn keep(&self, token: String, stream: File) {
        let mut all = self.lock();
        all.retain(|(_, f)| !hung_up(f));
        all.retain(|(t, _)| *t != token);
        while all.len() >= MAX_ATTACHED {
            all.pop_front();
        }
        all.push_back((token, stream));
    }

    fn take(&self, token: &Option<String>, what: &str) -> io::Result<Option<File>> {
        let Some(token) = token else {
            return Ok(None);
        };
        let mut all = self.lock();
        match all.iter().position(|(t, _)| t == token) {
            Some(i) => Ok(all.remove(i).map(|(_, f)| f)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {what} stream is attached under its token"),
            )),
        }
    }

    /// The streams `tokens` name, taken out (a request takes them first,
    /// so a bad token fails it before anything is built).
    pub fn take_all(&self, tokens: &StdioTokens) -> io::Result<Streams> {
        Ok(Streams {
            stdin: self.take(&tokens.stdin, "stdin")?,
            stdout: self.take(&tokens.stdout, "stdout")?,
            stderr: self.take(&tokens.stderr, "stderr")?,
        })
    }
}

/// One process's host streams; `None` is /dev/null.
#[derive(Default)]
pub struct Streams {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

/// Whether the host closed or reset its end (nothing waits).
fn hung_up(f: &File) -> bool {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The host can close stdin early (`close_stdin`) while a thread copies
/// into it. The copier holds the lock while a write blocks (the workload is
/// not reading), so closing never waits for it: it takes the file if the
/// lock is free, else leaves a request the copier honours after its write.
#[derive(Default)]
pub struct StdinSlot {
    file: Mutex<Option<File>>,
    close_requested: AtomicBool,
}

impl StdinSlot {
    fn new(f: File) -> Arc<StdinSlot> {
        Arc::new(StdinSlot {
            file: Mutex::new(Some(f)),
            close_requested: AtomicBool::new(false),
        })
    }

    pub fn close(&self) {
        self.close_requested.store(true, Ordering::SeqCst);
        if let Ok(mut f) = self.file.try_lock() {
            f.take();
        }
    }
}

/// What the agent keeps of a process's stdio after it starts.
#[derive(Default)]
pub struct Handles {
    pub stdin: Option<Arc<StdinSlot>>,
    pub tty: Option<Arc<File>>,
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new and ours.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn dev_null() -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")
}

/// Copies until EOF or an error on either side.
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A pty master reads EIO once the last slave holder is gone.
            Err(_) => return,
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).map(|_| ())
}

/// Output: process pipe -> host stream, then EOF to the host.
fn spawn_output(name: &str, pipe: File, stream: File) -> io::Result<()> {
    spawn(name, move || {
        pump(&pipe, &stream);
        shutdown_write(&stream);
    })
}

/// Makes pipes between a non-terminal process and its streams. Returns
/// the child's three descriptors; copying starts at once.
pub fn pipes(streams: Streams) -> io::Result<([OwnedFd; 3], Handles)> {
    let Streams { stdin, stdout, stderr } = streams;
    let mut handles = Handles::default();
    let stdin_child = match stdin {
        Some(stream) => {
            let (r, w) = pipe()?;
            let slot = StdinSlot::new(w);
            handles.stdin = Some(slot.clone());
            spawn("stdin", move || copy_stdin(stream, slot))?;
            OwnedFd::from(r)
        }
        None => OwnedFd::from(dev_null()?),
    };
    let out = |stream: Option<File>, name: &str| -> io::Result<OwnedFd> {
        match stream {
            Some(stream) => {
                let (r, w) = pipe()?;
                spawn_output(name, r, stream)?;
                Ok(OwnedFd::from(w))
            }
            None => Ok(OwnedFd::from(dev_null()?)),
        }
    };
    let stdout_child = out(stdout, "stdout")?;
    let stderr_child = out(stderr, "stderr")?;
    Ok(([stdin_child, stdout_child, stderr_child], handles))
}

fn copy_stdin(mut stream: File, slot: Arc<StdinSlot>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut guard = match slot.file.lock() {
            Ok(g) => g,
            Err(_) => break,
        };
        let written = guard.as_mut().is_some_and(|w| w.write_all(&buf[..n]).is_ok());
        if !written || slot.close_requested.load(Ordering::SeqCst) {
            break;
        }
    }
    if let Ok(mut g) = slot.file.lock() {
        g.take();
    }
}

/// Joins a terminal's one stream (its stdout) to a pty master, both
/// directions.
pub fn terminal(streams: Streams, master: File) -> io::Result<Handles> {
    let stream = streams
        .stdout
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a terminal needs the stdout stream"))?;
    let master = Arc::new(master);
    let (m_out, s_out) = (master.clone(), stream.try_clone()?);
    spawn("tty-out", move || {
        pump(&*m_out, &s_out);
        shutdown_write(&s_out);
    })?;
    let m_in = master.clone();
    spawn("tty-in", move || pump(&stream, &*m_in))?;
    Ok(Handles {
        stdin: None,
        tty: Some(master),
    })
}

pub fn resize(master: &File, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty in the container's devpts through the init's root.
pub fn open_container_pty(init_pid: i32) -> io::Result<(File, OwnedFd)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(format!("/proc/{init_pid}/root/dev/pts/ptmx"))?;
    let unlock: libc::c_int = 0;
    // SAFETY: ioctls on the master just opened with documented arguments.
    unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((master, OwnedFd::from_raw_fd(slave)))
    }
}
