use leak_common::event::{constraint, flags, MemcgSnapshot, OomKillEvent, MAX_CGROUP_DEPTH};

use super::*;
use crate::{
    decode::event::fixtures::{event, level, record, PAGE, UNLIMITED},
    enrich::{dedup::VictimDedup, procfs::fill_from_procfs},
    model::kill::{CauseKind, NotKilledReason, OomAttribution as Attribution},
};

fn context() -> KillContext<'static> {
    KillContext {
        page_size: PAGE,
        realtime_offset_ns: 1_700_000_000_000_000_000,
        attach_mode: "tp_btf",
        seq: 1,
        freshness: StatsFreshness::default(),
        same_oom_cgroup_id: None,
        cgroup_v2: Some(true),
        kill_witness: true,
    }
}

/// Decodes `event` and assembles its kill, as the agent does.
fn build_kill(event: &OomKillEvent, context: &KillContext<'_>, paths: &mut CgroupPaths) -> Kill {
    assemble(&record(event), context, paths)
}

#[test]
fn builds_paths_from_kernel_names_when_the_chain_reaches_the_root() {
    let ev = event(&[
        level(30, "child", 100, UNLIMITED, 5),
        level(20, "parent", 1024, 1024, 200),
        level(1, "", 5000, UNLIMITED, 1000),
    ]);
    let mut paths = CgroupPaths::new(None);
    let kill = build_kill(&ev, &context(), &mut paths);
    assert_eq!(kill.cgroup, "/parent/child");
    assert_eq!(kill.cgroups[2].path, "/");
    // The child is far below its (absent) limit; the parent's usage reached its limit.
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/parent"));
    assert_eq!(kill.attribution, Attribution::Inferred);
    assert_eq!(kill.constraint, Constraint::Memcg);
    assert_eq!(kill.usage_bytes, 1024 * PAGE);
    assert_eq!(kill.limit_bytes, Some(1024 * PAGE));
    assert_eq!(kill.inactive_file_bytes, 200 * PAGE);
    assert_eq!(kill.working_set_bytes, (1024 - 200) * PAGE);
    assert_eq!(kill.cgroups[0].limit_bytes, None);
    assert!(kill.cgroups[1].hit_limit && !kill.cgroups[0].hit_limit);
    assert_eq!(kill.victim_comm.as_deref(), Some("leak"));
    assert_eq!(
        kill.victim_rss.as_ref().map(|r| r.anon_bytes),
        Some(100 * PAGE)
    );
    assert_eq!(
        paths.lookup(30).as_deref(),
        Some("/parent/child"),
        "learned"
    );
}

#[test]
fn oom_control_names_the_cgroup_and_a_global_oom_has_none() {
    let mut ev = event(&[level(30, "pod", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
    ev.flags |= flags::HAS_OOM_CONTROL;
    ev.oc_constraint = constraint::NONE;
    ev.oc_memcg_cgroup_id = 0;
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None, "global OOM: no cgroup hit a limit");
    assert_eq!(kill.constraint, Constraint::None);
    assert_eq!(kill.attribution, Attribution::OomControl);
    // For a global OOM the headline figures describe the victim's own cgroup.
    assert_eq!(kill.usage_bytes, 10 * PAGE);

    ev.oc_constraint = constraint::MEMCG;
    ev.oc_memcg_cgroup_id = 1;
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/"));
    assert_eq!(kill.constraint, Constraint::Memcg);
    assert_eq!(kill.limit_bytes, None);
}

#[test]
fn inference_allows_one_huge_page_of_slack_and_no_more() {
    let ev = event(&[
        level(30, "a", 1000 - 512, 1000, 0),
        level(1, "", 5000, UNLIMITED, 0),
    ]);
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/a"));
    let ev = event(&[
        level(30, "a", 1000 - 513, 1000, 0),
        level(1, "", 5000, UNLIMITED, 0),
    ]);
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None);
    assert_eq!(kill.constraint, Constraint::None);
}

#[test]
fn a_chain_cut_by_the_depth_bound_is_marked_partial() {
    let levels: Vec<MemcgSnapshot> = (0..MAX_CGROUP_DEPTH as u64)
        .map(|i| level(100 + i, &format!("l{i}"), 1, UNLIMITED, 0))
        .collect();
    let kill = build_kill(&event(&levels), &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.cgroup, ".../l7/l6/l5/l4/l3/l2/l1/l0");
    let mut paths = CgroupPaths::new(None);
    paths.learn(107, "/deep/er/l7");
    let kill = build_kill(&event(&levels), &context(), &mut paths);
    assert_eq!(kill.cgroup, "/deep/er/l7/l6/l5/l4/l3/l2/l1/l0");
}

#[test]
fn an_unresolved_victim_keeps_only_its_pid() {
    let mut ev = event(&[level(30, "a", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
    ev.flags &= !(flags::VICTIM_TASK | flags::RSS_VALID);
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.victim_pid, 4242);
    assert_eq!(kill.victim_comm, None);
    assert_eq!(kill.victim_rss, None);
    assert!(!kill.victim_task_resolved);
}

#[test]
fn json_has_the_documented_keys() {
    let ev = event(&[level(30, "a", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    let json = serde_json::to_value(&kill).expect("serialize");
    for key in [
        "victim_pid",
        "victim_comm",
        "cgroup",
        "oom_cgroup",
        "usage_bytes",
        "limit_bytes",
        "working_set_bytes",
        "inactive_file_bytes",
        "attach_mode",
        "timestamp",
        "cgroups",
        "trigger",
        "oom_control",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
}

#[test]
fn threads_and_repeats_of_one_process_are_one_victim() {
    let levels = [level(30, "a", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)];
    let mut paths = CgroupPaths::new(None);
    let mut dedup = VictimDedup::default();
    let first = build_kill(&event(&levels), &context(), &mut paths);
    assert!(dedup.first_report(&first));
    // The same process met again on the group walk, then one of its other threads.
    assert!(!dedup.first_report(&first));
    let mut thread = event(&levels);
    thread.victim_pid = 4243;
    let thread = build_kill(&thread, &context(), &mut paths);
    assert_eq!((thread.victim_pid, thread.victim_tid), (4242, 4243));
    assert!(!dedup.first_report(&thread));
    // Another process is another victim; the same pid much later is a new process.
    let mut other = event(&levels);
    other.victim_pid = 5000;
    other.victim_tgid = 5000;
    assert!(dedup.first_report(&build_kill(&other, &context(), &mut paths)));
    let mut later = event(&levels);
    later.boot_ns += 60_000_000_000;
    assert!(dedup.first_report(&build_kill(&later, &context(), &mut paths)));
}

#[test]
fn a_later_member_of_the_same_oom_inherits_its_cgroup() {
    // The group's usage already fell well below its limit when this member was marked.
    let levels = [
        level(30, "group", 100, 1000, 0),
        level(1, "", 5000, UNLIMITED, 0),
    ];
    let mut context = context();
    let kill = build_kill(&event(&levels), &context, &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None);
    context.same_oom_cgroup_id = Some(30);
    let kill = build_kill(&event(&levels), &context, &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/group"));
    assert_eq!(kill.constraint, Constraint::Memcg);
    // A hint outside the victim's chain is ignored.
    context.same_oom_cgroup_id = Some(99);
    let kill = build_kill(&event(&levels), &context, &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None);
}

/// A kill whose victim the kernel program named by thread id alone, completed from a fake
/// procfs holding `/proc/<tid>/status`.
fn named_from_procfs(tid: u32, status: &str) -> Kill {
    named_from_fake_procfs(tid, &[(tid, status)])
}

/// The same, from a fake procfs holding `/proc/<pid>/status` for each of `files`.
fn named_from_fake_procfs(tid: u32, files: &[(u32, &str)]) -> Kill {
    // Unique per call: tests run in parallel, and several use the same tid.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root =
        std::env::temp_dir().join(format!("leak-procfs-{tid}-{}-{call}", std::process::id()));
    for (pid, status) in files {
        std::fs::create_dir_all(root.join(pid.to_string())).unwrap();
        std::fs::write(root.join(format!("{pid}/status")), status).unwrap();
    }
    let mut ev = event(&[level(30, "a", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
    ev.flags &= !flags::VICTIM_TASK;
    ev.victim_pid = tid;
    let mut kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    fill_from_procfs(&mut kill, &root);
    std::fs::remove_dir_all(&root).unwrap();
    kill
}

#[test]
fn an_unresolved_victim_is_named_from_procfs() {
    let kill = named_from_procfs(4243, "Name:\ttokio-rt-worker\nTgid:\t4242\nPid:\t4243\n");
    assert_eq!((kill.victim_pid, kill.victim_tid), (4242, 4243));
    assert_eq!(kill.victim_comm.as_deref(), Some("tokio-rt-worker"));
    assert!(
        !kill.victim_task_resolved,
        "the snapshot itself is still the trigger's"
    );
}

#[test]
fn an_unresolved_victim_is_its_namespace_main_process_by_its_leader() {
    // A worker thread marked while the leader, pid 1 of its namespace, has exited.
    let kill = named_from_fake_procfs(
        4243,
        &[
            (
                4243,
                "Name:\tworker\nTgid:\t4242\nPid:\t4243\nNSpid:\t4243\t7\n",
            ),
            (
                4242,
                "Name:\tleak\nTgid:\t4242\nPid:\t4242\nNSpid:\t4242\t1\n",
            ),
        ],
    );
    assert_eq!((kill.victim_pid, kill.victim_tid), (4242, 4243));
    assert_eq!(kill.victim_ns_pid, Some(1));
    assert_eq!(kill.main_process, Some(true));
}

#[test]
fn a_victim_detached_from_its_pids_keeps_its_thread_id() {
    // Between the kill and the reap, /proc/<pid>/status of an exiting task reads `Tgid: 0`.
    let kill = named_from_procfs(224, "Name:\tleak\nTgid:\t0\nPid:\t0\n");
    assert_eq!((kill.victim_pid, kill.victim_tid), (224, 224));
    assert_eq!(kill.victim_tgid, None);
    assert_eq!(kill.victim_comm.as_deref(), Some("leak"));
}

#[test]
fn a_victim_marked_without_the_witness_seeing_a_kill_was_exiting() {
    let levels = [
        level(31, "app", 16384, 16384, 0),
        level(1, "", 20000, UNLIMITED, 0),
    ];
    let killed = build_kill(&event(&levels), &context(), &mut CgroupPaths::new(None));
    assert_eq!(
        (killed.killed, killed.not_killed_reason),
        (Some(true), None)
    );
    let mut ev = event(&levels);
    ev.flags &= !flags::KILLED;
    let marked = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(
        (marked.killed, marked.not_killed_reason),
        (Some(false), Some(NotKilledReason::Exiting))
    );
    // Without a witness attached nobody knows.
    let blind = KillContext {
        kill_witness: false,
        ..context()
    };
    let unknown = build_kill(&ev, &blind, &mut CgroupPaths::new(None));
    assert_eq!((unknown.killed, unknown.not_killed_reason), (None, None));
    // Nor when the OOM began before the witness was attached (an agent starting mid-OOM).
    ev.flags |= flags::UNARMED;
    let early = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!((early.killed, early.not_killed_reason), (None, None));
}

#[test]
fn limit_hit_counters_follow_the_cgroup_version() {
    let levels = [
        level(31, "app", 16384, 16384, 0),
        level(1, "", 20000, UNLIMITED, 0),
    ];
    let mut ev = event(&levels);
    let counters = |ev: &OomKillEvent, cgroup_v2: Option<bool>| {
        let context = KillContext {
            cgroup_v2,
            ..context()
        };
        let kill = build_kill(ev, &context, &mut CgroupPaths::new(None));
        let level = &kill.cgroups[0];
        (level.failcnt, level.events.as_ref().map(|e| e.max))
    };
    // Before 6.15 failcnt is counted on both versions; memory.events only shows on v2.
    assert_eq!(counters(&ev, Some(true)), (Some(7), Some(Some(3))));
    assert_eq!(counters(&ev, Some(false)), (Some(7), None));
    // 6.15+ (`track_failcnt`): failcnt is a stale 0 on v2, so it is not served there.
    ev.flags |= flags::FAILCNT_V1_ONLY;
    assert_eq!(counters(&ev, Some(true)), (None, Some(Some(3))));
    assert_eq!(counters(&ev, Some(false)), (Some(7), None));
    assert_eq!(
        counters(&ev, None),
        (None, Some(Some(3))),
        "version unknown"
    );
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    let events = kill.cgroups[0].events.clone().expect("events on v2");
    assert_eq!(
        events.oom_group_kill, None,
        "an event the kernel lacks is null"
    );
    assert_eq!(kill.cause.map(|c| c.component), Some(CauseKind::Anon));
}

#[test]
fn stats_freshness_follows_the_report_the_mode_and_the_kernel() {
    let levels = [
        level(20, "app", 1024, 1024, 200),
        level(1, "", 5000, UNLIMITED, 1000),
    ];
    let hooked = StatsFreshness {
        report_hooked: true,
        live_counters: false,
        flush_interval_ms: Some(250),
    };
    let cases = [
        // (event flags, freshness, stats_flushed, stats_max_age_ms)
        (
            flags::HAS_OOM_CONTROL | flags::STATS_FLUSHED,
            hooked,
            Some(true),
            Some(0),
        ),
        // The report was rate-limited (or it was a global OOM): as of the agent's last flush.
        (flags::HAS_OOM_CONTROL, hooked, Some(false), Some(250)),
        // tp_btf: no oom_control, so whether the report ran is unknown.
        (0, hooked, None, Some(250)),
        // The report could not be hooked: a stray bit says nothing.
        (
            flags::HAS_OOM_CONTROL | flags::STATS_FLUSHED,
            StatsFreshness {
                report_hooked: false,
                ..hooked
            },
            None,
            Some(250),
        ),
        // 5.10 to 5.12: live counters, nothing to flush.
        (
            flags::HAS_OOM_CONTROL,
            StatsFreshness {
                live_counters: true,
                ..hooked
            },
            None,
            Some(0),
        ),
        // No root memory.stat to read: nothing bounds the age.
        (
            flags::HAS_OOM_CONTROL,
            StatsFreshness {
                flush_interval_ms: None,
                ..hooked
            },
            Some(false),
            None,
        ),
    ];
    for (event_flags, freshness, flushed, max_age) in cases {
        let mut ev = event(&levels);
        ev.flags |= event_flags;
        let context = KillContext {
            freshness,
            ..context()
        };
        let kill = build_kill(&ev, &context, &mut CgroupPaths::new(None));
        assert_eq!(
            (kill.stats_flushed, kill.stats_max_age_ms),
            (flushed, max_age),
            "flags {event_flags:#x}, {freshness:?}"
        );
    }
}

/// Eight levels of the chain (victim first), none at its limit; `above` levels above them.
fn deep_event(above: Option<(u32, MemcgSnapshot)>) -> OomKillEvent {
    let names = ["l7", "l6", "l5", "l4", "l3", "l2", "l1", "l0"];
    let chain: Vec<MemcgSnapshot> = names
        .iter()
        .enumerate()
        .map(|(i, name)| level(100 + i as u64, name, 1000, UNLIMITED, 10))
        .collect();
    let mut ev = event(&chain);
    if let Some((level, snapshot)) = above {
        ev.flags |= flags::OOM_MEMCG | flags::OOM_MEMCG_LEVEL;
        ev.oom_memcg_level = level;
        ev.oom_memcg = snapshot;
    }
    ev
}

#[test]
fn a_cgroup_above_the_chain_is_described_not_the_victims() {
    // /top/a/l0/../l7: l0 is level 7, `a` level 8, `top` level 9 and at its limit.
    let mut ev = deep_event(Some((9, level(50, "top", 1024, 1024, 100))));
    ev.flags |= flags::HAS_OOM_CONTROL;
    ev.oc_constraint = constraint::MEMCG;
    ev.oc_memcg_cgroup_id = 50;
    let mut paths = CgroupPaths::new(None);
    paths.learn(107, "/top/a/l0");
    let kill = build_kill(&ev, &context(), &mut paths);
    assert_eq!(kill.cgroup, "/top/a/l0/l1/l2/l3/l4/l5/l6/l7");
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/top"));
    assert_eq!(kill.oom_cgroup_id, Some(50));
    assert_eq!(kill.oom_cgroup_level, Some(9));
    assert_eq!(kill.constraint, Constraint::Memcg);
    assert_eq!(
        (kill.usage_bytes, kill.limit_bytes),
        (1024 * PAGE, Some(1024 * PAGE))
    );
    assert_eq!(kill.working_set_bytes, (1024 - 100) * PAGE);
    assert_eq!(kill.limit_counter, Some(LimitCounter::Memory));
    assert!(kill.cgroups.iter().all(|c| !c.hit_limit));
    let oom = kill.oom_level().expect("the cgroup above the chain");
    assert!(oom.hit_limit && oom.level == Some(9));
    assert!(!kill.oom_cgroup_search_incomplete);

    // Inferred the same way by the kernel's walk above the chain.
    ev.flags &= !flags::HAS_OOM_CONTROL;
    let kill = build_kill(&ev, &context(), &mut paths);
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/top"));
    assert_eq!(kill.attribution, Attribution::Inferred);
    assert_eq!(kill.constraint, Constraint::Memcg);
}

#[test]
fn an_unsearched_chain_says_so_instead_of_naming_a_cgroup() {
    let mut ev = deep_event(None);
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None);
    assert!(kill.oom_cgroup_search_incomplete);
    assert_eq!(kill.constraint, Constraint::Unknown);
    assert!(kill.cgroups.iter().all(|c| !c.hit_limit));

    ev.flags |= flags::ANCESTORS_SEARCHED;
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert!(
        !kill.oom_cgroup_search_incomplete,
        "every ancestor was read"
    );
    assert_eq!(kill.constraint, Constraint::None);
}

#[test]
fn memory_plus_swap_at_its_limit_is_the_limit_hit() {
    let mut victim = level(30, "memsw", 800, 1024, 10);
    victim.memsw_usage_pages = 1024;
    victim.memsw_limit_pages = 1024;
    victim.memsw_failcnt = 5;
    let mut ev = event(&[victim, level(1, "", 5000, UNLIMITED, 0)]);
    ev.flags |= flags::MEMSW_VALID;
    let v1 = KillContext {
        cgroup_v2: Some(false),
        ..context()
    };
    let kill = build_kill(&ev, &v1, &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/memsw"), "{kill:#?}");
    assert_eq!(kill.limit_counter, Some(LimitCounter::Memsw));
    let level = &kill.cgroups[0];
    assert_eq!(
        (
            level.memsw_usage_bytes,
            level.memsw_limit_bytes,
            level.memsw_failcnt
        ),
        (Some(1024 * PAGE), Some(1024 * PAGE), Some(5))
    );
    assert_eq!(
        kill.cgroups[1].memsw_limit_bytes, None,
        "no memory+swap limit"
    );

    // Equal limits and no swap: memory+swap is charged first, so it is the one that failed.
    ev.cgroups[0].usage_pages = 1024;
    let kill = build_kill(&ev, &v1, &mut CgroupPaths::new(None));
    assert_eq!(kill.limit_counter, Some(LimitCounter::Memsw));
    ev.cgroups[0].memsw_limit_pages = 4096;
    let kill = build_kill(&ev, &v1, &mut CgroupPaths::new(None));
    assert_eq!(kill.limit_counter, Some(LimitCounter::Memory));

    ev.flags &= !flags::MEMSW_VALID;
    let kill = build_kill(&ev, &v1, &mut CgroupPaths::new(None));
    assert_eq!(
        kill.cgroups[0].memsw_usage_bytes, None,
        "not charged: not shown"
    );
}

#[test]
fn the_root_level_is_measured_by_its_statistics() {
    let mut root = level(1, "", 5000, UNLIMITED, 1000);
    // The root's page counter holds only its children's charges; its statistics hold all.
    root.stats[leak_common::layout::stat::ANON] = 7000;
    root.stats[leak_common::layout::stat::FILE] = 3000;
    root.stats[leak_common::layout::stat::SWAP] = 50;
    root.memsw_usage_pages = 5000;
    let mut ev = event(&[level(30, "a", 100, 100, 0), root]);
    ev.flags |= flags::REACHED_ROOT | flags::MEMSW_VALID;
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    let root = &kill.cgroups[1];
    assert_eq!(root.usage_source, UsageSource::Statistics);
    assert_eq!(root.usage_bytes, 10_000 * PAGE);
    assert_eq!(root.working_set_bytes, 9_000 * PAGE);
    assert_eq!(root.memsw_usage_bytes, Some(10_050 * PAGE));
    assert_eq!(kill.cgroups[0].usage_source, UsageSource::PageCounter);
    assert_eq!(kill.cgroups[0].usage_bytes, 100 * PAGE);
}
