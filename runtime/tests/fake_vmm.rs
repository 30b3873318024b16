//! `Sandbox` end to end without KVM: this test binary doubles as a stand-in
//! VMM (started with the real VMM's flags, it serves the vsock Unix socket
//! and plays a tiny agent), so the run directory, VMM process handling,
//! agent connection with retries, stdio streams, shutdown and cleanup are
//! exercised on any host. The boot tier does the same with the real VMM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bulkhead_protocol::frame;
use bulkhead_protocol::handshake::Hello;
use bulkhead_protocol::messages::{ErrorKind, Process, Request, Response, StdioTokens};
use bulkhead_protocol::stdio::{Attach, Attached};
use bulkhead_runtime::paths::Artifacts;
use bulkhead_runtime::rootfs::{FsType, RootfsImage};
use bulkhead_runtime::sandbox::{Sandbox, SandboxConfig, SandboxError};
use bulkhead_vmm_api::config::{SerialOutput, VmConfig};

// ---- the stand-in VMM and agent ----

#[derive(Default)]
struct Proc {
    status: Mutex<Option<i32>>,
    done: Condvar,
    signal: Mutex<Option<i32>>,
    signalled: Condvar,
}

#[derive(Default)]
struct Agent {
    procs: Mutex<HashMap<String, Arc<Proc>>>,
    pending: Mutex<HashMap<String, (Process, Streams)>>,
    /// Stdio streams the host attached, by token.
    attached: Mutex<HashMap<String, UnixStream>>,
}

#[derive(Default)]
struct Streams {
    stdin: Option<UnixStream>,
    stdout: Option<UnixStream>,
    stderr: Option<UnixStream>,
}

fn arg(args: &[String], flag: &str) -> String {
    let i = args.iter().position(|a| a == flag).expect(flag);
    args[i + 1].clone()
}

/// Reads the configuration the runtime wrote (`--config FILE`), as the
/// real VMM does.
fn fake_vmm(args: Vec<String>) -> ! {
    let config = VmConfig::from_json_file(Path::new(&arg(&args, "--config"))).unwrap();
    let kernel = config.kernel.display().to_string();
    let SerialOutput::File(console) = config.serial else {
        panic!("the runtime sends the console to a file")
    };
    let uds = config.vsock.expect("the runtime asks for vsock").uds_path;
    let mut con = std::fs::File::create(&console).unwrap();
    writeln!(con, "[    0.000000] Linux version 6.1 (fake)").unwrap();
    match Path::new(&kernel).file_name().unwrap().to_str().unwrap() {
        "panic" => {
            writeln!(con, "[    0.100000] Kernel panic - not syncing: fake").unwrap();
            eprintln!("bulkhead-vmm: error: fake failure");
            std::process::exit(4);
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        _ => {}
    }
    let listener = UnixListener::bind(&uds).unwrap();
    // The guest is "booting": the first connections are reset.
    for _ in 0..3 {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        drop(s);
    }
    writeln!(con, "[    1.000000] Run /init as init process").unwrap();
    let agent = Arc::new(Agent::default());
    for s in listener.incoming() {
        let (s, agent) = (s.unwrap(), agent.clone());
        std::thread::spawn(move || serve(s, &agent));
    }
    std::process::exit(1)
}

fn take_streams(agent: &Agent, tokens: &StdioTokens) -> Streams {
    let mut attached = agent.attached.lock().unwrap();
    let mut take = |t: &Option<String>| t.as_ref().map(|t| attached.remove(t).expect("an attached stream"));
    Streams {
        stdin: take(&tokens.stdin),
        stdout: take(&tokens.stdout),
        stderr: take(&tokens.stderr),
    }
}

fn serve(mut s: UnixStream, agent: &Agent) {
    let mut line = [0u8; 13];
    s.read_exact(&mut line).unwrap();
    if &line == b"CONNECT 1025\n" {
        s.write_all(b"OK 1025\n").unwrap();
        let a: Attach = frame::recv(&mut s).unwrap();
        a.validate().unwrap();
        agent.attached.lock().unwrap().insert(a.token, s.try_clone().unwrap());
        frame::send(&mut s, &Attached::Ok).unwrap();
        return;
    }
    assert_eq!(&line, b"CONNECT 1024\n");
    s.write_all(b"OK 1024\n").unwrap();
    let _: Hello = frame::recv(&mut s).unwrap();
    frame::send(&mut s, &Hello::ours("fake agent")).unwrap();
    while let Ok(req) = frame::recv::<Request, _>(&mut s) {
        req.validate().unwrap();
        let answer = match req {
            Request::Create { container } => {
                let streams = take_streams(agent, &container.stdio);
                agent
                    .pending
                    .lock()
                    .unwrap()
                    .insert(container.id, (container.process, streams));
                Response::Ok
            }
            Request::Start { container_id } => {
                let (process, streams) = agent.pending.lock().unwrap().remove(&container_id).unwrap();
                start(agent, container_id, process, streams);
                Response::Started { pid: 42 }
            }
            Request::Exec {
                container_id,
                exec_id,
                process,
                stdio,
            } => {
                let streams = take_streams(agent, &stdio);
                start(agent, format!("{container_id}/{exec_id}"), process, streams);
                Response::Started { pid: 43 }
            }
            Request::Wait { container_id, exec_id } => {
                let key = match exec_id {
                    Some(e) => format!("{container_id}/{e}"),
                    None => container_id,
                };
                let p = agent.procs.lock().unwrap().get(&key).cloned();
                match p {
                    Some(p) => {
                        let mut st = p.status.lock().unwrap();
                        while st.is_none() {
                            st = p.done.wait(st).unwrap();
                        }
                        Response::Exited { status: st.unwrap() }
                    }
                    None => Response::Error {
                        kind: ErrorKind::NotFound,
                        message: format!("no process {key}"),
                    },
                }
            }
            Request::Signal {
                container_id, signal, ..
            } => {
                let p = agent.procs.lock().unwrap().get(&container_id).cloned().unwrap();
                *p.signal.lock().unwrap() = Some(signal);
                p.signalled.notify_all();
                Response::Ok
            }
            Request::Shutdown => {
                frame::send(&mut s, &Response::Ok).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                std::process::exit(0);
            }
            _ => Response::Ok,
        };
        frame::send(&mut s, &answer).unwrap();
    }
}

/// The "programs": echo, cat, exit N, stderr TEXT, sleep (until a signal).
fn start(agent: &Agent, key: String, process: Process, mut streams: Streams) {
    let p = Arc::new(Proc::default());
    agent.procs.lock().unwrap().insert(key, p.clone());
    std::thread::spawn(move || {
        let a = &process.args;
        let status = match a[0].as_str() {
            "echo" => {
                let out = streams.stdout.as_mut().unwrap();
                writeln!(out, "{}", a[1..].join(" ")).unwrap();
                0
            }
            "cat" => {
                let mut input = Vec::new();
                let from = match streams.stdin.as_mut() {
                    Some(s) => s,
                    None => streams.stdout.as_mut().unwrap(), // a terminal
                };
                from.read_to_end(&mut input).unwrap();
                streams.stdout.as_mut().unwrap().write_all(&input).unwrap();
                0
            }
            "exit" => a[1].parse().unwrap(),
            "stderr" => {
                streams.stderr.as_mut().unwrap().write_all(a[1].as_bytes()).unwrap();
                1
            }
            "sleep" => {
                let mut sig = p.signal.lock().unwrap();
                while sig.is_none() {
                    sig = p.signalled.wait(sig).unwrap();
                }
                128 + sig.unwrap()
            }
            other => panic!("unknown fake program {other}"),
        };
        drop(streams);
        *p.status.lock().unwrap() = Some(status);
        p.done.notify_all();
    });
}

// ---- the tests ----

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, kernel: &str) -> SandboxConfig {
        let d = self.dir.path();
        let kernel = d.join(kernel);
        std::fs::write(&kernel, b"fake").unwrap();
        let artifacts = Artifacts {
            kernel,
            initramfs: d.join("initramfs.cpio"),
            vmm: std::env::current_exe().unwrap(),
        };
        let rootfs = RootfsImage {
            path: d.join("root.ext4"),
            fstype: FsType::Ext4,
        };
        SandboxConfig {
            runtime_root: Some(d.join("run")),
            keep_console: Some(d.join("kept-console.log")),
            ..SandboxConfig::new(artifacts, rootfs)
        }
    }

    fn run_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("run")).map_or(0, |d| d.count())
    }
}

fn process(args: &[&str]) -> Process {
    Process {
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn processes_run_with_output_and_status() {
    let env = Env::new();
    let mut ticks = 0;
    let sb = Sandbox::boot_with(&env.config("vmlinux"), |_| {
        ticks += 1;
        Ok(())
    })
    .unwrap();
    assert!(ticks >= 3, "the reset connections were retried ({ticks})");
    let run_dir = sb.run_dir().to_path_buf();
    assert!(run_dir.join("pid").is_file());

    let out = sb.run_process(process(&["echo", "hello", "world"]), None).unwrap();
    assert_eq!((out.status, out.stdout_text().as_str()), (0, "hello world\n"));
    let out = sb.run_process(process(&["cat"]), Some(b"from stdin")).unwrap();
    assert_eq!(out.stdout, b"from stdin");
    let tty = Process {
        terminal: true,
        ..process(&["cat"])
    };
    let out = sb.run_process(tty, Some(b"typed")).unwrap();
    assert_eq!((out.stdout.as_slice(), out.stderr.len()), (&b"typed"[..], 0));
    let out = sb.run_process(process(&["stderr", "oops"]), None).unwrap();
    assert_eq!((out.status, out.stderr_text().as_str()), (1, "oops"));
    let out = sb.run_process(process(&["exit", "7"]), None).unwrap();
    assert_eq!(out.status, 7);
    let out = sb.exec("run-1", process(&["echo", "exec"]), None).unwrap();
    assert_eq!(out.stdout_text(), "exec\n");

    // A blocking wait on one stream, a signal on another.
    let mut c = sb.client().unwrap();
    let container = sb.container("sleeper", process(&["sleep"]));
    let streams = sb.create(&mut c, container, Default::default()).unwrap();
    sb.start(&mut c, "sleeper").unwrap();
    let mut waiter = sb.client().unwrap();
    let t = std::thread::spawn(move || waiter.wait("sleeper", None).unwrap());
    c.call_ok(&Request::Signal {
        container_id: "sleeper".into(),
        exec_id: None,
        signal: 15,
        all: false,
    })
    .unwrap();
    assert_eq!(t.join().unwrap(), 143);
    drop(streams);

    let status = sb.shutdown().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!run_dir.exists(), "run directory removed");
    assert_eq!(env.run_dirs(), 0);
    let kept = std::fs::read_to_string(env.dir.path().join("kept-console.log")).unwrap();
    assert!(kept.contains("Run /init"), "{kept}");
}

fn a_dying_vmm_is_reported_with_its_console() {
    let env = Env::new();
    let e = Sandbox::boot(&env.config("panic")).err().unwrap();
    let text = e.to_string();
    assert!(matches!(e, SandboxError::VmStopped { .. }), "{text}");
    assert!(text.contains("triple-faulted (exit status 4)"), "{text}");
    assert!(text.contains("Kernel panic - not syncing: fake"), "{text}");
    assert!(text.contains("fake failure"), "VMM log: {text}");
    assert_eq!(env.run_dirs(), 0);
}

fn boot_timeout_and_abort_clean_up() {
    let env = Env::new();
    let cfg = SandboxConfig {
        boot_timeout: Some(Duration::from_millis(500)),
        ..env.config("hang")
    };
    let e = Sandbox::boot(&cfg).err().unwrap();
    assert!(matches!(e, SandboxError::BootTimeout { .. }), "{e}");
    assert!(e.to_string().contains("Linux version 6.1 (fake)"), "{e}");
    let e = Sandbox::boot_with(&env.config("hang"), |_| Err("stop".into()))
        .err()
        .unwrap();
    assert!(matches!(e, SandboxError::Aborted(_)), "{e}");
    assert_eq!(env.run_dirs(), 0);
}

/// A guest that stops answering (its VMM stopped): Create, Start, Exec and
/// a new request stream each fail as unanswered instead of hanging.
fn silent_agent_calls_fail_in_time() {
    let env = Env::new();
    let limit = Duration::from_secs(1);
    let cfg = SandboxConfig {
        call_timeout: Some(limit),
        ..env.config("vmlinux")
    };
    let sb = Sandbox::boot(&cfg).unwrap();
    // While it answers, the bounded stream serves the whole start.
    let mut c = sb.request_client("create").unwrap();
    let container = sb.container("live", process(&["sleep"]));
    let live = sb.create(&mut c, container, Default::default()).unwrap();
    sb.start(&mut c, "live").unwrap();
    let mut held = sb.request_client("create").unwrap();

    // SAFETY: kill(2) on the stand-in VMM this test started.
    assert_eq!(unsafe { libc::kill(sb.vmm_pid() as libc::pid_t, libc::SIGSTOP) }, 0);
    let unanswered = |r: Result<(), SandboxError>, op: &str| match r {
        Err(SandboxError::Unanswered { op: got, after }) => {
            assert_eq!((got, after), (op, limit));
        }
        other => panic!("{op}: want unanswered, got {other:?}"),
    };
    let container = sb.container("late", process(&["echo", "never"]));
    unanswered(sb.create(&mut held, container, Default::default()).map(drop), "create");
    unanswered(sb.start(&mut c, "live").map(drop), "start");
    let exec = sb.exec_start(&mut c, "live", "x", process(&["echo"]), Default::default());
    unanswered(exec.map(drop), "exec");
    unanswered(sb.request_client("exec").map(drop), "exec");
    let e = sb.request_client("create").err().unwrap();
    assert_eq!(e.to_string(), "the guest agent did not answer create within 1 s");
    drop(live);
    let pid = sb.vmm_pid();
    drop(sb);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "VMM {pid} still there");
    assert_eq!(env.run_dirs(), 0);
}

fn dropping_kills_the_vmm() {
    let env = Env::new();
    let sb = Sandbox::boot(&env.config("vmlinux")).unwrap();
    let pid = sb.vmm_pid();
    let dir = sb.run_dir().to_path_buf();
    drop(sb);
    assert!(!dir.exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "VMM {pid} still there");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--config") {
        fake_vmm(args);
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests: &[(&str, fn())] = &[
        (
            "processes_run_with_output_and_status",
            processes_run_with_output_and_status,
        ),
        (
            "a_dying_vmm_is_reported_with_its_console",
            a_dying_vmm_is_reported_with_its_console,
        ),
        ("boot_timeout_and_abort_clean_up", boot_timeout_and_abort_clean_up),
        ("dropping_kills_the_vmm", dropping_kills_the_vmm),
        ("silent_agent_calls_fail_in_time", silent_agent_calls_fail_in_time),
    ];
    let mut passed = 0;
    let mut failed = 0;
    for (name, f) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        match std::panic::catch_unwind(f) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(101);
    }
}
