//! What only the end-to-end tests need on top of the experiment harness
//! (`leak_user::experiment::harness`, shared with `leak demo` and `leak bench`): which binary
//! and attach modes to test, when a test may run here (and the skip report when it may not),
//! the agent with panicking accessors, and the external tools that check its output.
#![allow(dead_code)]

pub mod browser;
pub mod node;
pub mod prometheus;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::Mutex,
    time::Duration,
};

// Each test binary uses a different part of these.
#[allow(unused_imports)]
pub use leak_user::experiment::harness::{
    current_test, skip, Cgroup, Process, RemoveOnDrop, SkipKind, TempDir, Tracer,
};
use leak_user::{enrich::cgroupfs::MemoryHierarchy, experiment::harness, model::kill::Kill};

/// The `leak` binary: cargo's, or `$LEAK_BIN` where the tests run away from the build (VMs).
pub fn leak_bin() -> String {
    std::env::var("LEAK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_leak").to_owned())
}

/// The attach modes to run each scenario with: `$LEAK_TEST_ATTACH` (comma-separated), by
/// default `auto` and the classic `tracepoint` (the two ends of the fallback chain).
pub fn attach_modes() -> Vec<String> {
    std::env::var("LEAK_TEST_ATTACH")
        .unwrap_or_else(|_| "auto,tracepoint".into())
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// OOM tests share the kernel log and its rate limit: run them one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Reports the running test as skipped for `reason`; the caller returns right after.
pub fn skip_test(reason: &str, kind: SkipKind) {
    skip(&current_test(), reason, kind);
}

/// The memory hierarchy, when privileged tests can run here; otherwise the test is reported
/// skipped (it hides every kernel-facing feature, so it fails under CI=true) and must return.
pub fn privileged() -> Option<MemoryHierarchy> {
    if !leak_user::sys::is_root() {
        skip_test(
            "not root: the test creates memory cgroups and loads BPF programs",
            SkipKind::HidesFeature,
        );
        return None;
    }
    match MemoryHierarchy::discover() {
        Ok(hierarchy) => Some(hierarchy),
        Err(err) => {
            skip_test(&err.to_string(), SkipKind::HidesFeature);
            None
        }
    }
}

/// Whether `tool` can be run here (`tool --version`); if not, the running test is reported
/// skipped (hiding the feature the tool checks) and must return.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match found {
        Ok(_) => true,
        Err(err) => {
            skip_test(
                &format!(
                    "{tool} cannot be run ({err}); `cargo xtask test` installs it from \
                     Debian (and the VM initramfs carries prometheus and promtool)"
                ),
                SkipKind::HidesFeature,
            );
            false
        }
    }
}

/// A memory cgroup at `/<name>-<pid>`.
pub fn cgroup(hierarchy: &MemoryHierarchy, name: &str) -> Cgroup {
    Cgroup::create(hierarchy, name).unwrap_or_else(|err| panic!("{err}"))
}

/// A child of `parent`; declare it after its parent, so that it is removed first.
pub fn child(parent: &Cgroup, name: &str) -> Cgroup {
    parent.child(name).unwrap_or_else(|err| panic!("{err}"))
}

/// Starts `leak workload ARGS` inside `cgroup`.
pub fn spawn_in(cgroup: &Cgroup, args: &[&str]) -> Process {
    let mut command = Command::new(leak_bin());
    command.arg("workload").args(args);
    spawn_command_in(cgroup, command)
}

/// Starts `command` inside `cgroup`, its output discarded.
pub fn spawn_command_in(cgroup: &Cgroup, mut command: Command) -> Process {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    harness::spawn_in(cgroup, command).unwrap_or_else(|err| panic!("{err}"))
}

/// Starts `command` inside `cgroup` as pid 1 of a new pid namespace (a container's main
/// process), its output discarded; the process returned ends as that pid 1 does.
pub fn spawn_command_as_init_in(cgroup: &Cgroup, mut command: Command) -> Process {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    harness::spawn_as_init_in(cgroup, command).unwrap_or_else(|err| panic!("{err}"))
}

/// Waits for the OOM killer to end `process`, and that it died of SIGKILL.
pub fn wait_for_oom_kill(process: &mut Process, timeout: Duration) {
    process
        .wait_for_oom_kill(timeout)
        .unwrap_or_else(|err| panic!("{err}"));
}

/// The agent under test: the harness's tracer, with accessors that fail the test.
pub struct Agent(pub Tracer);

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        Agent(
            Tracer::start(Path::new(&leak_bin()), extra, &[]).unwrap_or_else(|err| panic!("{err}")),
        )
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.0.addr
    }

    /// GET `path`: its status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let response = self.0.get(path).unwrap_or_else(|err| panic!("{err}"));
        (response.status, response.body)
    }

    /// GET `path`, which must answer 200; its body.
    pub fn page(&self, path: &str) -> String {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub fn kills(&self) -> Vec<Kill> {
        self.0.kills().unwrap_or_else(|err| panic!("{err}"))
    }

    /// The OOM hook's mode, from `/healthz`.
    pub fn attach_mode(&self) -> String {
        self.0.attach_mode().unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits for the kill of `pid` to appear on /kills.
    pub fn wait_for_kill(&self, pid: u32) -> Kill {
        self.wait_for(&format!("pid {pid}"), |kill| kill.victim_pid == pid)
    }

    /// Waits for a kill whose victim's cgroup is `cgroup` (for victims whose pid the test does
    /// not know, such as a process started through `unshare`).
    pub fn wait_for_kill_in(&self, cgroup: &str) -> Kill {
        self.wait_for(&format!("a process in {cgroup}"), |kill| {
            kill.cgroup == cgroup
        })
    }

    fn wait_for(&self, what: &str, matches: impl Fn(&Kill) -> bool) -> Kill {
        // A kill shows up within milliseconds; the deadline only bounds a failing run on a
        // busy machine (or under TCG).
        self.0
            .wait_for_kill(what, Duration::from_secs(60), matches)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    pub fn log(&self) -> String {
        self.0.log()
    }

    /// SIGTERM, and the exit status (the agent must shut down cleanly).
    pub fn stop(&mut self) -> ExitStatus {
        self.0.stop().unwrap_or_else(|err| panic!("{err}"))
    }
}

/// A file on a real disk filesystem (not tmpfs, so its pages are page cache), removed on drop:
/// `$LEAK_TEST_DISK_DIR` (the VMs' virtio disk), else /var/tmp.
pub fn disk_file(name: &str) -> RemoveOnDrop {
    RemoveOnDrop(disk_dir().join(format!("{name}-{}", std::process::id())))
}

pub fn disk_dir() -> PathBuf {
    std::env::var_os("LEAK_TEST_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The value of the sample line `series` (name and labels, exactly as exposed), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// The `cause` label a kill's counter carries (empty when the kill has no cause).
pub fn cause_label(kill: &Kill) -> &'static str {
    kill.cause
        .as_ref()
        .map_or("", |cause| cause.component.as_str())
}

/// The value of the first sample line starting with `prefix`, 0 when absent.
pub fn sample_with_prefix(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// The hooks the agent reports in `leak_attach_info` for an attach mode: the OOM hook and the
/// charge path's.
pub fn oom_hook(mode: &str) -> &'static str {
    match mode {
        "fentry" | "kprobe" => "oom_kill_process",
        _ => "mark_victim",
    }
}

/// The kill witness each mode hooks: what tells a kill from a victim marked while exiting.
pub fn kill_witness(mode: &str) -> &'static str {
    match mode {
        "fentry" | "kprobe" => "__oom_kill_process",
        _ => "signal_generate",
    }
}

/// The kernel's count of OOM kills in `cgroup`: `oom_kill` of `memory.events` on v2 (with its
/// descendants'), of `memory.oom_control` on v1 (its own tasks').
pub fn kernel_oom_kills(cgroup: &Cgroup) -> u64 {
    let file = match cgroup.hierarchy.version {
        leak_user::enrich::cgroupfs::Version::V2 => "memory.events",
        leak_user::enrich::cgroupfs::Version::V1 => "memory.oom_control",
    };
    let text = std::fs::read_to_string(cgroup.path().join(file))
        .unwrap_or_else(|err| panic!("read {file} of {}: {err}", cgroup.relative));
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `oom_kill` in {file}:\n{text}"))
}

/// The sum of `leak_oom_kills_total` over the series of the victim cgroup `cgroup`.
pub fn agent_oom_kills(metrics: &str, cgroup: &str) -> u64 {
    let label = format!("cgroup=\"{cgroup}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with("leak_oom_kills_total{") && line.contains(&label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// Checks that the agent attached the OOM hook in `requested` mode (for `auto`, the mode it
/// reported on /healthz, `reported`): `leak_attach_info{hook,mode} 1`, and the mode's kill
/// witness. With `charge` the charge path was forced to the same mode, and its hook must be
/// attached in it too.
pub fn check_attach_info(metrics: &str, requested: &str, reported: &str, charge: bool) {
    let mode = if requested == "auto" {
        reported
    } else {
        assert_eq!(reported, requested, "forced mode must be used");
        requested
    };
    let series = format!(
        "leak_attach_info{{hook=\"{}\",mode=\"{mode}\"}}",
        oom_hook(mode)
    );
    assert_eq!(
        sample(metrics, &series),
        Some(1.0),
        "missing `{series} 1` in\n{metrics}"
    );
    let witness = format!(
        "leak_attach_info{{hook=\"{}\",mode=\"{mode}\"}}",
        kill_witness(mode)
    );
    assert_eq!(
        sample(metrics, &witness),
        Some(1.0),
        "the kill witness is not attached: missing `{witness} 1` in\n{metrics}"
    );
    if charge && requested != "auto" {
        let hooks: &[&str] = match mode {
            "fentry" | "kprobe" => &["try_charge_memcg", "try_charge"],
            _ => &["mm_vmscan_memcg_reclaim_begin"],
        };
        assert!(
            hooks.iter().any(|hook| sample(
                metrics,
                &format!("leak_attach_info{{hook=\"{hook}\",mode=\"{mode}\"}}")
            ) == Some(1.0)),
            "the charge path is not attached in {mode} mode (one of {hooks:?}):\n{metrics}"
        );
    }
}

/// What the verifier may spend on any one of our programs: a tenth of its limit. The classic
/// tracepoint's victim report once took over a million instructions on 6.1 (refused) and over a
/// minute on 5.10 under emulation; split into separately verified functions it takes ~30,000.
const VERIFIER_BUDGET: f64 = 100_000.0;

/// Every program's verifier work (`leak_bpf_program_verified_instructions`) is within
/// [`VERIFIER_BUDGET`], and kernels that report it (5.16+) report it for the victim report.
pub fn check_verifier_work(metrics: &str) {
    let prefix = "leak_bpf_program_verified_instructions{program=\"";
    let mut victim_report = false;
    for line in metrics.lines().filter(|line| line.starts_with(prefix)) {
        let (series, value) = line.rsplit_once(' ').expect("a sample");
        let value: f64 = value.parse().expect("a number");
        assert!(
            value <= VERIFIER_BUDGET,
            "{series}: the verifier processed {value} instructions, over the budget of \
             {VERIFIER_BUDGET}"
        );
        victim_report |= series.contains("mark_victim");
    }
    if kernel_version() >= (5, 16) {
        assert!(
            victim_report,
            "kernel {:?}: no verifier figure for the victim report in\n{metrics}",
            kernel_version()
        );
    }
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// Lints a Prometheus exposition with the real `promtool check metrics` (the caller checked
/// [`have_tool`]`("promtool")` before doing anything else).
pub fn promtool_check(metrics: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("promtool: {err}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A fast anonymous leak: killed within a second in an 8 MiB cgroup.
pub const FAST_ANON: &[&str] = &["--interval", "1ms", "--chunk", "1MiB", "--listen", "off"];

/// `count` cgroups of 8 MiB under one parent (removed with it).
pub fn storm_cgroups(
    hierarchy: &MemoryHierarchy,
    name: &str,
    count: usize,
) -> (Cgroup, Vec<Cgroup>) {
    let parent = Cgroup::create(hierarchy, name).unwrap_or_else(|err| panic!("{err}"));
    let children = (0..count)
        .map(|i| {
            let child = parent
                .child(&format!("c{i}"))
                .unwrap_or_else(|err| panic!("{err}"));
            child
                .set_limit(8 << 20)
                .unwrap_or_else(|err| panic!("{err}"));
            child
        })
        .collect();
    (parent, children)
}

/// One leaker in each of `cgroups` at once; waits until each is killed.
pub fn kill_each(cgroups: &[Cgroup]) {
    let mut leakers: Vec<Process> = cgroups.iter().map(|c| spawn_in(c, FAST_ANON)).collect();
    for leaker in &mut leakers {
        wait_for_oom_kill(leaker, Duration::from_secs(120));
    }
}

/// The agent's `leak_oom_kills_total` summed by `cgroup` label.
pub fn agent_kills_by_cgroup(agent: &Agent) -> std::collections::HashMap<String, u64> {
    let mut counts = std::collections::HashMap::new();
    for line in agent.page("/metrics").lines() {
        let Some(labels) = line.strip_prefix("leak_oom_kills_total{") else {
            continue;
        };
        let Some(cgroup) = labels
            .split("cgroup=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let value: f64 = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0);
        *counts.entry(cgroup.to_owned()).or_default() += value as u64;
    }
    counts
}
