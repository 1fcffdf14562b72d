//! What a node can take away from the agent while it runs, with real kills: the victim's cgroup
//! removed before the agent reads the kill, the kubelet's log tree unreadable, tracefs
//! unmounted, a pin directory that is not on bpffs. Each time the agent keeps serving, says why
//! in its log, and reports the kill with everything the kernel gave it.

mod support;

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use leak_user::{experiment::harness::report_figure, model::kill::Kill};
use support::*;

const LIMIT: u64 = 64 << 20;

/// Sends `signal` (a name: STOP, CONT) to the agent.
fn signal(agent: &Agent, signal: &str) {
    let pid = agent.0.pid().expect("the agent runs");
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The agent's `leak_oom_kills_total` for `cgroup`, once it is there (counters are brought up
/// to date as kills are read).
fn counted(agent: &Agent, cgroup: &str) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let kills = agent_oom_kills(&agent.page("/metrics"), cgroup);
        if kills > 0 || std::time::Instant::now() > deadline {
            return kills;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Leaks in `cgroup` until the kernel kills the leak; the agent's report of that kill.
fn leak_until_reported(agent: &Agent, cgroup: &Cgroup) -> Kill {
    let mut leaker = spawn_in(cgroup, FAST_ANON);
    let pid = leaker.pid();
    wait_for_oom_kill(&mut leaker, Duration::from_secs(120));
    agent.wait_for_kill(pid)
}

/// The kill's figures are the kernel's, not the filesystem's: the limit exactly, a usage at it.
fn check_kernel_figures(kill: &Kill, cgroup: &str) {
    assert_eq!(kill.cgroup, cgroup, "{kill:#?}");
    assert_eq!(kill.limit_bytes, Some(LIMIT), "{kill:#?}");
    let usage = kill.usage_bytes;
    assert!(
        usage > LIMIT - (LIMIT / 8) && usage <= LIMIT,
        "usage {usage} at the kill, limit {LIMIT}: {kill:#?}"
    );
    assert!(kill.working_set_bytes > 0, "{kill:#?}");
}

/// The agent stopped (SIGSTOP) while the kernel kills and the victim's cgroup is removed: when
/// it reads the kill, the cgroup is gone from the filesystem. The kill is reported whole, from
/// what the kernel program read at the kill (path, limit, usage, breakdown), and counted.
#[test]
fn a_cgroup_removed_before_the_agent_reads_the_kill() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut agent = Agent::start(&["--charge-attach", "off"]);
    let victim = Cgroup::with_limit(&hierarchy, "leak-e2e-vanish", LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));
    let relative = victim.relative.clone();
    let path = victim.path();
    signal(&agent, "STOP");
    let mut leaker = spawn_in(&victim, FAST_ANON);
    let pid = leaker.pid();
    wait_for_oom_kill(&mut leaker, Duration::from_secs(120));
    drop(victim);
    assert!(!path.exists(), "{} still exists", path.display());
    signal(&agent, "CONT");

    let kill = agent.wait_for_kill(pid);
    check_kernel_figures(&kill, &relative);
    assert_eq!(counted(&agent, &relative), 1, "{}", agent.log());
    report_figure(
        "a_cgroup_removed_before_the_agent_reads_the_kill",
        &format!(
            "kill of pid {pid} in the removed {relative}: usage {:?}, limit {:?}",
            kill.usage_bytes, kill.limit_bytes
        ),
    );
    assert!(agent.stop().success(), "{}", agent.log());
}

/// A kubelet-style container cgroup whose node root has `/var/log/pods` as something the agent
/// cannot read as a directory: the kill is reported and counted without names, and the agent
/// keeps serving.
#[test]
fn an_unreadable_pod_log_tree_leaves_the_kill_unnamed() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = TempDir::new("leak-e2e-rootfs-unreadable").unwrap_or_else(|err| panic!("{err}"));
    // Both log directories are there when the agent starts (it refuses to start without
    // them, cri_e2e checks that); /var/log/pods breaks while it runs.
    for dir in ["var/log/pods", "var/log/containers"] {
        fs::create_dir_all(rootfs.path().join(dir)).expect("mkdir the log directories");
    }
    let node = cgroup(&hierarchy, "leak-e2e-node-unreadable");
    let kubepods = child(&node, "kubepods");
    let pod = child(&kubepods, "pod4b1c9e52-8d0f-4c7a-9e3b-2f6a1d5c8e70");
    let container = child(&pod, &"5f3e".repeat(16));
    container
        .set_limit(LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));

    let rootfs_arg = rootfs.path().to_string_lossy().into_owned();
    let mut agent = Agent::start(&["--rootfs", &rootfs_arg, "--charge-attach", "off"]);
    // Not a directory any more: every read of it fails (root reads through permissions, not
    // this).
    let pods = rootfs.path().join("var/log/pods");
    fs::remove_dir(&pods).expect("rmdir var/log/pods");
    fs::write(&pods, "not a directory").expect("var/log/pods");
    fs::set_permissions(&pods, fs::Permissions::from_mode(0o000)).expect("chmod");
    let kill = leak_until_reported(&agent, &container);
    check_kernel_figures(&kill, &container.relative);
    assert_eq!(
        (
            kill.names.namespace.as_str(),
            kill.names.pod.as_str(),
            kill.names.container.as_str()
        ),
        ("", "", ""),
        "names from an unreadable log tree: {kill:#?}"
    );
    assert_eq!(counted(&agent, &container.relative), 1);
    assert_eq!(agent.get("/healthz").0, 200);
    assert!(
        agent
            .log()
            .lines()
            .any(|line| line.contains("WARN") && line.contains("var/log/pods")),
        "no warning about the unreadable log tree:\n{}",
        agent.log()
    );
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The pin directory on a filesystem that is not bpffs: the agent runs with its probes
/// unpinned (`leak_probes_pinned 0`), says why, and reports kills.
#[test]
fn a_pin_directory_off_bpffs_runs_unpinned() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("leak-e2e-pins-off-bpffs").unwrap_or_else(|err| panic!("{err}"));
    let pin_dir = dir.path().join("leak").to_string_lossy().into_owned();
    let mut agent = Agent::start(&["--pin-dir", &pin_dir, "--charge-attach", "off"]);
    assert_eq!(
        sample(&agent.page("/metrics"), "leak_probes_pinned"),
        Some(0.0),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("not on a BPF filesystem"),
        "the agent did not say why it runs unpinned:\n{}",
        agent.log()
    );
    let victim = Cgroup::with_limit(&hierarchy, "leak-e2e-pins-off-bpffs", LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));
    let kill = leak_until_reported(&agent, &victim);
    check_kernel_figures(&kill, &victim.relative);
    assert!(agent.stop().success(), "{}", agent.log());
    assert!(
        !Path::new(&pin_dir).join("events").exists(),
        "something was pinned off bpffs"
    );
}

/// tracefs unmounted (in a mount namespace of the agent's own): the classic tracepoint mode
/// mounts it again and reports the kill.
#[test]
fn an_unmounted_tracefs_is_mounted_again() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if !have_tool("unshare") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("leak-e2e-no-tracefs").unwrap_or_else(|err| panic!("{err}"));
    let wrapper = dir.path().join("leak-without-tracefs");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             exec unshare --mount --propagation private sh -c '\
             umount /sys/kernel/debug/tracing 2>/dev/null; \
             umount /sys/kernel/tracing 2>/dev/null; \
             if grep -q \" tracefs \" /proc/self/mounts; then echo tracefs still mounted >&2; exit 3; fi; \
             exec \"$0\" \"$@\"' {} \"$@\"\n",
            leak_bin()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut agent = Agent(
        Tracer::start(
            &wrapper,
            &["--attach", "tracepoint", "--charge-attach", "off"],
            &[],
        )
        .unwrap_or_else(|err| panic!("{err}")),
    );
    assert_eq!(agent.attach_mode(), "tracepoint");
    assert!(
        agent.log().contains("mounted tracefs at"),
        "the agent did not say it mounted tracefs:\n{}",
        agent.log()
    );
    let victim = Cgroup::with_limit(&hierarchy, "leak-e2e-no-tracefs", LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));
    let kill = leak_until_reported(&agent, &victim);
    check_kernel_figures(&kill, &victim.relative);
    assert!(agent.stop().success(), "{}", agent.log());
}
