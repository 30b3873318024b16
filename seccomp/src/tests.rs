use super::bpf::run;
use super::profile::*;
use super::*;

const X86_64: u32 = AUDIT_ARCH_X86_64;

fn profile(json: &str) -> Profile {
    serde_json::from_str(json).unwrap()
}

fn nr(name: &str) -> u32 {
    syscall_number(name).unwrap()
}

fn decide(p: &Program, name: &str, args: [u64; 6]) -> u32 {
    run(&p.filter, nr(name), X86_64, args)
}

#[test]
fn the_table_matches_the_kernels_numbers() {
    for (name, n) in [
        ("read", libc::SYS_read),
        ("execve", libc::SYS_execve),
        ("clone3", libc::SYS_clone3),
        ("personality", libc::SYS_personality),
        ("io_uring_setup", libc::SYS_io_uring_setup),
    ] {
        assert_eq!(syscall_number(name), Some(n as u32), "{name}");
    }
    assert_eq!(syscall_number("no_such_call"), None);
}

/// The shape of containerd's RuntimeDefault: deny by default, an allow
/// list, argument conditions, an errno of its own, and a kill.
#[test]
fn a_runtime_default_like_profile_decides_per_call_and_argument() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
            "syscalls":[
              {"names":["read","write","exit_group","not_a_call"],"action":"SCMP_ACT_ALLOW"},
              {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
              {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]},
              {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
              {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
              {"names":["reboot"],"action":"SCMP_ACT_KILL_PROCESS"},
              {"names":["getpid"],"action":"SCMP_ACT_LOG"}]}"#,
    ))
    .unwrap();
    let eperm = RET_ERRNO | 1;
    assert_eq!(decide(&p, "read", [0; 6]), RET_ALLOW);
    assert_eq!(decide(&p, "exit_group", [0; 6]), RET_ALLOW);
    assert_eq!(decide(&p, "mount", [0; 6]), eperm);
    assert_eq!(decide(&p, "personality", [0; 6]), RET_ALLOW);
    assert_eq!(decide(&p, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(decide(&p, "personality", [8, 0, 0, 0, 0, 0]), eperm);
    assert_eq!(decide(&p, "personality", [0x1_0000_0000, 0, 0, 0, 0, 0]), eperm);
    // CLONE_NEWUSER (0x10000000) is one of the masked bits.
    assert_eq!(decide(&p, "clone", [0x0001_1200, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(decide(&p, "clone", [0x1000_0000, 0, 0, 0, 0, 0]), eperm);
    assert_eq!(decide(&p, "clone3", [0; 6]), RET_ERRNO | 38);
    assert_eq!(decide(&p, "reboot", [0; 6]), RET_KILL_PROCESS);
    assert_eq!(decide(&p, "getpid", [0; 6]), RET_LOG);
    assert_eq!(p.unknown, ["not_a_call"]);
    // Another ABI ends the process; x32 numbers get ENOSYS, as in the guest.
    assert_eq!(run(&p.filter, nr("read"), 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(run(&p.filter, 0x4000_0000, X86_64, [0; 6]), RET_ERRNO | 38);
}

#[test]
fn comparisons_are_on_64_bit_values() {
    let values = [
        0,
        1,
        7,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_0007,
        0xffff_ffff_0000_0000,
        u64::MAX,
    ];
    type Holds = fn(u64, u64) -> bool;
    let ops: [(&str, Holds); 6] = [
        ("SCMP_CMP_EQ", |a, b| a == b),
        ("SCMP_CMP_NE", |a, b| a != b),
        ("SCMP_CMP_LT", |a, b| a < b),
        ("SCMP_CMP_LE", |a, b| a <= b),
        ("SCMP_CMP_GT", |a, b| a > b),
        ("SCMP_CMP_GE", |a, b| a >= b),
    ];
    for (op, holds) in ops {
        for v in values {
            let p = compile(&profile(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["kill"],"action":"SCMP_ACT_ERRNO",
                    "args":[{{"index":1,"value":{v},"op":"{op}"}}]}}]}}"#
            )))
            .unwrap();
            for arg in values {
                let expected = if holds(arg, v) { RET_ERRNO | 1 } else { RET_ALLOW };
                assert_eq!(
                    decide(&p, "kill", [0, arg, 0, 0, 0, 0]),
                    expected,
                    "{arg:#x} {op} {v:#x}"
                );
            }
        }
    }
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":2,"value":18446744069414584335,"valueTwo":4294967297,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
    ))
    .unwrap();
    // mask 0xffffffff0000000f, datum 0x0000000100000001
    assert_eq!(decide(&p, "kill", [0, 0, 0x1_0000_00f1, 0, 0, 0]), RET_ERRNO | 1);
    assert_eq!(decide(&p, "kill", [0, 0, 0x1_0000_00f2, 0, 0, 0]), RET_ALLOW);
    assert_eq!(decide(&p, "kill", [0, 0, 0x3_0000_0001, 0, 0, 0]), RET_ALLOW);
}

#[test]
fn conditions_of_a_rule_all_hold_unless_one_argument_repeats() {
    let both = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},{"index":1,"value":9,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .unwrap();
    assert_eq!(decide(&both, "kill", [1, 9, 0, 0, 0, 0]), RET_ERRNO | 1);
    assert_eq!(decide(&both, "kill", [1, 8, 0, 0, 0, 0]), RET_ALLOW);
    let either = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":1,"value":9,"op":"SCMP_CMP_EQ"},{"index":1,"value":15,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .unwrap();
    assert_eq!(decide(&either, "kill", [0, 9, 0, 0, 0, 0]), RET_ERRNO | 1);
    assert_eq!(decide(&either, "kill", [0, 15, 0, 0, 0, 0]), RET_ERRNO | 1);
    assert_eq!(decide(&either, "kill", [0, 2, 0, 0, 0, 0]), RET_ALLOW);
}

#[test]
fn what_cannot_be_applied_is_refused_by_name() {
    let refused = |json: &str| compile(&profile(json)).unwrap_err().to_string();
    let e = refused(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
    assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
    let e = refused(r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#);
    assert!(e.contains("listenerPath"), "{e}");
    let e = refused(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#);
    assert!(e.contains("x86_64"), "{e}");
    let e = refused(r#"{"defaultAction":"SCMP_ACT_SOMETIMES"}"#);
    assert!(e.contains("SCMP_ACT_SOMETIMES"), "{e}");
    let e = refused(r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}"#);
    assert!(e.contains("SECCOMP_FILTER_FLAG_NEW_LISTENER"), "{e}");
    let e = refused(r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":70000}"#);
    assert!(e.contains("errnoRet"), "{e}");
    let e = refused(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
    );
    assert!(e.contains("argument index 6"), "{e}");
    let e = refused(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO"},
            {"names":["kill"],"action":"SCMP_ACT_KILL"}]}"#,
    );
    assert!(e.contains("kill has two unconditional rules"), "{e}");
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_TSYNC"]}"#,
    ))
    .unwrap();
    assert_eq!(p.flags, FLAG_LOG);
}

/// Every known call allowed, one by one: still under the kernel's limit.
#[test]
fn an_allow_list_of_every_call_fits() {
    let names: Vec<String> = super::syscalls::X86_64.iter().map(|(n, _)| format!("{n:?}")).collect();
    let p = compile(&profile(&format!(
        r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}}]}}"#,
        names.join(",")
    )))
    .unwrap();
    assert!(p.filter.len() <= MAX_INSNS, "{}", p.filter.len());
    assert_eq!(decide(&p, "mount", [0; 6]), RET_ALLOW);
}
