//! The command line: every subcommand's arguments and the parsers of sizes, durations and
//! addresses. In the library so that tests parse what users (and `deploy/daemonset.yaml`) write
//! with the very parser the agent uses.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    kernel::layout::VMLINUX_BTF,
    kernel::{pin::DEFAULT_PIN_DIR, AttachMode},
};

#[derive(Debug, Parser)]
#[command(
    name = "leak",
    version,
    about = "eBPF OOM-kill tracer: every OOM kill with its cgroup's working set at the moment of death",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `trace` is the default subcommand; its options work without naming it.
    #[command(flatten)]
    pub trace: TraceArgs,
}

impl Cli {
    /// The subcommand, `trace` when none was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Trace(self.trace))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Read a password on stdin and print its bcrypt hash, for `basic_auth_users` of the web
    /// configuration file (as `htpasswd -nB` would).
    HashPassword(HashPasswordArgs),
    /// Remove every probe and ring buffer agents pinned (detaching them); what they recorded
    /// and no agent drained is lost.
    Unpin(UnpinArgs),
}

#[derive(Debug, Args)]
pub struct UnpinArgs {
    /// Where the agents pinned their probes.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "LEAK_PIN_DIR")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct HashPasswordArgs {
    /// bcrypt cost (4 to 31): each verification takes about 2^cost / 2^10 * 50 ms.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub cost: u32,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rounds; each measures the baseline and every mode back to back.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// How long each workload runs per measurement.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Bytes mapped, touched and unmapped (or written and fsynced) per round trip.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub bytes: u64,
    /// How many OOM kills to time.
    #[arg(long, default_value_t = 30)]
    pub kills: usize,
    /// How many OOM kills the storm makes (in waves of 50 cgroups), to measure the agent's CPU
    /// time and peak memory under them.
    #[arg(long, default_value_t = 1000)]
    pub storm: usize,
    /// Directory for the file workload (a disk filesystem).
    #[arg(long, default_value = "/var/tmp")]
    pub file_dir: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ChurnArgs {
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub bytes: u64,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Write, fsync and drop this file each round instead of mapping anonymous memory.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The memory limit of the demo's cgroup.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    pub limit: u64,
    /// The original rate, 1 KiB every 5 ms (about 11 minutes per run at 128 MiB).
    #[arg(long)]
    pub faithful: bool,
    /// How often the workload leaks a chunk (ignored with --faithful).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub interval: Duration,
    /// Bytes leaked (and written) per interval (ignored with --faithful).
    #[arg(long, default_value = "32KiB", value_parser = parse_bytes)]
    pub chunk: u64,
    /// Directory for the page-cache run's file: a disk filesystem, not tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    pub file_dir: PathBuf,
    /// Give up on a run after this long.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Also write the runs' kills, as served on /kills, to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw both runs side by side, from the kills' timelines, as an SVG figure.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Address to serve /metrics, /kills and /healthz on.
    #[arg(long, default_value = "0.0.0.0:9750", env = "LEAK_LISTEN")]
    pub listen: SocketAddr,
    /// How to attach the OOM hook: auto walks fentry, kprobe, tp_btf, tracepoint.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto, env = "LEAK_ATTACH")]
    pub attach: AttachMode,
    /// How many recent kills /kills keeps.
    #[arg(long, default_value_t = 1000)]
    pub max_kills: usize,
    /// Size of the kernel's event ring buffer (a power of two, multiple of the page size).
    /// The default holds about 290 kills (each snapshot is about 3.5 KiB), so a storm of
    /// concurrent kills on a busy node is not lost while the agent waits for a CPU.
    #[arg(long, default_value = "1MiB", value_parser = parse_ring_size)]
    pub ring_buffer: u32,
    /// Kernel BTF to resolve struct layouts from.
    #[arg(long, default_value = VMLINUX_BTF)]
    pub btf: PathBuf,
    /// The node's root filesystem, where /var/log/pods and /var/log/containers name pods and
    /// containers (mount the host's at e.g. /host when running in a container). Anything but
    /// `/` says the agent's own root is not the node's: it then refuses to start without the
    /// node's cgroup tree, log directories (or a CRI socket), and, where it keeps them, a
    /// state directory and pins that outlive it.
    #[arg(long, default_value = "/", env = "LEAK_ROOTFS")]
    pub rootfs: PathBuf,
    /// The container runtime's CRI socket, asked for the names of containers the log
    /// directories do not name. Default: the first of containerd's, k3s's, CRI-O's and
    /// cri-dockerd's sockets present under --rootfs; an empty value asks no runtime.
    #[arg(long, env = "LEAK_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// How to attach the charge path (the timeline before kills, live series): auto walks
    /// fentry, kprobe, tp_btf, tracepoint; off disables it.
    #[arg(long, value_enum, default_value_t = ChargeAttach::Auto, env = "LEAK_CHARGE_ATTACH")]
    pub charge_attach: ChargeAttach,
    /// At most one charge-path sample per cgroup (and kind) per this interval, in the kernel.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub sample_interval: Duration,
    /// How much history to keep per cgroup and attach to each kill.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub history: Duration,
    /// Which cgroups get a timeline and live series: those with a memory limit, or all.
    #[arg(long, value_enum, default_value_t = Watch::Limited)]
    pub watch: Watch,
    /// With the tp_btf charge path, also sample on every memcg LRU update (kernels 6.13+):
    /// a timeline before the limit, at a measurable cost on page-fault-heavy loads.
    #[arg(long)]
    pub dense_samples: bool,
    /// Have the kernel count the runs and run time of each of leak's BPF programs (for as long
    /// as the agent runs; BPF_ENABLE_STATS, 5.8+; two clock reads per program run) and export
    /// them as leak_bpf_program_runs_total and leak_bpf_program_run_seconds_total.
    #[arg(long, env = "LEAK_BPF_STATS")]
    pub bpf_stats: bool,
    /// TLS, client certificates and basic auth for every endpoint, in the web configuration
    /// format of Prometheus exporters (tls_server_config, basic_auth_users).
    #[arg(long, env = "LEAK_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,
    /// At most this many open HTTP connections; at the cap the one idle the longest is closed
    /// for a new one.
    #[arg(long, default_value_t = 256)]
    pub web_max_connections: usize,
    /// Where kill snapshots are kept across restarts (an SQLite database, kills.db); an empty
    /// value keeps them in memory only.
    #[arg(
        long,
        default_value = "/var/lib/leak",
        env = "LEAK_STATE_DIR",
        value_parser = parse_state_dir
    )]
    pub state_dir: PathBuf,
    /// Kills older than this leave the store.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
    /// At most this many kills are kept in the store (the oldest leave first).
    #[arg(long, default_value_t = 100_000)]
    pub retention_kills: u64,
    /// At most this many cgroups are watched (the least recently active are dropped).
    #[arg(long, default_value_t = 500)]
    pub max_watched_cgroups: usize,
    /// Where the probes and their ring buffers are pinned (bpffs), so that they keep recording
    /// kills while no agent runs and the next agent drains them.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "LEAK_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Pin nothing: every probe is detached when the agent exits (what earlier agents pinned
    /// under --pin-dir is still drained and detached).
    #[arg(long, env = "LEAK_NO_PIN")]
    pub no_pin: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChargeAttach {
    Auto,
    Off,
    Fentry,
    Kprobe,
    #[value(name = "tp_btf")]
    TpBtf,
    Tracepoint,
}

impl ChargeAttach {
    /// The charge path's attach mode, `None` when it is off.
    pub fn mode(self) -> Option<AttachMode> {
        match self {
            Self::Off => None,
            Self::Auto => Some(AttachMode::Auto),
            Self::Fentry => Some(AttachMode::Fentry),
            Self::Kprobe => Some(AttachMode::Kprobe),
            Self::TpBtf => Some(AttachMode::TpBtf),
            Self::Tracepoint => Some(AttachMode::Tracepoint),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Watch {
    /// Cgroups with a memory limit (and their limited ancestors).
    Limited,
    /// Every memory cgroup the charge path sees.
    All,
}

#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// How often to leak a chunk (e.g. 5ms, 1ms, 100us).
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub interval: Duration,
    /// Bytes leaked (and written, with --file) per interval (e.g. 1KiB, 1MiB).
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    pub chunk: u64,
    /// Also append each chunk to this file and fsync it, growing page cache.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Address for the workload's own /metrics; `off` to disable.
    #[arg(long, default_value = "0.0.0.0:8081", value_parser = parse_listen)]
    pub listen: OptionalAddr,
    /// Stop leaking after this many bytes and keep running (default: leak until killed).
    #[arg(long, value_parser = parse_bytes)]
    pub max_bytes: Option<u64>,
    /// Leak from a worker thread while the main thread exits: the OOM killer then marks that
    /// other thread (the process's leader has no memory left to point at).
    #[arg(long)]
    pub leader_exits: bool,
}

/// A listen address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<OptionalAddr, String> {
    if text == "off" {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|err| format!("`{text}`: {err} (use HOST:PORT or off)"))
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    let page = crate::sys::page_size();
    if !bytes.is_power_of_two() || bytes < page || bytes > u64::from(u32::MAX) {
        return Err(format!(
            "{bytes} bytes: the ring buffer must be a power of two of at least {page} bytes"
        ));
    }
    u32::try_from(bytes).map_err(|_| format!("{bytes} bytes: too large for a ring buffer"))
}

/// A state directory; empty means none (so not clap's path parser, which refuses empty values).
fn parse_state_dir(text: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(text))
}

/// Parses `5ms`, `1s`, `250us`, `2m`; a bare number is milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 5ms or 1s"))?;
    let scale = match unit.trim() {
        "" | "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (ns, us, ms, s, m, h, d)"
            ))
        }
    };
    let seconds = value * scale;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `1024`, `1KiB`, `4k`, `1MiB`, `128M`, `1GiB` (binary multiples).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 1KiB or 128MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kb" | "kib" => 1 << 10,
        "m" | "mi" | "mb" | "mib" => 1 << 20,
        "g" | "gi" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (KiB, MiB, GiB)")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("1KiB"), Ok(1024));
        assert_eq!(parse_bytes("128Mi"), Ok(128 << 20));
        assert!(parse_bytes("1 parsec").is_err());
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("4k"), Ok(4096));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn trace_is_the_default_subcommand() {
        let cli = Cli::try_parse_from(["leak", "--attach", "tracepoint", "--max-kills", "5"])
            .expect("parses");
        let Command::Trace(args) = cli.into_command() else {
            panic!("not trace");
        };
        assert_eq!(args.attach, AttachMode::Tracepoint);
        assert_eq!(args.max_kills, 5);
        assert_eq!(args.charge_attach.mode(), Some(AttachMode::Auto));
        assert!(Cli::try_parse_from(["leak", "--ring-buffer", "3000"]).is_err());
        assert!(Cli::try_parse_from(["leak", "--no-such-flag"]).is_err());
        assert_eq!(args.state_dir, PathBuf::from("/var/lib/leak"));
        assert_eq!(args.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(args.pin_dir, PathBuf::from("/sys/fs/bpf/leak"));
        assert!(!args.no_pin);
        let cli =
            Cli::try_parse_from(["leak", "unpin", "--pin-dir", "/sys/fs/bpf/x"]).expect("parses");
        let Command::Unpin(args) = cli.into_command() else {
            panic!("not unpin");
        };
        assert_eq!(args.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
    }

    #[test]
    fn an_empty_state_dir_means_none() {
        let cli = Cli::try_parse_from(["leak", "trace", "--state-dir", ""]).expect("parses");
        let Command::Trace(args) = cli.into_command() else {
            panic!("not trace");
        };
        assert!(args.state_dir.as_os_str().is_empty());
    }
}
