//! `leak demo`: the original experiment, end to end, on this machine. A memory cgroup with a
//! limit, the tracer running, `leak workload` first leaking anonymous memory, then also
//! writing a file with fsync; for each run, from the kill's own timeline: when usage reached
//! the limit, when the working set did, the page cache before and at death.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cgroup::MemoryHierarchy,
    lab::{self, http_get, io, leak_until_killed, start_tracer, LabCgroup, LabError},
};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub limit_bytes: u64,
    pub interval: Duration,
    pub chunk_bytes: u64,
    /// Where the page-cache run writes its file (a disk filesystem, not tmpfs).
    pub file_dir: PathBuf,
    /// Give up on a run after this long.
    pub timeout: Duration,
}

pub type DemoError = LabError;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "never (in the window)".into(),
        |ms| format!("{:.2} s before the kill", ms as f64 / 1000.0),
    )
}

/// Prints one run's account; returns (usage at limit, working set at limit) in ms before death.
fn tell(kill: &Value) -> (Option<u64>, Option<u64>) {
    let story = &kill["story"];
    let usage_ms = story["usage_at_limit_ms_before_kill"].as_u64();
    let working_set_ms = story["working_set_at_limit_ms_before_kill"].as_u64();
    let timeline = kill["timeline"].as_array().cloned().unwrap_or_default();
    let peak_cache = timeline
        .iter()
        .filter_map(|p| p["page_cache_bytes"].as_u64())
        .max()
        .unwrap_or(0);
    let level = kill["cgroups"]
        .as_array()
        .and_then(|levels| levels.iter().find(|c| c["hit_limit"] == Value::Bool(true)))
        .cloned()
        .unwrap_or(Value::Null);
    let at_death_cache = level["inactive_file_bytes"].as_u64().unwrap_or(0)
        + level["active_file_bytes"].as_u64().unwrap_or(0);
    let field = |key: &str| kill[key].as_u64().unwrap_or(0);
    println!("  usage reached the limit:        {}", seconds(usage_ms));
    println!(
        "  working set reached the limit:  {}",
        seconds(working_set_ms)
    );
    println!(
        "  page cache: peak {} in the timeline, {} at death",
        mib(peak_cache),
        mib(at_death_cache)
    );
    println!(
        "  kill: pid {} ({}) in {}; usage {}, limit {}, working set {}, inactive_file {} \
         ({} timeline points, {} limit hits)",
        field("victim_pid"),
        kill["victim_comm"].as_str().unwrap_or("?"),
        kill["cgroup"].as_str().unwrap_or("?"),
        mib(field("usage_bytes")),
        mib(field("limit_bytes")),
        mib(field("working_set_bytes")),
        mib(field("inactive_file_bytes")),
        timeline.len(),
        story["limit_hits"].as_u64().unwrap_or(0),
    );
    (usage_ms, working_set_ms)
}

fn find_kill(addr: SocketAddr, pid: u32) -> Result<Value, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let kills: Value = serde_json::from_str(&http_get(addr, "/kills")?)
            .map_err(|err| LabError::Run(format!("/kills is not JSON: {err}")))?;
        if let Some(kill) = kills.as_array().and_then(|all| {
            all.iter()
                .find(|k| k["victim_pid"].as_u64() == Some(u64::from(pid)))
        }) {
            return Ok(kill.clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(LabError::Run(format!(
        "the tracer reported no kill of pid {pid}"
    )))
}

pub fn run(options: &DemoOptions) -> Result<(), DemoError> {
    lab::require_root()?;
    let exe = std::env::current_exe().map_err(io("finding the leak binary"))?;
    let hierarchy = MemoryHierarchy::discover()?;
    println!(
        "leak demo: a {} memory limit on cgroup {:?} at {}; {} KiB leaked every {:?}",
        mib(options.limit_bytes),
        hierarchy.version,
        hierarchy.root.display(),
        options.chunk_bytes / 1024,
        options.interval
    );
    let (_tracer, addr) = start_tracer(
        &exe,
        &["--history", "120s"],
        &["charge path (", "OOM hook attach mode:"],
    )?;
    let file = options
        .file_dir
        .join(format!("leak-demo-{}.dat", std::process::id()));
    struct RemoveFile<'a>(&'a Path);
    impl Drop for RemoveFile<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_file(self.0);
        }
    }
    let _remove = RemoveFile(&file);
    let base = vec![
        "--interval".to_owned(),
        format!("{}us", options.interval.as_micros()),
        "--chunk".to_owned(),
        options.chunk_bytes.to_string(),
    ];

    println!("\n== run 1: anonymous memory only");
    let cgroup = LabCgroup::create(&hierarchy, "demo-anon", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &base, options.timeout)?;
    let (anon_usage, anon_ws) = tell(&find_kill(addr, pid)?);
    println!(
        "  => usage and working set rose together: for an anonymous leak \
         container_memory_usage_bytes and container_memory_working_set_bytes track 1:1."
    );

    println!(
        "\n== run 2: anonymous memory + page cache (--file {}, fsync)",
        file.display()
    );
    let mut args = base.clone();
    args.extend(["--file".to_owned(), file.to_string_lossy().into_owned()]);
    let cgroup = LabCgroup::create(&hierarchy, "demo-file", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &args, options.timeout)?;
    let (file_usage, file_ws) = tell(&find_kill(addr, pid)?);
    match (file_usage, file_ws) {
        (Some(usage), Some(working_set)) if usage > working_set => println!(
            "  => usage sat at the limit for {:.2} s while the kernel reclaimed page cache; the \
             OOM killer struck only when the working set reached the limit: it follows \
             container_memory_working_set_bytes, not container_memory_usage_bytes.",
            (usage - working_set) as f64 / 1000.0
        ),
        _ => println!(
            "  => the working set reached the limit {} after usage did",
            seconds(file_ws)
        ),
    }
    let _ = (anon_usage, anon_ws);
    println!("\nleak demo: done");
    Ok(())
}
