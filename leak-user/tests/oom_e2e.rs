//! End to end on this machine's real memory cgroups (v1 or v2, whichever carries the memory
//! controller): the agent runs, `leak workload` leaks in a fresh memcg with a small limit until
//! the kernel kills it, and the snapshot on /kills and /metrics is compared with the kernel's
//! own OOM report in /dev/kmsg.

mod support;

#[path = "oom_e2e/levels.rs"]
mod levels;

use std::time::{Duration, Instant};

use leak_user::{
    enrich::cgroupfs::{MemoryHierarchy, Version},
    experiment::demo::DemoKills,
    kernel::kmsg::{self, Kmsg, OomReport},
    model::{
        kill::{CauseKind, CgroupState, Constraint, Kill, NotKilledReason, OomAttribution},
        timeline::{Point, SampleKind},
    },
};
use support::*;

const LIMIT: u64 = 64 << 20;

/// Inactive file pages may differ from the report by the rstat flush error: one charge batch
/// (64 pages) per CPU.
fn lru_tolerance_bytes() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    64 * 4096 * cpus
}

/// The kernel's report for the kill of `pid`, waiting for it to be logged.
fn report_for(kmsg: &mut Kmsg, seen: &mut Vec<String>, pid: u32) -> OomReport {
    for _ in 0..100 {
        seen.extend(kmsg.read_new().expect("read /dev/kmsg"));
        if let Some(report) = kmsg::parse_reports(seen.iter().map(String::as_str))
            .into_iter()
            .find(|r| r.pid == Some(pid) || r.killed.contains(&pid))
        {
            // A memcg OOM's report is whole once its `memory:` line is in; a global one has
            // none, and ends with the `Killed process` line.
            let global = report.constraint.as_deref() == Some("CONSTRAINT_NONE");
            if report.usage_kb.is_some() || global && report.killed.contains(&pid) {
                return report;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the kernel logged no OOM report for pid {pid}; kmsg:\n{}",
        seen.join("\n")
    );
}

/// Hierarchical inactive_file of the report: `total_inactive_file` on v1, `inactive_file` on v2.
fn report_stat(report: &OomReport, name: &str) -> u64 {
    report
        .stats
        .get(&format!("total_{name}"))
        .or_else(|| report.stats.get(name))
        .copied()
        .unwrap_or_else(|| panic!("report has no {name}: {:?}", report.stats))
}

/// The LRU lists of a cgroup at the kill, by the names the kernel's report gives them.
fn lru_lists(level: &CgroupState) -> [(&'static str, u64); 5] {
    [
        ("inactive_anon", level.inactive_anon_bytes),
        ("active_anon", level.active_anon_bytes),
        ("inactive_file", level.inactive_file_bytes),
        ("active_file", level.active_file_bytes),
        ("unevictable", level.unevictable_bytes),
    ]
}

/// The figures of a cgroup beyond its LRU lists, with the names the kernel's report gives
/// them on cgroup v2 and on v1 (`None`: that report does not print it).
fn breakdown_figures(
    level: &CgroupState,
) -> [(Option<u64>, Option<&'static str>, Option<&'static str>); 12] {
    let b = &level.breakdown;
    [
        (b.anon_bytes, Some("anon"), Some("rss")),
        (b.file_bytes, Some("file"), Some("cache")),
        (b.shmem_bytes, Some("shmem"), Some("shmem")),
        (b.file_dirty_bytes, Some("file_dirty"), Some("dirty")),
        (
            b.file_writeback_bytes,
            Some("file_writeback"),
            Some("writeback"),
        ),
        (b.slab_reclaimable_bytes, Some("slab_reclaimable"), None),
        (b.slab_unreclaimable_bytes, Some("slab_unreclaimable"), None),
        (b.kernel_stack_bytes, Some("kernel_stack"), None),
        (b.pagetables_bytes, Some("pagetables"), None),
        (b.sock_bytes, Some("sock"), None),
        (b.percpu_bytes, Some("percpu"), None),
        (b.swap_bytes, None, Some("swap")),
    ]
}

/// Each figure of the breakdown the kernel's report also prints, within the LRU tolerance
/// (slab and per-CPU figures are kept in bytes, flushed with the same batching). Returns how
/// many were compared.
fn check_breakdown(level: &CgroupState, report: &OomReport, version: Version) -> usize {
    let tolerance = lru_tolerance_bytes();
    let mut compared = 0;
    for (ours, v2, v1) in breakdown_figures(level) {
        let name = match version {
            Version::V2 => v2,
            Version::V1 => v1,
        };
        let (Some(ours), Some(name)) = (ours, name) else {
            continue;
        };
        let kernel = report
            .stats
            .get(&format!("total_{name}"))
            .or_else(|| report.stats.get(name));
        let Some(&kernel) = kernel else {
            continue;
        };
        assert!(
            ours.abs_diff(kernel) <= tolerance,
            "{name}: agent {ours} vs kernel {kernel} (tolerance {tolerance}): {level:#?}"
        );
        eprintln!("  {name}: agent {ours}, kernel {kernel}");
        compared += 1;
    }
    assert!(
        compared >= 4,
        "only {compared} breakdown figures were in both the snapshot and the kernel's report \
         {:?}: {level:#?}",
        report.stats
    );
    compared
}

/// The limit-hit counters of the cgroup that hit its limit: `failcnt` on v1 (and on v2 where
/// the kernel still counts it), `memory.events` on v2, never a counter the kernel stopped
/// keeping; each at least what the kernel's report printed a moment before.
fn check_limit_counters(level: &CgroupState, report: &OomReport, version: Version) {
    let printed = report.failcnt.expect("the report's failcnt");
    match version {
        Version::V1 => {
            assert!(level.events.is_none(), "no memory.events on v1: {level:#?}");
            let failcnt = level.failcnt.expect("failcnt on v1");
            assert!(
                failcnt >= printed,
                "failcnt {failcnt} below the report's {printed}"
            );
        }
        Version::V2 => {
            let events = level.events.as_ref().expect("memory.events on v2");
            let max = events.max.expect("the max event");
            assert!(
                max >= 1 && events.oom >= Some(1) && events.oom_kill >= Some(1),
                "{events:?}"
            );
            // The report prints page_counter.failcnt where the kernel keeps it for v2, else
            // (6.15+) memory_events[MEMCG_MAX].
            let ours = level.failcnt.unwrap_or(max);
            assert!(
                ours >= printed,
                "limit hits {ours} below the report's {printed}: {level:#?}"
            );
        }
    }
}

/// Hooking oom_kill_process gives the kernel's own oom_control; the tracepoints infer.
fn expected_attribution(mode: &str) -> OomAttribution {
    match mode {
        "fentry" | "kprobe" => OomAttribution::OomControl,
        _ => OomAttribution::Inferred,
    }
}

/// The OOM hook's mode the agent reports on /healthz, checked against what was asked for
/// (and, for `auto`, against `$LEAK_TEST_EXPECT_AUTO` where the suite knows the answer).
fn reported_mode(agent: &Agent, attach: &str) -> String {
    let mode = agent.attach_mode();
    if attach != "auto" {
        assert_eq!(mode, attach, "forced mode must be used");
    } else if let Ok(expected) = std::env::var("LEAK_TEST_EXPECT_AUTO") {
        assert_eq!(mode, expected, "auto chose {mode}, expected {expected}");
    }
    mode
}

struct Outcome {
    kill: Kill,
    report: OomReport,
    metrics: String,
    mode: String,
    version: Version,
}

/// Runs the agent, leaks in `victim` until killed, and gathers both sides.
fn leak_until_killed(attach: &str, victim: &Cgroup, workload: &[&str]) -> Outcome {
    run_until_killed(attach, victim, || spawn_in(victim, workload))
}

/// Runs the agent, starts what `spawn` starts in `victim`, waits for the kernel to kill it, and
/// gathers both sides.
fn run_until_killed(attach: &str, victim: &Cgroup, spawn: impl FnOnce() -> Process) -> Outcome {
    run_until_killed_then(attach, victim, spawn, |_| {})
}

/// [`run_until_killed`], running `after_kill` once the kill is served, while the agent runs.
fn run_until_killed_then(
    attach: &str,
    victim: &Cgroup,
    spawn: impl FnOnce() -> Process,
    after_kill: impl FnOnce(&Kill),
) -> Outcome {
    // The charge path in the same mode as the OOM hook, so every mode of both is exercised.
    let mut agent = Agent::start(&["--attach", attach, "--charge-attach", attach]);
    let mode = reported_mode(&agent, attach);

    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    let mut workload_process = spawn();
    wait_for_oom_kill(&mut workload_process, Duration::from_secs(120));

    // By cgroup: what `spawn` started may be a relay outside a pid namespace.
    let kill = agent.wait_for_kill_in(&victim.relative);
    let pid = kill.victim_pid;
    after_kill(&kill);
    let mut seen = Vec::new();
    let report = report_for(&mut kmsg, &mut seen, pid);
    // Per-cgroup counters are brought up to the kernel's once a second: wait (with a generous
    // deadline, the machine may be busy) for the limit hits of the cgroup that hit its limit.
    let oom_cgroup = kill.oom_cgroup.clone().unwrap_or_default();
    let hits = format!("leak_cgroup_limit_hits_total{{cgroup=\"{oom_cgroup}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = agent.page("/metrics");
        if metrics.contains(&hits) || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    check_attach_info(&metrics, attach, &mode, true);
    check_verifier_work(&metrics);
    let exit = agent.stop();
    assert!(
        exit.success(),
        "agent exited with {exit:?} on SIGTERM:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("detached and unloaded"),
        "agent did not report detaching its probes:\n{}",
        agent.log()
    );
    // The memcg statistics indices were cross-checked against the root's memory.stat, where
    // the root has one.
    let log = agent.log();
    let root_stat = victim.hierarchy.root.join("memory.stat");
    let expected = match root_stat.exists() {
        true => "memcg statistics indices agree",
        false => "memcg statistics indices not cross-checked",
    };
    let line = log
        .lines()
        .find(|line| line.contains(expected))
        .unwrap_or_else(|| panic!("no `{expected}` in the agent's log:\n{log}"));
    eprintln!("{line}");
    eprintln!(
        "[{attach} -> {mode}] pid {pid}: agent usage {} limit {:?} inactive_file {} working set \
         {}; kernel usage {}kB limit {}kB inactive_file {}",
        kill.usage_bytes,
        kill.limit_bytes,
        kill.inactive_file_bytes,
        kill.working_set_bytes,
        report.usage_kb.unwrap_or(0),
        report.limit_kb.unwrap_or(0),
        report_stat(&report, "inactive_file"),
    );
    let version = victim.hierarchy.version;
    Outcome {
        kill,
        report,
        metrics,
        mode,
        version,
    }
}

/// What every scenario checks: the victim, the cgroups, and the figures against the kernel's.
fn check_against_kernel(outcome: &Outcome, victim: &Cgroup, oom_cgroup: &Cgroup) {
    check_against_kernel_as(outcome, victim, oom_cgroup, "leak");
}

/// [`check_against_kernel`] for a victim named `comm`.
fn check_against_kernel_as(outcome: &Outcome, victim: &Cgroup, oom_cgroup: &Cgroup, comm: &str) {
    // The workload is not pid 1 of a pid namespace: outside a container, not a main process.
    check_victim_against_kernel(outcome, victim, oom_cgroup, comm, Some(false));
}

/// [`check_against_kernel_as`] for a victim whose `main_process` is `main_process`.
fn check_victim_against_kernel(
    outcome: &Outcome,
    victim: &Cgroup,
    oom_cgroup: &Cgroup,
    comm: &str,
    main_process: Option<bool>,
) {
    let Outcome {
        kill,
        report,
        metrics,
        mode,
        version,
    } = outcome;
    assert_eq!(&kill.attach_mode, mode);
    let attribution = expected_attribution(mode);
    assert_eq!(kill.attribution, attribution, "{kill:#?}");
    if attribution == OomAttribution::OomControl {
        assert!(
            kill.oom_control.as_ref().is_some_and(|c| c.totalpages > 0),
            "{kill:#?}"
        );
    }
    assert_eq!(kill.victim_comm.as_deref(), Some(comm));
    assert_eq!(kill.cgroup, victim.relative, "{kill:#?}");
    assert_eq!(
        kill.oom_cgroup.as_deref(),
        Some(oom_cgroup.relative.as_str()),
        "{kill:#?}"
    );
    assert_eq!(kill.constraint, Constraint::Memcg);
    assert_eq!(
        report.oom_memcg.as_deref(),
        Some(oom_cgroup.relative.as_str())
    );
    assert_eq!(report.task_memcg.as_deref(), Some(victim.relative.as_str()));

    // The headline figures describe oom_cgroup, as the kernel's `memory:` line does. The limit
    // is exact. Usage is read a moment after the kernel printed it: in between, the per-CPU
    // charge stocks that the OOM path asked to drain may return their pages (at most one
    // charge batch, 64 pages, per CPU), so it is exact or within that.
    let kernel_usage = report.usage_kb.expect("usage") * 1024;
    let usage = kill.usage_bytes;
    assert!(
        usage.abs_diff(kernel_usage) <= lru_tolerance_bytes(),
        "usage: agent {usage} vs kernel {kernel_usage}"
    );
    if usage != kernel_usage {
        eprintln!(
            "usage moved by {} bytes between the kernel's report and the snapshot",
            usage.abs_diff(kernel_usage)
        );
    }
    assert_eq!(
        kill.limit_bytes,
        Some(report.limit_kb.expect("limit") * 1024)
    );
    assert_eq!(kill.limit_bytes, Some(LIMIT));
    let tolerance = lru_tolerance_bytes();
    let oom_level = kill.oom_level().expect("a cgroup marked hit_limit");
    for (lru, ours) in lru_lists(oom_level) {
        let kernel = report_stat(report, lru);
        assert!(
            ours.abs_diff(kernel) <= tolerance,
            "{lru}: agent {ours} vs kernel {kernel} (tolerance {tolerance})"
        );
    }
    assert_eq!(
        kill.working_set_bytes,
        kill.usage_bytes.saturating_sub(kill.inactive_file_bytes)
    );
    let compared = check_breakdown(oom_level, report, *version);
    check_limit_counters(oom_level, report, *version);
    let cause = kill.cause.as_ref().expect("a cause");
    eprintln!(
        "breakdown: {compared} figures match the kernel's report; cause {} ({} bytes, {:.0}% \
         of usage); failcnt {:?}, events {:?}",
        cause.component.as_str(),
        cause.bytes,
        cause.share_of_usage * 100.0,
        oom_level.failcnt,
        oom_level.events
    );
    check_victim_rss(kill, report);

    let main_label = match main_process {
        Some(true) => "true",
        Some(false) => "false",
        None => "",
    };
    let counter = format!(
        "leak_oom_kills_total{{cause=\"{2}\",cgroup=\"{0}\",constraint=\"memcg\",\
         container=\"\",main_process=\"{main_label}\",namespace=\"\",oom_cgroup=\"{1}\",\
         pod=\"\"}}",
        victim.relative,
        oom_cgroup.relative,
        cause_label(kill)
    );
    assert_eq!(
        sample(metrics, &counter),
        Some(1.0),
        "missing `{counter} 1` in\n{metrics}"
    );
    let gauge = format!(
        "leak_oom_kill_working_set_bytes{{cgroup=\"{}\",container=\"\",namespace=\"\",\
         oom_cgroup=\"{}\",pod=\"\"}}",
        victim.relative, oom_cgroup.relative,
    );
    assert_eq!(
        sample(metrics, &gauge),
        Some(kill.working_set_bytes as f64),
        "missing `{gauge} {}` in\n{metrics}",
        kill.working_set_bytes
    );
    assert_eq!(kill.main_process, main_process, "{kill:#?}");
    // A real kill, seen as one, and counted as the kernel counts its cgroup's kills.
    assert_eq!(kill.killed, Some(true), "{kill:#?}");
    assert_eq!(kill.not_killed_reason, None);
    assert_eq!(
        agent_oom_kills(metrics, &victim.relative),
        kernel_oom_kills(victim),
        "leak_oom_kills_total of {} against the kernel's oom_kill:\n{metrics}",
        victim.relative
    );
}

/// The victim's anonymous rss against the kernel's `Killed process ... anon-rss:` (printed just
/// after the victim is marked). Both read the same counters; the per-CPU batches of the rss
/// counters (6.2+) or per-thread caches (before) let them drift a little.
fn check_victim_rss(kill: &Kill, report: &OomReport) {
    // Only a victim whose task the kernel program read has an rss; the classic tracepoint
    // names some victims by pid alone.
    if !kill.victim_task_resolved {
        return;
    }
    let rss = kill
        .victim_rss
        .as_ref()
        .unwrap_or_else(|| panic!("no victim_rss for a resolved victim: {kill:#?}"));
    // The kernel names the thread it found holding the mm: the process, or the marked thread.
    let kernel_kb = [kill.victim_pid, kill.victim_tid]
        .iter()
        .find_map(|id| report.anon_rss_kb.get(id))
        .unwrap_or_else(|| {
            panic!(
                "the kernel's report has no anon-rss for {}",
                kill.victim_pid
            )
        });
    let ours = rss.anon_bytes;
    let kernel = kernel_kb * 1024;
    let tolerance = lru_tolerance_bytes() + kernel / 50;
    assert!(
        ours.abs_diff(kernel) <= tolerance,
        "victim anon rss: agent {ours} vs kernel {kernel} (tolerance {tolerance})"
    );
}

const FAST_ANON: &[&str] = &["--interval", "1ms", "--chunk", "1MiB", "--listen", "off"];

/// A cgroup for one scenario, with the test's limit.
fn limited(hierarchy: &MemoryHierarchy, name: &str) -> Cgroup {
    Cgroup::with_limit(hierarchy, name, LIMIT).unwrap_or_else(|err| panic!("{err}"))
}

fn anonymous_leak_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-anon-{attach}"));
    let outcome = leak_until_killed(attach, &cgroup, FAST_ANON);
    check_against_kernel(&outcome, &cgroup, &cgroup);
    assert_eq!(Some(outcome.kill.victim_pid), outcome.report.pid);
    assert_eq!(
        outcome.kill.cause.as_ref().map(|c| c.component),
        Some(CauseKind::Anon),
        "an anonymous leak: {:#?}",
        outcome.kill
    );
}

/// The index of the timeline point taken `ms` before the kill.
fn point_at(timeline: &[Point], ms: u64) -> usize {
    timeline
        .iter()
        .position(|p| p.before_kill_ms == Some(ms))
        .unwrap_or_else(|| panic!("no point {ms} ms before the kill in {timeline:#?}"))
}

fn page_cache_leak_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-file-{attach}"));
    let file = disk_file(&format!("leak-e2e-file-{attach}"));
    let path = file.0.to_string_lossy().into_owned();
    let outcome = leak_until_killed(
        attach,
        &cgroup,
        &[
            "--interval",
            "1ms",
            "--chunk",
            "32KiB",
            "--file",
            &path,
            "--listen",
            "off",
        ],
    );
    check_against_kernel(&outcome, &cgroup, &cgroup);
    let kill = &outcome.kill;
    // The workload pushed a limit's worth of data through the page cache and was killed only
    // once its working set filled the limit: the cache was reclaimed on the way (the file
    // LRUs, checked against the kernel's above, hold what is left of it), and the working set,
    // not the usage, is what stood at the limit.
    assert!(
        file_size(&file.0) > LIMIT / 2,
        "wrote only {} bytes",
        file_size(&file.0)
    );
    let level = &kill.cgroups[0];
    assert!(
        kill.working_set_bytes >= LIMIT / 10 * 9,
        "working set below 90% of the limit at the kill: {kill:#?}"
    );
    assert!(
        level.anon_bytes() + level.page_cache_bytes() <= kill.usage_bytes + lru_tolerance_bytes()
    );

    // The seconds before death, from the charge path: usage reached the limit first, while
    // page cache still filled part of it; the kill came when the working set got there.
    let story = kill.story.as_ref().expect("a story");
    let usage_ms = story
        .usage_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("usage never at the limit in the timeline: {kill:#?}"));
    let working_set_ms = story
        .working_set_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("working set never at the limit: {kill:#?}"));
    assert!(
        usage_ms > working_set_ms && usage_ms >= 100,
        "usage at the limit {usage_ms} ms before the kill, working set {working_set_ms} ms: \
         {story:#?}"
    );
    let timeline = &kill.timeline;
    let first_at_limit = &timeline[point_at(timeline, usage_ms)];
    assert!(
        first_at_limit.working_set_bytes < first_at_limit.usage_bytes,
        "when usage reached the limit the working set was below it: {first_at_limit:#?}"
    );
    assert!(story.peak_page_cache_bytes.unwrap_or(0) > 0, "{story:#?}");
    assert!(story.limit_hits > 0, "{story:#?}");
    assert_eq!(timeline.last().map(|p| p.kind), Some(SampleKind::Kill));
    let hits = sample_with_prefix(
        &outcome.metrics,
        &format!(
            "leak_cgroup_limit_hits_total{{cgroup=\"{}\"",
            cgroup.relative
        ),
    );
    assert!(hits > 0, "no limit hits counted:\n{}", outcome.metrics);
    // A charge fails with -ENOMEM only when the retry after the kill still finds no room; the
    // OOM reaper often frees the victim's memory first, so failures are reported, not required.
    if matches!(outcome.mode.as_str(), "fentry" | "kprobe") {
        let failures = sample_with_prefix(
            &outcome.metrics,
            &format!(
                "leak_cgroup_charge_failures_total{{cgroup=\"{}\"",
                cgroup.relative
            ),
        );
        eprintln!("charge failures counted: {failures}");
    }
    eprintln!(
        "timeline: {} points; usage at the limit {usage_ms} ms before the kill, working set \
         {working_set_ms} ms; {hits} limit hits",
        timeline.len()
    );
    eprintln!(
        "page cache written {} bytes; at the kill: file LRU {}, working set {} of usage {}",
        file_size(&file.0),
        level.page_cache_bytes(),
        kill.working_set_bytes,
        kill.usage_bytes
    );
}

fn limit_on_parent_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let parent = limited(hierarchy, &format!("leak-e2e-parent-{attach}"));
    let child = child(&parent, "child");
    let outcome = leak_until_killed(attach, &child, FAST_ANON);
    check_against_kernel(&outcome, &child, &parent);
    let cgroups = &outcome.kill.cgroups;
    assert_eq!(cgroups[0].path, child.relative);
    assert!(!cgroups[0].hit_limit);
    assert_eq!(cgroups[1].path, parent.relative);
    assert!(cgroups[1].hit_limit);
}

/// A container's main process (pid 1 of its pid namespace) whose main thread exits while a
/// worker thread leaks. The OOM killer chooses the process by its leader, which has no mm left,
/// and kills and marks the first thread that still has it (`find_lock_task_mm`), not the one
/// that ran out of memory: the kill is still the main process's, and where `mark_victim`
/// gives a bare pid the fentry, kprobe and tp_btf modes still find the marked thread's task.
fn leader_exits_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-leader-{attach}"));
    let outcome = run_until_killed(attach, &cgroup, || {
        let mut command = std::process::Command::new(leak_bin());
        command.args(["workload", "--leader-exits"]).args(FAST_ANON);
        spawn_command_as_init_in(&cgroup, command)
    });
    let kill = &outcome.kill;
    let report = &outcome.report;
    // The kernel chose the process (its leader, named in the summary line) and killed another
    // thread of it.
    assert_eq!(report.task.as_deref(), Some("leak"), "{report:?}");
    assert!(
        report.killed.contains(&kill.victim_tid),
        "the kernel killed {:?}, the snapshot names thread {}",
        report.killed,
        kill.victim_tid
    );
    assert_ne!(report.pid, Some(kill.victim_tid), "{report:?}");
    // Read in the kernel in every mode, the classic tracepoint's bare pid included: the
    // marked thread belongs to the process whose thread ran out of memory.
    assert!(kill.victim_task_resolved, "{kill:#?}");
    assert_eq!(report.pid, Some(kill.victim_pid), "{report:?}");
    assert_eq!(kill.victim_ns_pid, Some(1), "{kill:#?}");
    let comm = kill.victim_comm.clone().unwrap_or_default();
    check_victim_against_kernel(&outcome, &cgroup, &cgroup, &comm, Some(true));
    eprintln!(
        "[{attach} -> {}] leader {} exited; the kernel marked thread {} ({comm}), resolved in \
         the kernel: {}",
        outcome.mode, kill.victim_pid, kill.victim_tid, kill.victim_task_resolved
    );
}

/// A filesystem frozen for one scenario (`FIFREEZE`, as `fsfreeze -f` does), thawed on drop:
/// until then a write to it sleeps uninterruptibly, even with SIGKILL pending. The test VMs
/// freeze their own test disk (`$LEAK_TEST_DISK_DIR`, a filesystem of its own that nothing
/// else uses); elsewhere a small ext4 image is mounted on a loop device and removed afterwards.
struct FrozenFs {
    dir: std::path::PathBuf,
    /// The image and its mount point, when the filesystem was made for the scenario.
    image: Option<TempDir>,
    frozen: bool,
}

/// `FIFREEZE` and `FITHAW` (`_IOWR('X', 119, int)`, `_IOWR('X', 120, int)`).
const FIFREEZE: u64 = 0xc004_5877;
const FITHAW: u64 = 0xc004_5878;

impl FrozenFs {
    /// A writable filesystem, not frozen yet.
    fn new(name: &str) -> Self {
        if let Some(dir) = std::env::var_os("LEAK_TEST_DISK_DIR").map(std::path::PathBuf::from) {
            let device = |path: &std::path::Path| {
                std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path).expect("stat"))
            };
            let parent = dir.parent().unwrap_or(std::path::Path::new("/"));
            assert_ne!(
                device(&dir),
                device(parent),
                "{} is not a filesystem of its own: it cannot be frozen for a test",
                dir.display()
            );
            return Self {
                dir,
                image: None,
                frozen: false,
            };
        }
        let image = TempDir::new(name).unwrap_or_else(|err| panic!("{err}"));
        let file = image.path().join("ext4.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create the ext4 image");
        let run = |command: &mut std::process::Command| {
            let status = command
                .status()
                .unwrap_or_else(|err| panic!("{command:?}: {err}"));
            assert!(status.success(), "{command:?}: {status}");
        };
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&file));
        let dir = image.path().join("mnt");
        std::fs::create_dir(&dir).expect("mount point");
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(&dir));
        Self {
            dir,
            image: Some(image),
            frozen: false,
        }
    }

    fn ioctl(&self, request: u64) -> std::io::Result<()> {
        let dir = std::fs::File::open(&self.dir)?;
        // SAFETY: FIFREEZE and FITHAW take no argument memory; the descriptor is open.
        let result = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                request as libc::Ioctl,
                0,
            )
        };
        match result {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    fn freeze(&mut self) {
        self.ioctl(FIFREEZE)
            .unwrap_or_else(|err| panic!("freeze {}: {err}", self.dir.display()));
        self.frozen = true;
    }

    fn thaw(&mut self) {
        if std::mem::take(&mut self.frozen) {
            if let Err(err) = self.ioctl(FITHAW) {
                eprintln!("warning: cannot thaw {}: {err}", self.dir.display());
            }
        }
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        self.thaw();
        if self.image.is_some() {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
        } else {
            let _ = std::fs::remove_file(self.dir.join(EXITING_FILE));
        }
    }
}

const EXITING_FILE: &str = "leak-e2e-exiting";

/// The state letter of `/proc/<pid>/stat` and the syscall it is in (`/proc/<pid>/syscall`).
fn task_state(pid: u32) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let number = syscall.split_whitespace().next()?.to_owned();
    Some((state, number))
}

/// The kernel's `Killed process <pid> (` lines for `pid` in what `kmsg` logged since it opened.
fn killed_lines(seen: &[String], pid: u32) -> usize {
    let needle = format!("Killed process {pid} (");
    seen.iter().filter(|line| line.contains(&needle)).count()
}

/// The OOM killer chooses a process that is already exiting (SIGKILL pending, its only thread
/// stuck in a write to a frozen filesystem, its memory still charged): `task_will_free_mem`
/// holds, so the kernel marks it (`oom:mark_victim` fires) and queues the OOM reaper, but
/// sends no SIGKILL and counts no `oom_kill`. The agent must say `killed: false` (reason
/// `exiting`) and leave it out of `leak_oom_kills_total`; the allocating process, chosen next
/// once the reaper freed the first, is a real kill. The kernel's `oom_kill` counter and its
/// `Killed process` lines are the ground truth.
fn exiting_victim_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-exiting-{attach}"));
    // Declared before the filesystem, so killed (and waited for) only once it is thawed.
    let mut stuck: Option<Process> = None;
    let mut fs = FrozenFs::new(&format!("leak-e2e-frozen-{attach}"));
    let file = fs.dir.join(EXITING_FILE);
    std::fs::write(&file, b"").expect("create the file to write");
    let mut agent = Agent::start(&["--attach", attach]);
    let mode = reported_mode(&agent, attach);
    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");

    // The file is opened before the freeze (opening for write waits on a frozen filesystem
    // too); then 40 MiB are filled and written to it, and the write sleeps until the thaw.
    let script = format!(
        "exec 3>>{} && read go && exec dd if=/dev/zero bs=40M count=1 >&3",
        file.display()
    );
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped());
    let process = stuck.insert(spawn_command_in(&cgroup, command));
    let pid = process.pid();
    std::thread::sleep(Duration::from_millis(300));
    fs.freeze();
    {
        use std::io::Write as _;
        let stdin = process.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("start dd");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    // `D` in write(2): this architecture's number (1 on x86_64, 64 on aarch64).
    let write = libc::SYS_write.to_string();
    while task_state(pid) != Some(('D', write.clone())) {
        assert!(
            Instant::now() < deadline,
            "dd never slept in its write: {:?}",
            task_state(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    set_oom_score_adj(pid, 1000);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        task_state(pid).map(|(state, _)| state),
        Some('D'),
        "SIGKILL must not wake a write to a frozen filesystem"
    );
    assert_eq!(kernel_oom_kills(&cgroup), 0);

    let mut leaker = spawn_in(&cgroup, FAST_ANON);
    let leaker_pid = leaker.pid();
    wait_for_oom_kill(&mut leaker, Duration::from_secs(120));
    let exiting = agent.wait_for_kill(pid);
    let killed = agent.wait_for_kill(leaker_pid);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while killed_lines(&seen, leaker_pid) == 0 && Instant::now() < deadline {
        seen.extend(kmsg.read_new().expect("read /dev/kmsg"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = agent.page("/metrics");
    check_attach_info(&metrics, attach, &mode, false);
    fs.thaw();

    // The kernel: one kill, the leaker's; the exiting process was never `Killed`.
    assert_eq!(killed_lines(&seen, leaker_pid), 1, "{seen:#?}");
    assert_eq!(killed_lines(&seen, pid), 0, "{seen:#?}");
    assert_eq!(kernel_oom_kills(&cgroup), 1);
    // The agent: the same.
    assert_eq!(exiting.cgroup, cgroup.relative, "{exiting:#?}");
    assert_eq!(
        (exiting.killed, exiting.not_killed_reason),
        (Some(false), Some(NotKilledReason::Exiting)),
        "{exiting:#?}"
    );
    assert_eq!(exiting.victim_comm.as_deref(), Some("dd"), "{exiting:#?}");
    assert_eq!(
        (killed.killed, killed.not_killed_reason),
        (Some(true), None)
    );
    assert_eq!(agent_oom_kills(&metrics, &cgroup.relative), 1, "{metrics}");
    let exiting_series = format!(
        "leak_oom_victims_exiting_total{{cgroup=\"{0}\",container=\"\",namespace=\"\",\
         oom_cgroup=\"{0}\",pod=\"\"}}",
        cgroup.relative
    );
    assert_eq!(sample(&metrics, &exiting_series), Some(1.0), "{metrics}");
    assert!(agent.stop().success());
    eprintln!(
        "[{attach} -> {mode}] pid {pid} marked while exiting (killed {:?}, resolved {}), pid \
         {leaker_pid} killed; the kernel's oom_kill: 1",
        exiting.killed, exiting.victim_task_resolved
    );
}

/// A tmpfs mounted for one scenario, unmounted (its pages freed) on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(name: &str) -> Self {
        let dir = TempDir::new(name).unwrap_or_else(|err| panic!("{err}"));
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.path().display());
        Self(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// A shell command run inside `cgroup`.
fn shell_in(cgroup: &Cgroup, script: &str) -> Process {
    let mut command = std::process::Command::new("sh");
    command.args(["-c", script]);
    spawn_command_in(cgroup, command)
}

/// tmpfs filled from inside a memcg: its pages look like files (they are in `file`) but
/// cannot be reclaimed without swap, so they are the cause, and the kernel's `shmem` agrees.
fn tmpfs_fill_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-tmpfs-{attach}"));
    // Declared after the cgroup, so unmounted (the pages uncharged) before it is removed.
    let tmpfs = Tmpfs::mount(&format!("leak-e2e-tmpfs-{attach}"));
    let fill = tmpfs.path().join("fill");
    let script = format!("exec dd if=/dev/zero of={} bs=1M", fill.display());
    let outcome = run_until_killed(attach, &cgroup, || shell_in(&cgroup, &script));
    check_against_kernel_as(&outcome, &cgroup, &cgroup, "dd");
    let kill = &outcome.kill;
    let cause = kill.cause.as_ref().expect("a cause");
    assert_eq!(cause.component, CauseKind::Shmem, "{kill:#?}");
    assert!(cause.share_of_usage > 0.8, "{cause:?}");
    let level = kill.oom_level().expect("the oom level");
    assert!(
        level.breakdown.file_bytes >= level.breakdown.shmem_bytes,
        "tmpfs pages are counted in file too: {level:#?}"
    );
}

/// Kernel memory filling a memcg: empty files on a tmpfs pin a dentry and an inode each, slab
/// the kernel cannot reclaim, charged to the cgroup of the task that made them.
fn kernel_memory_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-kmem-{attach}"));
    let tmpfs = Tmpfs::mount(&format!("leak-e2e-kmem-{attach}"));
    // Only shell builtins in the loop: no fork, no page cache, just dentries and inodes.
    let script = format!(
        "cd {} && i=0 && while :; do : > f$i; i=$((i+1)); done",
        tmpfs.path().display()
    );
    let outcome = run_until_killed(attach, &cgroup, || shell_in(&cgroup, &script));
    let kill = &outcome.kill;
    let comm = kill.victim_comm.clone().unwrap_or_default();
    check_against_kernel_as(&outcome, &cgroup, &cgroup, &comm);
    let cause = kill.cause.as_ref().expect("a cause");
    assert_eq!(cause.component, CauseKind::Kernel, "{kill:#?}");
    let level = kill.oom_level().expect("the oom level");
    let slab = level.breakdown.slab_reclaimable_bytes.unwrap_or(0)
        + level.breakdown.slab_unreclaimable_bytes.unwrap_or(0);
    assert!(slab > LIMIT / 2, "slab {slab} at the kill: {level:#?}");
    eprintln!(
        "kernel memory: {comm} killed with slab {slab} bytes, cause {:.0}% of usage",
        cause.share_of_usage * 100.0
    );
}

/// Whether this kernel keeps live memcg counters with nothing to flush (5.10 to 5.12).
fn live_stat_counters() -> bool {
    kernel_version() < (5, 13)
}

/// Kills in a burst, more than the kernel's report allows (10 per 5 s): every kill is still
/// reported, once, and each says whether the kernel's report flushed its statistics, which is
/// true exactly for the kills whose report the kernel printed (its `oom-kill:` summary line).
fn rate_limited_report_storm_with(hierarchy: &MemoryHierarchy, attach: &str) {
    const CGROUPS: usize = 24;
    const STORM_LIMIT: u64 = 16 << 20;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroups: Vec<Cgroup> = (0..CGROUPS)
        .map(|i| {
            Cgroup::with_limit(
                hierarchy,
                &format!("leak-e2e-storm-{attach}-{i}"),
                STORM_LIMIT,
            )
            .unwrap_or_else(|err| panic!("{err}"))
        })
        .collect();
    let before: Vec<u64> = cgroups.iter().map(kernel_oom_kills).collect();
    let mut agent = Agent::start(&["--attach", attach]);
    let mode = reported_mode(&agent, attach);
    let live = live_stat_counters();
    let report_hooked = matches!(mode.as_str(), "fentry" | "kprobe");
    // Where stats_flushed is known, the storm must show both: kills with the report and kills
    // without (every storm waits out the report's rate limit when done, so this one starts
    // with a fresh window).
    let both_needed = report_hooked && !live;
    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    let mut leakers: Vec<Process> = cgroups.iter().map(|c| spawn_in(c, FAST_ANON)).collect();
    for leaker in &mut leakers {
        wait_for_oom_kill(leaker, Duration::from_secs(120));
    }
    let pids: Vec<u32> = leakers.iter().map(Process::pid).collect();
    let kills: Vec<Kill> = pids.iter().map(|&pid| agent.wait_for_kill(pid)).collect();

    // The kernel's view: every victim has its `Killed process` line; only those whose report
    // got through the rate limit have the report (and its `oom-kill:` summary naming them).
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reports = loop {
        seen.extend(kmsg.read_new().expect("read /dev/kmsg"));
        // Not through the reports: a kill whose report was suppressed has its `Killed
        // process` line without the report's first line.
        let killed: Vec<u32> = seen
            .iter()
            .filter_map(|line| {
                let (_, rest) = line.split_once("Killed process ")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect();
        if pids.iter().all(|pid| killed.contains(pid)) || Instant::now() > deadline {
            break (killed, kmsg::parse_reports(seen.iter().map(String::as_str)));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (killed, reports) = reports;
    let reported: Vec<u32> = reports.iter().filter_map(|r| r.pid).collect();
    for pid in &pids {
        assert!(killed.contains(pid), "no `Killed process {pid}` line");
    }
    let unreported = pids.iter().filter(|pid| !reported.contains(pid)).count();
    assert!(
        unreported > 0 && (unreported < CGROUPS || !both_needed),
        "{unreported} of {CGROUPS} kills without the kernel's report: the storm did not hit \
         the report's rate limit"
    );

    // The kernel's counters: one kill per cgroup, each reported once by the agent.
    for (cgroup, before) in cgroups.iter().zip(&before) {
        assert_eq!(kernel_oom_kills(cgroup) - before, 1, "{}", cgroup.relative);
    }
    let all = agent.kills();
    for pid in &pids {
        let reports = all.iter().filter(|k| k.victim_pid == *pid).count();
        assert_eq!(reports, 1, "pid {pid} reported {reports} times");
    }

    for (kill, pid) in kills.iter().zip(&pids) {
        let expected = match (live, report_hooked) {
            (true, _) | (false, false) => None,
            (false, true) => Some(reported.contains(pid)),
        };
        assert_eq!(
            kill.stats_flushed,
            expected,
            "pid {pid} via {mode}: the kernel's report {} printed",
            if reported.contains(pid) {
                "was"
            } else {
                "was not"
            }
        );
        let max_age = match (live, kill.stats_flushed) {
            (true, _) | (false, Some(true)) => Some(0),
            _ => Some(250),
        };
        assert_eq!(kill.stats_max_age_ms, max_age, "pid {pid} via {mode}");
    }
    eprintln!(
        "storm via {mode}: {CGROUPS} kills, {unreported} without the kernel's report, all \
         reported once; stats_flushed {}",
        match (live, report_hooked) {
            (true, _) => "null (live counters)",
            (false, true) => "true exactly for the reported ones",
            (false, false) => "null (report not hooked in this mode)",
        }
    );
    assert!(agent.stop().success());
    // The kernel prints no report for 5 s after a burst: the next scenario needs its report.
    std::thread::sleep(Duration::from_millis(5500));
}

/// `memory.oom.group` (cgroup v2): the OOM killer kills every process of the group, and each
/// victim gets its own snapshot with its own pid.
fn group_kill_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-group-{attach}"));
    cgroup
        .write("memory.oom.group", "1")
        .unwrap_or_else(|err| panic!("{err}"));
    let mut agent = Agent::start(&["--attach", attach]);
    let mode = reported_mode(&agent, attach);
    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    // Two idle members holding a little memory, then one that leaks until the group dies.
    let idle = [
        "--interval",
        "1ms",
        "--chunk",
        "1MiB",
        "--max-bytes",
        "4MiB",
        "--listen",
        "off",
    ];
    let mut members = vec![spawn_in(&cgroup, &idle), spawn_in(&cgroup, &idle)];
    std::thread::sleep(Duration::from_millis(500));
    members.push(spawn_in(&cgroup, FAST_ANON));
    let pids: Vec<u32> = members.iter().map(Process::pid).collect();
    for member in &mut members {
        wait_for_oom_kill(member, Duration::from_secs(120));
    }
    let kills: Vec<Kill> = pids.iter().map(|&pid| agent.wait_for_kill(pid)).collect();
    let mut seen = Vec::new();
    let report = report_for(&mut kmsg, &mut seen, pids[2]);
    // The kernel kills (and names) every thread of every member; each member is one victim.
    for pid in &pids {
        assert!(
            report.killed.contains(pid),
            "the kernel's report does not name member {pid}: {:?}",
            report.killed
        );
    }
    // Every member's task is read in the kernel in fentry, kprobe and tp_btf modes: from
    // mark_victim's task where it passes one, else from `__oom_kill_process` (fentry, kprobe)
    // or the SIGKILL sent just before (tp_btf). The classic tracepoint only ever gives a pid:
    // members other than the chosen one are named from procfs.
    let task_in_kernel = matches!(mode.as_str(), "fentry" | "kprobe" | "tp_btf");
    for kill in &kills {
        assert_eq!(kill.attach_mode, mode);
        assert_eq!(kill.cgroup, cgroup.relative);
        assert_eq!(kill.oom_cgroup.as_deref(), Some(cgroup.relative.as_str()));
        assert_eq!(kill.limit_bytes, Some(LIMIT));
        // Each member is killed by `__oom_kill_process`, with its own SIGKILL.
        assert_eq!(kill.killed, Some(true), "{kill:#?}");
        if task_in_kernel {
            let victim = format!(
                "pid {} (thread {}, {:?}) via {}",
                kill.victim_pid, kill.victim_tid, kill.victim_comm, kill.attach_mode
            );
            assert!(
                kill.victim_task_resolved,
                "the victim's task was not read in the kernel: {victim}"
            );
            assert!(kill.victim_rss.is_some(), "no rss for {victim}");
        }
    }
    let all = agent.kills();
    for pid in &pids {
        let reports = all.iter().filter(|k| k.victim_pid == *pid).count();
        assert_eq!(reports, 1, "pid {pid} reported {reports} times");
    }
    let metrics = agent.page("/metrics");
    check_attach_info(&metrics, attach, &mode, false);
    // At least one kill per member, never more than the kernel counted: its walk of the group
    // meets the chosen victim again and `__oom_kill_process` counts it again while it still
    // has its mm, marking another of its threads if the first one already let go of it (a
    // second report, merged with the first unless the classic tracepoint, given a bare pid,
    // can name the thread's process neither in the kernel nor in procfs).
    let (ours, kernel) = (
        agent_oom_kills(&metrics, &cgroup.relative),
        kernel_oom_kills(&cgroup),
    );
    eprintln!(
        "[{attach} -> {mode}] group kill of {} members: leak_oom_kills_total {ours}, the \
         kernel's oom_kill {kernel}",
        pids.len()
    );
    assert!(
        ours >= pids.len() as u64 && ours <= kernel,
        "{ours} kills counted, the kernel counted {kernel}:\n{metrics}"
    );
    assert!(agent.stop().success());
}

/// A counter of the kernel's `memory.events` (hierarchical; the scenarios' cgroups are leaves).
fn memory_event(cgroup: &Cgroup, name: &str) -> u64 {
    let events = std::fs::read_to_string(cgroup.path().join("memory.events"))
        .unwrap_or_else(|err| panic!("read memory.events of {}: {err}", cgroup.relative));
    events
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no `{name}` in memory.events:\n{events}"))
}

/// The agent's `leak_cgroup_limit_hits_total` for `cgroup` (0 while it has none), after the
/// once-a-second catch-up of the per-cgroup counters has run at least twice.
fn agent_limit_hits(agent: &Agent, cgroup: &Cgroup) -> u64 {
    std::thread::sleep(Duration::from_millis(2500));
    let series = format!(
        "leak_cgroup_limit_hits_total{{cgroup=\"{}\"",
        cgroup.relative
    );
    agent
        .page("/metrics")
        .lines()
        .filter(|line| line.starts_with(&series))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// Reclaim driven by `memory.high` (on return to user mode and from inside the charge), by
/// writes to `memory.high` and `memory.max` and by `memory.reclaim` is no limit hit; reclaim
/// at `memory.max` from the charge path is. The kernel's `memory.events` is the ground truth:
/// `max` counts the charge path's hits at the limit (it is raised just before that reclaim).
fn high_is_not_a_limit_hit_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-high-{attach}"));
    let write = |file: &str, value: &str| {
        cgroup
            .write(file, value)
            .unwrap_or_else(|err| panic!("{err}"))
    };
    write("memory.high", &(8u64 << 20).to_string());
    let mut agent = Agent::start(&["--attach", attach, "--charge-attach", attach]);
    let mode = reported_mode(&agent, attach);

    // 24 MiB through the page cache of a cgroup whose memory.high is 8 MiB and memory.max 64
    // MiB, in 4 MiB writes: each write charges 1024 pages in one system call, so memory.high
    // is reclaimed from inside the charge as well as on the way back to user mode (and the
    // writer is throttled for being over it: the less over, the sooner done).
    let file = disk_file(&format!("leak-e2e-high-{attach}"));
    let mut dd = std::process::Command::new("dd");
    dd.arg("if=/dev/zero")
        .arg(format!("of={}", file.0.display()))
        .args(["bs=4M", "count=6"]);
    let mut writer = spawn_command_in(&cgroup, dd);
    let status = writer
        .wait_timeout(Duration::from_secs(120))
        .unwrap_or_else(|err| panic!("{err}"))
        .expect("dd did not finish in 120 s");
    assert!(status.success(), "dd failed: {status:?}");
    // Reclaim that no charge asks for: lowering memory.high and memory.max below the usage,
    // and proactive reclaim (memory.reclaim, 5.19+).
    write("memory.high", &(4u64 << 20).to_string());
    if cgroup.path().join("memory.reclaim").exists() {
        write("memory.reclaim", &(2u64 << 20).to_string());
    }
    write("memory.max", &(2u64 << 20).to_string());
    write("memory.max", &LIMIT.to_string());
    write("memory.high", "max");

    let high_events = memory_event(&cgroup, "high");
    let max_events = memory_event(&cgroup, "max");
    let hits = agent_limit_hits(&agent, &cgroup);
    eprintln!(
        "[{attach} -> {mode}] memory.high phase: memory.events high={high_events} \
         max={max_events}, leak_cgroup_limit_hits_total={hits}"
    );
    assert!(high_events > 0, "memory.high was never reclaimed");
    assert!(
        hits <= max_events,
        "{hits} limit hits counted while the kernel counted {max_events} at memory.max \
         (and {high_events} at memory.high)"
    );

    // Now at memory.max: an anonymous leak until the OOM killer ends it.
    let mut leaker = spawn_in(&cgroup, FAST_ANON);
    let pid = leaker.pid();
    wait_for_oom_kill(&mut leaker, Duration::from_secs(120));
    agent.wait_for_kill(pid);
    let max_events_after = memory_event(&cgroup, "max");
    let hits_after = agent_limit_hits(&agent, &cgroup);
    eprintln!(
        "[{attach} -> {mode}] memory.max phase: memory.events max={max_events_after}, \
         leak_cgroup_limit_hits_total={hits_after}"
    );
    assert!(
        max_events_after > max_events,
        "the leak never hit memory.max"
    );
    assert!(hits_after > hits, "no limit hit counted at memory.max");
    assert!(
        hits_after <= max_events_after,
        "{hits_after} limit hits counted, the kernel counted {max_events_after}"
    );
    assert!(agent.stop().success());
}

/// Sets a process's `oom_score_adj` (-1000 spares it, 1000 makes it the OOM killer's choice).
fn set_oom_score_adj(pid: u32, value: i32) {
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), value.to_string())
        .unwrap_or_else(|err| panic!("oom_score_adj of {pid}: {err}"));
}

/// Spares this process (and the children it starts) from the OOM killer until dropped, even by
/// a panic, then puts its `oom_score_adj` back.
struct SparedFromOom(String);

impl SparedFromOom {
    fn new() -> Self {
        let before = std::fs::read_to_string("/proc/self/oom_score_adj").expect("oom_score_adj");
        set_oom_score_adj(std::process::id(), -1000);
        Self(before.trim().to_owned())
    }
}

impl Drop for SparedFromOom {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/self/oom_score_adj", &self.0);
    }
}

/// A global OOM: the machine runs out of memory and no cgroup is at a limit.
fn global_oom_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // No limit: only the machine's memory bounds this cgroup.
    let cgroup = cgroup(hierarchy, &format!("leak-e2e-global-{attach}"));
    // This test and the agent (which inherits it) are spared; the workload is the choice.
    let _spared = SparedFromOom::new();
    let mut agent = Agent::start(&["--attach", attach]);
    let mode = reported_mode(&agent, attach);
    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    let mut workload = spawn_in(
        &cgroup,
        &["--interval", "1ms", "--chunk", "8MiB", "--listen", "off"],
    );
    let pid = workload.pid();
    set_oom_score_adj(pid, 1000);
    wait_for_oom_kill(&mut workload, Duration::from_secs(300));
    let kill = agent.wait_for_kill(pid);
    let mut seen = Vec::new();
    let report = report_for(&mut kmsg, &mut seen, pid);
    assert_eq!(report.constraint.as_deref(), Some("CONSTRAINT_NONE"));
    assert_eq!(report.oom_memcg, None);
    assert_eq!(report.task_memcg.as_deref(), Some(cgroup.relative.as_str()));

    assert_eq!(kill.attach_mode, mode);
    let attribution = expected_attribution(&mode);
    assert_eq!(kill.attribution, attribution);
    assert_eq!(kill.constraint, Constraint::None, "global OOM");
    assert_eq!(kill.oom_cgroup, None, "no cgroup hit a limit");
    // The classic tracepoint gives a bare pid: the victim's task is known only when it is the
    // task that ran out of memory, which a global OOM does not promise.
    if kill.victim_task_resolved {
        assert_eq!(kill.cgroup, cgroup.relative);
        assert_eq!(kill.victim_comm.as_deref(), Some("leak"));
        assert_eq!(kill.victim_oom_score_adj, Some(1000));
    } else {
        assert_eq!(
            mode, "tracepoint",
            "only the classic tracepoint leaves a victim unread"
        );
        eprintln!("victim not the allocating task: snapshot of the trigger's cgroups");
    }
    if attribution == OomAttribution::OomControl {
        let control = kill.oom_control.as_ref().expect("oom_control");
        assert_eq!(control.memcg_id, None);
        assert!(control.totalpages > 0);
    }
    // The headline figures describe the victim's own (unlimited) cgroup, which held most of
    // the machine's memory.
    assert_eq!(kill.limit_bytes, None);
    assert!(kill.cgroups.iter().all(|c| !c.hit_limit), "{kill:#?}");
    let usage = kill.usage_bytes;
    if kill.victim_task_resolved {
        assert!(usage >= 512 << 20, "usage {usage} at a global OOM");
    }
    assert_eq!(
        kill.working_set_bytes,
        usage.saturating_sub(kill.inactive_file_bytes)
    );
    check_victim_rss(&kill, &report);
    let metrics = agent.page("/metrics");
    let counter = format!(
        "leak_oom_kills_total{{cause=\"{}\",cgroup=\"{}\",constraint=\"none\",\
         container=\"\",main_process=\"false\",namespace=\"\",oom_cgroup=\"\",pod=\"\"}}",
        cause_label(&kill),
        kill.cgroup
    );
    assert_eq!(
        sample(&metrics, &counter),
        Some(1.0),
        "missing `{counter} 1` in\n{metrics}"
    );
    check_attach_info(&metrics, attach, &mode, false);
    assert!(agent.stop().success());
    eprintln!(
        "[{attach} -> {mode}] global OOM, pid {pid}: cgroup usage {usage}, victim anon rss {:?} \
         (kernel anon-rss {}kB)",
        kill.victim_rss.as_ref().map(|rss| rss.anon_bytes),
        report.anon_rss_kb.get(&pid).copied().unwrap_or(0)
    );
}

/// After a kill in each mode, the exposition (kill series, live cgroup series, histograms,
/// attach info) passes the real `promtool check metrics`.
fn promtool_accepts_with(hierarchy: &MemoryHierarchy, attach: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = limited(hierarchy, &format!("leak-e2e-promtool-{attach}"));
    let mut agent = Agent::start(&["--attach", attach, "--charge-attach", attach]);
    let mut workload = spawn_in(&cgroup, FAST_ANON);
    wait_for_oom_kill(&mut workload, Duration::from_secs(120));
    let kill = agent.wait_for_kill(workload.pid());
    let metrics = agent.page("/metrics");
    let counter = format!("cgroup=\"{}\"", kill.cgroup);
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("leak_oom_kills_total{") && line.contains(&counter)),
        "no kill counter with `{counter}` in\n{metrics}"
    );
    promtool_check(&metrics);
    assert!(agent.stop().success());
}

/// Runs `scenario` once per attach mode under test.
fn for_each_mode(hierarchy: &MemoryHierarchy, scenario: fn(&MemoryHierarchy, &str)) {
    for mode in attach_modes() {
        eprintln!("--- attach mode {mode}");
        scenario(hierarchy, &mode);
    }
}

#[test]
fn anonymous_leak() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, anonymous_leak_with);
}

#[test]
fn page_cache_leak() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, page_cache_leak_with);
}

#[test]
fn tmpfs_fill() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, tmpfs_fill_with);
}

#[test]
fn kernel_memory() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, kernel_memory_with);
}

#[test]
fn rate_limited_report_storm() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, rate_limited_report_storm_with);
}

#[test]
fn leader_exits() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, leader_exits_with);
}

#[test]
fn exiting_victim_is_not_a_kill() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, exiting_victim_with);
}

#[test]
fn limit_on_parent() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    for_each_mode(&hierarchy, limit_on_parent_with);
}

/// It exhausts the whole machine, so it runs only where the machine is the test's own (the VMs
/// of `cargo xtask vm`, which set LEAK_TEST_GLOBAL_OOM), never on a shared host.
#[test]
fn global_oom() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if std::env::var_os("LEAK_TEST_GLOBAL_OOM").is_none() {
        skip_test(
            "a global OOM exhausts the machine's memory, so it runs only in the test VMs \
             (LEAK_TEST_GLOBAL_OOM=1), never on a shared host",
            SkipKind::Legitimate,
        );
        return;
    }
    for_each_mode(&hierarchy, global_oom_with);
}

#[test]
fn group_kill() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if hierarchy.version != Version::V2 {
        skip_test(
            "memory.oom.group exists only on cgroup v2 and this host's memory controller is on \
             v1; the test VMs (cgroup v2) run it",
            SkipKind::Legitimate,
        );
        return;
    }
    for_each_mode(&hierarchy, group_kill_with);
}

#[test]
fn memory_high_and_reclaim_are_not_limit_hits() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if hierarchy.version != Version::V2 {
        skip_test(
            "memory.high, memory.reclaim and memory.events exist only on cgroup v2 and this \
             host's memory controller is on v1; the test VMs (cgroup v2) run it",
            SkipKind::Legitimate,
        );
        return;
    }
    for_each_mode(&hierarchy, high_is_not_a_limit_hit_with);
}

#[test]
fn promtool_accepts_the_metrics_after_a_kill() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if !have_tool("promtool") {
        return;
    }
    for_each_mode(&hierarchy, promtool_accepts_with);
}

/// Where usage, and where the working set, first reached the limit in a kill's timeline (by
/// its story), as indexes of the timeline's points.
fn turning_points(kill: &Kill) -> (usize, usize) {
    let story = kill.story.as_ref().expect("a story");
    let usage_ms = story
        .usage_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("usage never at the limit: {kill:#?}"));
    let working_set_ms = story
        .working_set_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("working set never at the limit: {kill:#?}"));
    (
        point_at(&kill.timeline, usage_ms),
        point_at(&kill.timeline, working_set_ms),
    )
}

/// `leak demo` with short settings, checked on the kills it saw (`--json`): in the anonymous
/// run usage and working set reached the limit together; in the page-cache run usage got there
/// first, with page cache in the timeline, and the kill came when the working set did.
#[test]
fn demo_tells_the_story() {
    let Some(_) = privileged() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("leak-e2e-demo").unwrap_or_else(|err| panic!("{err}"));
    let json = dir.path().join("kills.json");
    let limit: u64 = 48 << 20;
    let output = std::process::Command::new(leak_bin())
        .args(["demo", "--limit", "48MiB", "--timeout", "5m", "--file-dir"])
        .arg(disk_dir())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run leak demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "leak demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(&json).expect("leak demo --json wrote its kills");
    let kills: DemoKills = serde_json::from_str(&text).expect("DemoKills");
    for kill in [&kills.anon, &kills.page_cache] {
        assert_eq!(kill.limit_bytes, Some(limit), "{kill:#?}");
        assert_eq!(kill.constraint, Constraint::Memcg);
        assert_eq!(kill.victim_comm.as_deref(), Some("leak"));
        assert_eq!(kill.timeline.last().map(|p| p.kind), Some(SampleKind::Kill));
    }
    assert_ne!(
        kills.anon.cgroup, kills.page_cache.cgroup,
        "a cgroup per run"
    );

    // Anonymous memory only: usage and working set are the same figure but for the binary's
    // own file pages, so they reach the limit at the same point, or one sample apart.
    let (usage_at, working_set_at) = turning_points(&kills.anon);
    assert!(
        usage_at.abs_diff(working_set_at) <= 1,
        "anonymous run: usage reached the limit at point {usage_at}, the working set at \
         {working_set_at}: {:#?}",
        kills.anon.timeline
    );

    // With page cache: usage sat at the limit while the kernel reclaimed the cache, and the
    // kill came only when the working set got there.
    let story = kills.page_cache.story.as_ref().expect("a story");
    let (usage_ms, working_set_ms) = (
        story.usage_at_limit_ms_before_kill,
        story.working_set_at_limit_ms_before_kill,
    );
    assert!(
        usage_ms.is_some_and(|usage| working_set_ms.is_some_and(|ws| usage > ws)),
        "page-cache run: usage at the limit {usage_ms:?} ms before the kill, working set \
         {working_set_ms:?} ms: {story:#?}"
    );
    assert!(
        kills
            .page_cache
            .timeline
            .iter()
            .any(|p| p.page_cache_bytes > 0),
        "no page cache in the page-cache run's timeline: {:#?}",
        kills.page_cache.timeline
    );
}

/// Bad input gets a clear answer and leaves the agent serving.
#[test]
fn http_rejects_bad_requests_and_keeps_serving() {
    let Some(_) = privileged() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut agent = Agent::start(&[]);
    let raw = |bytes: &[u8]| -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(agent.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(bytes).expect("send");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    };
    let garbage = raw(b"\x16\x03\x01 this is not HTTP\r\n\r\n");
    assert!(
        garbage.starts_with("HTTP/1.1 400"),
        "garbage got: {garbage:?}"
    );
    assert_eq!(agent.get("/no-such-page").0, 404);
    let (status, body) = agent.get("/kills?limit=lots");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("limit"),
        "the error should name the parameter: {body}"
    );
    assert_eq!(agent.get("/kills?limit=0"), (200, "[]".to_owned()));
    assert_eq!(
        agent.get("/healthz").0,
        200,
        "still serving after bad requests"
    );
    assert!(agent.stop().success());
}

/// Without root the agent says what to do instead of failing obscurely.
#[test]
fn refuses_to_run_unprivileged_with_a_clear_error() {
    use std::os::unix::process::CommandExt;
    let Some(_) = privileged() else { return };
    // A copy anyone may execute, wherever the build tree lives.
    let copy = std::env::temp_dir().join(format!("leak-unprivileged-{}", std::process::id()));
    std::fs::copy(leak_bin(), &copy).expect("copy leak");
    let _remove = RemoveOnDrop(copy.clone());
    // Dropping to nobody also drops root's supplementary groups (std does setgroups(0)).
    let output = std::process::Command::new(&copy)
        .args(["trace", "--listen", "127.0.0.1:0"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run leak as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("must run as root"), "{stderr}");
}
