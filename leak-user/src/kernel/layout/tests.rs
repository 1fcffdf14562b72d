//! The resolver against real kernels' BTF: the running kernel's, and each kernel of the suite
//! in `$LEAK_TEST_BTF_DIR` (named `<kernel release>.btf`; `cargo xtask test` extracts them from
//! Debian's kernel packages), checked for the facts that kernel is in the suite for.

use super::*;
use crate::experiment::harness::{current_test, skip, SkipKind};

fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Whether the memcg statistics array is indexed by the compact memcg index (6.10+:
/// `state[MEMCG_VMSTAT_SIZE]`, only the items memcg keeps) rather than by
/// `enum node_stat_item` / `enum memcg_stat_item` (`[MEMCG_NR_STAT]`).
fn compact_stats_index(resolver: &Resolver, layout: &Layout) -> bool {
    let array = if layout.stats_scheme == stats_scheme::INLINE_ARRAY {
        resolver.member("mem_cgroup", "vmstats")
    } else {
        resolver.member("memcg_vmstats", "state")
    }
    .expect("the memcg statistics array");
    let (_, ty) = resolver.btf.resolve(array.type_id).expect("its type");
    let (_, slots) = ty.array.expect("the memcg statistics are an array");
    let all_items = resolver
        .enumerator("MEMCG_NR_STAT")
        .expect("enum memcg_stat_item ends with MEMCG_NR_STAT");
    i64::from(slots) < all_items
}

/// Checks facts about a layout that hold for any kernel of its version.
fn check(release: &str, resolver: &Resolver) -> Layout {
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
    let compact = compact_stats_index(resolver, &layout);
    if version >= (6, 12) {
        assert!(compact, "{release}: compact memcg stats index");
    } else if version < (6, 10) {
        assert!(!compact, "{release}: memcg stats indexed by stat item");
    }
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
    // From 6.15 `failcnt` is counted for v1 only (`page_counter.track_failcnt`).
    assert_eq!(
        layout.failcnt_v1_only,
        u32::from(version >= (6, 15)),
        "{release}: failcnt kept for v1 only"
    );
    // Every kernel of 5.11 and later keeps all twelve items in its memcg statistics; 5.10
    // keeps page tables per zone, not per memcg.
    let absent = layout
        .stat_index
        .iter()
        .filter(|&&index| index == Layout::ABSENT)
        .count();
    assert_eq!(
        absent,
        usize::from(version < (5, 11)),
        "{release}: {:?}",
        layout.stat_index
    );
    assert_ne!(layout.memcg_memory_events, Layout::ABSENT, "{release}");
    // v1's memory+swap counter is in every kernel of the suite (sharing a union with v2's
    // `swap` on newer ones); whether it is charged is the loader's to say, not BTF's.
    assert_ne!(
        layout.memcg_memsw,
        Layout::ABSENT,
        "{release}: mem_cgroup.memsw"
    );
    assert_ne!(layout.memcg_memsw, layout.memcg_memory, "{release}");
    assert_eq!(layout.memsw_accounted, 0, "{release}");
    eprintln!("{release}: {layout:?}");
    layout
}

/// A kernel of the suite and the facts it is there for.
struct Expected {
    /// Matches releases that start with it; the longest matching prefix wins.
    release_prefix: &'static str,
    why: &'static str,
    /// `mark_victim_has_task`: 0 for `TP_PROTO(int pid)`, 1 for the task prototype.
    mark_victim_has_task: u32,
    stats_scheme: u32,
    compact_stats_index: bool,
    rss_scheme: u32,
    /// `Layout::stat_index` (anon, file, shmem, file_dirty, file_writeback, slab_reclaimable,
    /// slab_unreclaimable, kernel_stack, pagetables, sock, percpu, swap); `A` is absent.
    stat_index: [u32; stat::COUNT],
    /// `Layout::memory_event_index` (max, oom, oom_kill, oom_group_kill).
    memory_event_index: [u32; memory_event::COUNT],
}

const A: u32 = Layout::ABSENT;

/// xtask's `BTF_KERNELS`: 5.10.0-30, the newest 5.10, 6.1 and 6.12 (Debian cloud kernels).
const SUITE: &[Expected] = &[
    Expected {
        release_prefix: "5.10.0-30-",
        why: "5.10.218: `mark_victim(int pid)`, before the 5.10.235 backport",
        mark_victim_has_task: 0,
        stats_scheme: stats_scheme::INLINE_ARRAY,
        compact_stats_index: false,
        rss_scheme: rss_scheme::ATOMIC_ARRAY,
        stat_index: [17, 19, 23, 20, 21, 5, 6, 36, A, 38, 39, 37],
        memory_event_index: [2, 3, 4, A],
    },
    Expected {
        // Any later Debian 5.10 ABI (5.10.0-46 when written): after the backport.
        release_prefix: "5.10.0-",
        why: "the newest 5.10: the backported task prototype, inline memcg stats",
        mark_victim_has_task: 1,
        stats_scheme: stats_scheme::INLINE_ARRAY,
        compact_stats_index: false,
        rss_scheme: rss_scheme::ATOMIC_ARRAY,
        stat_index: [17, 19, 23, 20, 21, 5, 6, 36, A, 38, 39, 37],
        memory_event_index: [2, 3, 4, A],
    },
    Expected {
        release_prefix: "6.1.",
        why: "memcg stats behind a pointer (6.1), atomic rss counters (before 6.2), the \
              task prototype backported in 6.1.130",
        mark_victim_has_task: 1,
        stats_scheme: stats_scheme::POINTER,
        compact_stats_index: false,
        rss_scheme: rss_scheme::ATOMIC_ARRAY,
        stat_index: [17, 19, 23, 20, 21, 5, 6, 37, 38, 44, 45, 43],
        memory_event_index: [2, 3, 4, 5],
    },
    Expected {
        release_prefix: "6.12.",
        why: "the compact memcg stats index (6.10), percpu rss counters (6.2)",
        mark_victim_has_task: 1,
        stats_scheme: stats_scheme::POINTER,
        compact_stats_index: true,
        rss_scheme: rss_scheme::PERCPU_COUNTER_ARRAY,
        stat_index: [14, 16, 19, 17, 18, 5, 6, 23, 24, 32, 33, 31],
        memory_event_index: [2, 3, 4, 5],
    },
];

/// The expectation for `release`: the one with the longest matching prefix.
fn expected_for(release: &str) -> Option<&'static Expected> {
    SUITE
        .iter()
        .filter(|expected| release.starts_with(expected.release_prefix))
        .max_by_key(|expected| expected.release_prefix.len())
}

#[test]
fn suite_prefixes_pick_each_kernel() {
    let pick = |release| expected_for(release).map(|e| e.release_prefix);
    assert_eq!(pick("5.10.0-30-cloud-amd64"), Some("5.10.0-30-"));
    assert_eq!(pick("5.10.0-46-cloud-amd64"), Some("5.10.0-"));
    assert_eq!(pick("6.1.0-57-cloud-amd64"), Some("6.1."));
    assert_eq!(pick("6.12.118+deb13-cloud-amd64"), Some("6.12."));
    assert_eq!(pick("6.10.1"), None);
    assert_eq!(pick("5.10.0-300-cloud-amd64"), Some("5.10.0-"));
}

#[test]
fn resolves_the_running_kernel() {
    let path = Path::new(VMLINUX_BTF);
    if !path.exists() {
        skip(
            &current_test(),
            &format!(
                "{VMLINUX_BTF} is missing (a kernel without CONFIG_DEBUG_INFO_BTF), so the \
                 resolver was not tested on this kernel"
            ),
            SkipKind::HidesFeature,
        );
        return;
    }
    let resolver = Resolver::from_file(path).expect("parse running kernel's BTF");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let layout = check(release.trim(), &resolver);

    // The memory controller's index must agree with /proc/cgroups, which lists the
    // controllers in subsystem-id order.
    let cgroups = std::fs::read_to_string("/proc/cgroups").expect("/proc/cgroups");
    let index = cgroups
        .lines()
        .filter(|line| !line.starts_with('#'))
        .position(|line| line.split_whitespace().next() == Some("memory"))
        .expect("memory controller in /proc/cgroups");
    assert_eq!(layout.memory_subsys_id as usize, index);
}

#[test]
fn resolves_the_suite_kernels() {
    let Some(dir) = std::env::var_os("LEAK_TEST_BTF_DIR") else {
        skip(
            &current_test(),
            "LEAK_TEST_BTF_DIR is unset, so the resolver was not tested on the suite's kernels \
             (`cargo xtask test` sets it)",
            SkipKind::HidesFeature,
        );
        return;
    };
    let dir = Path::new(&dir);
    let mut releases: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("LEAK_TEST_BTF_DIR {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "btf"))
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_owned()))
        .collect();
    releases.sort();
    let mut seen: Vec<&str> = Vec::new();
    for release in &releases {
        let expected = expected_for(release).unwrap_or_else(|| {
            panic!(
                "{}/{release}.btf: no kernel of the suite matches it; add what it is there for",
                dir.display()
            )
        });
        assert!(
            !seen.contains(&expected.release_prefix),
            "two kernels in {} match `{}`",
            dir.display(),
            expected.release_prefix
        );
        seen.push(expected.release_prefix);
        let resolver = Resolver::from_file(&dir.join(format!("{release}.btf"))).expect("parse BTF");
        let layout = check(release, &resolver);
        let why = expected.why;
        assert_eq!(
            layout.mark_victim_has_task, expected.mark_victim_has_task,
            "{release} ({why}): mark_victim prototype"
        );
        assert_eq!(
            layout.stats_scheme, expected.stats_scheme,
            "{release} ({why}): memcg stats scheme"
        );
        assert_eq!(
            compact_stats_index(&resolver, &layout),
            expected.compact_stats_index,
            "{release} ({why}): compact memcg stats index"
        );
        assert_eq!(
            layout.rss_scheme, expected.rss_scheme,
            "{release} ({why}): rss scheme"
        );
        assert_eq!(
            layout.stat_index, expected.stat_index,
            "{release} ({why}): memcg stat items (A = absent)"
        );
        assert_eq!(
            layout.memory_event_index, expected.memory_event_index,
            "{release} ({why}): memory events"
        );
    }
    let missing: Vec<&str> = SUITE
        .iter()
        .map(|expected| expected.release_prefix)
        .filter(|prefix| !seen.contains(prefix))
        .collect();
    assert!(
        missing.is_empty(),
        "no BTF in {} for the suite's kernels {missing:?} (has {releases:?})",
        dir.display()
    );
}

#[test]
fn missing_member_is_named() {
    let Ok(resolver) = Resolver::from_file(Path::new(VMLINUX_BTF)) else {
        skip(
            &current_test(),
            &format!("{VMLINUX_BTF} cannot be read, so error naming was not checked on it"),
            SkipKind::HidesFeature,
        );
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

/// Found by the fuzzer: `oom_control` with an anonymous member of type `oom_control`. The
/// resolver must refuse it, not recurse until the stack overflows.
#[test]
fn a_struct_nested_in_itself_is_an_error() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/btf/regression-oom-control-nests-itself");
    let data = std::fs::read(&seed).expect("the committed regression seed");
    let btf = Btf::parse(&data).expect("the blob is well-formed BTF");
    let err = Resolver::new(btf)
        .layout()
        .expect_err("a self-nesting struct");
    assert!(err.to_string().contains("corrupt"), "{err}");
}
