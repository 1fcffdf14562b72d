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
pub mod pin;
pub mod table;

use std::path::PathBuf;

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
const ARMED: &str = "ARMED";
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
    #[error(
        "{0}; the probes an earlier agent pinned (if any) stay attached and recording; \
         run with --no-pin to trace without pinning"
    )]
    Pin(pin::GenerationError),
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
    /// Held while the kernel counts program run times (BPF_ENABLE_STATS); closing it stops that.
    _stats: Option<std::os::fd::OwnedFd>,
    cgroup_counters: AyaHashMap<MapData, u64, CgroupCounters>,
    /// The link of every attached program (pinned ones stay attached after the agent exits).
    links: Vec<(Program, pin::HeldLink)>,
    pin_state: PinState,
    /// The ring buffers of the generations this agent replaced, to drain once.
    retired: Option<pin::Retired>,
    /// What the replaced generations' programs counted (lost events while no agent read).
    carried: KernelCounters,
}

/// Whether the probes outlive the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinState {
    /// Pinned under this generation directory (`charge_unpinnable`: charge-path programs this
    /// kernel cannot pin, detached when the agent exits).
    Pinned {
        generation: PathBuf,
        charge_unpinnable: Vec<&'static str>,
    },
    /// `--no-pin`: every probe is detached when the agent exits.
    Off,
    /// Pinning was asked for and is not possible; the reason.
    Unavailable(String),
}

impl PinState {
    pub fn pinned(&self) -> bool {
        matches!(self, Self::Pinned { .. })
    }
}

/// Where probes are pinned, and whether this agent pins its own.
#[derive(Clone, Debug)]
pub struct PinOptions {
    pub dir: PathBuf,
    /// `false` with `--no-pin`: what earlier agents pinned under `dir` is still taken over
    /// (drained and detached), nothing new is pinned.
    pub pin: bool,
}

/// Options for [`Probes::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub attach: AttachMode,
    /// How to attach the charge path; `None` leaves it off.
    pub charge_attach: Option<AttachMode>,
    pub ring_buffer_bytes: u32,
    pub btf_path: PathBuf,
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
    pub root_memory_stat: Option<PathBuf>,
    /// The kernel charges cgroup v1's memory+swap counter (v1 with swap accounting, where the
    /// `memory.memsw.*` files exist): snapshots then carry it.
    pub memsw_accounted: bool,
    pub pin: PinOptions,
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
        // Read through the object each time rather than taken: pinned with the probes.
        let _: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(ebpf.map(COUNTERS).ok_or(ProbeError::MissingMap(COUNTERS))?)
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

        // What earlier agents pinned stays attached (and recording) until this agent's own
        // programs are attached: then it is detached, and its ring buffers drained.
        let (previous, mut pin_state) = open_pinned(&options.pin);

        let btf = Btf::parse_file(&options.btf_path, aya::Endianness::default())?;
        let mut loader = Loader {
            ebpf: &mut ebpf,
            btf: &btf,
            resolver: &resolver,
            tracefs: tracefs.as_ref(),
            mark_victim_pid_known: kernel_layout.tp_mark_victim_pid != Layout::ABSENT,
            signal_generate_fields_known: kernel_layout.tp_signal_generate_pid != Layout::ABSENT,
            links: Vec::new(),
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
        let mut links = std::mem::take(&mut loader.links);
        // Every program attached: an OOM that begins from now on meets the whole set (one that
        // began earlier is reported with flags::UNARMED, its witness not to be trusted).
        let mut armed: aya::maps::Array<&mut MapData, u32> =
            aya::maps::Array::try_from(ebpf.map_mut(ARMED).ok_or(ProbeError::MissingMap(ARMED))?)
                .map_err(|source| map_error(ARMED, source))?;
        armed
            .set(0, 1, 0)
            .map_err(|source| map_error(ARMED, source))?;
        if pin_state.is_none() {
            let (held, pinned) = pin::pin_generation(&options.pin.dir, &ebpf, links);
            links = held;
            pin_state = Some(match pinned {
                Ok(pin::Pinned::All(generation)) => PinState::Pinned {
                    generation,
                    charge_unpinnable: Vec::new(),
                },
                Ok(pin::Pinned::KillPath(generation, charge_unpinnable)) => {
                    warn!(
                        "pinning: the charge path's {} cannot be pinned on this kernel (a \
                         perf event without BPF_LINK_TYPE_PERF_EVENT, 5.15+): kills while no \
                         agent runs have no timeline",
                        charge_unpinnable.join(", ")
                    );
                    PinState::Pinned {
                        generation,
                        charge_unpinnable,
                    }
                }
                Ok(pin::Pinned::Nothing(programs)) => {
                    let reason = format!(
                        "{} cannot be pinned on this kernel (a perf event without \
                         BPF_LINK_TYPE_PERF_EVENT, 5.15+; the {mode} mode's probes end with \
                         the agent): kills while no agent runs are counted from the kernel's \
                         oom_kill counters in leak_oom_kills_unobserved_total",
                        programs.join(", ")
                    );
                    warn!("pinning: {reason}");
                    PinState::Unavailable(reason)
                }
                Err(err @ pin::GenerationError::Maps(_)) => {
                    warn!("pinning: {err}; the probes end with the agent");
                    PinState::Unavailable(err.to_string())
                }
                Err(err @ pin::GenerationError::Link(_)) => return Err(ProbeError::Pin(err)),
            });
        }
        let pin_state = pin_state.unwrap_or(PinState::Off);
        if let PinState::Pinned { generation, .. } = &pin_state {
            info!(
                "probes pinned under {}: they keep recording kills while no agent runs",
                generation.display()
            );
        }
        // Only now, with this agent's probes attached, do the earlier ones go.
        let retired = previous.map(pin::Previous::retire);
        let carried = retired
            .as_ref()
            .map_or_else(KernelCounters::default, |retired| KernelCounters {
                lost_events: retired.lost_events,
                lost_samples: retired.lost_samples,
                ..KernelCounters::default()
            });
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
            _stats: stats,
            cgroup_counters,
            links,
            pin_state,
            retired,
            carried,
        })
    }

    /// Whether the probes outlive the agent.
    pub fn pin_state(&self) -> &PinState {
        &self.pin_state
    }

    /// The ring buffers of the generations this agent replaced (drain them once, first), and
    /// whether those generations recorded kills while no agent ran.
    pub fn take_retired(&mut self) -> Option<pin::Retired> {
        self.retired.take()
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
        let counters = self
            .ebpf
            .map(COUNTERS)
            .and_then(|map| PerCpuArray::<&MapData, u64>::try_from(map).ok());
        let sum = |index: u32| -> u64 {
            counters
                .as_ref()
                .and_then(|counters| counters.get(&index, 0).ok())
                .map(|values| values.iter().copied().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            lost_events: self.carried.lost_events + sum(counter::LOST_EVENTS),
            read_errors: sum(counter::READ_ERRORS),
            lost_samples: self.carried.lost_samples + sum(counter::LOST_SAMPLES),
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

    /// Detaches every program that is not pinned and unloads them (also done on drop; this
    /// logs it). Pinned probes stay attached for the next agent.
    pub fn detach(self) {
        let count = self.ebpf.programs().count();
        let pinned = self
            .links
            .iter()
            .filter(|(_, link)| link.pinnable())
            .count();
        match &self.pin_state {
            PinState::Pinned { generation, .. } => {
                let generation = generation.clone();
                drop(self);
                info!(
                    "{pinned} probes stay attached, pinned under {} (the next agent drains \
                     and replaces them; `leak unpin` removes them); the other {} programs \
                     detached",
                    generation.display(),
                    count.saturating_sub(pinned)
                );
            }
            _ => {
                drop(self);
                info!("detached and unloaded {count} BPF programs");
            }
        }
    }
}

/// Opens what earlier agents pinned under the pin directory, and checks that this agent can
/// pin there. The state is `None` when this agent is to pin its own probes.
fn open_pinned(options: &PinOptions) -> (Option<pin::Previous>, Option<PinState>) {
    let mut state = None;
    if options.pin {
        if let Err(err) = pin::prepare_dir(&options.dir) {
            warn!("pinning off: {err}");
            state = Some(PinState::Unavailable(err.to_string()));
        }
    } else {
        state = Some(PinState::Off);
    }
    let previous = match pin::Previous::open(&options.dir) {
        Ok(previous) if previous.is_empty() => None,
        Ok(previous) => Some(previous),
        Err(err) => {
            warn!("what earlier agents pinned is left alone: {err}");
            None
        }
    };
    (previous, state)
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
