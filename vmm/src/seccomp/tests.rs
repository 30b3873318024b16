use super::*;

#[test]
fn every_thread_kind_compiles_and_allows_little() {
    for (kind, n) in rule_counts().unwrap() {
        assert!(n > 10 && n < 80, "{}: {n} rules", kind.name());
        let rules = rules::for_thread(kind).unwrap();
        for refused in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_clone, libc::SYS_sysinfo] {
            assert!(!rules.contains_key(&refused), "{} allows {refused}", kind.name());
        }
    }
    // Guest-facing threads never open files.
    for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
        assert!(!rules::for_thread(kind).unwrap().contains_key(&libc::SYS_openat));
    }
    assert!(Filters::compile(SeccompPolicy::Off).unwrap().is_none());
}

/// The README publishes the counts; they must be these.
#[test]
fn the_readme_states_the_rule_counts() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let rows: Vec<String> = rule_counts()
        .unwrap()
        .into_iter()
        .map(|(kind, n)| format!("| {} thread | {n} |", kind.name()))
        .collect();
    for row in &rows {
        assert!(
            readme.contains(row),
            "README.md lacks the row `{row}`; expected {rows:#?}"
        );
    }
}

/// Forks, runs `child` under `kind`'s enforced filter, and returns how the
/// child ended.
fn in_filtered_child(filters: &Filters, kind: ThreadKind, child: fn()) -> libc::c_int {
    // SAFETY: the child makes only async-signal-safe calls (seccomp,
    // prctl, write, the call under test, _exit) and allocates nothing.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        if apply(Some(filters), kind).is_err() {
            // SAFETY: ends the forked child at once.
            unsafe { libc::_exit(100) };
        }
        child();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[test]
fn a_refused_call_ends_the_process_with_sigsys_and_allowed_ones_run() {
    let filters = Filters::compile(SeccompPolicy::Enforce).unwrap().unwrap();
    for kind in ThreadKind::ALL {
        let status = in_filtered_child(&filters, kind, || {
            // SAFETY: getppid has no preconditions; no filter allows it.
            unsafe { libc::getppid() };
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{}: status {status:#x}",
            kind.name()
        );
        let status = in_filtered_child(&filters, kind, || {
            // SAFETY: an empty write to stderr; every filter allows write.
            unsafe { libc::write(2, std::ptr::null(), 0) };
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{}",
            kind.name()
        );
    }
}

#[test]
fn executable_mappings_are_refused() {
    let filters = Filters::compile(SeccompPolicy::Enforce).unwrap().unwrap();
    let status = in_filtered_child(&filters, ThreadKind::Vcpu, || {
        // SAFETY: an anonymous mapping; its address is never used.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
    });
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
}
