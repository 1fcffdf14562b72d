//! The resolver against real kernels' BTF: the running kernel's, and every `*.btf` file in
//! `$LEAK_TEST_BTF_DIR` (named `<kernel release>.btf`; `cargo xtask test` extracts them from
//! Debian's kernel packages).

use super::*;

fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Checks facts about a layout that hold for a kernel of this version.
fn check(release: &str, resolver: &Resolver) {
    let layout = resolver
        .layout()
        .unwrap_or_else(|err| panic!("{release}: {err}"));
    let version = kernel_version(release);
    let expected_stats = if version >= (6, 1) {
        stats_scheme::POINTER
    } else if version >= (5, 13) {
        stats_scheme::EMBEDDED_STRUCT
    } else {
        stats_scheme::INLINE_ARRAY
    };
    assert_eq!(
        layout.stats_scheme, expected_stats,
        "{release}: stats scheme"
    );
    let expected_rss = if version >= (6, 2) {
        rss_scheme::PERCPU_COUNTER_ARRAY
    } else {
        rss_scheme::ATOMIC_ARRAY
    };
    assert_eq!(layout.rss_scheme, expected_rss, "{release}: rss scheme");
    assert_eq!(layout.lru_stat_index, [0, 1, 2, 3, 4], "{release}");
    // `comm` is a 16-byte array and `pid`/`tgid` are adjacent ints in every kernel.
    assert_eq!(layout.task_tgid, layout.task_pid + 4, "{release}");
    assert_ne!(layout.counter_usage, layout.counter_max, "{release}");
    assert!(resolver.has_btf_tracepoint("mark_victim"), "{release}");
    if version >= (6, 9) {
        assert_eq!(
            layout.mark_victim_has_task, 1,
            "{release}: 6.9 passes the task"
        );
    }
    if version >= (6, 1) {
        assert_ne!(
            layout.counter_failcnt,
            Layout::ABSENT,
            "{release}: failcnt kept"
        );
    }
    eprintln!("{release}: {layout:?}");
}

#[test]
fn resolves_the_running_kernel() {
    let path = Path::new(VMLINUX_BTF);
    if !path.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{VMLINUX_BTF} is missing, so the resolver was not tested on this kernel"
        );
        eprintln!("SKIP: {VMLINUX_BTF} is missing (kernel without CONFIG_DEBUG_INFO_BTF)");
        return;
    }
    let resolver = Resolver::from_file(path).expect("parse running kernel's BTF");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    check(release.trim(), &resolver);

    // The memory controller's index must agree with /proc/cgroups, which lists the
    // controllers in subsystem-id order.
    let cgroups = std::fs::read_to_string("/proc/cgroups").expect("/proc/cgroups");
    let index = cgroups
        .lines()
        .filter(|line| !line.starts_with('#'))
        .position(|line| line.split_whitespace().next() == Some("memory"))
        .expect("memory controller in /proc/cgroups");
    let layout = resolver.layout().expect("layout");
    assert_eq!(layout.memory_subsys_id as usize, index);
}

#[test]
fn resolves_other_kernels() {
    let Some(dir) = std::env::var_os("LEAK_TEST_BTF_DIR") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "LEAK_TEST_BTF_DIR is unset, so no other kernel's BTF was checked \
             (cargo xtask test sets it)"
        );
        eprintln!("SKIP: LEAK_TEST_BTF_DIR is unset; run through `cargo xtask test`");
        return;
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("LEAK_TEST_BTF_DIR") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("btf") {
            continue;
        }
        let release = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        check(release, &Resolver::from_file(&path).expect("parse"));
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no .btf files in {}",
        Path::new(&dir).display()
    );
}

#[test]
fn missing_member_is_named() {
    let Ok(resolver) = Resolver::from_file(Path::new(VMLINUX_BTF)) else {
        eprintln!("SKIP: no kernel BTF");
        return;
    };
    let err = resolver.offset("task_struct", "no_such_member").err();
    assert_eq!(
        err.map(|e| e.to_string()).unwrap_or_default(),
        "kernel BTF: `struct task_struct` has no member `no_such_member`"
    );
    let err = resolver.offset("no_such_struct", "x").err();
    assert_eq!(
        err.map(|e| e.to_string()).unwrap_or_default(),
        "kernel BTF has no type `struct no_such_struct`"
    );
}

#[test]
fn parses_tracepoint_format() {
    let format = "name: mark_victim\nID: 470\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
        \tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n";
    assert_eq!(tracepoint_field_offset(format, "pid"), Some(8));
    assert_eq!(tracepoint_field_offset(format, "common_pid"), Some(4));
    assert_eq!(tracepoint_field_offset(format, "comm"), Some(12));
    assert_eq!(tracepoint_field_offset(format, "uid"), None);
}
