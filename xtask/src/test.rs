//! `cargo xtask test`: the whole suite, as CI runs it, with each stage's time.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{
    bootstrap::{self, say},
    kernels, vm,
};

/// Kernels whose BTF the layout resolver is tested against, besides the running one: before
/// and after the memcg stats pointer (6.1), the percpu rss counters (6.2) and the compact
/// memcg stats index (6.10).
const BTF_KERNELS: &[&str] = &["5.10.0-30", "5.10", "6.1", "6.12"];
/// Kernels the end-to-end tests boot under QEMU: 5.10.0-30 (5.10.218: `mark_victim(int pid)`,
/// before the 5.10.235 backport of the task prototype), the newest 5.10 (RLIMIT_MEMLOCK
/// accounting, inline memcg stats, the backported prototype), 6.1 (stats behind a pointer) and
/// 6.12 (percpu rss counters, the compact stats index, merged /usr).
const VM_KERNELS: &[&str] = &["5.10.0-30", "5.10", "6.1", "6.12"];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to `cargo test`).
    #[arg(last = true)]
    filter: Vec<String>,
}

struct Stages(Vec<(String, Duration, bool)>);

impl Stages {
    fn time<T>(&mut self, name: &str, stage: impl FnOnce() -> Result<T>) -> Result<T> {
        say(format!("stage: {name}"));
        let start = Instant::now();
        let result = stage();
        self.0
            .push((name.to_owned(), start.elapsed(), result.is_ok()));
        result
    }

    fn report(&self) {
        say("stage times:");
        for (name, elapsed, ok) in &self.0 {
            eprintln!(
                "  {:<28} {:>8.1} s  {}",
                name,
                elapsed.as_secs_f64(),
                if *ok { "ok" } else { "FAILED" }
            );
        }
    }
}

pub fn run(options: Options) -> Result<()> {
    let mut stages = Stages(Vec::new());
    let mut totals = (0, 0);
    let result = run_stages(&mut stages, &options, &mut totals);
    stages.report();
    let failed = totals.1 + u64::from(result.is_err() && totals.1 == 0);
    println!("xtask: {} passed, {} failed", totals.0, failed);
    result
}

/// Runs a test command, echoing its output and adding up its `test result:` lines.
fn run_counting(command: &mut Command) -> Result<(u64, u64)> {
    use std::io::BufRead as _;
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.split_whitespace().last()?.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        failed = 1;
    }
    Ok((passed, failed))
}

fn run_stages(stages: &mut Stages, options: &Options, totals: &mut (u64, u64)) -> Result<()> {
    if !bootstrap::is_root() {
        say(
            "not root: the privileged end-to-end tests will be skipped (they fail in CI); \
             run `sudo -E cargo xtask test` for the whole suite",
        );
    }
    stages.time("bootstrap", || {
        bootstrap::ebpf_toolchain()?;
        bootstrap::debian_packages(&bootstrap::TEST_PACKAGES)
    })?;
    let btf_dir = stages.time("kernel BTF (5.10.0-30, 5.10, 6.1, 6.12)", || {
        let dir = bootstrap::cache_dir().join("btf");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for series in BTF_KERNELS {
            let kernel = kernels::fetch(series)?;
            std::fs::copy(&kernel.btf, dir.join(format!("{}.btf", kernel.release)))?;
        }
        Ok(dir)
    })?;
    stages.time("cargo test", || {
        let mut command = Command::new(env!("CARGO"));
        command
            .args(["test", "--workspace", "--exclude", "leak-ebpf"])
            .current_dir(bootstrap::workspace_root())
            .env("PATH", bootstrap::path_with_cargo_bin())
            .env("LEAK_TEST_BTF_DIR", &btf_dir);
        if !options.filter.is_empty() {
            command.arg("--").args(&options.filter);
        }
        // The kernel-facing tests share /dev/kmsg and the OOM killer: one at a time.
        command.env("RUST_TEST_THREADS", "1");
        let (passed, failed) = run_counting(&mut command)?;
        totals.0 += passed;
        totals.1 += failed;
        if failed > 0 {
            bail!("cargo test: {failed} failed");
        }
        Ok(())
    })?;
    stages.time("VM kernels (5.10.0-30, 5.10, 6.1, 6.12)", || {
        let settings = vm::Settings {
            k8s: true,
            bench: false,
            modes: vm::ALL_MODES.into(),
            expect_auto: "fentry".into(),
            timeout: Duration::from_secs(1500),
            filter: options.filter.clone(),
        };
        let series: Vec<String> = VM_KERNELS.iter().map(|s| (*s).to_owned()).collect();
        let outcomes = vm::run_kernels(&series, &settings)?;
        totals.0 += outcomes.iter().filter(|o| o.passed).count() as u64;
        totals.1 += outcomes.iter().filter(|o| !o.passed).count() as u64;
        vm::report(&outcomes)
    })?;
    Ok(())
}
