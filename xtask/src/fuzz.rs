//! `cargo xtask fuzz`: every fuzz target of leak-user/fuzz for a bounded time, each from its
//! committed seed corpus (`leak-user/fuzz/corpus/<target>/`) copied into a scratch folder, so
//! the committed corpus never grows. A crash, a leak, a hang or running out of memory fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::bootstrap::{self, output, say, NIGHTLY};

/// How long each target runs.
const SECONDS_PER_TARGET: u32 = 20;
/// One input taking longer than this is a hang, reported as a failure.
const INPUT_TIMEOUT_SECONDS: u32 = 10;
/// The target triple cargo-fuzz builds for (its default).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Builds and runs every target; returns how many passed and failed.
pub fn run() -> Result<(u64, u64)> {
    bootstrap::ebpf_toolchain()?;
    bootstrap::cargo_fuzz()?;
    let root = bootstrap::workspace_root();
    // cargo-fuzz looks for `fuzz/` under the directory it runs in.
    let crate_dir = root.join("leak-user");
    let target_dir = root.join("target").join("fuzz");
    let cargo_fuzz = || {
        let mut command = Command::new("cargo");
        command
            .arg(format!("+{NIGHTLY}"))
            .arg("fuzz")
            .current_dir(&crate_dir)
            .env("PATH", bootstrap::path_with_cargo_bin());
        command
    };
    let targets: Vec<String> = output(cargo_fuzz().arg("list"))?
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` in leak-user found no fuzz target");
    }
    say(format!(
        "fuzz: building {} (cargo +{NIGHTLY} fuzz build, AddressSanitizer)",
        targets.join(", ")
    ));
    bootstrap::run(
        cargo_fuzz()
            .arg("build")
            .arg("--target-dir")
            .arg(&target_dir),
    )?;

    let scratch = bootstrap::cache_dir().join("fuzz");
    let mut results = Vec::new();
    for target in &targets {
        let binary = target_dir.join(TRIPLE).join("release").join(target);
        let seeds = root.join("leak-user/fuzz/corpus").join(target);
        let start = Instant::now();
        let result = run_target(target, &binary, &seeds, &scratch.join(target));
        match &result {
            Ok(summary) => say(format!("fuzz: {target}: ok, {summary}")),
            Err(err) => say(format!("fuzz: {target}: FAILED: {err:#}")),
        }
        results.push((target, start.elapsed(), result.is_ok()));
    }
    say("fuzz results:");
    for (target, elapsed, ok) in &results {
        eprintln!(
            "  {:<12} {:>7.1} s  {}",
            target,
            elapsed.as_secs_f64(),
            if *ok { "ok" } else { "FAILED" }
        );
    }
    let failed = results.iter().filter(|(_, _, ok)| !ok).count() as u64;
    Ok((results.len() as u64 - failed, failed))
}

/// Runs one target from a fresh copy of its seeds; returns a one-line summary.
fn run_target(target: &str, binary: &Path, seeds: &Path, work: &Path) -> Result<String> {
    let seed_files = files_in(seeds).with_context(|| {
        format!(
            "no seed corpus for {target} at {}: commit a few inputs there",
            seeds.display()
        )
    })?;
    if seed_files.is_empty() {
        bail!("the seed corpus {} is empty", seeds.display());
    }
    let _ = fs::remove_dir_all(work);
    let corpus = work.join("corpus");
    let artifacts = work.join("artifacts");
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(&artifacts)?;
    for seed in &seed_files {
        if let Some(name) = seed.file_name() {
            fs::copy(seed, corpus.join(name))?;
        }
    }
    let log = work.join("fuzz.log");
    say(format!(
        "fuzz: {target}: {} s from {} seeds (log: {})",
        SECONDS_PER_TARGET,
        seed_files.len(),
        log.display()
    ));
    let status = Command::new(binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        // libFuzzer joins the prefix and the file name as strings: keep the slash.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::from(fs::File::create(&log)?))
        .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
        .status()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let crashes = files_in(&artifacts).unwrap_or_default();
    if !status.success() || !crashes.is_empty() {
        print_excerpt(&log, &text);
        let inputs: Vec<String> = crashes.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{status}; failing inputs: [{}]; reproduce with `cd leak-user && cargo +{NIGHTLY} \
             fuzz run {target} <input>`",
            inputs.join(", ")
        );
    }
    let runs = text
        .lines()
        .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
        .map_or("?", str::trim)
        .to_owned();
    let corpus_size = files_in(&corpus).map_or(0, |files| files.len());
    Ok(format!(
        "{runs} runs, corpus {} -> {corpus_size} inputs",
        seed_files.len()
    ))
}

/// The start of the failure report (the sanitizer's or the panic's first lines, not a whole
/// overflowed stack) and libFuzzer's closing lines.
fn print_excerpt(log: &Path, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|line| {
            line.contains("ERROR: ") || line.contains("panicked at") || line.contains("deadly")
        })
        .unwrap_or(lines.len().saturating_sub(37));
    let tail = lines.len().saturating_sub(12).max(start);
    eprintln!("---- {} ----", log.display());
    for line in &lines[start..(start + 25).min(tail)] {
        eprintln!("{line}");
    }
    if start + 25 < tail {
        eprintln!("[...]");
    }
    for line in &lines[tail..] {
        eprintln!("{line}");
    }
    eprintln!("----");
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `cargo xtask fuzz`.
pub fn run_alone() -> Result<()> {
    let (passed, failed) = run()?;
    println!("xtask: {passed} passed, {failed} failed, 0 skipped");
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed");
    }
    Ok(())
}
