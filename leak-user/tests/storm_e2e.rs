//! Storms, for real, with the kernel's own `oom_kill` counters as ground truth: a thousand kills
//! across five hundred memory cgroups arrive complete and once each, and a ring buffer too small
//! for what the kernel sends while the agent is stopped loses kills only as counted losses.

mod support;

use std::{process::Command, time::Duration};

use leak_user::experiment::harness::report_figure;
use support::*;

#[test]
fn a_thousand_kills_across_five_hundred_cgroups() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    const CGROUPS: usize = 500;
    const WAVE: usize = 50;
    let (_parent, children) = storm_cgroups(&hierarchy, "leak-e2e-storm1000", CGROUPS);
    let before: Vec<u64> = children.iter().map(kernel_oom_kills).collect();
    let mut agent = Agent::start(&["--max-kills", "2000"]);
    let started = std::time::Instant::now();
    // Two kills in every cgroup, fifty cgroups at a time.
    for _round in 0..2 {
        for wave in children.chunks(WAVE) {
            kill_each(wave);
        }
    }
    let took = started.elapsed();
    // The kernel's count per cgroup, against the agent's: every kill once, none twice.
    let expected: u64 = 2 * CGROUPS as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = agent_kills_by_cgroup(&agent);
    while seen.values().sum::<u64>() < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        seen = agent_kills_by_cgroup(&agent);
    }
    let kills = agent.kills();
    for (child, before) in children.iter().zip(&before) {
        let kernel = kernel_oom_kills(child) - before;
        assert_eq!(kernel, 2, "{}: the kernel counted {kernel}", child.relative);
        let reported: Vec<String> = kills
            .iter()
            .filter(|k| k.cgroup == child.relative)
            .map(|k| {
                format!(
                    "pid {} killed {:?} via {}",
                    k.victim_pid, k.killed, k.attach_mode
                )
            })
            .collect();
        assert_eq!(
            seen.get(&child.relative).copied().unwrap_or(0),
            kernel,
            "{}: the agent's count against the kernel's; /kills has {reported:?}; lost {:?}",
            child.relative,
            sample(&agent.page("/metrics"), "leak_events_lost_total")
        );
    }
    assert_eq!(kills.len() as u64, expected, "/kills");
    let mut pids: Vec<u32> = kills.iter().map(|k| k.victim_pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len() as u64, expected, "a victim reported twice");
    assert_eq!(
        sample(&agent.page("/metrics"), "leak_events_lost_total"),
        Some(0.0)
    );
    report_figure(
        "a_thousand_kills_across_five_hundred_cgroups",
        &format!(
            "storm: {expected} kills across {CGROUPS} cgroups in {:.1} s, all reported once",
            took.as_secs_f64()
        ),
    );
    assert!(agent.stop().success());
}

#[test]
fn a_tiny_ring_buffer_loses_only_what_it_counts() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    const KILLS: usize = 12;
    let (_parent, children) = storm_cgroups(&hierarchy, "leak-e2e-tinyring", KILLS);
    let before: Vec<u64> = children.iter().map(kernel_oom_kills).collect();
    // Two pages: room for two snapshots.
    let mut agent = Agent::start(&["--ring-buffer", "8KiB", "--charge-attach", "off"]);
    let pid = agent.0.pid().expect("the agent runs");
    // Stopped, the agent reads nothing: the kernel's programs fill the ring and then lose.
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {pid}");
    };
    signal("STOP");
    for child in &children {
        kill_each(std::slice::from_ref(child));
    }
    signal("CONT");
    let kernel: u64 = children
        .iter()
        .zip(&before)
        .map(|(child, before)| kernel_oom_kills(child) - before)
        .sum();
    assert_eq!(kernel, KILLS as u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = agent.kills().len() as u64;
        let lost = sample(&agent.page("/metrics"), "leak_events_lost_total").unwrap_or(0.0) as u64;
        if delivered + lost == kernel {
            assert!(lost > 0, "nothing lost: the ring was not small enough");
            assert!(delivered > 0, "nothing delivered");
            report_figure(
                "a_tiny_ring_buffer_loses_only_what_it_counts",
                &format!("{delivered} delivered + {lost} counted lost = {kernel} kills"),
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "delivered {delivered} + lost {lost} != the kernel's {kernel}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.stop().success());
}
