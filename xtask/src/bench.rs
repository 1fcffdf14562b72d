//! `cargo xtask bench`: `leak bench` on this machine (and, with `--kernel`, inside Debian
//! kernels under QEMU, where fentry and kprobe can be measured), printing throughput ratios
//! and kill-to-report latency; `--json FILE` keeps them.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, say},
    run::build_release,
    vm,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Write the results as JSON: this machine's at the top level, each VM kernel's under
    /// "vm".
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also benchmark inside this Debian kernel series under QEMU; repeat for several.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Arguments for `leak bench` on this machine (e.g. --rounds 10).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(options: Options) -> Result<()> {
    let binary = build_release()?;
    let host_json = bootstrap::cache_dir().join("bench-host.json");
    let mut command = if bootstrap::is_root() {
        Command::new(&binary)
    } else {
        say("leak bench creates memory cgroups and loads BPF programs: using sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg(&binary);
        sudo
    };
    command
        .arg("bench")
        .arg("--json")
        .arg(&host_json)
        .args(&options.args);
    say(format!("running {command:?}"));
    let status = command.status().context("cannot start leak bench")?;
    if !status.success() {
        bail!("leak bench failed with {status}");
    }
    let mut result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&host_json)?).context("leak bench JSON")?;

    if !options.kernels.is_empty() {
        let settings = vm::Settings {
            k8s: false,
            bench: true,
            restart_on: Vec::new(),
            modes: String::new(),
            expect_auto: "fentry".into(),
            timeout: Duration::from_secs(2400),
            filter: Vec::new(),
        };
        let outcomes = vm::run_kernels(&options.kernels, &settings)?;
        let mut by_kernel = serde_json::Map::new();
        for outcome in &outcomes {
            if let Some(bench) = &outcome.bench {
                by_kernel.insert(outcome.kernel.clone(), bench.clone());
                print_summary(&outcome.kernel, bench);
            }
        }
        result["vm"] = serde_json::Value::Object(by_kernel);
        vm::report(&outcomes)?;
    }
    print_summary("this machine", &result);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")?;
        say(format!("wrote {}", path.display()));
    }
    Ok(())
}

fn print_summary(name: &str, bench: &serde_json::Value) {
    say(format!(
        "{name} ({}): kill to /metrics p50 {:.1} ms, p99 {:.1} ms",
        bench["kernel"].as_str().unwrap_or("?"),
        bench["kill_to_metrics_ms_p50"].as_f64().unwrap_or(f64::NAN),
        bench["kill_to_metrics_ms_p99"].as_f64().unwrap_or(f64::NAN)
    ));
    if let Some(modes) = bench["charge_modes"].as_object() {
        for (mode, result) in modes {
            eprintln!(
                "  {mode:<13} overhead_ratio {:.3} ({:.3}-{:.3}), file+fsync {:.3}",
                result["overhead_ratio"].as_f64().unwrap_or(f64::NAN),
                result["overhead_ratio_min"].as_f64().unwrap_or(f64::NAN),
                result["overhead_ratio_max"].as_f64().unwrap_or(f64::NAN),
                result["file_overhead_ratio"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
}
