//! End to end on this machine's real memory cgroups (v1 or v2, whichever carries the memory
//! controller): the agent runs, `leak workload` leaks in a fresh memcg with a small limit until
//! the kernel kills it, and the snapshot on /kills and /metrics is compared with the kernel's
//! own OOM report in /dev/kmsg.

mod support;

use std::time::{Duration, Instant};

use leak_user::kernel::kmsg::{self, Kmsg, OomReport};
use serde_json::Value;
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

fn bytes(kill: &Value, key: &str) -> u64 {
    kill[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {kill:#}"))
}

struct Outcome {
    kill: Value,
    report: OomReport,
    metrics: String,
    mode: String,
}

/// Runs the agent, leaks in `victim` until killed, and gathers both sides.
fn leak_until_killed(attach: &str, victim: &Cgroup, workload: &[&str]) -> Outcome {
    // The charge path in the same mode as the OOM hook, so every mode of both is exercised.
    let mut agent = Agent::start(&["--attach", attach, "--charge-attach", attach]);
    let (status, health) = agent.get("/healthz");
    assert_eq!(status, 200);
    let mode = health
        .split("attach_mode=")
        .nth(1)
        .map(|m| m.trim().to_owned())
        .expect("attach mode in /healthz");
    if attach != "auto" {
        assert_eq!(mode, attach, "forced mode must be used");
    } else if let Ok(expected) = std::env::var("LEAK_TEST_EXPECT_AUTO") {
        assert_eq!(mode, expected, "auto chose {mode}, expected {expected}");
    }

    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    let mut workload_process = spawn_in(victim, workload);
    let pid = workload_process.pid();
    workload_process.wait_for_oom_kill(Duration::from_secs(120));

    let kill = agent.wait_for_kill(pid);
    let mut seen = Vec::new();
    let report = report_for(&mut kmsg, &mut seen, pid);
    // Per-cgroup counters are brought up to the kernel's once a second: wait (with a generous
    // deadline, the machine may be busy) for the limit hits of the cgroup that hit its limit.
    let oom_cgroup = kill["oom_cgroup"].as_str().unwrap_or_default();
    let hits = format!("leak_cgroup_limit_hits_total{{cgroup=\"{oom_cgroup}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (status, metrics) = agent.get("/metrics");
        assert_eq!(status, 200);
        if metrics.contains(&hits) || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
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
    eprintln!(
        "[{attach} -> {mode}] pid {pid}: agent usage {} limit {} inactive_file {} working set {}; \
         kernel usage {}kB limit {}kB inactive_file {}",
        kill["usage_bytes"],
        kill["limit_bytes"],
        kill["inactive_file_bytes"],
        kill["working_set_bytes"],
        report.usage_kb.unwrap_or(0),
        report.limit_kb.unwrap_or(0),
        report_stat(&report, "inactive_file"),
    );
    Outcome {
        kill,
        report,
        metrics,
        mode,
    }
}

/// What every scenario checks: the victim, the cgroups, and the figures against the kernel's.
fn check_against_kernel(outcome: &Outcome, victim: &Cgroup, oom_cgroup: &Cgroup) {
    let Outcome {
        kill,
        report,
        metrics,
        mode,
    } = outcome;
    assert_eq!(kill["attach_mode"].as_str(), Some(mode.as_str()));
    // Hooking oom_kill_process gives the kernel's own oom_control; the tracepoints infer.
    let expected_attribution = match mode.as_str() {
        "fentry" | "kprobe" => "oom_control",
        _ => "inferred",
    };
    assert_eq!(
        kill["attribution"].as_str(),
        Some(expected_attribution),
        "{kill:#}"
    );
    if expected_attribution == "oom_control" {
        assert!(kill["oom_control"]["totalpages"]
            .as_u64()
            .is_some_and(|p| p > 0));
    }
    assert_eq!(kill["victim_comm"].as_str(), Some("leak"));
    assert_eq!(
        kill["cgroup"].as_str(),
        Some(victim.relative.as_str()),
        "{kill:#}"
    );
    assert_eq!(
        kill["oom_cgroup"].as_str(),
        Some(oom_cgroup.relative.as_str()),
        "{kill:#}"
    );
    assert_eq!(kill["constraint"].as_str(), Some("memcg"));
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
    let usage = bytes(kill, "usage_bytes");
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
        bytes(kill, "limit_bytes"),
        report.limit_kb.expect("limit") * 1024
    );
    assert_eq!(bytes(kill, "limit_bytes"), LIMIT);
    let tolerance = lru_tolerance_bytes();
    let oom_level = kill["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .find(|c| c["hit_limit"] == Value::Bool(true))
        .expect("a cgroup marked hit_limit");
    for lru in [
        "inactive_anon",
        "active_anon",
        "inactive_file",
        "active_file",
        "unevictable",
    ] {
        let ours = bytes(oom_level, &format!("{lru}_bytes"));
        let kernel = report_stat(report, lru);
        assert!(
            ours.abs_diff(kernel) <= tolerance,
            "{lru}: agent {ours} vs kernel {kernel} (tolerance {tolerance})"
        );
    }
    assert_eq!(
        bytes(kill, "working_set_bytes"),
        bytes(kill, "usage_bytes").saturating_sub(bytes(kill, "inactive_file_bytes"))
    );
    check_victim_rss(kill, report);

    let counter = format!(
        "leak_oom_kills_total{{cgroup=\"{0}\",constraint=\"memcg\",container=\"\",\
         main_process=\"false\",namespace=\"\",oom_cgroup=\"{1}\",pod=\"\"}} 1",
        victim.relative, oom_cgroup.relative
    );
    assert!(
        metrics.contains(&counter),
        "missing `{counter}` in\n{metrics}"
    );
    let gauge = format!(
        "leak_oom_kill_working_set_bytes{{cgroup=\"{}\",container=\"\",namespace=\"\",\
         oom_cgroup=\"{}\",pod=\"\"}} {}",
        victim.relative,
        oom_cgroup.relative,
        bytes(kill, "working_set_bytes")
    );
    assert!(metrics.contains(&gauge), "missing `{gauge}` in\n{metrics}");
    // The workload is not pid 1 of a pid namespace: outside a container, not a main process.
    assert_eq!(kill["main_process"], Value::Bool(false), "{kill:#}");
    let info = "leak_attach_info{hook=\"mark_victim\",mode=\"";
    assert!(metrics.contains(info), "no attach info in\n{metrics}");
    promtool_check(metrics);
}

/// The victim's anonymous rss against the kernel's `Killed process ... anon-rss:` (printed just
/// after the victim is marked). Both read the same counters; the per-CPU batches of the rss
/// counters (6.2+) or per-thread caches (before) let them drift a little.
fn check_victim_rss(kill: &Value, report: &OomReport) {
    // Only a victim whose task the kernel program read has an rss; the classic tracepoint
    // names some victims by pid alone.
    if kill["victim_task_resolved"] != true {
        return;
    }
    let pid = kill["victim_pid"].as_u64().expect("victim_pid") as u32;
    let rss = kill["victim_rss"]
        .as_object()
        .unwrap_or_else(|| panic!("no victim_rss for a resolved victim: {kill:#}"));
    // The kernel names the thread it found holding the mm: the process, or the marked thread.
    let tid = kill["victim_tid"].as_u64().expect("victim_tid") as u32;
    let kernel_kb = [pid, tid]
        .iter()
        .find_map(|id| report.anon_rss_kb.get(id))
        .unwrap_or_else(|| panic!("the kernel's report has no anon-rss for {pid}"));
    let ours = rss["anon_bytes"].as_u64().expect("anon_bytes");
    let kernel = kernel_kb * 1024;
    let tolerance = lru_tolerance_bytes() + kernel / 50;
    assert!(
        ours.abs_diff(kernel) <= tolerance,
        "victim anon rss: agent {ours} vs kernel {kernel} (tolerance {tolerance})"
    );
}

/// The value of the first sample line starting with `prefix`, 0 when absent.
fn counter_value(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

const FAST_ANON: &[&str] = &["--interval", "1ms", "--chunk", "1MiB", "--listen", "off"];

fn anonymous_leak_with(attach: &str) {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = Cgroup::create(&hierarchy, &format!("leak-e2e-anon-{attach}"));
    cgroup.set_limit(LIMIT);
    let outcome = leak_until_killed(attach, &cgroup, FAST_ANON);
    check_against_kernel(&outcome, &cgroup, &cgroup);
    assert_eq!(
        outcome.kill["victim_pid"],
        outcome.report.pid.map(Value::from).unwrap_or_default()
    );
}

fn page_cache_leak_with(attach: &str) {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = Cgroup::create(&hierarchy, &format!("leak-e2e-file-{attach}"));
    cgroup.set_limit(LIMIT);
    let file = TempFile::on_disk(&format!("leak-e2e-file-{attach}"));
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
    let level = &kill["cgroups"][0];
    let file_lru = bytes(level, "inactive_file_bytes") + bytes(level, "active_file_bytes");
    let anon_lru = bytes(level, "inactive_anon_bytes") + bytes(level, "active_anon_bytes");
    assert!(
        bytes(kill, "working_set_bytes") >= LIMIT / 10 * 9,
        "working set below 90% of the limit at the kill: {kill:#}"
    );
    assert!(anon_lru + file_lru <= bytes(kill, "usage_bytes") + lru_tolerance_bytes());

    // The seconds before death, from the charge path: usage reached the limit first, while
    // page cache still filled part of it; the kill came when the working set got there.
    let story = &kill["story"];
    let usage_ms = story["usage_at_limit_ms_before_kill"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage never at the limit in the timeline: {kill:#}"));
    let working_set_ms = story["working_set_at_limit_ms_before_kill"]
        .as_u64()
        .unwrap_or_else(|| panic!("working set never at the limit: {kill:#}"));
    assert!(
        usage_ms > working_set_ms && usage_ms >= 100,
        "usage at the limit {usage_ms} ms before the kill, working set {working_set_ms} ms: {story:#}"
    );
    let timeline = kill["timeline"].as_array().expect("timeline");
    let first_at_limit = timeline
        .iter()
        .find(|p| p["before_kill_ms"].as_u64() == Some(usage_ms))
        .expect("the point where usage reached the limit");
    assert!(
        bytes(first_at_limit, "working_set_bytes") < bytes(first_at_limit, "usage_bytes"),
        "when usage reached the limit the working set was below it: {first_at_limit:#}"
    );
    assert!(story["peak_page_cache_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(story["limit_hits"].as_u64().unwrap_or(0) > 0, "{story:#}");
    assert_eq!(
        timeline.last().map(|p| &p["kind"]),
        Some(&Value::from("kill"))
    );
    let hits = counter_value(
        &outcome.metrics,
        &format!(
            "leak_cgroup_limit_hits_total{{cgroup=\"{}\"",
            cgroup.relative
        ),
    );
    assert!(hits > 0, "no limit hits counted:\n{}", outcome.metrics);
    // A charge fails with -ENOMEM only when the retry after the kill still finds no room; the
    // OOM reaper often frees the victim's memory first, so failures are reported, not required.
    let failures = counter_value(
        &outcome.metrics,
        &format!(
            "leak_cgroup_charge_failures_total{{cgroup=\"{}\"",
            cgroup.relative
        ),
    );
    if matches!(outcome.mode.as_str(), "fentry" | "kprobe") {
        assert!(
            outcome
                .metrics
                .contains("leak_attach_info{hook=\"try_charge_memcg\"")
                || outcome
                    .metrics
                    .contains("leak_attach_info{hook=\"try_charge\""),
            "the charge hook is not attached in {} mode",
            outcome.mode
        );
        eprintln!("charge failures counted: {failures}");
    }
    eprintln!(
        "timeline: {} points; usage at the limit {usage_ms} ms before the kill, working set \
         {working_set_ms} ms; {hits} limit hits",
        timeline.len()
    );
    eprintln!(
        "page cache written {} bytes; at the kill: file LRU {file_lru}, working set {} of usage {}",
        file_size(&file.0),
        kill["working_set_bytes"],
        kill["usage_bytes"]
    );
}

fn limit_on_parent_with(attach: &str) {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let parent = Cgroup::create(&hierarchy, &format!("leak-e2e-parent-{attach}"));
    parent.set_limit(LIMIT);
    let child = parent.child("child");
    let outcome = leak_until_killed(attach, &child, FAST_ANON);
    check_against_kernel(&outcome, &child, &parent);
    let cgroups = outcome.kill["cgroups"].as_array().expect("cgroups");
    assert_eq!(cgroups[0]["path"].as_str(), Some(child.relative.as_str()));
    assert_eq!(cgroups[0]["hit_limit"], Value::Bool(false));
    assert_eq!(cgroups[1]["path"].as_str(), Some(parent.relative.as_str()));
    assert_eq!(cgroups[1]["hit_limit"], Value::Bool(true));
}

/// `memory.oom.group` (cgroup v2): the OOM killer kills every process of the group, and each
/// victim gets its own snapshot with its own pid.
fn group_kill_with(attach: &str) {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if hierarchy.version != leak_user::enrich::cgroupfs::Version::V2 {
        eprintln!("SKIP group kill: memory.oom.group exists only on cgroup v2 (this host has v1)");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = Cgroup::create(&hierarchy, &format!("leak-e2e-group-{attach}"));
    cgroup.set_limit(LIMIT);
    cgroup.write("memory.oom.group", "1");
    let mut agent = Agent::start(&["--attach", attach]);
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
        member.wait_for_oom_kill(Duration::from_secs(120));
    }
    let kills: Vec<Value> = pids.iter().map(|&pid| agent.wait_for_kill(pid)).collect();
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
    let task_in_kernel = kills.iter().all(|k| {
        matches!(
            k["attach_mode"].as_str(),
            Some("fentry" | "kprobe" | "tp_btf")
        )
    });
    for kill in &kills {
        assert_eq!(kill["cgroup"].as_str(), Some(cgroup.relative.as_str()));
        assert_eq!(kill["oom_cgroup"].as_str(), Some(cgroup.relative.as_str()));
        assert_eq!(bytes(kill, "limit_bytes"), LIMIT);
        if task_in_kernel {
            let victim = format!(
                "pid {} (thread {}, {}) via {}",
                kill["victim_pid"], kill["victim_tid"], kill["victim_comm"], kill["attach_mode"]
            );
            assert_eq!(
                kill["victim_task_resolved"].as_bool(),
                Some(true),
                "the victim's task was not read in the kernel: {victim}"
            );
            assert!(kill["victim_rss"].is_object(), "no rss for {victim}");
        }
    }
    let all = agent.kills();
    for pid in &pids {
        let reports = all
            .iter()
            .filter(|k| k["victim_pid"].as_u64() == Some(u64::from(*pid)))
            .count();
        assert_eq!(reports, 1, "pid {pid} reported {reports} times");
    }
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

/// A global OOM: the machine runs out of memory and no cgroup is at a limit. It exhausts the
/// whole machine, so it runs only where the machine is the test's own (the VMs of `cargo xtask
/// vm`, which set LEAK_TEST_GLOBAL_OOM), never on a shared host.
fn global_oom_with(attach: &str) {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if std::env::var_os("LEAK_TEST_GLOBAL_OOM").is_none() {
        eprintln!(
            "SKIP global OOM: it exhausts the machine's memory, so it runs only in the test VMs \
             (LEAK_TEST_GLOBAL_OOM=1)"
        );
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // No limit: only the machine's memory bounds this cgroup.
    let cgroup = Cgroup::create(&hierarchy, &format!("leak-e2e-global-{attach}"));
    // This harness and the agent (which inherits it) are spared; the workload is the choice.
    let _spared = SparedFromOom::new();
    let mut agent = Agent::start(&["--attach", attach]);
    let mut kmsg = Kmsg::open_at_end().expect("open /dev/kmsg");
    let mut workload = spawn_in(
        &cgroup,
        &["--interval", "1ms", "--chunk", "8MiB", "--listen", "off"],
    );
    let pid = workload.pid();
    set_oom_score_adj(pid, 1000);
    workload.wait_for_oom_kill(Duration::from_secs(300));
    let kill = agent.wait_for_kill(pid);
    let mut seen = Vec::new();
    let report = report_for(&mut kmsg, &mut seen, pid);
    assert_eq!(report.constraint.as_deref(), Some("CONSTRAINT_NONE"));
    assert_eq!(report.oom_memcg, None);
    assert_eq!(report.task_memcg.as_deref(), Some(cgroup.relative.as_str()));

    let mode = kill["attach_mode"].as_str().unwrap_or_default().to_owned();
    let expected_attribution = match mode.as_str() {
        "fentry" | "kprobe" => "oom_control",
        _ => "inferred",
    };
    assert_eq!(kill["attribution"].as_str(), Some(expected_attribution));
    assert_eq!(kill["constraint"].as_str(), Some("none"), "global OOM");
    assert_eq!(kill["oom_cgroup"], Value::Null, "no cgroup hit a limit");
    // The classic tracepoint gives a bare pid: the victim's task is known only when it is the
    // task that ran out of memory, which a global OOM does not promise.
    let resolved = kill["victim_task_resolved"] == true;
    if resolved {
        assert_eq!(kill["cgroup"].as_str(), Some(cgroup.relative.as_str()));
        assert_eq!(kill["victim_comm"].as_str(), Some("leak"));
        assert_eq!(kill["victim_oom_score_adj"].as_i64(), Some(1000));
    } else {
        assert_eq!(
            mode, "tracepoint",
            "only the classic tracepoint leaves a victim unread"
        );
        eprintln!("victim not the allocating task: snapshot of the trigger's cgroups");
    }
    if expected_attribution == "oom_control" {
        assert_eq!(kill["oom_control"]["memcg_id"], Value::Null);
        assert!(kill["oom_control"]["totalpages"]
            .as_u64()
            .is_some_and(|p| p > 0));
    }
    // The headline figures describe the victim's own (unlimited) cgroup, which held most of
    // the machine's memory.
    assert_eq!(kill["limit_bytes"], Value::Null);
    assert!(
        kill["cgroups"]
            .as_array()
            .expect("cgroups")
            .iter()
            .all(|c| c["hit_limit"] == false),
        "{kill:#}"
    );
    let usage = bytes(&kill, "usage_bytes");
    if resolved {
        assert!(usage >= 512 << 20, "usage {usage} at a global OOM");
    }
    assert_eq!(
        bytes(&kill, "working_set_bytes"),
        usage.saturating_sub(bytes(&kill, "inactive_file_bytes"))
    );
    check_victim_rss(&kill, &report);
    let (status, metrics) = agent.get("/metrics");
    assert_eq!(status, 200);
    let counter = format!(
        "leak_oom_kills_total{{cgroup=\"{}\",constraint=\"none\",container=\"\",\
         main_process=\"false\",namespace=\"\",oom_cgroup=\"\",pod=\"\"}} 1",
        kill["cgroup"].as_str().unwrap_or_default()
    );
    assert!(
        metrics.contains(&counter),
        "missing `{counter}` in\n{metrics}"
    );
    assert!(agent.stop().success());
    eprintln!(
        "[{attach} -> {mode}] global OOM, pid {pid}: cgroup usage {usage}, victim anon rss {} \
         (kernel anon-rss {}kB)",
        kill["victim_rss"]["anon_bytes"],
        report.anon_rss_kb.get(&pid).copied().unwrap_or(0)
    );
}

/// Runs `scenario` once per attach mode under test.
fn for_each_mode(scenario: fn(&str)) {
    for mode in attach_modes() {
        eprintln!("--- attach mode {mode}");
        scenario(&mode);
    }
}

#[test]
fn anonymous_leak() {
    for_each_mode(anonymous_leak_with);
}

#[test]
fn page_cache_leak() {
    for_each_mode(page_cache_leak_with);
}

#[test]
fn limit_on_parent() {
    for_each_mode(limit_on_parent_with);
}

#[test]
fn global_oom() {
    for_each_mode(global_oom_with);
}

#[test]
fn group_kill() {
    for_each_mode(group_kill_with);
}

/// `leak demo` with short settings: both runs end in a kill, and the page-cache run tells that
/// usage sat at the limit before the working set got there.
#[test]
fn demo_tells_the_story() {
    let Some(_) = privileged() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::var("LEAK_TEST_DISK_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let output = std::process::Command::new(leak_bin())
        .args([
            "demo",
            "--limit",
            "48MiB",
            "--timeout",
            "5m",
            "--file-dir",
            &dir,
        ])
        .output()
        .expect("run leak demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "leak demo failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
    for expected in [
        "== run 1: anonymous memory only",
        "== run 2: anonymous memory + page cache",
        "usage reached the limit:",
        "working set reached the limit:",
        "usage sat at the limit for",
        "it follows container_memory_working_set_bytes",
        "leak demo: done",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert_eq!(stdout.matches("kill: pid ").count(), 2);
}

/// Bad input gets a clear answer and leaves the agent serving.
#[test]
fn http_rejects_bad_requests_and_keeps_serving() {
    let Some(_) = privileged() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut agent = Agent::start(&[]);
    let raw = |bytes: &[u8]| -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(agent.addr).expect("connect");
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
    let _remove = TempFile(copy.clone());
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
