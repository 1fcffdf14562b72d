use leak_common::event::{constraint, MemcgSnapshot, OomKillEvent, CGROUP_NAME_LEN, TASK_COMM_LEN};

use super::*;

const PAGE: u64 = 4096;
const UNLIMITED: u64 = (i64::MAX as u64) / PAGE;

fn name(text: &str) -> [u8; CGROUP_NAME_LEN] {
    let mut out = [0u8; CGROUP_NAME_LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

fn comm(text: &str) -> [u8; TASK_COMM_LEN] {
    let mut out = [0u8; TASK_COMM_LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

fn level(id: u64, leaf: &str, usage: u64, limit: u64, inactive_file: u64) -> MemcgSnapshot {
    MemcgSnapshot {
        cgroup_id: id,
        usage_pages: usage,
        limit_pages: limit,
        watermark_pages: usage,
        failcnt: 7,
        lru_pages: [usage - inactive_file, 0, inactive_file, 0, 0],
        name: name(leaf),
    }
}

fn event(levels: &[MemcgSnapshot]) -> OomKillEvent {
    let mut cgroups = [level(0, "", 0, 0, 0); MAX_CGROUP_DEPTH];
    cgroups[..levels.len()].copy_from_slice(levels);
    OomKillEvent {
        boot_ns: 5_000_000_000,
        hook: hook::TP_BTF_MARK_VICTIM,
        flags: flags::VICTIM_TASK | flags::FAILCNT_VALID | flags::RSS_VALID | flags::NS_PID_VALID,
        victim_pid: 4242,
        victim_tgid: 4242,
        victim_comm: comm("leak"),
        victim_oom_score_adj: 0,
        victim_ns_pid: 1,
        rss_anon_pages: 100,
        rss_file_pages: 2,
        rss_shmem_pages: 0,
        trigger_pid: 4242,
        trigger_tgid: 4242,
        trigger_comm: comm("leak"),
        oc_totalpages: 0,
        oc_chosen_points: 0,
        oc_memcg_cgroup_id: 0,
        oc_constraint: 0,
        oc_gfp_mask: 0,
        oc_order: 0,
        depth: levels.len() as u32,
        cgroups,
    }
}

fn bytes_of(event: &OomKillEvent) -> Vec<u8> {
    // SAFETY: OomKillEvent is plain old data; we only read its bytes.
    unsafe {
        std::slice::from_raw_parts(
            (event as *const OomKillEvent).cast::<u8>(),
            size_of::<OomKillEvent>(),
        )
    }
    .to_vec()
}

fn context() -> Context<'static> {
    Context {
        page_size: PAGE,
        realtime_offset_ns: 1_700_000_000_000_000_000,
        attach_mode: "tp_btf",
        seq: 1,
        same_oom_cgroup_id: None,
    }
}

#[test]
fn decode_checks_size_hook_and_depth() {
    let good = event(&[level(10, "a", 10, 10, 0), level(1, "", 100, UNLIMITED, 0)]);
    let bytes = bytes_of(&good);
    assert_eq!(decode(&bytes).expect("decodes").victim_pid, 4242);
    assert!(matches!(decode(&bytes[1..]), Err(DecodeError::Size { .. })));
    assert!(matches!(decode(&[]), Err(DecodeError::Size { .. })));

    let mut bad_hook = good;
    bad_hook.hook = 99;
    assert_eq!(
        decode(&bytes_of(&bad_hook)).err(),
        Some(DecodeError::UnknownHook(99))
    );
    let mut bad_depth = good;
    bad_depth.depth = 9;
    assert_eq!(
        decode(&bytes_of(&bad_depth)).err(),
        Some(DecodeError::Depth(9))
    );
}

#[test]
fn working_set_is_usage_minus_inactive_file_floored() {
    assert_eq!(working_set_bytes(100, 30), 70);
    assert_eq!(working_set_bytes(30, 100), 0);
    assert_eq!(working_set_bytes(0, 0), 0);
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
    assert_eq!(kill.constraint, "memcg");
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
    assert_eq!(kill.constraint, "none");
    assert_eq!(kill.attribution, Attribution::OomControl);
    // For a global OOM the headline figures describe the victim's own cgroup.
    assert_eq!(kill.usage_bytes, 10 * PAGE);

    ev.oc_constraint = constraint::MEMCG;
    ev.oc_memcg_cgroup_id = 1;
    let kill = build_kill(&ev, &context(), &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup.as_deref(), Some("/"));
    assert_eq!(kill.constraint, "memcg");
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
    assert_eq!(kill.constraint, "none");
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
fn formats_rfc3339() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(
        rfc3339(1_795_978_173_529_311_299),
        "2026-11-29T18:49:33.529311Z"
    );
    assert_eq!(
        rfc3339(951_782_400_000_000_000),
        "2000-02-29T00:00:00.000000Z"
    );
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
    assert_eq!(kill.constraint, "memcg");
    // A hint outside the victim's chain is ignored.
    context.same_oom_cgroup_id = Some(99);
    let kill = build_kill(&event(&levels), &context, &mut CgroupPaths::new(None));
    assert_eq!(kill.oom_cgroup, None);
}

/// A kill whose victim the kernel program named by thread id alone, completed from a fake
/// procfs holding `/proc/<tid>/status`.
fn named_from_procfs(tid: u32, status: &str) -> Kill {
    let root = std::env::temp_dir().join(format!("leak-procfs-{tid}-{}", std::process::id()));
    std::fs::create_dir_all(root.join(tid.to_string())).unwrap();
    std::fs::write(root.join(format!("{tid}/status")), status).unwrap();
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
fn a_victim_detached_from_its_pids_keeps_its_thread_id() {
    // Between the kill and the reap, /proc/<pid>/status of an exiting task reads `Tgid: 0`.
    let kill = named_from_procfs(224, "Name:\tleak\nTgid:\t0\nPid:\t0\n");
    assert_eq!((kill.victim_pid, kill.victim_tid), (224, 224));
    assert_eq!(kill.victim_tgid, None);
    assert_eq!(kill.victim_comm.as_deref(), Some("leak"));
}

#[test]
fn metrics_keep_a_bounded_number_of_kill_series() {
    let metrics = crate::metrics::Metrics::with_kill_series_bound("test", 2).expect("metrics");
    let mut paths = CgroupPaths::new(None);
    for (id, name) in [(31, "first"), (32, "second"), (33, "third")] {
        let ev = event(&[level(id, name, 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
        metrics.record_kill(&build_kill(&ev, &context(), &mut paths));
    }
    let text = metrics.render().expect("render");
    assert!(
        !text.contains("cgroup=\"/first\""),
        "the oldest series is dropped:\n{text}"
    );
    assert!(text.contains("leak_oom_kills_total{cgroup=\"/second\""));
    assert!(text.contains("leak_oom_kill_working_set_bytes{cgroup=\"/third\""));
}
