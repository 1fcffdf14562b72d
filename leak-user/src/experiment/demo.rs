//! `leak demo`: the original experiment, end to end, on this machine. A memory cgroup with a
//! limit, the tracer running, `leak workload` first leaking anonymous memory, then also
//! writing a file with fsync; for each run, from the kill's own timeline: when usage reached
//! the limit, when the working set did, the page cache before and at death.

use std::{fs, path::PathBuf, time::Duration};

use crate::{
    enrich::cgroupfs::MemoryHierarchy,
    experiment::harness::{self, io, leak_until_killed, Cgroup, LabError, RemoveOnDrop, Tracer},
    model::kill::Kill,
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
    /// Also write both runs' kills here, as JSON ([`DemoKills`]).
    pub json: Option<PathBuf>,
    /// Also draw both runs here, as an SVG figure.
    pub svg: Option<PathBuf>,
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

/// Prints one run's account, from the kill's own timeline.
fn tell(kill: &Kill) {
    let story = kill.story.clone().unwrap_or_default();
    let peak_cache = kill
        .timeline
        .iter()
        .map(|p| p.page_cache_bytes)
        .max()
        .unwrap_or(0);
    let at_death_cache = kill.oom_level().map_or(0, |level| level.page_cache_bytes());
    println!(
        "  usage reached the limit:        {}",
        seconds(story.usage_at_limit_ms_before_kill)
    );
    println!(
        "  working set reached the limit:  {}",
        seconds(story.working_set_at_limit_ms_before_kill)
    );
    println!(
        "  page cache: peak {} in the timeline, {} at death",
        mib(peak_cache),
        mib(at_death_cache)
    );
    println!(
        "  kill: pid {} ({}) in {}; usage {}, limit {}, working set {}, inactive_file {} \
         ({} timeline points, {} limit hits)",
        kill.victim_pid,
        kill.victim_comm.as_deref().unwrap_or("?"),
        kill.cgroup,
        mib(kill.usage_bytes),
        mib(kill.limit_bytes.unwrap_or(0)),
        mib(kill.working_set_bytes),
        mib(kill.inactive_file_bytes),
        kill.timeline.len(),
        story.limit_hits,
    );
}

fn find_kill(tracer: &Tracer, pid: u32) -> Result<Kill, DemoError> {
    tracer.wait_for_kill(&format!("pid {pid}"), Duration::from_secs(20), |kill| {
        kill.victim_pid == pid
    })
}

/// What `leak demo --json` writes: each run's kill as `/kills` served it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DemoKills {
    /// The run that leaks anonymous memory only.
    pub anon: Kill,
    /// The run that also writes a file with fsync (page cache).
    pub page_cache: Kill,
}

pub fn run(options: &DemoOptions) -> Result<(), DemoError> {
    harness::require_root()?;
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
    let tracer = Tracer::start(
        &exe,
        &["--history", "120s", "--dense-samples"],
        &["charge path (", "OOM hook attach mode:"],
    )?;
    let file = options
        .file_dir
        .join(format!("leak-demo-{}.dat", std::process::id()));
    let _remove = RemoveOnDrop(file.clone());
    let base = vec![
        "--interval".to_owned(),
        format!("{}us", options.interval.as_micros()),
        "--chunk".to_owned(),
        options.chunk_bytes.to_string(),
    ];

    println!("\n== run 1: anonymous memory only");
    let cgroup = Cgroup::with_limit(&hierarchy, "leak-demo-anon", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &base, options.timeout)?;
    let anon = find_kill(&tracer, pid)?;
    tell(&anon);
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
    let cgroup = Cgroup::with_limit(&hierarchy, "leak-demo-file", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &args, options.timeout)?;
    let page_cache = find_kill(&tracer, pid)?;
    tell(&page_cache);
    let story = page_cache.story.clone().unwrap_or_default();
    let (file_usage, file_ws) = (
        story.usage_at_limit_ms_before_kill,
        story.working_set_at_limit_ms_before_kill,
    );
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
    if let Some(path) = &options.svg {
        let caption = format!(
            "leak demo, {} limit, {} KiB every {:?}, kernel {}, {}",
            mib(options.limit_bytes),
            options.chunk_bytes / 1024,
            options.interval,
            crate::sys::kernel_release(),
            anon.timestamp.get(..10).unwrap_or(&anon.timestamp),
        );
        let figure = super::figure::demo_svg(&anon, &page_cache, &caption);
        fs::write(path, figure).map_err(io(format!("writing {}", path.display())))?;
        println!("leak demo: figure written to {}", path.display());
    }
    if let Some(path) = &options.json {
        let kills = DemoKills { anon, page_cache };
        let text = serde_json::to_string_pretty(&kills)
            .map_err(|err| LabError::Run(format!("encoding the kills: {err}")))?;
        fs::write(path, text).map_err(io(format!("writing {}", path.display())))?;
    }
    println!("\nleak demo: done");
    Ok(())
}
