//! Kills across agent restarts, for real: probes pinned under bpffs keep recording while the
//! agent is SIGKILLed, the next agent drains them and replaces the old probes, and each kill
//! the kernel counted (`oom_kill`, per cgroup) is on `/kills` once. Without pinning, the kills
//! while no agent ran are counted from the kernel's counters. Each test pins under a directory
//! of its own, removed even when it fails.

mod support;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use leak_user::{experiment::harness::report_figure, model::kill::Kill};
use support::*;

/// A pin directory of the test's own under bpffs; everything pinned there is removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/leak-e2e-{name}-{}",
            std::process::id()
        ));
        let _ = leak_user::kernel::pin::unpin_all(&dir);
        Self(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }

    /// The generation directories pinned now.
    fn generations(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(err) = leak_user::kernel::pin::unpin_all(&self.0) {
            eprintln!("cleaning {}: {err}", self.0.display());
        }
    }
}

/// An agent with its probes pinned under `pins` and its store in `state`.
fn pinned_agent(pins: &PinDir, state: &TempDir, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--pin-dir",
        pins.arg(),
        "--state-dir",
        state.path().to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Agent::start(&args)
}

fn kernel_deltas(children: &[Cgroup], before: &[u64]) -> HashMap<String, u64> {
    children
        .iter()
        .zip(before)
        .map(|(child, before)| (child.relative.clone(), kernel_oom_kills(child) - before))
        .collect()
}

/// Waits until `/kills` holds `expected` kills in `cgroups`; the kills then.
fn wait_for_kills(agent: &Agent, cgroups: &HashSet<String>, expected: u64) -> Vec<Kill> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kills: Vec<Kill> = agent
            .kills()
            .into_iter()
            .filter(|kill| cgroups.contains(&kill.cgroup))
            .collect();
        if kills.len() as u64 >= expected || Instant::now() > deadline {
            return kills;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every kill once: per cgroup as many as the kernel counted, no task twice.
fn assert_once_each(kills: &[Kill], kernel: &HashMap<String, u64>, agent: &Agent) {
    let mut per_cgroup: HashMap<&str, u64> = HashMap::new();
    for kill in kills {
        *per_cgroup.entry(kill.cgroup.as_str()).or_default() += 1;
    }
    for (cgroup, &counted) in kernel {
        assert_eq!(
            per_cgroup.get(cgroup.as_str()).copied().unwrap_or(0),
            counted,
            "{cgroup}: /kills against the kernel's oom_kill; agent log:\n{}",
            agent.log()
        );
    }
    let mut tasks = HashSet::new();
    for kill in kills {
        let start = kill.victim_start_ns.expect("the victim task's start time");
        assert!(
            tasks.insert((kill.victim_tid, start)),
            "thread {} reported twice",
            kill.victim_tid
        );
    }
}

/// A full snapshot: the victim's task read in the kernel, its cgroup chain, usage at its limit.
fn assert_full_snapshot(kill: &Kill) {
    assert!(kill.victim_task_resolved, "{kill:?}");
    assert!(!kill.cgroups.is_empty());
    assert_eq!(kill.killed, Some(true));
    assert_eq!(kill.limit_bytes, Some(8 << 20), "{}", kill.cgroup);
    assert!(
        kill.usage_bytes + (2 << 20) >= 8 << 20,
        "usage {} of an 8 MiB limit",
        kill.usage_bytes
    );
}

/// The ids of the maps the programs of `generation`'s pinned links use, and those links' ids.
fn generation_links(generation: &Path) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let (mut maps, mut links) = (BTreeSet::new(), BTreeSet::new());
    let programs: HashMap<u32, Vec<u32>> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| (info.id(), info.map_ids().ok().flatten().unwrap_or_default()))
        .collect();
    let pinned: Vec<PathBuf> = std::fs::read_dir(generation)
        .expect("generation directory")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link-"))
        })
        .collect();
    for path in pinned {
        let link = aya::programs::links::PinnedLink::from_pin(&path).expect("pinned link");
        let fd: aya::programs::links::FdLink = link.into();
        let info = fd.info().expect("link info");
        links.insert(info.id());
        maps.extend(
            programs
                .get(&info.program_id())
                .cloned()
                .unwrap_or_default(),
        );
    }
    (maps, links)
}

/// The kernel's links whose programs use one of `maps`.
fn links_using(maps: &BTreeSet<u32>) -> BTreeSet<u32> {
    let programs: HashSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| {
            info.map_ids()
                .ok()
                .flatten()
                .unwrap_or_default()
                .iter()
                .any(|id| maps.contains(id))
        })
        .map(|info| info.id())
        .collect();
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|link| programs.contains(&link.program_id()))
        .map(|link| link.id())
        .collect()
}

#[test]
fn kills_while_the_agent_is_down_are_reported_once_after_restart() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("down");
    let state = TempDir::new("leak-e2e-pin-down").unwrap_or_else(|err| panic!("{err}"));
    let (_parent, children) = storm_cgroups(&hierarchy, "leak-e2e-pindown", 3);
    let before: Vec<u64> = children.iter().map(kernel_oom_kills).collect();
    let mut first = pinned_agent(&pins, &state, &[]);
    // One kill seen by the first agent.
    kill_each(&children[..1]);
    first.wait_for_kill_in(&children[0].relative);
    first
        .0
        .end(libc::SIGKILL)
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        pins.generations().len(),
        1,
        "the first agent's probes stay pinned"
    );
    // While no agent runs: the pinned probes record.
    kill_each(&children);
    kill_each(&children[1..2]);
    let kernel = kernel_deltas(&children, &before);
    assert_eq!(kernel.values().sum::<u64>(), 5);
    let second = pinned_agent(&pins, &state, &[]);
    let cgroups: HashSet<String> = kernel.keys().cloned().collect();
    let kills = wait_for_kills(&second, &cgroups, 5);
    assert_once_each(&kills, &kernel, &second);
    for kill in &kills {
        assert_full_snapshot(kill);
    }
    // The second agent counted the four it drained (the first one's kill is in the store).
    let counted = agent_kills_by_cgroup(&second);
    let drained: u64 = cgroups.iter().filter_map(|c| counted.get(c)).sum();
    assert_eq!(drained, 4, "{counted:?}");
    let metrics = second.page("/metrics");
    assert!(
        !metrics.contains("leak_oom_kills_unobserved_total{"),
        "the pinned probes saw every kill:\n{metrics}"
    );
    assert_eq!(sample(&metrics, "leak_probes_pinned"), Some(1.0));
    report_figure(
        "kills_while_the_agent_is_down_are_reported_once_after_restart",
        &format!("4 kills while the agent was SIGKILLed, all 5 on /kills once ({kernel:?})"),
    );
}

#[test]
fn an_agent_killed_in_a_storm_and_restarted_reports_every_kill_once() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CGROUPS: usize = 100;
    const WAVE: usize = 25;
    let pins = PinDir::new("storm");
    let state = TempDir::new("leak-e2e-pin-storm").unwrap_or_else(|err| panic!("{err}"));
    let (_parent, children) = storm_cgroups(&hierarchy, "leak-e2e-pinstorm", CGROUPS);
    let before: Vec<u64> = children.iter().map(kernel_oom_kills).collect();
    let ring = ["--ring-buffer", "4MiB", "--max-kills", "1000"];
    let mut first = pinned_agent(&pins, &state, &ring);
    // The cgroups go to the storm's thread and come back with it (before their parent goes).
    let storm = std::thread::spawn(move || {
        for _round in 0..2 {
            for wave in children.chunks(WAVE) {
                kill_each(wave);
            }
        }
        children
    });
    // SIGKILLed in the middle of the storm, restarted a second later.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.kills().len() < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    first
        .0
        .end(libc::SIGKILL)
        .unwrap_or_else(|err| panic!("{err}"));
    // What the first agent stored, from the store itself: the second agent numbers after it.
    let kept: u64 = rusqlite::Connection::open(state.path().join("kills.db"))
        .and_then(|db| {
            db.query_row("SELECT COALESCE(MAX(seq), 0) FROM kills", [], |row| {
                row.get(0)
            })
        })
        .expect("the first agent's store");
    std::thread::sleep(Duration::from_secs(1));
    let second = pinned_agent(&pins, &state, &ring);
    let children = storm.join().expect("the storm");
    let kernel = kernel_deltas(&children, &before);
    let total: u64 = kernel.values().sum();
    assert_eq!(total, 2 * CGROUPS as u64, "the kernel's count");
    let cgroups: HashSet<String> = kernel.keys().cloned().collect();
    let kills = wait_for_kills(&second, &cgroups, total);
    assert_once_each(&kills, &kernel, &second);
    // What the second agent counted is what it served: /kills past the first agent's.
    let counted: u64 = agent_kills_by_cgroup(&second)
        .iter()
        .filter(|(cgroup, _)| cgroups.contains(*cgroup))
        .map(|(_, kills)| kills)
        .sum();
    let served_by_second = kills.iter().filter(|kill| kill.seq > kept).count() as u64;
    // Every kill served is a kill the kernel made: none may say otherwise.
    let doubted: Vec<_> = kills
        .iter()
        .filter(|kill| kill.killed != Some(true))
        .map(|kill| (kill.seq, kill.victim_pid, &kill.cgroup, kill.killed))
        .collect();
    assert_eq!(
        counted, served_by_second,
        "leak_oom_kills_total of the second agent; kills not known killed: {doubted:?}"
    );
    assert!(
        kept > 0 && served_by_second > 0,
        "the restart was not in the storm"
    );
    assert_eq!(
        sample(&second.page("/metrics"), "leak_events_lost_total"),
        Some(0.0)
    );
    report_figure(
        "an_agent_killed_in_a_storm_and_restarted_reports_every_kill_once",
        &format!(
            "{total} kills across {CGROUPS} cgroups, agent SIGKILLed after {kept} stored: all \
             on /kills once ({served_by_second} by the restarted agent)"
        ),
    );
}

#[test]
fn unpin_removes_everything_and_an_unpinned_agent_works_after() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("unpin");
    let state = TempDir::new("leak-e2e-pin-unpin").unwrap_or_else(|err| panic!("{err}"));
    let mut agent = pinned_agent(&pins, &state, &[]);
    assert!(agent.stop().success());
    let generations = pins.generations();
    assert_eq!(generations.len(), 1, "SIGTERM leaves the probes pinned");
    let (maps, links) = generation_links(&generations[0]);
    assert!(!links.is_empty());
    assert_eq!(links_using(&maps), links, "the pinned links are attached");
    let output = std::process::Command::new(leak_bin())
        .args(["unpin", "--pin-dir", pins.arg()])
        .output()
        .expect("leak unpin");
    assert!(output.status.success(), "{output:?}");
    assert!(!pins.0.exists(), "leak unpin leaves {}", pins.0.display());
    assert!(
        links_using(&maps).is_empty(),
        "links left attached after leak unpin"
    );
    let again = std::process::Command::new(leak_bin())
        .args(["unpin", "--pin-dir", pins.arg()])
        .output()
        .expect("leak unpin");
    assert!(
        again.status.success(),
        "leak unpin is idempotent: {again:?}"
    );

    let cgroup = cgroup(&hierarchy, "leak-e2e-unpinned");
    cgroup
        .set_limit(8 << 20)
        .unwrap_or_else(|err| panic!("{err}"));
    let mut unpinned = Agent::start(&["--no-pin", "--pin-dir", pins.arg()]);
    let mut leaker = spawn_in(&cgroup, FAST_ANON);
    wait_for_oom_kill(&mut leaker, Duration::from_secs(60));
    let kill = unpinned.wait_for_kill(leaker.pid());
    assert_full_snapshot(&kill);
    assert_eq!(
        sample(&unpinned.page("/metrics"), "leak_probes_pinned"),
        Some(0.0)
    );
    assert!(unpinned.stop().success());
    assert!(!pins.0.exists(), "a --no-pin agent pinned something");
}

#[test]
fn kills_while_an_unpinned_agent_is_down_are_counted_unobserved() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("unobserved");
    let state = TempDir::new("leak-e2e-pin-unobserved").unwrap_or_else(|err| panic!("{err}"));
    let (_parent, children) = storm_cgroups(&hierarchy, "leak-e2e-unobserved", 2);
    let args = [
        "--no-pin",
        "--pin-dir",
        pins.arg(),
        "--state-dir",
        state.path().to_str().expect("utf-8 path"),
    ];
    let mut first = Agent::start(&args);
    // Seen: one kill; then the agent keeps its view of the kernel's counters.
    kill_each(&children[..1]);
    first.wait_for_kill_in(&children[0].relative);
    std::thread::sleep(Duration::from_secs(3));
    first
        .0
        .end(libc::SIGKILL)
        .unwrap_or_else(|err| panic!("{err}"));
    let before: Vec<u64> = children.iter().map(kernel_oom_kills).collect();
    kill_each(&children);
    kill_each(&children[..1]);
    let missed = kernel_deltas(&children, &before);
    let second = Agent::start(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let series = |cgroup: &str| format!("leak_oom_kills_unobserved_total{{cgroup=\"{cgroup}\"}}");
    loop {
        let metrics = second.page("/metrics");
        let counted: HashMap<String, u64> = missed
            .keys()
            .map(|cgroup| {
                let value = sample(&metrics, &series(cgroup)).unwrap_or(0.0) as u64;
                (cgroup.clone(), value)
            })
            .collect();
        if counted == missed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unobserved {counted:?}, the kernel's {missed:?}; log:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let cgroups: HashSet<String> = missed.keys().cloned().collect();
    let seen = second
        .kills()
        .iter()
        .filter(|kill| cgroups.contains(&kill.cgroup))
        .count();
    assert_eq!(seen, 1, "only the first agent's kill is on /kills");
    report_figure(
        "kills_while_an_unpinned_agent_is_down_are_counted_unobserved",
        &format!("unobserved while the agent was down: {missed:?}"),
    );
}

#[test]
fn a_restart_with_pinned_state_leaves_one_set_of_links() {
    let Some(_hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("replace");
    let state = TempDir::new("leak-e2e-pin-replace").unwrap_or_else(|err| panic!("{err}"));
    let mut first = pinned_agent(&pins, &state, &[]);
    first
        .0
        .end(libc::SIGKILL)
        .unwrap_or_else(|err| panic!("{err}"));
    let old = pins.generations();
    assert_eq!(old.len(), 1);
    let (old_maps, old_links) = generation_links(&old[0]);
    assert_eq!(links_using(&old_maps), old_links);
    let mut second = pinned_agent(&pins, &state, &[]);
    let new = pins.generations();
    assert_eq!(new.len(), 1, "one generation pinned: {new:?}");
    assert_ne!(new, old, "the old generation is replaced");
    assert!(
        links_using(&old_maps).is_empty(),
        "the replaced agent's links are still attached"
    );
    let (new_maps, new_links) = generation_links(&new[0]);
    assert_eq!(
        links_using(&new_maps),
        new_links,
        "exactly the pinned links"
    );
    assert_eq!(new_links.len(), old_links.len());
    assert!(second.stop().success());
    assert_eq!(pins.generations(), new, "SIGTERM keeps the pins");
    assert_eq!(links_using(&new_maps), new_links);
    report_figure(
        "a_restart_with_pinned_state_leaves_one_set_of_links",
        &format!("{} links before and after the replacement", new_links.len()),
    );
}
