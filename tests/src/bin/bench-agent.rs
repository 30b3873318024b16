//! Agent benchmarks, for the numbers in notes and the README.
//!
//! `bench-agent host [N]`: the real agent as a host process (the agent
//! tier's debug listener mode); time from `create` to the workload's first
//! output byte, and the round trip of `exec true` into a running container.
//!
//! `bench-agent vm [BOOTS] [N]`: real sandboxes (`bulkhead_runtime::sandbox::Sandbox`, the
//! project's kernel and the static agent's initramfs); boot to agent-ready,
//! then `run echo` and `exec true` round trips inside one sandbox.
//!
//! Each figure is a median and p95 over its runs; nothing here asserts.

use bulkhead_runtime::stdio::StdioPlan;
use std::io::Read;
use std::time::{Duration, Instant};

use bulkhead_protocol::messages::{Request, StdioTokens};
use bulkhead_tests::agent::{self, Agent};

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p95 = v[((v.len() * 95).div_ceil(100)).saturating_sub(1)];
    println!(
        "{name:<34} n={:<3} median {:>9.2} ms   p95 {:>9.2} ms   min {:>9.2} ms",
        v.len(),
        ms(v[v.len() / 2]),
        ms(p95),
        ms(v[0])
    );
}

fn host(n: usize) {
    agent::require_root();
    let a = Agent::start();
    let mut c = a.connect();
    let mut first_output = Vec::new();
    for i in 0..n {
        let id = format!("bench-{i}");
        let mut spec = agent::container(&id, agent::process(&["echo", "hi"]));
        let (tokens, streams) = a.open_stdio(StdioPlan::default());
        spec.stdio = StdioTokens { stderr: None, ..tokens };
        let mut out = streams.stdout.unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            out.read_exact(&mut b).unwrap();
            let t = Instant::now();
            let mut rest = Vec::new();
            out.read_to_end(&mut rest).unwrap();
            t
        });
        let t0 = Instant::now();
        c.call_ok(&Request::Create { container: spec }).unwrap();
        c.call_started(&Request::Start {
            container_id: id.clone(),
        })
        .unwrap();
        let t1 = reader.join().unwrap();
        first_output.push(t1 - t0);
        assert_eq!(c.wait(&id, None).unwrap(), 0);
        c.call_ok(&Request::Delete { container_id: id }).unwrap();
    }
    summary("host: create -> first output", first_output);

    let (_, _stdio) = a.start_container(&mut c, agent::container("long", agent::process(&["sleep", "100000"])));
    let mut exec = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        c.call_started(&Request::Exec {
            container_id: "long".into(),
            exec_id: format!("e{i}"),
            process: agent::process(&["true"]),
            stdio: StdioTokens::default(),
        })
        .unwrap();
        assert_eq!(c.wait("long", Some(&format!("e{i}"))).unwrap(), 0);
        exec.push(t0.elapsed());
    }
    summary("host: exec true (round trip)", exec);
}

fn vm(boots: usize, n: usize) {
    use bulkhead_runtime::paths::Artifacts;
    use bulkhead_runtime::rootfs::ImageCache;
    use bulkhead_runtime::sandbox::{Sandbox, SandboxConfig};

    let dir = tempfile::tempdir().unwrap();
    let initramfs = bulkhead_tests::guest_initramfs(dir.path());
    let cache = ImageCache::new(dir.path().join("cache"));
    let image = bulkhead::default_rootfs::default_image(&cache, &mut |_| {}).unwrap();
    let mut cfg = SandboxConfig::new(
        Artifacts {
            kernel: bulkhead_tests::kernel(),
            initramfs,
            vmm: bulkhead_tests::vmm_bin(),
        },
        image,
    );
    cfg.runtime_root = Some(dir.path().join("run"));
    let mut ready = Vec::new();
    let mut last = None;
    for _ in 0..boots {
        drop(last.take());
        let t0 = Instant::now();
        let sb = Sandbox::boot(&cfg).unwrap();
        ready.push(t0.elapsed());
        last = Some(sb);
    }
    summary("vm: boot -> agent ready", ready);
    let sb = last.unwrap();
    let mut run = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let out = sb.run_process(agent::process(&["echo", "hi"]), None).unwrap();
        run.push(t0.elapsed());
        assert_eq!(out.stdout_text(), "hi\n");
    }
    summary("vm: run echo (create..exit)", run);
    let mut c = sb.client().unwrap();
    let spec = sb.container("long", agent::process(&["sleep", "100000"]));
    let _streams = sb.create(&mut c, spec, Default::default()).unwrap();
    sb.start(&mut c, "long").unwrap();
    let mut exec = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let out = sb.exec("long", agent::process(&["true"]), None).unwrap();
        exec.push(t0.elapsed());
        assert_eq!(out.status, 0);
    }
    summary("vm: exec true (round trip)", exec);
    sb.shutdown().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("host") => host(num(1, 20)),
        Some("vm") => vm(num(1, 2), num(2, 5)),
        _ => {
            eprintln!("usage: bench-agent host [N] | vm [BOOTS] [N]");
            std::process::exit(2);
        }
    }
}
