//! A process's stdio: containerd's FIFOs bridged to the guest streams.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use bulkhead_runtime::stdio::{self, StdioStreams};

/// The FIFO paths containerd named for a process (empty: none).
#[derive(Clone, Debug, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Opens a FIFO on a thread (a FIFO open blocks until the other end is
/// there) and copies a guest stream into it.
fn bridge_out(from: UnixStream, fifo: String, name: &'static str) -> io::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name(format!("out-{name}")).spawn(move || {
        let sink: Box<dyn Write + Send> = if fifo.is_empty() {
            Box::new(io::sink())
        } else {
            match OpenOptions::new().write(true).open(&fifo) {
                Ok(f) => Box::new(f),
                Err(e) => {
                    tracing::warn!("cannot open {name} {fifo}: {e}");
                    Box::new(io::sink())
                }
            }
        };
        let done = stdio::copy_out(from, sink, name).map(|h| h.join());
        if let Err(e) = done {
            tracing::warn!("{name}: {e}");
        }
        let _ = tx.send(());
    })?;
    Ok(rx)
}

fn bridge_in(to: UnixStream, fifo: String) -> io::Result<()> {
    std::thread::Builder::new().name("in".into()).spawn(move || {
        match File::open(&fifo) {
            Ok(f) => {
                // copy_in closes the guest's stdin at EOF.
                match stdio::copy_in(f, to) {
                    Ok(h) => {
                        let _ = h.join();
                    }
                    Err(e) => tracing::warn!("stdin: {e}"),
                }
            }
            Err(e) => {
                tracing::warn!("cannot open stdin {fifo}: {e}");
                let _ = to.shutdown(Shutdown::Write);
            }
        }
    })?;
    Ok(())
}

/// Connects the process's FIFOs to its guest streams; the receivers tell
/// when each output stream has drained.
pub fn bridge(fifos: &Fifos, streams: StdioStreams) -> io::Result<Vec<mpsc::Receiver<()>>> {
    let mut drains = Vec::new();
    if !fifos.stdin.is_empty() {
        // A terminal's one stream carries stdin too.
        let to = match (&streams.stdin, &streams.stdout) {
            (Some(s), _) => Some(s.try_clone()?),
            (None, Some(s)) if fifos.terminal => Some(s.try_clone()?),
            _ => None,
        };
        if let Some(to) = to {
            bridge_in(to, fifos.stdin.clone())?;
        }
    }
    if let Some(s) = streams.stdout {
        drains.push(bridge_out(s, fifos.stdout.clone(), "stdout")?);
    }
    if let Some(s) = streams.stderr {
        drains.push(bridge_out(s, fifos.stderr.clone(), "stderr")?);
    }
    Ok(drains)
}
