//! `cargo xtask run [-- ARGS]`: build leak in release and run it as root.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::bootstrap::{self, say};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Arguments for `leak` (default: `trace`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn build_release() -> Result<std::path::PathBuf> {
    say("building leak (release)");
    cargo_build_leak(None, Vec::new())?;
    Ok(bootstrap::workspace_root().join("target/release/leak"))
}

/// `cargo build --release` of the `leak` binary for `target` (this machine's when `None`),
/// with `env` added to cargo's environment; it lands in `target/[<target>/]release/leak`.
pub fn cargo_build_leak(
    target: Option<&str>,
    env: Vec<(String, std::ffi::OsString)>,
) -> Result<()> {
    bootstrap::ebpf_toolchain()?;
    bootstrap::run(
        Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--package",
                "leak-user",
                "--bin",
                "leak",
            ])
            .args(
                target
                    .map(|target| ["--target", target])
                    .into_iter()
                    .flatten(),
            )
            .envs(env)
            .current_dir(bootstrap::workspace_root())
            .env("PATH", bootstrap::path_with_cargo_bin()),
    )
}

pub fn run(options: Options) -> Result<()> {
    let binary = build_release()?;
    let args = if options.args.is_empty() {
        vec!["trace".to_owned()]
    } else {
        options.args
    };
    let mut command = if bootstrap::is_root() {
        Command::new(&binary)
    } else {
        say("leak loads BPF programs, so it runs as root: using sudo");
        let mut sudo = Command::new("sudo");
        sudo.args(["--preserve-env=RUST_LOG"]).arg(&binary);
        sudo
    };
    command.args(&args);
    say(format!("running {} {}", binary.display(), args.join(" ")));
    let status = command.status().context("cannot start leak")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
