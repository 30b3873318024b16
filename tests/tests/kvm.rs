//! kvm tier: tiny hand-written guests (tests/guests/*.S) under the real
//! /dev/kvm, booted by the real bulkhead-vmm through its own set-up.

use bulkhead_protocol::guest_env::PVM_GLIBC_TUNABLE;
use bulkhead_tests::{require_kvm, run_vmm, text, HostKind};

const SERIAL_RESET: &str = env!("GUEST_SERIAL_RESET");
const LONG_MODE: &str = env!("GUEST_LONG_MODE");
const TRIPLE_FAULT: &str = env!("GUEST_TRIPLE_FAULT");
const INT3: &str = env!("GUEST_INT3");
const SPIN: &str = env!("GUEST_SPIN");
const TOUCH_RAM: &str = env!("GUEST_TOUCH_RAM");
const VSOCK_RX_FLOOD: &str = env!("GUEST_VSOCK_RX_FLOOD");

/// Every guest gets a VMM timeout so a regression cannot hang the suite.
fn boot(kernel: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--kernel", kernel, "--mem-mib", "32", "--timeout", "120"];
    args.extend_from_slice(extra);
    run_vmm(args)
}

#[test]
fn serial_guest_prints_and_resets_through_i8042() {
    require_kvm();
    let out = boot(SERIAL_RESET, &[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("kvm-tier: hello from the serial guest"),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn guest_enters_long_mode_and_reads_boot_params() {
    require_kvm();
    let out = boot(LONG_MODE, &["--cmdline", "hello-from-the-vmm x=1"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("kvm-tier: long mode ok, cmdline: hello-from-the-vmm x=1"),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn template_params_are_appended_to_the_users_cmdline() {
    require_kvm();
    let out = boot(LONG_MODE, &["--cmdline", "mine", "--cpu-template", "pvm", "--no-rng"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("cmdline: mine noxsave clearcpuid="), "{stdout}");
    // Last, what init gets as its environment (protocol::guest_env).
    let env = format!(" bulkhead.no_int3_selftest GLIBC_TUNABLES={PVM_GLIBC_TUNABLE}\n");
    assert!(stdout.contains(&env), "{stdout}");
    let out = boot(LONG_MODE, &["--cmdline", "mine", "--cpu-template", "host", "--no-rng"]);
    assert!(text(&out.stdout).contains("cmdline: mine\n"), "{}", text(&out.stdout));
}

#[test]
fn serial_can_go_to_a_file_or_nowhere() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let out = boot(SERIAL_RESET, &["--serial", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("hello"));
    assert!(std::fs::read_to_string(&log).unwrap().contains("kvm-tier: hello"));
    let out = boot(SERIAL_RESET, &["--serial", "off"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("hello"));
}

#[test]
fn triple_fault_ends_the_vmm_with_an_error() {
    require_kvm();
    let out = boot(TRIPLE_FAULT, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
    assert!(stderr.contains("triple fault on vCPU 0"), "{stderr}");
    assert!(stderr.contains("RIP 0x"), "{stderr}");
}

#[test]
fn unexecutable_instruction_is_named() {
    let kind = require_kvm();
    let out = boot(INT3, &[]);
    let stderr = text(&out.stderr);
    match kind {
        // The emulator cannot run int3: the error names it by its bytes.
        HostKind::Pvm => {
            assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
            assert!(stderr.contains("emulation failure"), "{stderr}");
            assert!(stderr.contains("instruction bytes: cc"), "{stderr}");
            assert!(stderr.contains("RIP 0x0000000000200"), "{stderr}");
        }
        // Natively int3 runs, finds no IDT, and the CPU shuts down.
        _ => {
            assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
            assert!(stderr.contains("triple fault"), "{stderr}");
        }
    }
}

#[test]
fn timeout_ends_a_stuck_guest() {
    require_kvm();
    let out = run_vmm(["--kernel", SPIN, "--mem-mib", "32", "--timeout", "1"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    // No KVM needed: validation happens before any VM exists.
    let out = run_vmm(["--kernel", SERIAL_RESET, "--vcpus", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`vcpus`"), "{}", text(&out.stderr));
    let out = run_vmm(["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`kernel`"), "{}", text(&out.stderr));
    let out = run_vmm(["--kernel", SERIAL_RESET, "--cpu-template", "t2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--cpu-template"), "{}", text(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, format!(r#"{{"kernel":"{SERIAL_RESET}","mem_mib":"lots"}}"#)).unwrap();
    let out = run_vmm(["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("mem_mib"), "{}", text(&out.stderr));
}

#[test]
fn json_config_boots_and_flags_override_it() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"kernel":"{LONG_MODE}","cmdline":"from-json","mem_mib":32,"timeout_secs":120,"rng":false}}"#),
    )
    .unwrap();
    let out = run_vmm(["--config", cfg.to_str().unwrap(), "--cpu-template", "host"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cmdline: from-json\n"));
    let out = run_vmm([
        "--config",
        cfg.to_str().unwrap(),
        "--cmdline",
        "from-flag",
        "--cpu-template",
        "host",
    ]);
    assert!(
        text(&out.stdout).contains("cmdline: from-flag\n"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn several_vcpus_start_and_the_boot_cpu_runs() {
    require_kvm();
    let out = boot(SERIAL_RESET, &["--vcpus", "4"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("kvm-tier: hello"));
}

#[test]
fn virtio_devices_are_announced_on_the_cmdline() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let disk_arg = format!("{},ro", disk.display());
    let uds = dir.path().join("v.sock");
    let vsock_arg = format!("3,{}", uds.display());
    let out = boot(
        LONG_MODE,
        &[
            "--cmdline",
            "x",
            "--cpu-template",
            "host",
            "--disk",
            &disk_arg,
            "--vsock",
            &vsock_arg,
        ],
    );
    let stdout = text(&out.stdout);
    // Disk, vsock, rng: one MMIO page and one interrupt line each, in order.
    assert!(
        stdout.contains(
            "cmdline: x virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7\n"
        ),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(!uds.exists(), "the vsock socket was left behind");
}

#[test]
fn termination_signal_stops_the_vmm_and_cleans_up() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let child = std::process::Command::new(bulkhead_tests::vmm_bin())
        .args(["--kernel", SPIN, "--mem-mib", "32", "--timeout", "120", "--vsock"])
        .arg(format!("3,{}", uds.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The socket appears once the devices exist; the guest then spins.
    for _ in 0..600 {
        if uds.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(uds.exists(), "the VMM never created its vsock socket");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(!uds.exists(), "the vsock socket was left behind");
}

/// A guest that writes to all of its RAM makes the host back all of it,
/// and the VMM still fits the memory limit the runtime gives its host
/// cgroup (guest RAM plus the VMM's allowance): it is not OOM-killed, and
/// the cgroup is charged at least the guest's RAM and at most the limit.
/// A guest can go no further: its RAM is all the memory it has. Under a
/// limit below its RAM, the same VMM is killed by the host's OOM killer:
/// the limit is what holds.
#[test]
fn a_guest_using_all_its_ram_stays_inside_the_vmm_cgroup_limit() {
    use bulkhead_runtime::host_cgroup::Limits;
    use bulkhead_runtime::vmm_process::can_make_namespaces;
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;
    require_kvm();
    if !can_make_namespaces() {
        eprintln!("skipped: host cgroups need root");
        return;
    }
    const MEM_MIB: u32 = 256;
    let limits = Limits::for_vm(1, MEM_MIB);
    let mut run = TouchRam::start("fits", limits);
    let line = loop {
        let text = std::fs::read_to_string(run.console()).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("touched RAM")) {
            break l.to_string();
        }
        if let Some(status) = run.vmm.try_status().unwrap() {
            panic!(
                "the VMM ended ({status}) before its guest had touched its RAM: {}",
                run.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(line.contains(&format!("up to {MEM_MIB} MiB")), "{line}");
    let used = run.cg.usage().memory_bytes.expect("the memory controller's figure");
    let ram = u64::from(MEM_MIB) << 20;
    eprintln!(
        "charged {} MiB for {MEM_MIB} MiB of guest RAM, limit {} MiB",
        used >> 20,
        limits.memory_bytes >> 20
    );
    assert!(used >= ram - ram / 10, "charged {used} bytes for {ram} of guest RAM");
    assert!(
        used <= limits.memory_bytes,
        "charged {used} over the limit {}",
        limits.memory_bytes
    );
    assert_eq!(run.vmm.try_status().unwrap(), None, "the VMM did not survive its guest");
    run.vmm.kill().unwrap();

    // With swap, a cgroup over its limit pages out rather than OOM-kills.
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().count() > 1 {
        eprintln!("skipped the OOM half: this host has swap");
        return;
    }
    let tight = Limits {
        memory_bytes: 64 << 20,
        ..limits
    };
    let mut run = TouchRam::start("oom", tight);
    let status = run
        .vmm
        .wait_timeout(Duration::from_secs(600))
        .unwrap()
        .expect("a VMM over its cgroup's limit kept running");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}: {}", run.log());
    let console = std::fs::read_to_string(run.console()).unwrap_or_default();
    assert!(!console.contains("touched RAM"), "{console}");
}

/// `touch_ram` under the real VMM, in a host cgroup of its own.
struct TouchRam {
    // Dropped first: the VMM is killed before its cgroup is removed.
    vmm: bulkhead_runtime::vmm_process::VmmProcess,
    cg: bulkhead_runtime::host_cgroup::HostCgroup,
    dir: tempfile::TempDir,
}

impl TouchRam {
    fn start(name: &str, limits: bulkhead_runtime::host_cgroup::Limits) -> TouchRam {
        use bulkhead_runtime::host_cgroup::HostCgroup;
        use bulkhead_runtime::vmm_process::{Launch, LaunchConfig, VmmProcess};
        use bulkhead_vmm_api::config::{SerialOutput, VmConfig};
        use std::os::fd::AsRawFd;
        let path = format!("/bulkhead-kvm-tier-{}-{name}", std::process::id());
        let cg = HostCgroup::create(&path, limits).unwrap();
        let procs = cg.procs_files().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = Launch {
            vmm: bulkhead_tests::vmm_bin(),
            config: LaunchConfig::Boot(VmConfig {
                mem_mib: 256,
                serial: SerialOutput::File(dir.path().join("console.log")),
                timeout_secs: Some(900),
                ..VmConfig::new(TOUCH_RAM)
            }),
            config_file: dir.path().join("vmm.json"),
            log: dir.path().join("vmm.log"),
            join_cgroups: procs.iter().map(|f| f.as_raw_fd()).collect(),
            own_namespaces: false,
            jail: None,
        };
        let vmm = VmmProcess::spawn(&spec).unwrap();
        TouchRam { vmm, cg, dir }
    }

    fn console(&self) -> std::path::PathBuf {
        self.dir.path().join("console.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmm.log")).unwrap_or_default()
    }
}

/// A guest that keeps its vsock rx ring full of buffers pointing past its
/// RAM, and notifies without pause, while a host peer waits to connect
/// (so the device always has a packet to try): the VMM refuses buffer
/// after buffer, and SIGTERM still ends it, cleanly, with its socket gone.
#[test]
fn sigterm_ends_a_vmm_whose_guest_floods_vsock_rx_with_bad_buffers() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let log = dir.path().join("vmm.log");
    let mut child = std::process::Command::new(bulkhead_tests::vmm_bin())
        .args([
            "--kernel",
            VSOCK_RX_FLOOD,
            "--mem-mib",
            "32",
            "--no-rng",
            "--timeout",
            "300",
            "--vsock",
        ])
        .arg(format!("3,{}", uds.display()))
        .env("BULKHEAD_LOG", "bulkhead_vmm::devices::virtio::vsock=debug,info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut banner = [0u8; 28];
    std::io::Read::read_exact(&mut stdout, &mut banner).unwrap();
    assert_eq!(&banner, b"kvm-tier: flooding vsock rx\n");
    let mut peer = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    peer.write_all(b"CONNECT 1234\n").unwrap();
    // The refusals show in the log; wait for a good many of them.
    let refused = |s: &str| s.matches("malformed rx chain").count();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if refused(&text) >= 1000 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the VMM ended under the flood: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    eprintln!("SIGTERM under the flood: exited after {:?}", t0.elapsed());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "{}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert!(text.contains("stopped by SIGTERM"));
    assert!(!uds.exists(), "the vsock socket was left behind");
}
