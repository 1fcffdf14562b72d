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
    pub charge_modes: std::collections::BTreeMap<String, ModeResult>,
    pub kills: usize,
    pub kill_to_metrics_ms_p50: f64,
    pub kill_to_metrics_ms_p99: f64,
    pub kill_to_kills_ms_p50: f64,
    pub kill_to_kills_ms_p99: f64,
}

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
) -> Result<(f64, f64, std::collections::BTreeMap<String, ModeResult>), LabError> {
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
    let baseline_anon = &anon["off"];
    let baseline_file = &written["off"];
    let mut results = std::collections::BTreeMap::new();
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

/// Kernel timestamp to appearance on /kills and on /metrics, over `options.kills` kills.
fn kill_latency(
    exe: &Path,
    hierarchy: &MemoryHierarchy,
    options: &BenchOptions,
) -> Result<(Vec<f64>, Vec<f64>), LabError> {
    let tracer = Tracer::start(exe, &[], &[])?;
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
    Ok((to_kills, to_metrics))
}

/// Polls /kills and /metrics until the kill in `cgroup` shows on both; returns the kill's
/// kernel timestamp and when each endpoint first showed it (CLOCK_BOOTTIME).
fn watch_for_kill(addr: SocketAddr, cgroup: &str) -> Result<(u64, u64, u64), LabError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let label = format!("cgroup=\"{cgroup}\"");
    let mut on_kills: Option<(u64, u64)> = None;
    let mut on_metrics: Option<u64> = None;
    while Instant::now() < deadline {
        if on_kills.is_none() {
            let kills = harness::kills(addr, "?limit=8")?;
            let now = boot_ns();
            if let Some(kill) = kills.iter().find(|k| k.cgroup == cgroup) {
                on_kills = Some((kill.boot_ns, now));
            }
        }
        if on_metrics.is_none() {
            let body = http_get(addr, "/metrics")?.body;
            let now = boot_ns();
            if body
                .lines()
                .any(|line| line.starts_with("leak_oom_kills_total{") && line.contains(&label))
            {
                on_metrics = Some(now);
            }
        }
        if let (Some((kill, seen_kills)), Some(seen_metrics)) = (on_kills, on_metrics) {
            return Ok((kill, seen_kills, seen_metrics));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Err(LabError::Run(format!(
        "the kill in {cgroup} never showed up"
    )))
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
    let (baseline_anon, baseline_file, charge_modes) = overhead(&exe, &hierarchy, options, &modes)?;
    println!("  kill-to-report latency over {} kills", options.kills);
    let (to_kills, to_metrics) = kill_latency(&exe, &hierarchy, options)?;
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
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&result)
            .map_err(|err| LabError::Run(format!("JSON: {err}")))?;
        std::fs::write(path, json + "\n").map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(result)
}
