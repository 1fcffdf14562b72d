//! `cargo xtask test`: the whole suite, as CI runs it, with each stage's time.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};

use crate::{
    bootstrap::{self, say},
    fuzz, image, kernels, lint,
    musl::Arch,
    vm,
};

/// Kernels whose BTF the layout resolver is tested against, besides the running one: before
/// and after the memcg stats pointer (6.1), the percpu rss counters (6.2) and the compact
/// memcg stats index (6.10).
const BTF_KERNELS: &[&str] = &["5.10.0-30", "5.10", "6.1", "6.12"];
/// Kernels the end-to-end tests boot under QEMU: 5.10.0-30 (5.10.218: `mark_victim(int pid)`,
/// before the 5.10.235 backport of the task prototype), the newest 5.10 (RLIMIT_MEMLOCK
/// accounting, inline memcg stats, the backported prototype), 6.1 (stats behind a pointer) and
/// 6.12 (percpu rss counters, the compact stats index, merged /usr), and the newest kernel the
/// archive carries (trixie-backports or sid; 7.3 on 2026-11-30): 6.15+ keeps `failcnt` for v1
/// only, so limit hits come from `memory.events`, and new kernels reach CI as they appear.
const VM_KERNELS: &[&str] = &["5.10.0-30", "5.10", "6.1", "6.12", kernels::NEWEST];
/// The VM kernel that also runs the restart and storm tests.
const RESTART_KERNEL: &str = "6.12";

/// The file the tests append one line to for every skip: `<test>\t<kind>\t<reason>`, where
/// `<test>` is libtest's name of the test (its thread's name) and `<kind>` is `legitimate` or
/// `hides-feature`.
pub const SKIP_LOG_ENV: &str = "LEAK_TEST_SKIP_LOG";
/// The file the tests append the figures they measured to (one line each), printed after the
/// stage: what a passing run saw, not only that it passed.
pub const FIGURES_ENV: &str = "LEAK_TEST_FIGURES";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only run tests whose name contains one of these (passed to `cargo test` and to the test
    /// binaries in the VMs).
    #[arg(last = true)]
    filter: Vec<String>,
}

struct Stages(Vec<(String, Duration, bool)>);

impl Stages {
    fn time<T>(&mut self, name: &str, stage: impl FnOnce() -> Result<T>) -> Result<T> {
        say(format!("stage: {name}"));
        let start = Instant::now();
        let result = stage();
        let elapsed = start.elapsed();
        say(format!(
            "stage {name}: {} in {:.1} s",
            if result.is_ok() { "ok" } else { "FAILED" },
            elapsed.as_secs_f64()
        ));
        self.0.push((name.to_owned(), elapsed, result.is_ok()));
        result
    }

    fn report(&self) {
        say("stage times:");
        for (name, elapsed, ok) in &self.0 {
            eprintln!(
                "  {:<40} {:>8.1} s  {}",
                name,
                elapsed.as_secs_f64(),
                if *ok { "ok" } else { "FAILED" }
            );
        }
    }
}

/// What the closing line reports. A skipped test is never among the passed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

pub fn run(options: Options) -> Result<()> {
    let mut stages = Stages(Vec::new());
    let mut totals = Totals::default();
    let result = run_stages(&mut stages, &options, &mut totals);
    stages.report();
    if let Err(err) = &result {
        say(format!("failed: {err:#}"));
    }
    let failed = totals.failed + u64::from(result.is_err() && totals.failed == 0);
    // The last line on stdout, read by CI.
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, failed, totals.skipped
    );
    result
}

/// How one libtest test ended, from its `test <name> ... <status>` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Ignored,
}

/// What a `cargo test` run printed.
#[derive(Debug, Default)]
struct Run {
    /// From the `test result:` lines.
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Every `test <name> ... <status>` line.
    tests: Vec<(String, Status)>,
}

impl Run {
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.split_whitespace().last()?.parse().ok())
                    .unwrap_or(0)
            };
            self.passed += count(" passed");
            self.failed += count(" failed");
            self.ignored += count(" ignored");
        } else if let Some((name, status)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.rsplit_once(" ... "))
        {
            let status = match status.trim() {
                "ok" => Status::Ok,
                "FAILED" => Status::Failed,
                s if s.starts_with("ignored") => Status::Ignored,
                _ => return,
            };
            self.tests.push((name.to_owned(), status));
        }
    }
}

/// Runs a test command, echoing its output and reading its results.
fn run_counting(command: &mut Command) -> Result<Run> {
    let mut child = command.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut run = Run::default();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        run.line(&line);
    }
    let status = child.wait()?;
    if !status.success() && run.failed == 0 {
        run.failed = 1;
    }
    Ok(run)
}

/// One line of the skip log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Skip {
    test: String,
    hides_feature: bool,
    reason: String,
}

/// Reads the skip log; a line that breaks the format is an error (the contract is what keeps
/// a skip from passing as a pass).
fn parse_skip_log(text: &str) -> Result<Vec<Skip>> {
    let mut skips: Vec<Skip> = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let mut fields = line.splitn(3, '\t');
        let (Some(test), Some(kind), Some(reason)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("{SKIP_LOG_ENV}: `{line}` is not `<test>\\t<kind>\\t<reason>`");
        };
        let hides_feature = match kind {
            "legitimate" => false,
            "hides-feature" => true,
            other => bail!(
                "{SKIP_LOG_ENV}: kind `{other}` of `{test}` is neither `legitimate` nor \
                 `hides-feature`"
            ),
        };
        // A test that skips twice (two checks it could not make) is still one skipped test;
        // it hides a feature if either skip does.
        match skips.iter_mut().find(|skip| skip.test == test) {
            Some(known) => known.hides_feature |= hides_feature,
            None => skips.push(Skip {
                test: test.to_owned(),
                hides_feature,
                reason: reason.to_owned(),
            }),
        }
    }
    Ok(skips)
}

/// The host stage's totals: libtest counted every skipped test that returned as passed, so
/// each moves from passed to skipped; under CI a skip that hides a feature is a failure
/// (the test should have panicked; this defends against one that did not). libtest's ignored
/// tests count as skipped too. Returns the totals and the lines to print.
fn account(run: &Run, skips: &[Skip], ci: bool) -> (Totals, Vec<String>) {
    let mut totals = Totals {
        passed: run.passed,
        failed: run.failed,
        skipped: run.ignored,
    };
    let mut report = Vec::new();
    for skip in skips {
        let statuses: Vec<Status> = run
            .tests
            .iter()
            .filter(|(name, _)| *name == skip.test)
            .map(|(_, status)| *status)
            .collect();
        let kind = if skip.hides_feature {
            "hides a feature"
        } else {
            "legitimate"
        };
        if statuses.contains(&Status::Ok) {
            totals.passed = totals.passed.saturating_sub(1);
            if ci && skip.hides_feature {
                totals.failed += 1;
                report.push(format!(
                    "FAILED {}: skipped under CI=true although the skip hides a feature: {}",
                    skip.test, skip.reason
                ));
            } else {
                totals.skipped += 1;
                report.push(format!("skipped {} ({kind}): {}", skip.test, skip.reason));
            }
        } else if statuses.contains(&Status::Failed) {
            // Already counted as failed (under CI a hides-feature skip panics).
            report.push(format!(
                "FAILED {} (skip {kind}, then the test failed): {}",
                skip.test, skip.reason
            ));
        } else {
            totals.passed = totals.passed.saturating_sub(1);
            totals.failed += 1;
            report.push(format!(
                "FAILED {}: {SKIP_LOG_ENV} names a test no test binary reported (the name must \
                 be libtest's, `std::thread::current().name()`): {}",
                skip.test, skip.reason
            ));
        }
    }
    for (name, status) in &run.tests {
        if *status == Status::Ignored {
            report.push(format!("skipped {name} (#[ignore])"));
        }
    }
    (totals, report)
}

/// The images the container tests run (leak-user/tests/cri_e2e.rs): the agent's, from
/// deploy/Dockerfile around the static binary, and the pods' sandbox and shell image.
struct Images {
    agent: PathBuf,
    node_tools: PathBuf,
}

fn build_images() -> Result<Images> {
    let agent = image::build(Arch::Amd64)?;
    say(agent.to_string());
    let node_tools = image::build_node_tools(&agent.binary)?;
    Ok(Images {
        agent: agent.archive,
        node_tools,
    })
}

fn host_tests(
    options: &Options,
    btf_dir: &Path,
    images: &Images,
    totals: &mut Totals,
) -> Result<()> {
    let skip_log = bootstrap::cache_dir().join("host-test-skips.log");
    std::fs::create_dir_all(bootstrap::cache_dir())?;
    std::fs::write(&skip_log, "")?;
    let figures = bootstrap::cache_dir().join("host-test-figures.log");
    std::fs::write(&figures, "")?;
    let mut command = Command::new(env!("CARGO"));
    command
        .args(["test", "--workspace", "--exclude", "leak-ebpf"])
        .current_dir(bootstrap::workspace_root())
        .env("PATH", bootstrap::path_with_cargo_bin())
        .env("LEAK_TEST_BTF_DIR", btf_dir)
        .env("LEAK_TEST_IMAGE", &images.agent)
        .env("LEAK_TEST_NODE_IMAGE", &images.node_tools)
        .env(SKIP_LOG_ENV, &skip_log)
        .env(FIGURES_ENV, &figures);
    if !options.filter.is_empty() {
        command.arg("--").args(&options.filter);
    }
    // The kernel-facing tests share /dev/kmsg and the OOM killer: one at a time. This also
    // keeps the skip log's lines in the order the tests ran.
    command.env("RUST_TEST_THREADS", "1");
    let run = run_counting(&mut command)?;
    let measured = std::fs::read_to_string(&figures).unwrap_or_default();
    if !measured.trim().is_empty() {
        say("cargo test: figures the tests measured:");
        for line in measured.lines() {
            eprintln!("  {line}");
        }
    }
    let skips = parse_skip_log(&std::fs::read_to_string(&skip_log)?)?;
    let ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let (counted, report) = account(&run, &skips, ci);
    if !report.is_empty() {
        say(format!("cargo test: {} skipped or ignored:", report.len()));
        for line in &report {
            eprintln!("  {line}");
        }
    }
    say(format!(
        "cargo test: {} passed, {} failed, {} skipped",
        counted.passed, counted.failed, counted.skipped
    ));
    totals.passed += counted.passed;
    totals.failed += counted.failed;
    totals.skipped += counted.skipped;
    if counted.failed > 0 {
        bail!("cargo test: {} failed", counted.failed);
    }
    Ok(())
}

/// A stage of checks that each pass or fail (lint commands, fuzz targets).
fn checks(totals: &mut Totals, what: &str, (passed, failed): (u64, u64)) -> Result<()> {
    totals.passed += passed;
    totals.failed += failed;
    if failed > 0 {
        bail!("{what}: {failed} of {} failed", passed + failed);
    }
    Ok(())
}

fn run_stages(stages: &mut Stages, options: &Options, totals: &mut Totals) -> Result<()> {
    // The VMs get the same filters: refuse now what they could not take, not after an hour.
    vm::kernel_filter(&options.filter)?;
    if !bootstrap::is_root() {
        say(
            "not root: the privileged end-to-end tests will be skipped (they fail in CI); \
             run `sudo -E cargo xtask test` for the whole suite",
        );
    }
    stages.time("bootstrap", bootstrap::all)?;
    stages.time("lint", || checks(totals, "lint", lint::run()?))?;
    stages.time("fuzz", || checks(totals, "fuzz", fuzz::run()?))?;
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
    let images = stages.time("container images (agent, node tools)", build_images)?;
    stages.time("cargo test", || {
        host_tests(options, &btf_dir, &images, totals)
    })?;
    stages.time("VM kernels (5.10.0-30, 5.10, 6.1, 6.12, newest)", || {
        let settings = vm::Settings {
            k8s: true,
            bench: false,
            // The restart and storm tests in a VM too, with fentry (auto there).
            restart_on: vec![RESTART_KERNEL.to_owned()],
            modes: vm::SUITE_MODES.into(),
            expect_auto: "fentry".into(),
            timeout: Duration::from_secs(1500),
            filter: options.filter.clone(),
        };
        let series: Vec<String> = VM_KERNELS.iter().map(|s| (*s).to_owned()).collect();
        let outcomes = vm::run_kernels(&series, &settings)?;
        totals.passed += outcomes.iter().filter(|o| o.passed).count() as u64;
        totals.failed += outcomes.iter().filter(|o| !o.passed).count() as u64;
        vm::report(&outcomes)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(output: &str) -> Run {
        let mut run = Run::default();
        for line in output.lines() {
            run.line(line);
        }
        run
    }

    const OUTPUT: &str = "\
running 4 tests
test layout::tests::resolves ... ok
test global_oom ... ok
test promtool_lint ... FAILED
test slow ... ignored, needs a big machine

test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s
";

    #[test]
    fn reads_libtest_output() {
        let run = run_of(OUTPUT);
        assert_eq!((run.passed, run.failed, run.ignored), (2, 1, 1));
        assert_eq!(run.tests.len(), 4);
        assert_eq!(run.tests[1], ("global_oom".into(), Status::Ok));
        assert_eq!(run.tests[3], ("slow".into(), Status::Ignored));
    }

    #[test]
    fn a_skip_moves_from_passed_to_skipped() {
        let skips = parse_skip_log("global_oom\tlegitimate\tit exhausts the machine\n").unwrap();
        let (totals, report) = account(&run_of(OUTPUT), &skips, true);
        assert_eq!(
            totals,
            Totals {
                passed: 1,
                failed: 1,
                skipped: 2
            }
        );
        assert!(report[0].contains("it exhausts the machine"));
    }

    #[test]
    fn a_hidden_feature_fails_in_ci_and_skips_elsewhere() {
        let skips = parse_skip_log(
            "global_oom\thides-feature\tno kprobes\nglobal_oom\tlegitimate\tsecond check\n",
        )
        .unwrap();
        assert_eq!(skips.len(), 1);
        let (ci, _) = account(&run_of(OUTPUT), &skips, true);
        assert_eq!((ci.passed, ci.failed, ci.skipped), (1, 2, 1));
        let (dev, _) = account(&run_of(OUTPUT), &skips, false);
        assert_eq!((dev.passed, dev.failed, dev.skipped), (1, 1, 2));
    }

    #[test]
    fn a_skip_that_panicked_is_counted_once() {
        let skips = parse_skip_log("promtool_lint\thides-feature\tno promtool\n").unwrap();
        let (totals, _) = account(&run_of(OUTPUT), &skips, true);
        assert_eq!((totals.passed, totals.failed, totals.skipped), (2, 1, 1));
    }

    #[test]
    fn broken_skip_lines_are_errors() {
        assert!(parse_skip_log("global_oom legitimate no tabs\n").is_err());
        assert!(parse_skip_log("global_oom\tmaybe\treason\n").is_err());
        let skips = parse_skip_log("not_a_test\tlegitimate\treason\n").unwrap();
        let (totals, _) = account(&run_of(OUTPUT), &skips, false);
        assert_eq!((totals.passed, totals.failed), (1, 2));
    }
}
