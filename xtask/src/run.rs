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
    bootstrap::ebpf_toolchain()?;
    say("building leak (release)");
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
            .current_dir(bootstrap::workspace_root())
            .env("PATH", bootstrap::path_with_cargo_bin()),
    )?;
    Ok(bootstrap::workspace_root().join("target/release/leak"))
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
