//! `cargo xtask lint`: formatting and clippy with warnings denied, the first stage of
//! `cargo xtask test`.

use std::{process::Command, time::Instant};

use anyhow::{bail, Result};

use crate::bootstrap::{self, say, NIGHTLY};

/// One check: a name for the report and the command, run from the workspace root.
struct Check {
    name: &'static str,
    /// `None`: the toolchain running xtask; `Some`: `cargo +toolchain`.
    toolchain: Option<&'static str>,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// What aya-build 0.2.0 hands the kernel programs' build (`CARGO_ENCODED_RUSTFLAGS`, fields
/// separated by 0x1f), so clippy sees the same cfgs as the real build.
const EBPF_RUSTFLAGS: &str =
    "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

/// Every lint check, in the order they run.
const CHECKS: &[Check] = &[
    Check {
        name: "rustfmt (workspace)",
        toolchain: None,
        args: &["fmt", "--all", "--check"],
        env: &[],
    },
    // The fuzz crate is its own workspace; without --all so that leak-user, its path
    // dependency, is not checked twice.
    Check {
        name: "rustfmt (leak-user/fuzz)",
        toolchain: None,
        args: &[
            "fmt",
            "--check",
            "--manifest-path",
            "leak-user/fuzz/Cargo.toml",
        ],
        env: &[],
    },
    Check {
        name: "clippy (leak-user, leak-common, xtask)",
        toolchain: None,
        args: &[
            "clippy",
            "--workspace",
            "--exclude",
            "leak-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        env: &[],
    },
    // As aya-build builds it: nightly, the BPF target, core built from source, release.
    Check {
        name: "clippy (leak-ebpf, bpfel-unknown-none)",
        toolchain: Some(NIGHTLY),
        args: &[
            "clippy",
            "--package",
            "leak-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
        env: &[("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS)],
    },
];

/// Runs every check (all of them, even after a failure, so one run shows every problem) and
/// returns how many passed and failed.
pub fn run() -> Result<(u64, u64)> {
    bootstrap::lint_tools()?;
    let root = bootstrap::workspace_root();
    let mut results = Vec::new();
    for check in CHECKS {
        let mut command = match check.toolchain {
            // The rustup proxy, which understands `+toolchain`.
            Some(toolchain) => {
                let mut command = Command::new("cargo");
                command.arg(format!("+{toolchain}"));
                command
            }
            None => Command::new(env!("CARGO")),
        };
        command
            .args(check.args)
            .current_dir(&root)
            .env("PATH", bootstrap::path_with_cargo_bin());
        for (key, value) in check.env {
            command.env(key, value);
        }
        say(format!("lint: {}: {}", check.name, describe(check)));
        let start = Instant::now();
        let result = bootstrap::run(&mut command);
        results.push((check.name, start.elapsed(), result));
    }
    say("lint results:");
    let mut failed = 0;
    for (name, elapsed, result) in &results {
        eprintln!(
            "  {:<40} {:>7.1} s  {}",
            name,
            elapsed.as_secs_f64(),
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if result.is_err() {
            failed += 1;
        }
    }
    let passed = results.len() as u64 - failed;
    if failed > 0 {
        say(format!(
            "lint: {failed} check(s) failed; `cargo fmt --all` fixes formatting, the clippy \
             output above says what to change"
        ));
    }
    Ok((passed, failed))
}

/// The check as a developer would type it.
fn describe(check: &Check) -> String {
    let mut line = String::new();
    for (key, value) in check.env {
        line.push_str(&format!("{key}={value:?} "));
    }
    line.push_str("cargo");
    if let Some(toolchain) = check.toolchain {
        line.push_str(&format!(" +{toolchain}"));
    }
    for arg in check.args {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// `cargo xtask lint`.
pub fn run_alone() -> Result<()> {
    let (passed, failed) = run()?;
    println!("xtask: {passed} passed, {failed} failed, 0 skipped");
    if failed > 0 {
        bail!("{failed} lint check(s) failed");
    }
    Ok(())
}
