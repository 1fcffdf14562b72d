//! Where a kill is born: loading the kernel programs and attaching the OOM hook and the charge
//! path through their fallback chains.
//!
//! Kernel compatibility is data, in [`table`]: per hook, the attach modes in priority order,
//! each with its programs, hooks and how support is detected. [`attach`] walks it; `auto` takes
//! the first mode that attaches, a forced mode fails with the reason the kernel gave. [`host`]
//! checks and prepares what the host must allow before anything is loaded.

pub mod attach;
pub mod crosscheck;
pub mod host;
pub mod kmsg;
pub mod layout;
pub mod table;

use aya::{
    maps::{HashMap as AyaHashMap, MapData, MapError, PerCpuArray, RingBuf},
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use leak_common::{
    event::counter,
    layout::{stats_scheme, Layout},
    sample::{CgroupCounters, ChargeConfig},
};
use log::{debug, info, warn};

pub use self::{
    attach::{AttachError, Attachment},
    host::HostError,
    table::AttachMode,
};
use self::{
    attach::{Loader, Walker, Wants},
    crosscheck::CrossCheckError,
    host::Tracefs,
    layout::{LayoutError, Resolver},
    table::{Hook, Program, CHARGE_PATH_CHAIN, OOM_HOOK_CHAIN},
};

/// The compiled kernel programs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leak"));

/// Maps and globals of the BPF object (leak-ebpf/src/maps.rs and the programs' statics).
const EVENTS: &str = "EVENTS";
const SAMPLES: &str = "SAMPLES";
const COUNTERS: &str = "COUNTERS";
const CGROUP_COUNTERS: &str = "CGROUP_COUNTERS";
const LAYOUT: &str = "LAYOUT";
const CHARGE_CONFIG: &str = "CHARGE_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "cannot read kernel BTF for attaching: {0}; leak needs /sys/kernel/btf/vmlinux \
         (CONFIG_DEBUG_INFO_BTF=y) or a BTF file passed with --btf"
    )]
    Btf(#[from] aya::BtfError),
    #[error(
        "the kernel refused to create BPF map `{name}` ({source}): leak needs CAP_BPF, \
         CAP_PERFMON and CAP_SYS_ADMIN (in a container: privileged), and kernels before 5.11 \
         need RLIMIT_MEMLOCK raised (`ulimit -l unlimited`)"
    )]
    MapRefused {
        name: String,
        source: std::io::Error,
    },
    #[error(
        "cannot load the BPF object: {0}; run with RUST_LOG=debug and report it with `uname -r`"
    )]
    Load(#[source] EbpfError),
    #[error(
        "the BPF object has no map `{0}`: the agent and its kernel programs are out of step; \
         rebuild leak"
    )]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    CrossCheck(#[from] CrossCheckError),
}

impl From<EbpfError> for ProbeError {
    fn from(err: EbpfError) -> Self {
        match err {
            EbpfError::MapError(MapError::CreateError { name, io_error })
                if io_error.raw_os_error() == Some(libc::EPERM) =>
            {
                Self::MapRefused {
                    name,
                    source: io_error,
                }
            }
            err => Self::Load(err),
        }
    }
}

/// The loaded programs. Dropping it detaches every probe.
pub struct Probes {
    ebpf: Ebpf,
    mode: AttachMode,
    charge_mode: Option<AttachMode>,
    attachments: Vec<Attachment>,
    /// The kernel keeps live memcg counters, with nothing to flush (5.10 to 5.12).
    live_stat_counters: bool,
    counters: PerCpuArray<MapData, u64>,
    /// Held while the kernel counts program run times (BPF_ENABLE_STATS); closing it stops that.
    _stats: Option<std::os::fd::OwnedFd>,
    cgroup_counters: AyaHashMap<MapData, u64, CgroupCounters>,
}

/// Options for [`Probes::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub attach: AttachMode,
    /// How to attach the charge path; `None` leaves it off.
    pub charge_attach: Option<AttachMode>,
    pub ring_buffer_bytes: u32,
    pub btf_path: std::path::PathBuf,
    /// At most one charge sample per cgroup and kind per this many nanoseconds.
    pub sample_interval_ns: u64,
    /// Sample only cgroups with a memory limit.
    pub only_limited: bool,
    /// With tp_btf, also sample on every memcg LRU update (6.13+): a timeline before the
    /// limit, at a cost on page-fault-heavy loads (see the README's benchmark).
    pub dense_samples: bool,
    /// Have the kernel count each program's runs and run time while the programs are loaded.
    pub bpf_stats: bool,
    /// The root memory cgroup's `memory.stat`, against which the statistics indices resolved
    /// from BTF are cross-checked before anything is attached; `None` skips the check.
    pub root_memory_stat: Option<std::path::PathBuf>,
    /// The kernel charges cgroup v1's memory+swap counter (v1 with swap accounting, where the
    /// `memory.memsw.*` files exist): snapshots then carry it.
    pub memsw_accounted: bool,
}

impl Probes {
    /// Resolves the kernel layout, loads the programs and attaches the OOM hook (and the charge
    /// path, if asked).
    pub fn load(options: &LoadOptions) -> Result<Self, ProbeError> {
        host::preflight()?;
        host::raise_memlock_rlimit();
        // Once, before any format file is read or program attached.
        let tracefs = Tracefs::discover();
        match &tracefs {
            Some(tracefs) => debug!("tracefs at {}", tracefs.root()),
            None => debug!("no tracefs: the classic tracepoint modes are unavailable"),
        }

        let resolver = Resolver::from_file(&options.btf_path)?;
        let mut kernel_layout = resolver.layout()?;
        if let Some(offset) = tracefs
            .as_ref()
            .and_then(|tracefs| tracefs.format(Hook::MarkVictim))
            .and_then(|format| layout::tracepoint_field_offset(&format, "pid"))
        {
            kernel_layout.tp_mark_victim_pid = offset;
        }
        if let Some(format) = tracefs
            .as_ref()
            .and_then(|tracefs| tracefs.format(Hook::SignalGenerate))
        {
            let field = |name| layout::tracepoint_field_offset(&format, name);
            if let (Some(sig), Some(code), Some(pid)) = (field("sig"), field("code"), field("pid"))
            {
                kernel_layout.tp_signal_generate_sig = sig;
                kernel_layout.tp_signal_generate_code = code;
                kernel_layout.tp_signal_generate_pid = pid;
            }
        }
        kernel_layout.memsw_accounted = u32::from(options.memsw_accounted);
        info!("kernel layout resolved from {}", options.btf_path.display());
        debug!("{kernel_layout:?}");

        let charge_config = ChargeConfig {
            min_interval_ns: options.sample_interval_ns,
            unlimited_pages: crate::model::memory::unlimited_pages(crate::sys::page_size()),
            only_limited: u32::from(options.only_limited),
            _pad: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(LAYOUT, &kernel_layout, true)
            .override_global(CHARGE_CONFIG, &charge_config, true)
            .map_max_entries(EVENTS, options.ring_buffer_bytes)
            .map_max_entries(SAMPLES, options.ring_buffer_bytes)
            .load(EBPF_OBJECT)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS)?)
            .map_err(|source| map_error(COUNTERS, source))?;
        let cgroup_counters = AyaHashMap::try_from(take_map(&mut ebpf, CGROUP_COUNTERS)?)
            .map_err(|source| map_error(CGROUP_COUNTERS, source))?;

        if let Some(path) = &options.root_memory_stat {
            match crosscheck::cross_check(&mut ebpf, &kernel_layout, path, crate::sys::page_size())
            {
                Ok(figures) => info!(
                    "memcg statistics indices agree with {} ({figures} figures)",
                    path.display()
                ),
                Err(err @ CrossCheckError::Disagree(_)) => return Err(err.into()),
                Err(err) => warn!("memcg statistics indices not cross-checked: {err}"),
            }
        }

        let btf = Btf::parse_file(&options.btf_path, aya::Endianness::default())?;
        let mut loader = Loader {
            ebpf: &mut ebpf,
            btf: &btf,
            resolver: &resolver,
            tracefs: tracefs.as_ref(),
            mark_victim_pid_known: kernel_layout.tp_mark_victim_pid != Layout::ABSENT,
            signal_generate_fields_known: kernel_layout.tp_signal_generate_pid != Layout::ABSENT,
        };
        let mut walker = Walker::new(
            &mut loader,
            Wants {
                bare_pid: kernel_layout.mark_victim_has_task != 1,
                dense_samples: options.dense_samples,
            },
        );
        let mode = walker.attach(&OOM_HOOK_CHAIN, options.attach)?;
        let charge_mode = match options.charge_attach {
            None => None,
            Some(requested) => match walker.attach(&CHARGE_PATH_CHAIN, requested) {
                Ok(mode) => Some(mode),
                // The kills are still reported; only their timelines are missing.
                Err(err) if requested == AttachMode::Auto => {
                    warn!("no charge-path hook, so no timeline before kills: {err}");
                    None
                }
                Err(err) => return Err(err.into()),
            },
        };
        let attachments = walker.into_attachments();
        let stats = match options.bpf_stats {
            false => None,
            true => match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => {
                    info!("the kernel counts each BPF program's runs and run time (--bpf-stats)");
                    Some(fd)
                }
                Err(err) => {
                    warn!("--bpf-stats: the kernel refused BPF_ENABLE_STATS (5.8+): {err}");
                    None
                }
            },
        };
        for attachment in &attachments {
            info!("attached {} via {}", attachment.hook, attachment.mode);
        }
        Ok(Self {
            ebpf,
            mode,
            charge_mode,
            attachments,
            live_stat_counters: kernel_layout.stats_scheme == stats_scheme::INLINE_ARRAY,
            counters,
            _stats: stats,
            cgroup_counters,
        })
    }

    /// The OOM hook's mode in use (never `auto`).
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The charge path's mode in use, `None` when it is off or unavailable.
    pub fn charge_mode(&self) -> Option<AttachMode> {
        self.charge_mode
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Whether the kernel's OOM report is hooked, so that each kill can say whether it
    /// flushed the statistics.
    pub fn report_hooked(&self) -> bool {
        self.attachments
            .iter()
            .any(|attachment| attachment.hook == Hook::OomReport)
    }

    /// Whether the kernel keeps live memcg counters with nothing to flush (5.10 to 5.12).
    pub fn live_stat_counters(&self) -> bool {
        self.live_stat_counters
    }

    /// Whether a kill witness is attached (`__oom_kill_process` or `signal:signal_generate`):
    /// then every kill says whether the OOM killer killed the victim or only marked it.
    pub fn kill_witness(&self) -> bool {
        self.attachments
            .iter()
            .any(|a| matches!(a.hook, Hook::OomKillVictim | Hook::SignalGenerate))
    }

    /// The ring buffer of OOM-kill events; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        RingBuf::try_from(take_map(&mut self.ebpf, EVENTS)?)
            .map_err(|source| map_error(EVENTS, source))
    }

    /// The charge-path samples; can be taken once.
    pub fn take_samples(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        RingBuf::try_from(take_map(&mut self.ebpf, SAMPLES)?)
            .map_err(|source| map_error(SAMPLES, source))
    }

    /// Limit hits and charge failures per cgroup id, as the kernel counted them.
    pub fn cgroup_counters(&self) -> Vec<(u64, CgroupCounters)> {
        self.cgroup_counters.iter().filter_map(Result::ok).collect()
    }

    /// The forwarder of the programs' own log records (aya-log).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                warn!("kernel program logs are not forwarded: {err}");
                None
            }
        }
    }

    /// The kernel-side counters, summed over CPUs.
    pub fn kernel_counters(&self) -> KernelCounters {
        let sum = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().copied().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            lost_events: sum(counter::LOST_EVENTS),
            read_errors: sum(counter::READ_ERRORS),
            lost_samples: sum(counter::LOST_SAMPLES),
            charge_state_dropped: sum(counter::CHARGE_STATE_DROPPED),
        }
    }

    /// Runs and total run time of each loaded program, as the kernel counts them (zero unless
    /// statistics are enabled: `--bpf-stats` or the `kernel.bpf_stats_enabled` sysctl), and
    /// the verifier's work to load it.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        Program::ALL
            .iter()
            .filter_map(|program| {
                let info = self.ebpf.program(program.name())?.info().ok()?;
                Some(ProgramStats {
                    program: program.name(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    verified_instructions: info.verified_instruction_count(),
                })
            })
            .collect()
    }

    /// Detaches every program and unloads them (also done on drop; this logs it).
    pub fn detach(self) {
        let count = self.ebpf.programs().count();
        drop(self);
        info!("detached and unloaded {count} BPF programs");
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
}

fn map_error(name: &'static str, source: MapError) -> ProbeError {
    ProbeError::Map { name, source }
}

/// What the kernel counted for one loaded program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// How many instructions the verifier processed to load it (kernels 5.16+ tell).
    pub verified_instructions: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub lost_events: u64,
    pub read_errors: u64,
    pub lost_samples: u64,
    pub charge_state_dropped: u64,
}
