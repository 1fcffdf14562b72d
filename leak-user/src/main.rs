//! `leak`: an eBPF OOM-kill tracer. Parses the command line and hands over to the library.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use leak_user::{
    bench::{self, BenchOptions},
    demo::{self, DemoOptions},
    layout::VMLINUX_BTF,
    probes::AttachMode,
    trace::{self, TraceOptions},
    workload::{self, parse_bytes, parse_duration, WorkloadOptions},
};

#[derive(Debug, Parser)]
#[command(
    name = "leak",
    version,
    about = "eBPF OOM-kill tracer: every OOM kill with its cgroup's working set at the moment of death",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `trace` is the default subcommand; its options work without naming it.
    #[command(flatten)]
    trace: TraceArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace OOM kills and serve them on /metrics and /kills (the default).
    Trace(TraceArgs),
    /// The leaking program of the original experiment.
    Workload(WorkloadArgs),
    /// The original experiment end to end: a memcg, the tracer, an anonymous leak, then one
    /// with page cache, told from the kills' timelines.
    Demo(DemoArgs),
    /// Measure the tracer: throughput with and without it per charge-path mode, and the
    /// latency from a kill to /metrics and /kills.
    Bench(BenchArgs),
    /// A page-fault-heavy loop for benchmarks (prints bytes per second).
    Churn(ChurnArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Rounds; each measures the baseline and every mode back to back.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How long each workload runs per measurement.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes mapped, touched and unmapped (or written and fsynced) per round trip.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    bytes: u64,
    /// How many OOM kills to time.
    #[arg(long, default_value_t = 30)]
    kills: usize,
    /// Directory for the file workload (a disk filesystem).
    #[arg(long, default_value = "/var/tmp")]
    file_dir: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ChurnArgs {
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    bytes: u64,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    duration: Duration,
    /// Write, fsync and drop this file each round instead of mapping anonymous memory.
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// The memory limit of the demo's cgroup.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    limit: u64,
    /// The original rate, 1 KiB every 5 ms (about 11 minutes per run at 128 MiB).
    #[arg(long)]
    faithful: bool,
    /// How often the workload leaks a chunk (ignored with --faithful).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    interval: Duration,
    /// Bytes leaked (and written) per interval (ignored with --faithful).
    #[arg(long, default_value = "32KiB", value_parser = parse_bytes)]
    chunk: u64,
    /// Directory for the page-cache run's file: a disk filesystem, not tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    file_dir: PathBuf,
    /// Give up on a run after this long.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Address to serve /metrics, /kills and /healthz on.
    #[arg(long, default_value = "0.0.0.0:9750", env = "LEAK_LISTEN")]
    listen: SocketAddr,
    /// How to attach the OOM hook: auto walks fentry, kprobe, tp_btf, tracepoint.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto, env = "LEAK_ATTACH")]
    attach: AttachMode,
    /// How many recent kills /kills keeps.
    #[arg(long, default_value_t = 1000)]
    max_kills: usize,
    /// Size of the kernel's event ring buffer (a power of two, multiple of the page size).
    #[arg(long, default_value = "256KiB", value_parser = parse_ring_size)]
    ring_buffer: u32,
    /// Kernel BTF to resolve struct layouts from.
    #[arg(long, default_value = VMLINUX_BTF)]
    btf: PathBuf,
    /// The node's root filesystem, where /var/log/pods and /var/log/containers name pods and
    /// containers (mount the host's at e.g. /host when running in a container).
    #[arg(long, default_value = "/", env = "LEAK_ROOTFS")]
    rootfs: PathBuf,
    /// How to attach the charge path (the timeline before kills, live series): auto walks
    /// fentry, kprobe, tp_btf, tracepoint; off disables it.
    #[arg(long, value_enum, default_value_t = ChargeAttach::Auto, env = "LEAK_CHARGE_ATTACH")]
    charge_attach: ChargeAttach,
    /// At most one charge-path sample per cgroup (and kind) per this interval, in the kernel.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    sample_interval: Duration,
    /// How much history to keep per cgroup and attach to each kill.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    history: Duration,
    /// Which cgroups get a timeline and live series: those with a memory limit, or all.
    #[arg(long, value_enum, default_value_t = Watch::Limited)]
    watch: Watch,
    /// With the tp_btf charge path, also sample on every memcg LRU update (kernels 6.13+):
    /// a timeline before the limit, at a measurable cost on page-fault-heavy loads.
    #[arg(long)]
    dense_samples: bool,
    /// At most this many cgroups are watched (the least recently active are dropped).
    #[arg(long, default_value_t = 500)]
    max_watched_cgroups: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ChargeAttach {
    Auto,
    Off,
    Fentry,
    Kprobe,
    #[value(name = "tp_btf")]
    TpBtf,
    Tracepoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Watch {
    /// Cgroups with a memory limit (and their limited ancestors).
    Limited,
    /// Every memory cgroup the charge path sees.
    All,
}

#[derive(Debug, Args)]
struct WorkloadArgs {
    /// How often to leak a chunk (e.g. 5ms, 1ms, 100us).
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    interval: Duration,
    /// Bytes leaked (and written, with --file) per interval (e.g. 1KiB, 1MiB).
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    chunk: u64,
    /// Also append each chunk to this file and fsync it, growing page cache.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Address for the workload's own /metrics; `off` to disable.
    #[arg(long, default_value = "0.0.0.0:8081", value_parser = parse_listen)]
    listen: OptionalAddr,
    /// Stop leaking after this many bytes and keep running (default: leak until killed).
    #[arg(long, value_parser = parse_bytes)]
    max_bytes: Option<u64>,
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    let page = trace::page_size();
    if !bytes.is_power_of_two() || bytes < page || bytes > u64::from(u32::MAX) {
        return Err(format!(
            "{bytes} bytes: the ring buffer must be a power of two of at least {page} bytes"
        ));
    }
    Ok(bytes as u32)
}

/// A listen address, or `off`.
#[derive(Clone, Copy, Debug)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<OptionalAddr, String> {
    if text == "off" {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|err| format!("`{text}`: {err} (use HOST:PORT or off)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Trace(cli.trace)) {
        Command::Trace(args) => trace::run(TraceOptions {
            listen: args.listen,
            attach: args.attach,
            max_kills: args.max_kills,
            ring_buffer_bytes: args.ring_buffer,
            btf: args.btf,
            rootfs: args.rootfs,
            charge_attach: match args.charge_attach {
                ChargeAttach::Off => None,
                ChargeAttach::Auto => Some(AttachMode::Auto),
                ChargeAttach::Fentry => Some(AttachMode::Fentry),
                ChargeAttach::Kprobe => Some(AttachMode::Kprobe),
                ChargeAttach::TpBtf => Some(AttachMode::TpBtf),
                ChargeAttach::Tracepoint => Some(AttachMode::Tracepoint),
            },
            sample_interval: args.sample_interval,
            history: args.history,
            only_limited: args.watch == Watch::Limited,
            dense_samples: args.dense_samples,
            max_watched_cgroups: args.max_watched_cgroups,
            memory_root: None,
            memory_version: None,
        })
        .await
        .context("leak trace")?,
        Command::Workload(args) => workload::run(WorkloadOptions {
            interval: args.interval,
            chunk: usize::try_from(args.chunk).context("--chunk is too large")?,
            file: args.file,
            listen: args.listen.0,
            max_bytes: args.max_bytes,
        })
        .await
        .context("leak workload")?,
        Command::Bench(args) => {
            let options = BenchOptions {
                rounds: args.rounds.max(1),
                duration: args.duration,
                churn_bytes: usize::try_from(args.bytes).context("--bytes is too large")?,
                kills: args.kills.max(1),
                file_dir: args.file_dir,
                json: args.json,
            };
            tokio::task::spawn_blocking(move || bench::run(&options))
                .await
                .context("leak bench")?
                .context("leak bench")?;
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
            };
            tokio::task::spawn_blocking(move || demo::run(&options))
                .await
                .context("leak demo")?
                .context("leak demo")?
        }
    }
    Ok(())
}
