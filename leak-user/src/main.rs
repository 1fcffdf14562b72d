//! `leak`: an eBPF OOM-kill tracer. Parses the command line and hands over to the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use leak_user::{
    agent::{self, TraceOptions},
    cli::{Cli, Command, Watch},
    experiment::{
        bench::{self, BenchOptions},
        demo::{self, DemoOptions},
        workload::{self, WorkloadOptions},
    },
    kernel::PinOptions,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().into_command() {
        Command::Trace(args) => agent::run(TraceOptions {
            listen: args.listen,
            attach: args.attach,
            max_kills: args.max_kills,
            ring_buffer_bytes: args.ring_buffer,
            btf: args.btf,
            cri_socket: match args.cri_socket {
                Some(path) if path.as_os_str().is_empty() => None,
                Some(path) => Some(path),
                None => leak_user::enrich::cri::default_socket(&args.rootfs),
            },
            rootfs: args.rootfs,
            charge_attach: args.charge_attach.mode(),
            sample_interval: args.sample_interval,
            history: args.history,
            only_limited: args.watch == Watch::Limited,
            dense_samples: args.dense_samples,
            bpf_stats: args.bpf_stats,
            web_config_file: args.web_config_file,
            web_max_connections: args.web_max_connections.max(1),
            state_dir: (!args.state_dir.as_os_str().is_empty()).then_some(args.state_dir),
            retention: leak_user::store::disk::Retention {
                max_kills: args.retention_kills.max(1),
                max_age: args.retention,
            },
            max_watched_cgroups: args.max_watched_cgroups,
            pin: PinOptions {
                dir: args.pin_dir,
                pin: !args.no_pin,
            },
        })
        .await
        .context("leak trace")?,
        Command::Workload(args) => workload::run(WorkloadOptions {
            interval: args.interval,
            chunk: usize::try_from(args.chunk).context("--chunk is too large")?,
            file: args.file,
            listen: args.listen.0,
            max_bytes: args.max_bytes,
            leader_exits: args.leader_exits,
        })
        .await
        .context("leak workload")?,
        Command::Bench(args) => {
            let options = BenchOptions {
                rounds: args.rounds.max(1),
                duration: args.duration,
                churn_bytes: usize::try_from(args.bytes).context("--bytes is too large")?,
                kills: args.kills.max(1),
                storm: args.storm,
                file_dir: args.file_dir,
                json: args.json,
            };
            tokio::task::spawn_blocking(move || bench::run(&options))
                .await
                .context("leak bench")?
                .context("leak bench")?;
        }
        Command::Unpin(args) => {
            let removed = leak_user::kernel::pin::unpin_all(&args.pin_dir)
                .with_context(|| format!("leak unpin {}", args.pin_dir.display()))?;
            match removed.is_empty() {
                true => println!("nothing pinned under {}", args.pin_dir.display()),
                false => {
                    for path in &removed {
                        println!("removed {}", path.display());
                    }
                }
            }
        }
        Command::HashPassword(args) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!password.is_empty(), "an empty password on stdin");
            println!("{}", bcrypt::hash(password, args.cost).context("bcrypt")?);
        }
        Command::Churn(args) => {
            let bytes = usize::try_from(args.bytes).context("--bytes is too large")?;
            let rate = workload::churn(bytes, args.duration, args.file.as_deref())
                .context("leak churn")?;
            println!("bytes_per_sec {rate:.0}");
        }
        Command::Demo(args) => {
            let (interval, chunk) = if args.faithful {
                (Duration::from_millis(5), 1024)
            } else {
                (args.interval, args.chunk)
            };
            let options = DemoOptions {
                limit_bytes: args.limit,
                interval,
                chunk_bytes: chunk,
                file_dir: args.file_dir,
                timeout: args.timeout,
                json: args.json,
                svg: args.svg,
            };
            tokio::task::spawn_blocking(move || demo::run(&options))
                .await
                .context("leak demo")?
                .context("leak demo")?
        }
    }
    Ok(())
}
