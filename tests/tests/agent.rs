//! agent tier: the real bulkhead-agent, a host process in its own PID and
//! mount namespaces (its debug-only listener mode), runs real workloads from
//! a busybox root filesystem over the real protocol. Each test starts its own
//! agent (fast on the host); dropping it shuts the agent down and checks that
//! nothing of it is left. Needs root and a debug build of the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_protocol::client::Client;
use bulkhead_protocol::defaults::{self, MASKED_PATHS, READONLY_PATHS};
use bulkhead_protocol::frame::{self, FrameError, MAX_FRAME_BYTES};
use bulkhead_protocol::handshake::{Hello, PROTOCOL_NAME, PROTOCOL_VERSION};
use bulkhead_protocol::messages::{
    CreateContainer, DeviceRule, ErrorKind, Mount, Process, Request, Resources, Response, Rlimit, SeccompProgram,
    SharedNamespaces, StdioTokens, MAX_ARGS_BYTES,
};
use bulkhead_tests::agent::*;

fn list_processes(c: &mut Client<UnixStream>, id: &str) -> Vec<u32> {
    match c.call(&Request::ListProcesses {
        container_id: id.into(),
    }) {
        Ok(Response::Processes { pids }) => pids,
        other => panic!("list_processes {id}: {other:?}"),
    }
}

fn create(agent: &Agent, c: &mut Client<UnixStream>, container: CreateContainer) {
    let id = container.id.clone();
    c.call_ok(&Request::Create { container })
        .unwrap_or_else(|e| panic!("create {id}: {e}\nagent output:\n{}", agent.log()));
}

fn start(agent: &Agent, c: &mut Client<UnixStream>, id: &str) -> u32 {
    c.call_started(&Request::Start {
        container_id: id.into(),
    })
    .unwrap_or_else(|e| panic!("start {id}: {e}\nagent output:\n{}", agent.log()))
}

/// Polls (bounded) until no process in the agent's PID namespace matches.
fn eventually_none(agent: &Agent, what: &str, matches: impl Fn(&ProcInfo) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<ProcInfo> = agent.descendants().into_iter().filter(|p| matches(p)).collect();
        if found.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} still there after 20 s: {found:#?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn output_and_exit_code() {
    let agent = Agent::start();
    let (status, out, err) = agent.run(sh("echo out; echo err >&2; exit 3"));
    assert_eq!((status, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    // More than a pipe holds, all of it, even though the exit may be answered first.
    let (status, out, err) = agent.run(sh("seq 1 20000"));
    assert_eq!(status, 0, "stderr: {err}");
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(
        out == expected,
        "seq output differs: {} bytes, expected {}; its last line is {:?}",
        out.len(),
        expected.len(),
        out.lines().last()
    );
}

/// A stdio stream belongs to the one request that names its token: a
/// second request naming it is refused, and a stream whose host end went
/// away is gone too. The agent keeps serving.
#[test]
fn stdio_streams_are_taken_once() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let stdio = agent.stdio(false);
    let mut a = container(&unique_id("first"), sh("echo mine"));
    a.stdio = stdio.tokens.clone();
    c.call_ok(&Request::Create { container: a.clone() }).unwrap();
    c.call_started(&Request::Start {
        container_id: a.id.clone(),
    })
    .unwrap();
    let mut b = container(&unique_id("second"), sh("echo stolen"));
    b.stdio = stdio.tokens.clone();
    assert_eq!(refusal(c.call(&Request::Create { container: b })), ErrorKind::Invalid);
    assert_eq!(wait_for(&mut c, &a.id, None), 0);
    assert_eq!(stdio.finish().0, "mine\n");

    let (tokens, streams) = agent.open_stdio(Default::default());
    drop(streams);
    // The next attach prunes streams whose host end is gone.
    let _other = agent.stdio(false);
    let mut d = container(&unique_id("late"), sh("true"));
    d.stdio = tokens;
    assert_eq!(refusal(c.call(&Request::Create { container: d })), ErrorKind::Invalid);
    agent.assert_serves();
}

/// As under runc: the workload is PID 1 of its PID namespace, so
/// `/proc/1/cmdline` is the workload and the kernel passes it only the
/// signals it handles (and SIGKILL).
#[test]
fn the_workload_is_pid_1_and_gets_only_the_signals_it_handles() {
    let agent = Agent::start();
    let script = "echo $$; cat /proc/1/cmdline; exit 0";
    let (status, out, err) = agent.run(sh(script));
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, format!("1\n/bin/sh\0-c\0{script}\0"));
    let mut c = agent.connect();
    let id = unique_id("pid1");
    let (_, stdio) = agent.start_container(&mut c, container(&id, sh("echo ready; exec sleep 1000")));
    stdio.stdout_until("ready\n");
    // Dropped by the kernel: had it been delivered, the status would be 143.
    agent.signal(&mut c, &id, None, libc::SIGTERM, false);
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    stdio.finish();

    let id = unique_id("pid1");
    let script = "trap 'exit 7' TERM; echo ready; while :; do sleep 1; done";
    let (_, stdio) = agent.start_container(&mut c, container(&id, sh(script)));
    stdio.stdout_until("ready\n");
    agent.signal(&mut c, &id, None, libc::SIGTERM, false);
    assert_eq!(wait_for(&mut c, &id, None), 7);
    stdio.finish();
}

/// With `init`, a helper is PID 1 and forwards every signal to the
/// workload, which then dies of the ones it has no handler for.
#[test]
fn signals_reach_a_workload_without_handlers_under_a_helper_init() {
    let agent = Agent::start();
    let with_init = |id: &str, p: Process| CreateContainer {
        init: true,
        ..container(id, p)
    };
    let (_, out, _) = agent.run_container(with_init(&unique_id("init"), sh("echo $$")));
    assert_ne!(out.trim(), "1", "the helper init is PID 1");
    let mut c = agent.connect();
    for (sig, expected) in [(libc::SIGTERM, 143), (libc::SIGINT, 130), (libc::SIGKILL, 137)] {
        let id = unique_id("signal");
        let (_, stdio) = agent.start_container(&mut c, with_init(&id, sh("echo ready; exec sleep 1000")));
        stdio.stdout_until("ready\n");
        agent.signal(&mut c, &id, None, sig, false);
        assert_eq!(wait_for(&mut c, &id, None), expected, "status after signal {sig}");
        stdio.finish();
    }
}

/// An OCI profile compiled as the shim does: its own errno, an argument
/// condition and a kill, for the workload (with and without
/// no_new_privileges, as root and as a user without CAP_SYS_ADMIN) and for
/// an exec.
#[test]
fn seccomp_profiles_decide_per_call_and_argument() {
    let agent = Agent::start();
    let profile: bulkhead_seccomp::profile::Profile = serde_json::from_str(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":36},
            {"names":["kill"],"action":"SCMP_ACT_ERRNO","args":[{"index":1,"value":10,"op":"SCMP_CMP_EQ"}]},
            {"names":["sync"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
    )
    .unwrap();
    let program = bulkhead_seccomp::compile(&profile).unwrap();
    let seccomp = SeccompProgram {
        filter: program.filter.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect(),
        flags: program.flags,
    };
    let script = "mkdir /tmp/d 2>&1; kill -USR1 $$ 2>/dev/null || echo usr1-refused; \
                  kill -0 $$ && echo kill0-ok; sh -c sync; echo sync-rc=$?";
    let expected = "mkdir: can't create directory '/tmp/d': File name too long\nusr1-refused\nkill0-ok\nsync-rc=159\n";
    for (no_new_privileges, uid) in [(false, 0), (true, 0), (false, 65534)] {
        let mut p = as_user(sh(script), uid, uid, &[]);
        p.no_new_privileges = no_new_privileges;
        let c = CreateContainer {
            seccomp: Some(seccomp.clone()),
            ..container(&unique_id("seccomp"), p)
        };
        let (status, out, err) = agent.run_container(c);
        assert_eq!(
            (status, out.as_str()),
            (0, expected),
            "nnp {no_new_privileges}, uid {uid}: {err}"
        );
    }
    let mut c = agent.connect();
    let id = unique_id("seccomp");
    let filtered = CreateContainer {
        seccomp: Some(seccomp),
        ..container(&id, sh("echo ready; exec sleep 1000"))
    };
    let (_, stdio) = agent.start_container(&mut c, filtered);
    stdio.stdout_until("ready\n");
    let (_, out, _) = agent.exec(&mut c, &id, sh("mkdir /tmp/e 2>&1; true"));
    assert!(
        out.contains("File name too long"),
        "an exec ran without the filter: {out}"
    );
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    stdio.finish();
    // Unfiltered by default.
    let (_, out, _) = agent.run(sh("mkdir /tmp/d && echo made"));
    assert_eq!(out, "made\n");
}

/// Docker's and containerd's default device rules: a container's root
/// (which has CAP_MKNOD) may make nodes, but opens only those the rules
/// allow.
#[test]
fn device_rules_deny_nodes_a_container_makes() {
    let agent = Agent::start();
    let rules = defaults::device_rules();
    let script =
        "mknod /dev/kmsgcopy c 1 11 && echo made; head -c1 /dev/kmsgcopy 2>&1 | grep -o 'Operation not permitted'; \
                  head -c1 /dev/zero | wc -c; mknod /dev/disk b 7 0 && echo made; \
                  head -c1 /dev/disk 2>&1 | grep -o 'Operation not permitted'";
    let c = CreateContainer {
        device_rules: rules,
        ..container(&unique_id("devices"), sh(script))
    };
    let (status, out, err) = agent.run_container(c);
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "made\nOperation not permitted\n1\nmade\nOperation not permitted\n");
    // linux.devices: nodes made with their mode and owner, parents too.
    let node = |path: &str, kind: char, major: u32, minor: u32| bulkhead_protocol::messages::DeviceNode {
        path: path.into(),
        kind,
        major,
        minor,
        file_mode: Some(0o620),
        uid: Some(1000),
        gid: Some(5),
    };
    let c = CreateContainer {
        device_nodes: vec![node("/dev/mynull", 'c', 1, 3), node("/dev/net/blk", 'b', 7, 0), node("/dev/null", 'c', 1, 5)],
        ..container(
            &unique_id("nodes"),
            sh("stat -c '%F %t:%T %a %u %g' /dev/mynull /dev/net/blk; echo x > /dev/mynull && head -c1 /dev/null | wc -c"),
        )
    };
    let (status, out, err) = agent.run_container(c);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out, "character special file 1:3 620 1000 5\nblock special file 7:0 620 1000 5\n0\n",
        "/dev/null stays the bound null device"
    );
    // A spec that denies everything (CRI's pause) still has the nodes the
    // agent gives every container, as under runc: a shell can start a
    // background job, which reads /dev/null.
    let deny_all = DeviceRule {
        allow: false,
        kind: 'a',
        major: None,
        minor: None,
        access: "rwm".into(),
    };
    let c = CreateContainer {
        device_rules: vec![deny_all],
        ..container(
            &unique_id("deny-all"),
            sh("sleep 0 & wait; echo x > /dev/null && echo ok"),
        )
    };
    let (status, out, err) = agent.run_container(c);
    assert_eq!((status, out.as_str(), err.as_str()), (0, "ok\n", ""));
    // Without rules the same node opens.
    let (_, out, err) = agent.run(sh("mknod /dev/fullcopy c 1 7 && head -c1 /dev/fullcopy | wc -c"));
    assert_eq!(out, "1\n", "{err}");
}

/// A pod's app containers join its sandbox's IPC, UTS and (when asked)
/// PID namespaces, as their specs name them; others get their own.
#[test]
fn a_pods_containers_share_the_namespaces_they_join() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let pause = unique_id("pause");
    let mut sandbox = container(&pause, sh("echo ready; exec sleep 1000"));
    sandbox.hostname = Some("pod-host".into());
    let (_, stdio) = agent.start_container(&mut c, sandbox);
    stdio.stdout_until("ready\n");
    let view = "for ns in ipc uts pid; do readlink /proc/self/ns/$ns; done; hostname";
    let (status, pod_view, err) = agent.exec(&mut c, &pause, sh(&format!("{view}; echo pod-shm > /dev/shm/obj")));
    assert_eq!(status, 0, "{err}");
    assert!(pod_view.ends_with("pod-host\n"), "{pod_view}");

    // POSIX shared memory (/dev/shm) goes with the IPC namespace.
    let script = format!("{view}; cat /dev/shm/obj /proc/1/cmdline");
    let mut app = container(&unique_id("app"), sh(&script));
    app.join = SharedNamespaces {
        ipc: Some(pause.clone()),
        uts: Some(pause.clone()),
        pid: Some(pause.clone()),
    };
    let (status, out, err) = agent.run_container(app);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        format!("{pod_view}pod-shm\nsleep\x001000\0"),
        "PID 1 is the sandbox's workload"
    );

    // IPC and UTS only: a PID namespace of its own, where it is PID 1.
    let mut app = container(&unique_id("app"), sh(&format!("{view}; echo $$")));
    app.join = SharedNamespaces {
        ipc: Some(pause.clone()),
        uts: Some(pause.clone()),
        pid: None,
    };
    let (status, out, err) = agent.run_container(app);
    assert_eq!(status, 0, "{err}");
    let (own, shared): (Vec<&str>, Vec<&str>) = (out.lines().collect(), pod_view.lines().collect());
    assert_eq!(own[..2], shared[..2], "{out}");
    assert_ne!(own[2], shared[2], "{out}");
    assert_eq!(own[3..], ["pod-host", "1"], "{out}");

    let (_, alone, _) = agent.run(sh(&format!("{view}; cat /dev/shm/obj 2>&1")));
    for (a, b) in alone.lines().zip(pod_view.lines()) {
        assert_ne!(a, b, "a container that joins nothing shares nothing: {alone}");
    }
    assert!(alone.contains("No such file"), "{alone}");
    let mut stray = container(&unique_id("app"), sh("true"));
    stray.join.ipc = Some("no-such-pod".into());
    assert_eq!(
        refusal(c.call(&Request::Create { container: stray })),
        ErrorKind::NotFound
    );
    let mut named = container(&unique_id("app"), sh("true"));
    named.join.uts = Some(pause.clone());
    named.hostname = Some("mine".into());
    assert_eq!(
        refusal(c.call(&Request::Create { container: named })),
        ErrorKind::Invalid
    );

    agent.signal(&mut c, &pause, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &pause, None), 137);
    stdio.finish();
    let mut late = container(&unique_id("app"), sh("true"));
    late.join.pid = Some(pause.clone());
    assert_eq!(refusal(c.call(&Request::Create { container: late })), ErrorKind::Failed);
    agent.assert_serves();
}

#[test]
fn signal_all_reaches_every_process_in_the_container() {
    let agent = Agent::start();
    let mut c = agent.connect();
    // The workload ignores SIGTERM; only `all` reaches the child it started first.
    let id = unique_id("all");
    let script = "sleep 1000 & child=$!; trap '' TERM; echo ready; wait $child; echo child-status:$?";
    let (_, stdio) = agent.start_container(&mut c, container(&id, sh(script)));
    stdio.stdout_until("ready\n");
    agent.signal(&mut c, &id, None, libc::SIGTERM, true);
    assert_eq!(wait_for(&mut c, &id, None), 0);
    let (out, err) = stdio.finish();
    assert_eq!(out, "ready\nchild-status:143\n", "stderr: {err}");

    let id = unique_id("all");
    let script = "sleep 1001 & sleep 1001 & echo ready; wait";
    let (_, stdio) = agent.start_container(&mut c, container(&id, sh(script)));
    stdio.stdout_until("ready\n");
    agent.signal(&mut c, &id, None, libc::SIGKILL, true);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    stdio.finish();
    eventually_none(&agent, "`sleep 1001`", |p| p.cmdline.contains("sleep 1001"));
}

#[test]
fn env_cwd_user_hostname_and_capabilities() {
    let agent = Agent::start();
    // A bare args[0] is looked up in the process's PATH, as execvp does.
    let script = "echo $FOO; pwd; id -u; id -g; id -G; hostname; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status";
    let mut p = as_user(process(&["sh", "-c", script]), 65534, 65534, &[1234]);
    p.env.push("FOO=bar".into());
    p.cwd = "/tmp".into();
    p.no_new_privileges = true;
    let mut ct = container(&unique_id("env"), p);
    ct.hostname = Some("agent-tier-host".into());
    let (status, out, err) = agent.run_container(ct);
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert_eq!(lines[..4], ["bar", "/tmp", "65534", "65534"], "{out}");
    let groups: BTreeSet<&str> = lines[4].split_whitespace().collect();
    assert_eq!(groups, BTreeSet::from(["65534", "1234"]), "id -G: {out}");
    assert_eq!(lines[5], "agent-tier-host");
    let status_of = |s: &str| -> BTreeMap<String, String> {
        s.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    };
    let fields = status_of(&lines[6..].join("\n"));
    assert_eq!(
        fields["CapEff"], "0000000000000000",
        "a non-root user kept capabilities"
    );
    assert_eq!(fields["NoNewPrivs"], "1");

    // Root gets Docker's default set (0xa80425fb), bounding set included.
    let (status, out, err) = agent.run(sh("grep -E '^(Cap(Prm|Eff|Bnd)|NoNewPrivs)' /proc/self/status"));
    assert_eq!(status, 0, "stderr: {err}");
    let fields = status_of(&out);
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(
            fields.get(set).map(String::as_str),
            Some("00000000a80425fb"),
            "{set}: {out}"
        );
    }
    assert_eq!(fields["NoNewPrivs"], "0");
}

#[test]
fn umask_is_the_specs_or_runcs() {
    let agent = Agent::start();
    let script = "umask; f=$(mktemp -u); touch $f; stat -c %a $f; rm $f";
    let (status, out, err) = agent.run(sh(script));
    assert_eq!((status, out.as_str()), (0, "0022\n644\n"), "stderr: {err}");
    let mut p = sh(script);
    p.user.umask = Some(0o077);
    let (status, out, err) = agent.run(p);
    assert_eq!((status, out.as_str()), (0, "0077\n600\n"), "stderr: {err}");
}

#[test]
fn rlimits() {
    let agent = Agent::start();
    let mut p = sh("ulimit -n; ulimit -Hn");
    p.rlimits = vec![Rlimit {
        kind: "RLIMIT_NOFILE".into(),
        soft: 123,
        hard: 456,
    }];
    let (status, out, err) = agent.run(p);
    assert_eq!((status, out.as_str()), (0, "123\n456\n"), "stderr: {err}");
}

#[test]
fn oom_score_adj_is_set_before_the_capabilities_go() {
    let agent = Agent::start();
    // Raising needs no privilege: a non-root user gets it too.
    let mut p = sh("cat /proc/self/oom_score_adj; id -u");
    p.oom_score_adj = Some(500);
    p.user.uid = 1000;
    let (status, out, err) = agent.run(p);
    assert_eq!((status, out.as_str()), (0, "500\n1000\n"), "stderr: {err}");
    // Lowering needs CAP_SYS_RESOURCE, which uid 1000 lacks by the time it
    // runs: the agent sets it first. The guest's agent always holds it; a
    // host that withholds it from this test (some sandboxes do) must see
    // the refusal named instead of a silently ignored value.
    let mut p = sh("cat /proc/self/oom_score_adj");
    p.oom_score_adj = Some(-998);
    p.user.uid = 1000;
    if host_bounding_set_has(CAP_SYS_RESOURCE) {
        let (status, out, err) = agent.run(p);
        assert_eq!((status, out.as_str()), (0, "-998\n"), "stderr: {err}");
    } else {
        let mut c = agent.connect();
        let id = unique_id("oom-adj");
        let mut ct = container(&id, p);
        let stdio = agent.stdio(false);
        ct.stdio = stdio.tokens.clone();
        create(&agent, &mut c, ct);
        let e = c
            .call_started(&Request::Start { container_id: id })
            .expect_err("lowering oom_score_adj without CAP_SYS_RESOURCE")
            .to_string();
        assert!(e.contains("setting oom_score_adj"), "{e}");
    }
}

/// capability.h's number; libc does not carry the capability constants.
const CAP_SYS_RESOURCE: u32 = 24;

fn host_bounding_set_has(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << cap) != 0
}

/// The agent's children are undumpable until `execve`; the workload itself
/// must come out dumpable, or a non-root workload could not read its own
/// /proc/self/environ (and debuggers and core dumps would break).
#[test]
fn a_workload_is_dumpable_again_after_execve() {
    let agent = Agent::start();
    // An undumpable process's /proc files belong to root.
    let mut p = sh("grep -c MARK=x /proc/self/environ; ls -ln /proc/self/environ | awk '{print $3}'; id -u");
    p.env.push("MARK=x".into());
    p.user.uid = 1000;
    let (status, out, err) = agent.run(p);
    assert_eq!((status, out.as_str()), (0, "1\n1000\n1000\n"), "stderr: {err}");
}

#[test]
fn terminal_for_a_container_and_an_exec() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("tty");
    let mut p = sh("tty; read x; echo got:$x; stty size");
    p.terminal = true;
    let mut ct = container(&id, p);
    let mut stdio = agent.terminal_stdio();
    ct.stdio = stdio.tokens.clone();
    create(&agent, &mut c, ct);
    let mut term = stdio.terminal();
    start(&agent, &mut c, &id);
    stdio.stdout_until("/dev/pts/");
    c.call_ok(&Request::ResizeTty {
        container_id: id.clone(),
        exec_id: None,
        rows: 33,
        cols: 101,
    })
    .unwrap();
    term.write_all(b"hi\n").unwrap();
    assert_eq!(wait_for(&mut c, &id, None), 0);
    let (out, _) = stdio.finish();
    assert!(out.contains("got:hi"), "{out:?}");
    assert!(out.contains("33 101"), "stty size after resize_tty: {out:?}");

    let id = unique_id("tty-exec");
    let (_, ctr_stdio) = agent.start_container(&mut c, container(&id, process(&["/bin/sleep", "1000"])));
    let mut stdio = agent.terminal_stdio();
    let mut p = sh("tty; read x; stty size");
    p.terminal = true;
    c.call_started(&Request::Exec {
        container_id: id.clone(),
        exec_id: "term".into(),
        process: p,
        stdio: stdio.tokens.clone(),
    })
    .unwrap_or_else(|e| panic!("exec with a terminal: {e}\n{}", agent.log()));
    let mut term = stdio.terminal();
    stdio.stdout_until("/dev/pts/");
    c.call_ok(&Request::ResizeTty {
        container_id: id.clone(),
        exec_id: Some("term".into()),
        rows: 40,
        cols: 120,
    })
    .unwrap();
    term.write_all(b"\n").unwrap();
    assert_eq!(wait_for(&mut c, &id, Some("term")), 0);
    let (out, _) = stdio.finish();
    assert!(out.contains("40 120"), "stty size after resize_tty: {out:?}");
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
}

#[test]
fn stdin_reaches_the_process_and_closes() {
    let agent = Agent::start();
    let mut c = agent.connect();
    // Half-closing our end closes the process's stdin.
    let id = unique_id("stdin");
    let mut stdio = agent.stdio(true);
    let mut ct = container(&id, process(&["/bin/cat"]));
    ct.stdio = stdio.tokens.clone();
    create(&agent, &mut c, ct);
    let mut input = stdio.stdin();
    start(&agent, &mut c, &id);
    input.write_all(b"abc").unwrap();
    input.shutdown(Shutdown::Write).unwrap();
    assert_eq!(wait_for(&mut c, &id, None), 0);
    assert_eq!(stdio.finish(), ("abc".into(), "".into()));

    // close_stdin does the same while our end stays open.
    let id = unique_id("close-stdin");
    let mut stdio = agent.stdio(true);
    let mut ct = container(&id, process(&["/bin/cat"]));
    ct.stdio = stdio.tokens.clone();
    create(&agent, &mut c, ct);
    let mut input = stdio.stdin();
    start(&agent, &mut c, &id);
    input.write_all(b"xyz\n").unwrap();
    // Once cat echoed it, nothing is in flight for close_stdin to race with.
    stdio.stdout_until("xyz\n");
    c.call_ok(&Request::CloseStdin {
        container_id: id.clone(),
        exec_id: None,
    })
    .unwrap();
    assert_eq!(wait_for(&mut c, &id, None), 0);
    assert_eq!(stdio.finish(), ("xyz\n".into(), "".into()));
    drop(input);

    // And an exec's stdin.
    let id = unique_id("exec-stdin");
    let (_, ctr_stdio) = agent.start_container(&mut c, container(&id, process(&["/bin/sleep", "1000"])));
    let mut stdio = agent.stdio(true);
    c.call_started(&Request::Exec {
        container_id: id.clone(),
        exec_id: "cat".into(),
        process: process(&["/bin/cat"]),
        stdio: stdio.tokens.clone(),
    })
    .unwrap_or_else(|e| panic!("exec with stdin: {e}\n{}", agent.log()));
    let mut input = stdio.stdin();
    input.write_all(b"to-exec").unwrap();
    input.shutdown(Shutdown::Write).unwrap();
    assert_eq!(wait_for(&mut c, &id, Some("cat")), 0);
    assert_eq!(stdio.finish(), ("to-exec".into(), "".into()));
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
}

#[test]
fn exec_joins_a_running_container() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("exec");
    let mut ct = container(&id, process(&["/bin/sleep", "1000"]));
    ct.hostname = Some("exec-host".into());
    let (pid, ctr_stdio) = agent.start_container(&mut c, ct);

    let script =
        r#"echo pid:$$; hostname; for p in /proc/[0-9]*; do echo "${p#/proc/}:$(tr '\0' ' ' < $p/cmdline)"; done"#;
    let (status, out, err) = agent.exec(&mut c, &id, sh(script));
    assert_eq!(status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    let own: u32 = lines
        .first()
        .and_then(|l| l.strip_prefix("pid:"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid line in {out:?}"));
    assert_ne!(own, 1, "the exec is PID 1 of a namespace of its own: {out}");
    assert_eq!(
        lines.get(1),
        Some(&"exec-host"),
        "the exec is not in the container's UTS namespace"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("1:")),
        "no PID 1 in the exec's /proc: {out}"
    );
    assert!(
        lines.iter().any(|l| l.contains(":/bin/sleep 1000")),
        "the exec does not see the container's workload: {out}"
    );

    let pids = list_processes(&mut c, &id);
    assert!(
        pids.contains(&pid),
        "list_processes {pids:?} lacks the started pid {pid}"
    );
    let sleeper = c
        .call_started(&Request::Exec {
            container_id: id.clone(),
            exec_id: "sleeper".into(),
            process: process(&["/bin/sleep", "1000"]),
            stdio: StdioTokens::default(),
        })
        .unwrap();
    let pids = list_processes(&mut c, &id);
    assert!(
        pids.contains(&sleeper),
        "list_processes {pids:?} lacks the exec's pid {sleeper}"
    );
    // A signal to an exec reaches it, not the container.
    agent.signal(&mut c, &id, Some("sleeper"), libc::SIGTERM, false);
    assert_eq!(wait_for(&mut c, &id, Some("sleeper")), 143);
    assert!(
        list_processes(&mut c, &id).contains(&pid),
        "the container died with its exec"
    );

    let mut p = as_user(sh("pwd; id -u; echo $X; exit 5"), 65534, 65534, &[]);
    p.cwd = "/tmp".into();
    p.env.push("X=y".into());
    assert_eq!(agent.exec(&mut c, &id, p), (5, "/tmp\n65534\ny\n".into(), "".into()));

    // An exec id names one process for good: wait must keep meaning it.
    let again = c.call(&Request::Exec {
        container_id: id.clone(),
        exec_id: "sleeper".into(),
        process: process(&["/bin/true"]),
        stdio: StdioTokens::default(),
    });
    assert_eq!(refusal(again), ErrorKind::AlreadyExists);

    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
}

#[test]
fn wait_after_exit_and_for_unknown_ids() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("wait");
    let (_, stdio) = agent.start_container(&mut c, container(&id, sh("exit 7")));
    // Its streams end when it exits, so every wait below comes after the exit.
    stdio.finish();
    assert_eq!(wait_for(&mut c, &id, None), 7);
    assert_eq!(wait_for(&mut agent.connect(), &id, None), 7);
    assert_eq!(wait_for(&mut c, &id, None), 7);

    let id = unique_id("wait-exec");
    let (_, ctr_stdio) = agent.start_container(&mut c, container(&id, process(&["/bin/sleep", "1000"])));
    let stdio = agent.stdio(false);
    c.call_started(&Request::Exec {
        container_id: id.clone(),
        exec_id: "e".into(),
        process: sh("exit 9"),
        stdio: stdio.tokens.clone(),
    })
    .unwrap();
    stdio.finish();
    assert_eq!(wait_for(&mut c, &id, Some("e")), 9);
    assert_eq!(wait_for(&mut c, &id, Some("e")), 9);

    // A blocked wait holds only its own stream; an abandoned one harms nothing.
    let waiter = {
        let mut w = agent.connect();
        let id = id.clone();
        thread::spawn(move || wait_for(&mut w, &id, None))
    };
    let mut abandoned = agent.connect().into_inner();
    frame::send(
        &mut abandoned,
        &Request::Wait {
            container_id: id.clone(),
            exec_id: None,
        },
    )
    .unwrap();
    drop(abandoned);
    assert!(!list_processes(&mut c, &id).is_empty());
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(waiter.join().unwrap(), 137);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();

    assert_eq!(refusal(c.wait("no-such-container", None)), ErrorKind::NotFound);
    assert_eq!(refusal(c.wait(&id, Some("no-such-exec"))), ErrorKind::NotFound);
    agent.assert_serves();
}

#[test]
fn oom_kill_is_reported() {
    require_root();
    if let Err(why) = memory_controller() {
        // Past the test harness's capture, so CI logs show it.
        let _ = writeln!(
            io::stderr(),
            "agent tier: oom_kill_is_reported skipped: {why} (the boot tier covers OOM)"
        );
        return;
    }
    let agent = Agent::start();
    let mut c = agent.connect();
    // Asked before the container runs, on a stream of its own.
    let mut events = agent.connect().into_inner();
    frame::send(&mut events, &Request::NextOomEvent).unwrap();
    let id = unique_id("oom");
    let mut ct = container(&id, sh(r#"a=$(head -c 67108864 /dev/zero | tr "\0" x); echo done"#));
    ct.resources.memory_max_bytes = Some(16 << 20);
    let (_, stdio) = agent.start_container(&mut c, ct);
    assert_eq!(
        wait_for(&mut c, &id, None),
        137,
        "a 64 MiB shell variable under a 16 MiB limit"
    );
    let (out, _) = stdio.finish();
    assert!(!out.contains("done"), "{out}");
    let event: Response = frame::recv(&mut events).unwrap_or_else(|e| panic!("next_oom_event: {e}"));
    assert_eq!(event, Response::Oom { container_id: id });
}

/// The contents of every file named `name` in a cgroup tree.
fn cgroup_files(dir: &Path, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(cgroup_files(&e.path(), name));
        } else if e.file_name() == name {
            found.push(fs::read_to_string(e.path()).unwrap_or_default().trim().to_string());
        }
    }
    found
}

#[test]
fn limits_are_applied_or_refused() {
    require_root();
    // Settle the memory controller first: oom_kill_is_reported may enable it concurrently.
    let _ = memory_controller();
    let delegated = fs::read_to_string(cgroup2_mount().join("cgroup.subtree_control")).unwrap_or_default();
    let agent = Agent::start();
    let mut c = agent.connect();
    let cases = [
        (
            "memory",
            "memory.max",
            Resources {
                memory_max_bytes: Some(32 << 20),
                ..Default::default()
            },
            "33554432",
        ),
        (
            "pids",
            "pids.max",
            Resources {
                pids_max: Some(10),
                ..Default::default()
            },
            "10",
        ),
        (
            "cpu",
            "cpu.max",
            Resources {
                cpu_quota_usec: Some(10_000),
                cpu_period_usec: Some(100_000),
                ..Default::default()
            },
            "10000 100000",
        ),
    ];
    for (controller, file, resources, value) in cases {
        let id = unique_id(controller);
        let mut ct = container(&id, process(&["/bin/sleep", "1000"]));
        ct.resources = resources;
        if !delegated.split_whitespace().any(|d| d == controller) {
            // Running without a limit that was asked for would be worse.
            let r = c.call(&Request::Create { container: ct });
            assert_eq!(
                refusal(r),
                ErrorKind::Failed,
                "a {controller} limit without the controller"
            );
            continue;
        }
        create(&agent, &mut c, ct);
        start(&agent, &mut c, &id);
        let values = cgroup_files(&agent.cgroup, file);
        assert!(
            values.iter().any(|v| v == value),
            "no {file} of {value:?} under {}: {values:?}",
            agent.cgroup.display()
        );
        agent.signal(&mut c, &id, None, libc::SIGKILL, false);
        assert_eq!(wait_for(&mut c, &id, None), 137);
    }
}

#[test]
fn orphans_are_reaped_and_die_with_their_container() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("orphans");
    // Orphans go to PID 1 of the container's namespace: with `init`, the
    // helper reaps them; a workload that is PID 1 itself must, as under runc.
    let with_init = CreateContainer {
        init: true,
        ..container(&id, process(&["/bin/sleep", "1000"]))
    };
    let (_, ctr_stdio) = agent.start_container(&mut c, with_init);
    for _ in 0..5 {
        let (status, _, err) = agent.exec(&mut c, &id, sh("sleep 0.2 & exit 0"));
        assert_eq!(status, 0, "stderr: {err}");
    }
    // The background sleeps outlive their shells; whoever inherits them must reap them.
    eventually_none(&agent, "orphaned `sleep 0.2`, or zombies", |p| {
        p.cmdline.contains("sleep 0.2") || p.state == 'Z'
    });

    // A workload's background process ends with the container's PID namespace.
    let orphaner = unique_id("orphaner");
    create(&agent, &mut c, container(&orphaner, sh("sleep 999 & exit 0")));
    start(&agent, &mut c, &orphaner);
    assert_eq!(wait_for(&mut c, &orphaner, None), 0);
    eventually_none(&agent, "an exited container's `sleep 999`, or zombies", |p| {
        p.cmdline.contains("sleep 999") || p.state == 'Z'
    });

    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
}

/// Whether a failed read means the agent closed the stream.
fn closed(e: &FrameError) -> bool {
    match e {
        FrameError::Closed => true,
        FrameError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Reads until the agent closes the stream; it may say hello, or why, first.
fn expect_closed(s: &mut UnixStream, what: &str) {
    for _ in 0..8 {
        match frame::read_frame(s) {
            Ok(bytes) => {
                if serde_json::from_slice::<Hello>(&bytes).is_ok() {
                    continue;
                }
                match serde_json::from_slice::<Response>(&bytes) {
                    Ok(Response::Error {
                        kind: ErrorKind::Invalid,
                        ..
                    }) => continue,
                    _ => panic!("{what}: unexpected answer {}", String::from_utf8_lossy(&bytes)),
                }
            }
            Err(e) if closed(&e) => return,
            Err(e) => panic!("{what}: the agent kept the stream open ({e})"),
        }
    }
    panic!("{what}: the agent keeps answering instead of closing the stream");
}

/// After a bad request on a handshaken stream: an `invalid` error, after
/// which the stream still works or closes, or the stream closed.
fn refused_or_closed(s: &mut UnixStream, what: &str) {
    match frame::read_frame(s) {
        Ok(bytes) => match serde_json::from_slice::<Response>(&bytes) {
            Ok(Response::Error {
                kind: ErrorKind::Invalid,
                ..
            }) => {}
            _ => panic!(
                "{what}: expected an `invalid` error, got {}",
                String::from_utf8_lossy(&bytes)
            ),
        },
        Err(e) if closed(&e) => return,
        Err(e) => panic!("{what}: no answer and the stream still open ({e})"),
    }
    let probe = Request::Wait {
        container_id: "no-such-container".into(),
        exec_id: None,
    };
    let _ = frame::send(s, &probe);
    match frame::recv::<Response, _>(s) {
        Ok(Response::Error {
            kind: ErrorKind::NotFound,
            ..
        }) => {}
        Ok(other) => panic!("{what}: after the refusal, a wait got {other:?}"),
        Err(e) if closed(&e) => {}
        Err(e) => panic!("{what}: after the refusal, the stream hangs ({e})"),
    }
}

#[test]
fn oversized_and_malformed_frames_are_refused() {
    let mut agent = Agent::start();
    // A hello that announces 4 GiB.
    let mut s = agent.stream();
    write_lossy(&mut s, &u32::MAX.to_be_bytes());
    write_lossy(&mut s, br#"{"protocol":"#);
    expect_closed(&mut s, "a 4 GiB hello");
    agent.assert_serves();

    // Oversized requests after a good handshake: there is no skipping them.
    for len in [MAX_FRAME_BYTES + 1, u32::MAX] {
        let mut s = agent.connect().into_inner();
        write_lossy(&mut s, &len.to_be_bytes());
        write_lossy(&mut s, &[b' '; 4096]);
        expect_closed(&mut s, &format!("a {len}-byte request"));
        agent.assert_serves();
    }

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"{not json".to_vec()),
        ("an unknown op", br#"{"op":"format_disk"}"#.to_vec()),
        (
            "an unknown field",
            br#"{"op":"start","container_id":"a","x":1}"#.to_vec(),
        ),
        ("a wrong type", br#"{"op":"start","container_id":7}"#.to_vec()),
        ("not an object", b"[1,2,3]".to_vec()),
        ("invalid UTF-8", b"{\"op\":\"\xff\xfe\"}".to_vec()),
        ("deep nesting", "[".repeat(500_000).into_bytes()),
    ];
    for (what, payload) in bad {
        let mut s = agent.connect().into_inner();
        frame::write_frame(&mut s, &payload).unwrap();
        refused_or_closed(&mut s, what);
        agent.assert_serves();
    }
    let mut s = agent.connect().into_inner();
    write_lossy(&mut s, &0u32.to_be_bytes());
    refused_or_closed(&mut s, "an empty frame");
    agent.assert_serves();
}

#[test]
fn invalid_requests_are_refused() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let good = || container(&unique_id("bad"), process(&["/bin/true"]));
    let mut cases: Vec<(&str, CreateContainer)> = Vec::new();
    let mut x = good();
    x.process.args.clear();
    cases.push(("empty args", x));
    let mut x = good();
    x.process.args = vec!["x".repeat(MAX_ARGS_BYTES)];
    cases.push(("oversized args", x));
    let mut x = good();
    x.root.device = "/etc/passwd".into();
    cases.push(("a root device that is no /dev/vdX", x));
    let mut x = good();
    x.root.device = "/dev/vda/../../etc/passwd".into();
    cases.push(("a root device with '..'", x));
    let mut x = good();
    x.root.fstype = "nfs".into();
    cases.push(("an nfs root", x));
    let mut x = good();
    x.mounts.push(Mount {
        destination: "/mnt".into(),
        kind: "nfs".into(),
        source: "server:/export".into(),
        options: vec![],
    });
    cases.push(("an nfs mount", x));
    let mut x = good();
    x.mounts.push(Mount {
        destination: "/x/../../etc".into(),
        kind: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
    });
    cases.push(("a mount destination with '..'", x));
    let mut x = good();
    x.id = "../escape".into();
    cases.push(("an id with '..'", x));
    let mut x = good();
    x.hostname = Some("bad host".into());
    cases.push(("a hostname with a space", x));
    let mut x = good();
    x.process.cwd = "tmp".into();
    cases.push(("a relative cwd", x));
    let mut x = good();
    x.process.env.push("NOEQUALS".into());
    cases.push(("an env entry without '='", x));
    let mut x = good();
    x.process.rlimits.push(Rlimit {
        kind: "RLIMIT_BOGUS".into(),
        soft: 1,
        hard: 1,
    });
    cases.push(("an unknown rlimit", x));
    let mut x = good();
    x.masked_paths.push("relative".into());
    cases.push(("a relative masked path", x));
    let mut x = good();
    x.resources.memory_max_bytes = Some(1000);
    cases.push(("a memory limit below 1 MiB", x));
    let mut x = good();
    x.process.terminal = true;
    x.stdio.stdin = Some("a".repeat(32));
    cases.push(("a terminal with a stdin stream", x));
    let mut x = good();
    x.stdio.stdout = Some("b".repeat(32));
    cases.push(("a stdio token no stream was attached under", x));
    let mut x = good();
    x.stdio.stdout = Some("not-a-token".into());
    cases.push(("a malformed stdio token", x));
    for (what, ct) in cases {
        assert_eq!(
            refusal(c.call(&Request::Create { container: ct })),
            ErrorKind::Invalid,
            "create with {what}"
        );
    }
    let others = [
        Request::Signal {
            container_id: "a".into(),
            exec_id: None,
            signal: 0,
            all: false,
        },
        Request::Signal {
            container_id: "a".into(),
            exec_id: None,
            signal: 65,
            all: false,
        },
        Request::Exec {
            container_id: "a".into(),
            exec_id: "../e".into(),
            process: process(&["/bin/true"]),
            stdio: StdioTokens::default(),
        },
        Request::Wait {
            container_id: "".into(),
            exec_id: None,
        },
    ];
    for req in others {
        assert_eq!(refusal(c.call(&req)), ErrorKind::Invalid, "{req:?}");
    }

    // A refused create leaves its id free; a taken one is refused.
    let mut x = container("reused", process(&["/bin/true"]));
    x.root.fstype = "nfs".into();
    assert_eq!(refusal(c.call(&Request::Create { container: x })), ErrorKind::Invalid);
    create(&agent, &mut c, container("reused", process(&["/bin/true"])));
    let again = c.call(&Request::Create {
        container: container("reused", process(&["/bin/true"])),
    });
    assert_eq!(refusal(again), ErrorKind::AlreadyExists);

    let none = "no-such-container".to_string();
    let unknown = [
        Request::Start {
            container_id: none.clone(),
        },
        Request::Exec {
            container_id: none.clone(),
            exec_id: "e".into(),
            process: process(&["/bin/true"]),
            stdio: StdioTokens::default(),
        },
        Request::Signal {
            container_id: none.clone(),
            exec_id: None,
            signal: 9,
            all: false,
        },
        Request::ListProcesses {
            container_id: none.clone(),
        },
        Request::CloseStdin {
            container_id: none.clone(),
            exec_id: None,
        },
        Request::ResizeTty {
            container_id: none.clone(),
            exec_id: None,
            rows: 1,
            cols: 1,
        },
    ];
    for req in unknown {
        assert_eq!(refusal(c.call(&req)), ErrorKind::NotFound, "{req:?}");
    }
    agent.assert_serves();
}

#[test]
fn mismatched_hellos_are_answered_then_closed() {
    let mut agent = Agent::start();
    let ours = Hello::ours("agent-tier");
    let bad = [
        Hello {
            version: 0,
            ..ours.clone()
        },
        Hello {
            version: PROTOCOL_VERSION + 1,
            ..ours.clone()
        },
        Hello {
            protocol: "kata-agent".into(),
            ..ours.clone()
        },
    ];
    for hello in bad {
        let mut s = agent.stream();
        frame::send(&mut s, &hello).unwrap();
        let theirs: Hello = frame::recv(&mut s).unwrap_or_else(|e| panic!("no hello back for {hello:?}: {e}"));
        assert_eq!(
            (theirs.protocol.as_str(), theirs.version),
            (PROTOCOL_NAME, PROTOCOL_VERSION)
        );
        expect_closed(&mut s, &format!("after {hello:?}"));
    }
    // Not hellos at all; a request in a hello's place is not obeyed.
    let mut s = agent.stream();
    frame::send(&mut s, &Request::Shutdown).unwrap();
    expect_closed(&mut s, "a shutdown in place of a hello");
    let mut s = agent.stream();
    frame::write_frame(
        &mut s,
        br#"{"protocol":"bulkhead-agent","version":1,"software":"x","extra":1}"#,
    )
    .unwrap();
    expect_closed(&mut s, "a hello with an unknown field");
    agent.assert_serves();
}

#[test]
fn abrupt_and_many_clients_do_not_hurt_the_agent() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("abrupt");
    let (_, ctr_stdio) = agent.start_container(&mut c, container(&id, process(&["/bin/sleep", "1000"])));
    // 50: even if the agent noticed none of these closing yet, they and
    // the blocked waits stay under its 64 streams, so each connect here is
    // served whatever the host's load.
    for i in 0..50 {
        let s = match i % 5 {
            0 => agent.stream(),
            1 => {
                let mut s = agent.stream();
                write_lossy(&mut s, &[0, 0]);
                s
            }
            2 => {
                let mut s = agent.stream();
                write_lossy(&mut s, &serde_json::to_vec(&Hello::ours("abrupt")).unwrap());
                s
            }
            3 => {
                let mut s = agent.connect().into_inner();
                write_lossy(&mut s, &100u32.to_be_bytes());
                write_lossy(&mut s, br#"{"op":"#);
                s
            }
            _ => {
                let mut s = agent.connect().into_inner();
                let wait = Request::Wait {
                    container_id: id.clone(),
                    exec_id: None,
                };
                frame::send(&mut s, &wait).unwrap();
                s
            }
        };
        drop(s);
    }
    agent.assert_serves();

    // More idle streams than the agent serves at once (64): a stream it
    // already serves keeps working, and the slots come back.
    let socket = agent.socket();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let held: Vec<io::Result<UnixStream>> = (0..100).map(|_| UnixStream::connect(&socket)).collect();
        let _ = tx.send(held);
    });
    let held = rx.recv_timeout(TIMEOUT).expect("connecting 100 streams blocked");
    assert!(
        !list_processes(&mut c, &id).is_empty(),
        "the served stream stopped working"
    );
    drop(held);
    // The agent frees a slot when it sees the stream close: poll for it.
    agent.serves_again();

    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
    agent.assert_serves();
}

#[test]
fn root_filesystem_is_a_throwaway_overlay() {
    let agent = Agent::start();
    let script = r#"echo evil >> /etc/passwd && echo new > /newfile && mkdir /root/d && rm /bin/tr && cat /newfile && tail -n 1 /etc/passwd && awk '$2 == "/" {print $3}' /proc/mounts"#;
    let (status, out, err) = agent.run(sh(script));
    assert_eq!((status, out.as_str()), (0, "new\nevil\noverlay\n"), "stderr: {err}");
    // The next container starts from the pristine image.
    let script = "grep -c evil /etc/passwd; test -e /newfile && echo newfile; test -e /root/d && echo dir; test -e /bin/tr && echo tr";
    let (status, out, err) = agent.run(sh(script));
    assert_eq!((status, out.as_str()), (0, "0\ntr\n"), "stderr: {err}");
    let rootfs = agent.rootfs.clone();
    drop(agent);
    assert_eq!(sha256(&rootfs.image), rootfs.sha256, "the read-only root image changed");
}

#[test]
fn read_only_root_refuses_writes_but_not_to_its_mounts() {
    let agent = Agent::start();
    let mut c = container(
        &unique_id("ro-root"),
        sh(
            "(echo x > /newfile) 2>&1; (mkdir /etc/d) 2>&1; echo ok > /dev/shm/f && cat /dev/shm/f; \
         awk '$2 == \"/\" {print $4}' /proc/mounts | cut -d, -f1",
        ),
    );
    c.root.readonly = true;
    let (status, out, err) = agent.run_container(c);
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out.matches("Read-only file system").count(),
        2,
        "a write to / was not refused:\n{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[lines.len() - 2..],
        ["ok", "ro"],
        "/dev/shm not writable or / not ro:\n{out}"
    );
    // The default stays writable.
    let (status, out, err) = agent.run(sh("echo x > /newfile && cat /newfile"));
    assert_eq!((status, out.as_str()), (0, "x\n"), "stderr: {err}");
}

/// Namespaced sysctls land in the container's own IPC namespace, not the
/// agent's (here the host's, in the guest the VM's).
#[test]
fn sysctls_are_set_in_the_containers_namespaces() {
    let agent = Agent::start();
    let host_shmmax = fs::read_to_string("/proc/sys/kernel/shmmax").unwrap();
    let mut c = container(
        &unique_id("sysctl"),
        sh("cat /proc/sys/kernel/shmmax /proc/sys/fs/mqueue/msg_max"),
    );
    c.sysctl = [
        ("kernel.shmmax".to_string(), "123456789".to_string()),
        ("fs.mqueue.msg_max".to_string(), "17".to_string()),
    ]
    .into();
    let (status, out, err) = agent.run_container(c);
    assert_eq!((status, out.as_str()), (0, "123456789\n17\n"), "stderr: {err}");
    assert_eq!(fs::read_to_string("/proc/sys/kernel/shmmax").unwrap(), host_shmmax);
}

#[test]
fn masked_and_read_only_paths_and_dev() {
    let agent = Agent::start();
    let mut script = String::new();
    for p in MASKED_PATHS {
        script += &format!(
            "if [ -d {p} ]; then echo \"{p}:$(ls -A {p} 2>/dev/null | wc -l)\"; \
             elif [ -e {p} ]; then echo \"{p}:$(cat {p} 2>/dev/null | wc -c)\"; else echo {p}:absent; fi\n"
        );
    }
    script += "(echo agent-tier > /proc/sys/kernel/domainname) 2>&1\n";
    script += "for d in null zero full random urandom tty; do test -c /dev/$d && echo dev:$d; done\n";
    script += "grep '^0::' /proc/self/cgroup\n";
    script += "cat /proc/self/mountinfo\n";
    let (status, out, err) = agent.run(sh(&script));
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");

    for p in MASKED_PATHS {
        let want = if Path::new(p).exists() { "0" } else { "absent" };
        let line = format!("{p}:{want}");
        assert!(
            out.lines().any(|l| l == line),
            "{p} is not masked: want {line:?} in\n{out}"
        );
    }
    assert!(
        out.contains("Read-only file system"),
        "a write to /proc/sys was not refused as read-only:\n{out}"
    );
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        assert!(out.lines().any(|l| l == format!("dev:{d}")), "no /dev/{d}:\n{out}");
    }
    let mounts: Vec<(&str, &str)> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 6 && f[0].parse::<u32>().is_ok())
        .map(|f| (f[4], f[5]))
        .collect();
    // A cgroup namespace: the container's cgroup is its root.
    assert!(
        out.lines().any(|l| l == "0::/"),
        "the container sees the host's cgroup tree:\n{out}"
    );
    let from_defaults = defaults::mounts()
        .into_iter()
        .filter(|m| m.options.iter().any(|o| o == "ro"));
    let ro_mounts: Vec<String> = from_defaults.map(|m| m.destination).collect();
    for p in READONLY_PATHS
        .iter()
        .copied()
        .chain(ro_mounts.iter().map(String::as_str))
    {
        if !Path::new(p).exists() {
            continue;
        }
        // The last mount on a point is the one on top.
        let opts = mounts.iter().rev().find(|(m, _)| *m == p).map(|(_, o)| *o);
        let opts = opts.unwrap_or_else(|| panic!("{p} is not a mount point in the container:\n{out}"));
        assert!(opts.split(',').any(|o| o == "ro"), "{p} is mounted {opts}");
    }
}

#[test]
fn shutdown_ends_the_agent_and_every_container() {
    let mut agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("shutdown");
    let (_, stdio) = agent.start_container(&mut c, container(&id, process(&["/bin/sleep", "1000"])));
    c.call_started(&Request::Exec {
        container_id: id.clone(),
        exec_id: "e".into(),
        process: process(&["/bin/sleep", "999"]),
        stdio: StdioTokens::default(),
    })
    .unwrap();
    let ours: Vec<ProcInfo> = agent.descendants();
    for cmd in ["/bin/sleep 1000", "/bin/sleep 999"] {
        assert!(ours.iter().any(|p| p.cmdline == cmd), "no {cmd:?} among {ours:#?}");
    }
    let status = agent.shutdown();
    assert!(
        status.success(),
        "the agent exited {status} after shutdown\n{}",
        agent.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours.iter().any(|p| !p.is_gone()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<&ProcInfo> = ours.iter().filter(|p| !p.is_gone()).collect();
    assert!(left.is_empty(), "processes outlived the agent: {left:#?}");
    // The agent's ends of the streams went with it.
    stdio.finish();
}

/// `reseed` takes host entropy (the listener mode mixes it in but never
/// sets the host's clock) and refuses too little or non-hex entropy.
#[test]
fn reseed_takes_entropy_and_refuses_bad_input() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    c.call_ok(&Request::Reseed {
        entropy: "5a".repeat(32),
        realtime_ns: now,
    })
    .unwrap();
    for bad in ["5a".repeat(8), "zz".repeat(32)] {
        let r = c.call(&Request::Reseed {
            entropy: bad,
            realtime_ns: now,
        });
        assert_eq!(refusal(r), ErrorKind::Invalid);
    }
    assert_eq!(agent.run(sh("echo still")).1, "still\n");
}

/// close_stdin while the copy into a workload that never reads is blocked
/// (the pipe is full) answers at once, and the agent keeps serving.
#[test]
fn close_stdin_does_not_wait_for_a_blocked_copy() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("stuck-stdin");
    let mut stdio = agent.stdio(true);
    let mut ct = container(&id, process(&["/bin/sleep", "1000"]));
    ct.stdio = stdio.tokens.clone();
    create(&agent, &mut c, ct);
    let mut input = stdio.stdin();
    start(&agent, &mut c, &id);
    // More than a pipe holds; the writer thread blocks, and that is fine.
    let writer = thread::spawn(move || {
        let _ = input.write_all(&vec![b'x'; 1 << 20]);
        input
    });
    thread::sleep(Duration::from_millis(300));
    c.call_ok(&Request::CloseStdin {
        container_id: id.clone(),
        exec_id: None,
    })
    .unwrap();
    assert!(!list_processes(&mut c, &id).is_empty());
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    stdio.finish();
    drop(writer);
}

/// A helper init keeps only CAP_KILL and is not dumpable; device nodes
/// made inside the container give no access (nodev).
#[test]
fn container_init_is_unprivileged_and_devices_are_inert() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let id = unique_id("init-caps");
    let with_init = CreateContainer {
        init: true,
        ..container(&id, process(&["/bin/sleep", "1000"]))
    };
    let (_, ctr_stdio) = agent.start_container(&mut c, with_init);
    let (status, out, err) = agent.exec(&mut c, &id, sh("grep -E '^Cap(Eff|Bnd)' /proc/1/status"));
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "CapEff:\t0000000000000020\nCapBnd:\t0000000000000020\n");
    let (status, out, _) = agent.exec(
        &mut c,
        &id,
        sh("mknod /tmp/zero c 1 5 && head -c 1 /tmp/zero; echo rc=$?"),
    );
    assert_eq!(status, 0);
    assert!(out.ends_with("rc=1\n"), "a mknod'ed /dev/zero was readable: {out:?}");
    agent.signal(&mut c, &id, None, libc::SIGKILL, false);
    assert_eq!(wait_for(&mut c, &id, None), 137);
    ctr_stdio.finish();
}
