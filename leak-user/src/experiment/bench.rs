//! `leak bench`: what the tracer costs and how fast it reports. A page-fault-heavy workload
//! (and a file-write-plus-fsync one) runs in a memory cgroup with the agent off and on, in
//! each charge-path attach mode this kernel offers, interleaved and repeated; throughput ratios
//! come from the same run. Then many real OOM kills, timed from the kernel's timestamp of each
//! to its appearance on /kills and on /metrics.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    enrich::cgroupfs::MemoryHierarchy,
    experiment::harness::{self, http_get, io, spawn_in, Cgroup, LabError, RemoveOnDrop, Tracer},
    sys::boot_ns,
};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub rounds: usize,
    pub duration: Duration,
    pub churn_bytes: usize,
    pub kills: usize,
    pub storm: usize,
    pub file_dir: PathBuf,
    pub json: Option<PathBuf>,
}

/// Throughput ratios of one charge-path mode against no agent.
#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    /// Median over rounds of (throughput with the agent) / (throughput without), anonymous
    /// page faults.
    pub overhead_ratio: f64,
    pub overhead_ratio_min: f64,
    pub overhead_ratio_max: f64,
    /// The same for the file-write-plus-fsync workload.
    pub file_overhead_ratio: f64,
    pub file_overhead_ratio_min: f64,
    pub file_overhead_ratio_max: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub kernel: String,
    pub rounds: usize,
    pub churn_bytes: usize,
    pub baseline_anon_bytes_per_sec: f64,
    pub baseline_file_bytes_per_sec: f64,
    /// By charge-path attach mode.
    pub charge_modes: BTreeMap<String, ModeResult>,
    pub kills: usize,
    pub kill_to_metrics_ms_p50: f64,
    pub kill_to_metrics_ms_p99: f64,
    pub kill_to_kills_ms_p50: f64,
    pub kill_to_kills_ms_p99: f64,
    /// By program name: what the kernel counted while the program ran in the bench (summed
    /// over every agent that loaded it).
    pub programs: BTreeMap<String, ProgramResult>,
    pub agent: AgentResult,
}

/// The kernel's own statistics of one BPF program (BPF_ENABLE_STATS).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramResult {
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Average time per run, in nanoseconds (0 when it never ran).
    pub avg_run_ns: f64,
}

/// The agent's own cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentResult {
    /// Resident memory 2 s after start, with no kill yet.
    pub idle_rss_bytes: u64,
    /// Kills in the storm, and how many of them the agent served on /kills.
    pub storm_kills: usize,
    pub storm_kills_served: usize,
    /// Peak resident memory during the storm (VmHWM, reset just before it).
    pub storm_peak_rss_bytes: u64,
    /// CPU time (user + system) the agent spent from the storm's start until it served its
    /// last kill.
    pub storm_cpu_seconds: f64,
}

/// Targets, printed next to the figures (never asserted: the machines are shared).
const TARGET_PROGRAM_NS: f64 = 1000.0;
const TARGET_IDLE_RSS: u64 = 30 << 20;
const TARGET_STORM_RSS: u64 = 64 << 20;
const TARGET_METRICS_P99_MS: f64 = 2.0;
const TARGET_DENSE_RATIO: f64 = 0.95;

/// Charge-path modes, and the tracer arguments that select each.
const CHARGE_MODES: &[(&str, &[&str])] = &[
    ("fentry", &["--charge-attach", "fentry"]),
    ("kprobe", &["--charge-attach", "kprobe"]),
    ("tp_btf", &["--charge-attach", "tp_btf"]),
    (
        "tp_btf_dense",
        &["--charge-attach", "tp_btf", "--dense-samples"],
    ),
    ("tracepoint", &["--charge-attach", "tracepoint"]),
];

fn mode_args(mode: &str) -> &'static [&'static str] {
    CHARGE_MODES
        .iter()
        .find(|(name, _)| *name == mode)
        .map_or(&[], |(_, args)| args)
}

/// Runs `leak churn` in the cgroup; bytes per second.
fn churn(
    exe: &Path,
    cgroup: &Cgroup,
    options: &BenchOptions,
    file: Option<&Path>,
) -> Result<f64, LabError> {
    let mut command = Command::new(exe);
    command.args([
        "churn",
        "--bytes",
        &options.churn_bytes.to_string(),
        "--duration",
        &format!("{}ms", options.duration.as_millis()),
    ]);
    if let Some(file) = file {
        command.arg("--file").arg(file);
    }
    command.stdout(Stdio::piped());
    let mut child = spawn_in(cgroup, command)?;
    let mut stdout = String::new();
    if let Some(mut pipe) = child.child.stdout.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stdout).map_err(io("reading leak churn"))?;
    }
    let status = child.child.wait().map_err(io("waiting for leak churn"))?;
    if !status.success() {
        return Err(LabError::Run(format!("leak churn failed: {status}")));
    }
    stdout
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| LabError::Run(format!("leak churn printed {stdout:?}")))
}

fn median_min_max(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The charge-path modes this kernel can attach.
fn available_modes(exe: &Path) -> Vec<&'static str> {
    CHARGE_MODES
        .iter()
        .filter(|(mode, args)| {
            // Dense sampling needs the 6.13+ memcg tracepoint; without it the mode is tp_btf.
            let dense_missing = *mode == "tp_btf_dense"
                && !std::fs::read_to_string(
                    "/sys/kernel/tracing/events/memcg/mod_memcg_lruvec_state/format",
                )
                .is_ok_and(|f| !f.is_empty());
            !dense_missing && Tracer::start(exe, args, &[]).is_ok()
        })
        .map(|(mode, _)| *mode)
        .collect()
}

fn overhead(
    exe: &Path,
    hierarchy: &MemoryHierarchy,
    options: &BenchOptions,
    modes: &[&str],
    programs: &mut BTreeMap<String, ProgramResult>,
) -> Result<(f64, f64, BTreeMap<String, ModeResult>), LabError> {
    let cgroup = Cgroup::with_limit(hierarchy, "leak-bench-churn", 4 << 30)?;
    let file = options
        .file_dir
        .join(format!("leak-bench-{}.dat", std::process::id()));
    let _remove = RemoveOnDrop(file.clone());
    let mut anon: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    let mut written: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    for round in 0..options.rounds {
        // Interleaved: each round measures the baseline and every mode back to back.
        for mode in std::iter::once("off").chain(modes.iter().copied()) {
            let _tracer = match mode {
                "off" => None,
                mode => Some(Tracer::start(exe, mode_args(mode), &[])?),
            };
            let a = churn(exe, &cgroup, options, None)?;
            let f = churn(exe, &cgroup, options, Some(&file))?;
            println!(
                "  round {} {mode:<10} anon {:>8.1} MiB/s   file+fsync {:>8.1} MiB/s",
                round + 1,
                a / (1 << 20) as f64,
                f / (1 << 20) as f64
            );
            anon.entry(mode).or_default().push(a);
            written.entry(mode).or_default().push(f);
        }
    }
    // One more pass per mode with the kernel counting each program's runs and run time: not
    // in the ratios above, since counting costs two clock reads per run.
    for mode in modes {
        let mut args = mode_args(mode).to_vec();
        args.push("--bpf-stats");
        let tracer = Tracer::start(exe, &args, &[])?;
        churn(exe, &cgroup, options, None)?;
        churn(exe, &cgroup, options, Some(&file))?;
        add_program_stats(&tracer, programs)?;
    }
    let baseline_anon = &anon["off"];
    let baseline_file = &written["off"];
    let mut results = BTreeMap::new();
    for mode in modes {
        let ratios = |with: &Vec<f64>, without: &Vec<f64>| -> Vec<f64> {
            with.iter().zip(without).map(|(w, o)| w / o).collect()
        };
        let (a, a_min, a_max) = median_min_max(ratios(&anon[mode], baseline_anon));
        let (f, f_min, f_max) = median_min_max(ratios(&written[mode], baseline_file));
        results.insert(
            (*mode).to_owned(),
            ModeResult {
                overhead_ratio: a,
                overhead_ratio_min: a_min,
                overhead_ratio_max: a_max,
                file_overhead_ratio: f,
                file_overhead_ratio_min: f_min,
                file_overhead_ratio_max: f_max,
            },
        );
    }
    let (base_a, _, _) = median_min_max(baseline_anon.clone());
    let (base_f, _, _) = median_min_max(baseline_file.clone());
    Ok((base_a, base_f, results))
}

/// Adds what the tracer counted for each program (its `leak_bpf_program_*` series, caught
/// up with the kernel once a second) to `totals`.
fn add_program_stats(
    tracer: &Tracer,
    totals: &mut BTreeMap<String, ProgramResult>,
) -> Result<(), LabError> {
    std::thread::sleep(Duration::from_millis(1500));
    let body = tracer.get("/metrics")?.body;
    for line in body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let program = |name: &str| -> Option<String> {
            let labels = series.strip_prefix(name)?;
            Some(
                labels
                    .strip_prefix("{program=\"")?
                    .strip_suffix("\"}")?
                    .to_owned(),
            )
        };
        if let Some(name) = program("leak_bpf_program_runs_total") {
            totals.entry(name).or_default().run_count += value as u64;
        } else if let Some(name) = program("leak_bpf_program_run_seconds_total") {
            totals.entry(name).or_default().run_time_ns += (value * 1e9) as u64;
        }
    }
    for program in totals.values_mut() {
        if program.run_count > 0 {
            program.avg_run_ns = program.run_time_ns as f64 / program.run_count as f64;
        }
    }
    Ok(())
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let kb = line.strip_prefix(field)?.strip_prefix(':')?;
            kb.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time of every thread of `pid`, in seconds, to the nanosecond (`/proc/PID/task/*/
/// schedstat`: `/proc/PID/stat` counts in ticks of 10 ms, too coarse for the agent).
fn cpu_seconds(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// How many kills of cgroups named `prefix...` the tracer's /metrics counted.
fn kills_counted(tracer: &Tracer, prefix: &str) -> Result<usize, LabError> {
    let label = format!("cgroup=\"{prefix}");
    let body = tracer.get("/metrics")?.body;
    Ok(body
        .lines()
        .filter(|line| line.starts_with("leak_oom_kills_total{") && line.contains(&label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as usize)
}

/// `options.storm` kills in waves of 50 cgroups: the agent's CPU time and peak memory.
fn storm(
    exe: &Path,
    hierarchy: &MemoryHierarchy,
    options: &BenchOptions,
    tracer: &Tracer,
    agent: &mut AgentResult,
) -> Result<(), LabError> {
    const WAVE: usize = 50;
    let pid = tracer
        .pid()
        .ok_or_else(|| LabError::Run("the tracer is not running".into()))?;
    // Resets VmHWM, so the peak is the storm's.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let cpu_before = cpu_seconds(pid);
    let prefix = format!("/leak-bench-storm-{}-", std::process::id());
    let mut started = 0;
    while started < options.storm {
        let wave = WAVE.min(options.storm - started);
        let cgroups = (started..started + wave)
            .map(|i| Cgroup::create_at(hierarchy, &format!("{prefix}{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut workloads = Vec::new();
        for cgroup in &cgroups {
            cgroup.set_limit(8 << 20)?;
            let mut command = Command::new(exe);
            command.args(["workload", "--interval", "1ms", "--chunk", "1MiB"]);
            command.args(["--listen", "off"]);
            command.stdout(Stdio::null()).stderr(Stdio::null());
            workloads.push(spawn_in(cgroup, command)?);
        }
        for workload in &mut workloads {
            workload.wait_timeout(Duration::from_secs(60))?;
        }
        started += wave;
    }
    agent.storm_kills = started;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills_counted(tracer, &prefix)? < started && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.storm_cpu_seconds = cpu_seconds(pid) - cpu_before;
    agent.storm_kills_served = kills_counted(tracer, &prefix)?;
    agent.storm_peak_rss_bytes = status_bytes(pid, "VmHWM");
    Ok(())
}

/// Kernel timestamp to appearance on /kills and on /metrics, over `options.kills` kills, then
/// the storm; the agent's idle memory before the first kill.
fn kill_latency(
    exe: &Path,
    hierarchy: &MemoryHierarchy,
    options: &BenchOptions,
    programs: &mut BTreeMap<String, ProgramResult>,
    agent: &mut AgentResult,
) -> Result<(Vec<f64>, Vec<f64>), LabError> {
    let max_kills = (options.kills + options.storm + 10).to_string();
    let tracer = Tracer::start(exe, &["--bpf-stats", "--max-kills", &max_kills], &[])?;
    std::thread::sleep(Duration::from_secs(2));
    agent.idle_rss_bytes = tracer.pid().map_or(0, |pid| status_bytes(pid, "VmRSS"));
    let mut to_kills = Vec::new();
    let mut to_metrics = Vec::new();
    for index in 0..options.kills {
        let cgroup = Cgroup::with_limit(hierarchy, &format!("leak-bench-kill-{index}"), 16 << 20)?;
        let mut command = Command::new(exe);
        command.args([
            "workload",
            "--interval",
            "1ms",
            "--chunk",
            "1MiB",
            "--listen",
            "off",
        ]);
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let _workload = spawn_in(&cgroup, command)?;
        let (kill_boot_ns, seen_kills, seen_metrics) =
            watch_for_kill(tracer.addr, &cgroup.relative)?;
        to_kills.push(seen_kills.saturating_sub(kill_boot_ns) as f64 / 1e6);
        to_metrics.push(seen_metrics.saturating_sub(kill_boot_ns) as f64 / 1e6);
    }
    println!("  storm of {} kills", options.storm);
    storm(exe, hierarchy, options, &tracer, agent)?;
    add_program_stats(&tracer, programs)?;
    Ok((to_kills, to_metrics))
}

/// Polls /metrics (on a thread of its own) and /kills (that cgroup's, newest only) until the
/// kill in `cgroup` shows on both; returns the kill's kernel timestamp and when each endpoint
/// first showed it (CLOCK_BOOTTIME). Each poll runs as often as it is answered, so that
/// neither waits for the other: what is measured is the agent, not the poll loop.
fn watch_for_kill(addr: SocketAddr, cgroup: &str) -> Result<(u64, u64, u64), LabError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let label = format!("cgroup=\"{cgroup}\"");
    let metrics = std::thread::spawn(move || -> Result<Option<u64>, LabError> {
        while Instant::now() < deadline {
            let body = http_get(addr, "/metrics")?.body;
            let now = boot_ns();
            if body
                .lines()
                .any(|line| line.starts_with("leak_oom_kills_total{") && line.contains(&label))
            {
                return Ok(Some(now));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(None)
    });
    let query = format!("?cgroup={cgroup}&limit=1");
    let mut on_kills: Option<(u64, u64)> = None;
    while on_kills.is_none() && Instant::now() < deadline {
        let kills = harness::kills(addr, &query)?;
        let now = boot_ns();
        on_kills = kills.first().map(|kill| (kill.boot_ns, now));
        std::thread::sleep(Duration::from_micros(200));
    }
    let on_metrics = metrics
        .join()
        .map_err(|_| LabError::Run("the /metrics poll panicked".into()))??;
    match (on_kills, on_metrics) {
        (Some((kill, seen_kills)), Some(seen_metrics)) => Ok((kill, seen_kills, seen_metrics)),
        _ => Err(LabError::Run(format!(
            "the kill in {cgroup} never showed up"
        ))),
    }
}

pub fn run(options: &BenchOptions) -> Result<BenchResult, LabError> {
    harness::require_root()?;
    let exe = std::env::current_exe().map_err(io("finding the leak binary"))?;
    let hierarchy = MemoryHierarchy::discover()?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let modes = available_modes(&exe);
    println!(
        "leak bench on {kernel}: charge-path modes {modes:?}; {} rounds of {:?} per workload, \
         {} MiB per round trip",
        options.rounds,
        options.duration,
        options.churn_bytes >> 20
    );
    let mut programs = BTreeMap::new();
    let mut agent = AgentResult::default();
    let (baseline_anon, baseline_file, charge_modes) =
        overhead(&exe, &hierarchy, options, &modes, &mut programs)?;
    println!("  kill-to-report latency over {} kills", options.kills);
    let (to_kills, to_metrics) =
        kill_latency(&exe, &hierarchy, options, &mut programs, &mut agent)?;
    let result = BenchResult {
        kernel,
        rounds: options.rounds,
        churn_bytes: options.churn_bytes,
        baseline_anon_bytes_per_sec: baseline_anon,
        baseline_file_bytes_per_sec: baseline_file,
        charge_modes,
        kills: to_kills.len(),
        kill_to_metrics_ms_p50: percentile(&to_metrics, 50.0),
        kill_to_metrics_ms_p99: percentile(&to_metrics, 99.0),
        kill_to_kills_ms_p50: percentile(&to_kills, 50.0),
        kill_to_kills_ms_p99: percentile(&to_kills, 99.0),
        programs,
        agent,
    };
    println!("\nmode        anon ratio (min-max)        file+fsync ratio (min-max)");
    for (mode, r) in &result.charge_modes {
        println!(
            "{mode:<10}  {:.3} ({:.3}-{:.3})        {:.3} ({:.3}-{:.3})",
            r.overhead_ratio,
            r.overhead_ratio_min,
            r.overhead_ratio_max,
            r.file_overhead_ratio,
            r.file_overhead_ratio_min,
            r.file_overhead_ratio_max
        );
    }
    println!(
        "kill to /metrics: p50 {:.1} ms, p99 {:.1} ms; kill to /kills: p50 {:.1} ms, p99 {:.1} ms",
        result.kill_to_metrics_ms_p50,
        result.kill_to_metrics_ms_p99,
        result.kill_to_kills_ms_p50,
        result.kill_to_kills_ms_p99
    );
    print_costs(&result);
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&result)
            .map_err(|err| LabError::Run(format!("JSON: {err}")))?;
        std::fs::write(path, json + "\n").map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(result)
}

/// The per-program and agent figures, each next to its target.
fn print_costs(result: &BenchResult) {
    let verdict = |ok: bool| if ok { "ok" } else { "OVER TARGET" };
    println!(
        "\nprogram                       runs        avg ns   (target < {TARGET_PROGRAM_NS} ns)"
    );
    for (name, program) in &result.programs {
        println!(
            "{name:<28} {:>10} {:>10.0}   {}",
            program.run_count,
            program.avg_run_ns,
            match program.run_count {
                0 => "never ran",
                _ => verdict(program.avg_run_ns < TARGET_PROGRAM_NS),
            }
        );
    }
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let agent = &result.agent;
    println!(
        "agent idle RSS {:.1} MiB (target < {:.0} MiB: {}); storm of {} kills ({} served): peak \
         RSS {:.1} MiB (target < {:.0} MiB: {}), CPU {:.2} s",
        mib(agent.idle_rss_bytes),
        mib(TARGET_IDLE_RSS),
        verdict(agent.idle_rss_bytes < TARGET_IDLE_RSS),
        agent.storm_kills,
        agent.storm_kills_served,
        mib(agent.storm_peak_rss_bytes),
        mib(TARGET_STORM_RSS),
        verdict(agent.storm_peak_rss_bytes < TARGET_STORM_RSS),
        agent.storm_cpu_seconds
    );
    println!(
        "kill to /metrics p99 {:.1} ms (target < {TARGET_METRICS_P99_MS} ms: {})",
        result.kill_to_metrics_ms_p99,
        verdict(result.kill_to_metrics_ms_p99 < TARGET_METRICS_P99_MS)
    );
    if let Some(dense) = result.charge_modes.get("tp_btf_dense") {
        println!(
            "--dense-samples anon ratio {:.3} (target >= {TARGET_DENSE_RATIO}: {})",
            dense.overhead_ratio,
            verdict(dense.overhead_ratio >= TARGET_DENSE_RATIO)
        );
    }
}
