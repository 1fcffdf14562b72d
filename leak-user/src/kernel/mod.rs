//! Where a kill is born: loading the kernel programs and attaching the OOM hook through its
//! fallback chain.
//!
//! Kernel compatibility lives in one table, [`OOM_HOOK_CHAIN`]: the attach modes in priority
//! order, each with how support is detected. `auto` walks it; a forced mode tries only itself
//! and fails with the reason the kernel gave.

use std::{fmt, fs, path::Path};

use aya::{
    maps::{HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use leak_common::{
    event::counter,
    layout::Layout,
    sample::{CgroupCounters, ChargeConfig},
};
use log::{info, warn};

pub mod kmsg;
pub mod layout;

use self::layout::{LayoutError, Resolver};
use crate::sys::{is_root, kallsyms_has};

/// The compiled kernel programs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leak"));

/// How the OOM hook is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// Walk the fallback chain and take the first mode the kernel supports.
    Auto,
    /// fentry/fexit on `oom_kill_process` (BTF trampolines), victims from `oom:mark_victim`.
    Fentry,
    /// kprobe/kretprobe on `oom_kill_process`, victims from `oom:mark_victim`.
    Kprobe,
    /// BTF-enabled raw tracepoint `oom:mark_victim`.
    #[value(name = "tp_btf")]
    TpBtf,
    /// Classic tracepoint `oom:mark_victim` (needs tracefs).
    Tracepoint,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The OOM hook's attach modes in priority order, and what each needs from the kernel.
pub const OOM_HOOK_CHAIN: &[(AttachMode, &str)] = &[
    (
        AttachMode::Fentry,
        "oom_kill_process in BTF (not inlined) and BPF trampolines (fentry) allowed",
    ),
    (
        AttachMode::Kprobe,
        "CONFIG_KPROBES and oom_kill_process in /proc/kallsyms (not inlined)",
    ),
    (AttachMode::TpBtf, "btf_trace_mark_victim in BTF (5.5+)"),
    (
        AttachMode::Tracepoint,
        "tracefs with events/oom/mark_victim",
    ),
];

/// One attached program: which kernel hook, in which mode.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub hook: &'static str,
    pub mode: AttachMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "leak must run as root (it loads BPF programs: CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); \
         try `sudo leak` or `cargo xtask run`"
    )]
    NotRoot,
    #[error(
        "kernel lockdown is in `confidentiality` mode, which forbids reading kernel memory \
         from BPF; boot with lockdown=integrity or none"
    )]
    Lockdown,
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("cannot load kernel BTF for attaching: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot load the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the BPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("attach mode `{mode}` is not available on this kernel: {reason} (needs {needs})")]
    ModeUnavailable {
        mode: AttachMode,
        reason: String,
        needs: &'static str,
    },
    #[error("no OOM hook could be attached:\n{0}")]
    NoHook(String),
}

/// The loaded programs. Dropping it detaches every probe.
pub struct Probes {
    ebpf: Ebpf,
    mode: AttachMode,
    charge_mode: Option<AttachMode>,
    attachments: Vec<Attachment>,
    counters: PerCpuArray<MapData, u64>,
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
}

/// The charge path's attach modes in priority order, and what each needs from the kernel.
pub const CHARGE_HOOK_CHAIN: &[(AttachMode, &str)] = &[
    (
        AttachMode::Fentry,
        "try_charge_memcg (5.15+) or try_charge, and try_to_free_mem_cgroup_pages, in BTF; \
         BPF trampolines allowed",
    ),
    (
        AttachMode::Kprobe,
        "CONFIG_KPROBES; try_charge_memcg or try_charge, and try_to_free_mem_cgroup_pages, in \
         /proc/kallsyms",
    ),
    (
        AttachMode::TpBtf,
        "btf_trace_mm_vmscan_memcg_reclaim_begin in BTF (limit hits; with --dense-samples \
         also memcg:mod_memcg_lruvec_state, 6.13+)",
    ),
    (
        AttachMode::Tracepoint,
        "tracefs with events/vmscan/mm_vmscan_memcg_reclaim_begin (limit hits only)",
    ),
];

impl Probes {
    /// Resolves the kernel layout, loads the programs and attaches the OOM hook.
    pub fn load(options: &LoadOptions) -> Result<Self, ProbeError> {
        preflight()?;
        raise_memlock_rlimit();

        let resolver = Resolver::from_file(&options.btf_path)?;
        let mut kernel_layout = resolver.layout()?;
        if let Some(offset) = tracefs_event_format("oom", "mark_victim")
            .and_then(|format| layout::tracepoint_field_offset(&format, "pid"))
        {
            kernel_layout.tp_mark_victim_pid = offset;
        }
        info!("kernel layout resolved from {}", options.btf_path.display());
        log::debug!("{kernel_layout:?}");

        let charge_config = ChargeConfig {
            min_interval_ns: options.sample_interval_ns,
            unlimited_pages: crate::model::memory::unlimited_pages(crate::sys::page_size()),
            only_limited: u32::from(options.only_limited),
            _pad: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("CHARGE_CONFIG", &charge_config, true)
            .map_max_entries("EVENTS", options.ring_buffer_bytes)
            .map_max_entries("SAMPLES", options.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(|err| match permission_denied(&err) {
                true => ProbeError::NotRoot,
                false => ProbeError::Load(err),
            })?;
        let counters = ebpf
            .take_map("COUNTERS")
            .ok_or(ProbeError::MissingMap("COUNTERS"))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;

        let btf = Btf::parse_file(&options.btf_path, aya::Endianness::default())?;
        let mut attacher = Attacher {
            ebpf: &mut ebpf,
            btf: &btf,
            resolver: &resolver,
            kernel_layout: &kernel_layout,
            attachments: Vec::new(),
            dense_samples: options.dense_samples,
        };
        let mode = attacher.attach_oom_hook(options.attach)?;
        let charge_mode = match options.charge_attach {
            None => None,
            Some(requested) => match attacher.attach_charge_path(requested) {
                Ok(mode) => Some(mode),
                Err(err) if requested == AttachMode::Auto => {
                    warn!("no charge-path hook, so no timeline before kills: {err}");
                    None
                }
                Err(err) => return Err(err),
            },
        };
        let attachments = attacher.attachments;
        for attachment in &attachments {
            info!("attached {} via {}", attachment.hook, attachment.mode);
        }
        let cgroup_counters = ebpf
            .take_map("CGROUP_COUNTERS")
            .ok_or(ProbeError::MissingMap("CGROUP_COUNTERS"))?;
        let cgroup_counters =
            AyaHashMap::try_from(cgroup_counters).map_err(|source| ProbeError::Map {
                name: "CGROUP_COUNTERS",
                source,
            })?;
        Ok(Self {
            ebpf,
            mode,
            charge_mode,
            attachments,
            counters,
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

    /// The charge-path samples; can be taken once.
    pub fn take_samples(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("SAMPLES")
            .ok_or(ProbeError::MissingMap("SAMPLES"))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "SAMPLES",
            source,
        })
    }

    /// Limit hits and charge failures per cgroup id, as the kernel counted them.
    pub fn cgroup_counters(&self) -> Vec<(u64, CgroupCounters)> {
        self.cgroup_counters.iter().filter_map(Result::ok).collect()
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The ring buffer of OOM-kill events; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })
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

    /// The kernel-side counters summed over CPUs: (lost events, read errors).
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
        }
    }

    /// Detaches every program and unloads them (also done on drop; this logs it).
    pub fn detach(self) {
        let count = self.ebpf.programs().count();
        drop(self);
        info!("detached and unloaded {count} BPF programs");
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub lost_events: u64,
    pub read_errors: u64,
    pub lost_samples: u64,
}

struct Attacher<'a> {
    ebpf: &'a mut Ebpf,
    btf: &'a Btf,
    resolver: &'a Resolver,
    kernel_layout: &'a Layout,
    attachments: Vec<Attachment>,
    dense_samples: bool,
}

impl Attacher<'_> {
    fn attach_oom_hook(&mut self, requested: AttachMode) -> Result<AttachMode, ProbeError> {
        if requested != AttachMode::Auto {
            self.try_mode(requested)?;
            return Ok(requested);
        }
        let mut reasons = String::new();
        for &(mode, _) in OOM_HOOK_CHAIN {
            match self.try_mode(mode) {
                Ok(()) => return Ok(mode),
                Err(err) => {
                    info!("attach mode {mode} skipped: {err}");
                    reasons.push_str(&format!("  {err}\n"));
                }
            }
        }
        Err(ProbeError::NoHook(reasons))
    }

    fn try_mode(&mut self, mode: AttachMode) -> Result<(), ProbeError> {
        let needs = OOM_HOOK_CHAIN
            .iter()
            .find(|(candidate, _)| *candidate == mode)
            .map_or("", |(_, needs)| needs);
        let unavailable = |reason: String| ProbeError::ModeUnavailable {
            mode,
            reason,
            needs,
        };
        match mode {
            AttachMode::Auto => Err(unavailable("auto is not a mode".into())),
            AttachMode::Fentry => {
                if !self.resolver.has_function("oom_kill_process") {
                    return Err(unavailable(
                        "oom_kill_process is not in BTF (inlined?)".into(),
                    ));
                }
                self.fentry_pair()
                    .map_err(|err| unavailable(describe(&err)))?;
                self.victim_path(mode, needs)?;
                self.victim_task_hook(mode);
                Ok(())
            }
            AttachMode::Kprobe => {
                if !kallsyms_has("oom_kill_process") {
                    return Err(unavailable(
                        "oom_kill_process is not in /proc/kallsyms (inlined or renamed)".into(),
                    ));
                }
                self.kprobe_pair()
                    .map_err(|err| unavailable(describe(&err)))?;
                self.victim_path(mode, needs)?;
                self.victim_task_hook(mode);
                Ok(())
            }
            AttachMode::TpBtf => {
                self.mark_victim_btf()
                    .map_err(|err| unavailable(describe(&err)))?;
                self.victim_task_hook(mode);
                Ok(())
            }
            AttachMode::Tracepoint => self
                .mark_victim_tracepoint()
                .map_err(|err| unavailable(describe(&err))),
        }
    }

    fn attach_charge_path(&mut self, requested: AttachMode) -> Result<AttachMode, ProbeError> {
        if requested != AttachMode::Auto {
            self.try_charge_mode(requested)?;
            return Ok(requested);
        }
        let mut reasons = String::new();
        for &(mode, _) in CHARGE_HOOK_CHAIN {
            match self.try_charge_mode(mode) {
                Ok(()) => return Ok(mode),
                Err(err) => {
                    info!("charge-path mode {mode} skipped: {err}");
                    reasons.push_str(&format!("  {err}\n"));
                }
            }
        }
        Err(ProbeError::NoHook(reasons))
    }

    /// `try_charge_memcg` since 5.15, `try_charge` before.
    fn charge_function(&self, present: impl Fn(&str) -> bool) -> Option<&'static str> {
        ["try_charge_memcg", "try_charge"]
            .into_iter()
            .find(|name| present(name))
    }

    fn try_charge_mode(&mut self, mode: AttachMode) -> Result<(), ProbeError> {
        let needs = CHARGE_HOOK_CHAIN
            .iter()
            .find(|(candidate, _)| *candidate == mode)
            .map_or("", |(_, needs)| needs);
        let unavailable = |reason: String| ProbeError::ModeUnavailable {
            mode,
            reason: format!("charge path: {reason}"),
            needs,
        };
        let result = match mode {
            AttachMode::Auto => return Err(unavailable("auto is not a mode".into())),
            AttachMode::Fentry => {
                let Some(charge) = self.charge_function(|f| self.resolver.has_function(f)) else {
                    return Err(unavailable("no try_charge_memcg/try_charge in BTF".into()));
                };
                if !self.resolver.has_function("try_to_free_mem_cgroup_pages") {
                    return Err(unavailable("no try_to_free_mem_cgroup_pages in BTF".into()));
                }
                self.charge_fentry(charge)
            }
            AttachMode::Kprobe => {
                let Some(charge) = self.charge_function(kallsyms_has) else {
                    return Err(unavailable(
                        "no try_charge_memcg/try_charge in kallsyms".into(),
                    ));
                };
                if !kallsyms_has("try_to_free_mem_cgroup_pages") {
                    return Err(unavailable(
                        "no try_to_free_mem_cgroup_pages in kallsyms".into(),
                    ));
                }
                self.charge_kprobe(charge)
            }
            AttachMode::TpBtf => self.charge_tp_btf(),
            AttachMode::Tracepoint => self.charge_tracepoint(),
        };
        result.map_err(|err| {
            self.unload_charge_programs();
            unavailable(describe(&err))
        })
    }

    fn unload_charge_programs(&mut self) {
        unload(self.ebpf, CHARGE_PROGRAMS);
        let charge_hooks = [
            "try_charge_memcg",
            "try_charge",
            "try_to_free_mem_cgroup_pages",
            "mod_memcg_lruvec_state",
            "mm_vmscan_memcg_reclaim_begin",
        ];
        self.attachments.retain(|a| !charge_hooks.contains(&a.hook));
    }

    fn charge_fentry(&mut self, charge: &'static str) -> Result<(), ProgramError> {
        let entry: &mut FEntry = program(self.ebpf, "try_charge_fentry")?;
        entry.load(charge, self.btf)?;
        entry.attach()?;
        let exit: &mut FExit = program(self.ebpf, "try_charge_fexit")?;
        exit.load(charge, self.btf)?;
        exit.attach()?;
        self.attachments.push(Attachment {
            hook: charge,
            mode: AttachMode::Fentry,
        });
        let reclaim: &mut FEntry = program(self.ebpf, "reclaim_fentry")?;
        reclaim.load("try_to_free_mem_cgroup_pages", self.btf)?;
        reclaim.attach()?;
        self.attachments.push(Attachment {
            hook: "try_to_free_mem_cgroup_pages",
            mode: AttachMode::Fentry,
        });
        Ok(())
    }

    fn charge_kprobe(&mut self, charge: &'static str) -> Result<(), ProgramError> {
        for (name, function) in [
            ("try_charge_kprobe", charge),
            ("try_charge_kretprobe", charge),
            ("reclaim_kprobe", "try_to_free_mem_cgroup_pages"),
        ] {
            let probe: &mut KProbe = program(self.ebpf, name)?;
            probe.load()?;
            probe.attach(function, 0)?;
        }
        self.attachments.push(Attachment {
            hook: charge,
            mode: AttachMode::Kprobe,
        });
        self.attachments.push(Attachment {
            hook: "try_to_free_mem_cgroup_pages",
            mode: AttachMode::Kprobe,
        });
        Ok(())
    }

    fn charge_tp_btf(&mut self) -> Result<(), ProgramError> {
        if !self
            .resolver
            .has_btf_tracepoint("mm_vmscan_memcg_reclaim_begin")
        {
            return Err(ProgramError::Btf(aya::BtfError::UnknownBtfTypeName {
                type_name: "btf_trace_mm_vmscan_memcg_reclaim_begin".into(),
            }));
        }
        let reclaim: &mut BtfTracePoint = program(self.ebpf, "reclaim_begin_btf")?;
        reclaim.load("mm_vmscan_memcg_reclaim_begin", self.btf)?;
        reclaim.attach()?;
        self.attachments.push(Attachment {
            hook: "mm_vmscan_memcg_reclaim_begin",
            mode: AttachMode::TpBtf,
        });
        // Samples before the limit: only kernels with the memcg tracepoints (6.13+) name the
        // cgroup of every statistics update, and that fires for every page: opt-in.
        if !self.dense_samples {
            info!(
                "tp_btf charge path samples at limit hits (--dense-samples adds every LRU update)"
            );
        } else if self.resolver.has_btf_tracepoint("mod_memcg_lruvec_state") {
            let state: &mut BtfTracePoint = program(self.ebpf, "lruvec_state_btf")?;
            state.load("mod_memcg_lruvec_state", self.btf)?;
            state.attach()?;
            self.attachments.push(Attachment {
                hook: "mod_memcg_lruvec_state",
                mode: AttachMode::TpBtf,
            });
        } else {
            info!("no memcg:mod_memcg_lruvec_state (6.13+): charge samples only at limit hits");
        }
        Ok(())
    }

    fn charge_tracepoint(&mut self) -> Result<(), ProgramError> {
        let reclaim: &mut TracePoint = program(self.ebpf, "reclaim_begin_tracepoint")?;
        reclaim.load()?;
        reclaim.attach("vmscan", "mm_vmscan_memcg_reclaim_begin")?;
        self.attachments.push(Attachment {
            hook: "mm_vmscan_memcg_reclaim_begin",
            mode: AttachMode::Tracepoint,
        });
        Ok(())
    }

    /// The per-victim path that accompanies an `oom_kill_process` hook.
    fn victim_path(&mut self, mode: AttachMode, needs: &'static str) -> Result<(), ProbeError> {
        let btf_error = match self.mark_victim_btf() {
            Ok(()) => return Ok(()),
            Err(err) => describe(&err),
        };
        let tracepoint_error = match self.mark_victim_tracepoint() {
            Ok(()) => return Ok(()),
            Err(err) => describe(&err),
        };
        self.unload_oom_kill_process();
        Err(ProbeError::ModeUnavailable {
            mode,
            reason: format!(
                "oom_kill_process attached, but no per-victim hook: tp_btf: {btf_error}; \
                 tracepoint: {tracepoint_error}"
            ),
            needs,
        })
    }

    /// Where `oom:mark_victim` gives a bare pid, hooks `__oom_kill_process` too (or, in tp_btf
    /// mode, the SIGKILL it sends each victim first), so that the victim's task (its cgroups,
    /// rss and name) is read in the kernel for every member of a group kill, not only for the
    /// chosen victim. Without it those members are named from procfs, while they are dying.
    fn victim_task_hook(&mut self, mode: AttachMode) {
        if self.kernel_layout.mark_victim_has_task == 1 {
            return;
        }
        let (hook, result) = match mode {
            AttachMode::Fentry => (
                "__oom_kill_process",
                if self.resolver.has_function("__oom_kill_process") {
                    program::<FEntry>(self.ebpf, "oom_victim_fentry")
                        .and_then(|entry| {
                            entry.load("__oom_kill_process", self.btf)?;
                            entry.attach().map(drop)
                        })
                        .map_err(|err| describe(&err))
                } else {
                    Err("not in BTF (inlined?)".to_owned())
                },
            ),
            AttachMode::Kprobe => (
                "__oom_kill_process",
                if kallsyms_has("__oom_kill_process") {
                    program::<KProbe>(self.ebpf, "oom_victim_kprobe")
                        .and_then(|probe| {
                            probe.load()?;
                            probe.attach("__oom_kill_process", 0).map(drop)
                        })
                        .map_err(|err| describe(&err))
                } else {
                    Err("not in /proc/kallsyms (inlined?)".to_owned())
                },
            ),
            AttachMode::TpBtf => (
                "signal_generate",
                if self.resolver.has_btf_tracepoint("signal_generate") {
                    program::<BtfTracePoint>(self.ebpf, "signal_generate_btf")
                        .and_then(|program| {
                            program.load("signal_generate", self.btf)?;
                            program.attach().map(drop)
                        })
                        .map_err(|err| describe(&err))
                } else {
                    Err("btf_trace_signal_generate is not in BTF".to_owned())
                },
            ),
            _ => return,
        };
        match result {
            Ok(()) => self.attachments.push(Attachment { hook, mode }),
            Err(reason) => {
                unload(
                    self.ebpf,
                    &[
                        "oom_victim_fentry",
                        "oom_victim_kprobe",
                        "signal_generate_btf",
                    ],
                );
                warn!(
                    "oom:mark_victim gives only a pid here and {hook} cannot be hooked \
                     ({reason}): group-kill members other than the chosen victim are named \
                     from procfs"
                );
            }
        }
    }

    fn unload_oom_kill_process(&mut self) {
        unload(
            self.ebpf,
            &[
                "oom_kill_process_fentry",
                "oom_kill_process_fexit",
                "oom_kill_process_kprobe",
                "oom_kill_process_kretprobe",
            ],
        );
        self.attachments.retain(|a| a.hook != "oom_kill_process");
    }

    fn fentry_pair(&mut self) -> Result<(), ProgramError> {
        let entry: &mut FEntry = program(self.ebpf, "oom_kill_process_fentry")?;
        entry.load("oom_kill_process", self.btf)?;
        entry.attach()?;
        let exit: &mut FExit = program(self.ebpf, "oom_kill_process_fexit")?;
        if let Err(err) = exit
            .load("oom_kill_process", self.btf)
            .and_then(|()| exit.attach().map(drop))
        {
            self.unload_oom_kill_process();
            return Err(err);
        }
        self.attachments.push(Attachment {
            hook: "oom_kill_process",
            mode: AttachMode::Fentry,
        });
        Ok(())
    }

    fn kprobe_pair(&mut self) -> Result<(), ProgramError> {
        let entry: &mut KProbe = program(self.ebpf, "oom_kill_process_kprobe")?;
        entry.load()?;
        entry.attach("oom_kill_process", 0)?;
        let exit: &mut KProbe = program(self.ebpf, "oom_kill_process_kretprobe")?;
        if let Err(err) = exit
            .load()
            .and_then(|()| exit.attach("oom_kill_process", 0).map(drop))
        {
            self.unload_oom_kill_process();
            return Err(err);
        }
        self.attachments.push(Attachment {
            hook: "oom_kill_process",
            mode: AttachMode::Kprobe,
        });
        Ok(())
    }

    fn mark_victim_btf(&mut self) -> Result<(), ProgramError> {
        if !self.resolver.has_btf_tracepoint("mark_victim") {
            return Err(ProgramError::Btf(aya::BtfError::UnknownBtfTypeName {
                type_name: "btf_trace_mark_victim".into(),
            }));
        }
        let program: &mut BtfTracePoint = program(self.ebpf, "mark_victim_btf")?;
        program.load("mark_victim", self.btf)?;
        if let Err(err) = program.attach() {
            let _ = program.unload();
            return Err(err);
        }
        self.attachments.push(Attachment {
            hook: "mark_victim",
            mode: AttachMode::TpBtf,
        });
        Ok(())
    }

    fn mark_victim_tracepoint(&mut self) -> Result<(), ProgramError> {
        if self.kernel_layout.tp_mark_victim_pid == Layout::ABSENT {
            return Err(ProgramError::IOError(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "events/oom/mark_victim/format not found: mount tracefs at /sys/kernel/tracing \
                 (or debugfs at /sys/kernel/debug)",
            )));
        }
        let program: &mut TracePoint = program(self.ebpf, "mark_victim_tracepoint")?;
        program.load()?;
        if let Err(err) = program.attach("oom", "mark_victim") {
            let _ = program.unload();
            return Err(err);
        }
        self.attachments.push(Attachment {
            hook: "mark_victim",
            mode: AttachMode::Tracepoint,
        });
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProgramError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| {
        ProgramError::IOError(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("program {name} missing from the BPF object"),
        ))
    })?;
    program.try_into()
}

/// Unloads (and so detaches) the named programs, whatever their type; absent or never-loaded
/// ones are skipped. Used to undo a half-attached mode before the next one is tried.
fn unload(ebpf: &mut Ebpf, names: &[&str]) {
    use aya::programs::Program;
    for name in names {
        let _ = match ebpf.program_mut(name) {
            Some(Program::FEntry(p)) => p.unload(),
            Some(Program::FExit(p)) => p.unload(),
            Some(Program::KProbe(p)) => p.unload(),
            Some(Program::BtfTracePoint(p)) => p.unload(),
            Some(Program::TracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// Every charge-path program, for unloading a half-attached mode.
const CHARGE_PROGRAMS: &[&str] = &[
    "try_charge_fentry",
    "try_charge_fexit",
    "reclaim_fentry",
    "try_charge_kprobe",
    "try_charge_kretprobe",
    "reclaim_kprobe",
    "lruvec_state_btf",
    "reclaim_begin_btf",
    "reclaim_begin_tracepoint",
];

/// A one-line reason, with what to do for the errors users meet.
fn describe(err: &ProgramError) -> String {
    let text = match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let log = log.trim();
            if log.is_empty() {
                format!("load failed: {io_error}")
            } else {
                // The verifier ends with statistics; the reason is the line before them.
                let reason: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|line| {
                        !(line.starts_with("processed ")
                            || line.starts_with("stack depth")
                            || line.starts_with("verification time"))
                    })
                    .take(2)
                    .collect();
                let reason: Vec<&str> = reason.into_iter().rev().collect();
                format!("load failed: {io_error}; verifier: {}", reason.join(" | "))
            }
        }
        other => other.to_string(),
    };
    if text.contains("kprobe/type") {
        format!("{text} is missing: the kernel has no kprobe PMU (CONFIG_KPROBES is off)")
    } else if text.contains("Operation not permitted") || text.contains("os error 1)") {
        format!("{text} (the kernel refused it: not root, or this program type is disabled)")
    } else {
        text
    }
}

fn permission_denied(err: &aya::EbpfError) -> bool {
    let text = err.to_string();
    text.contains("Operation not permitted") && !is_root()
}

fn preflight() -> Result<(), ProbeError> {
    if !is_root() {
        return Err(ProbeError::NotRoot);
    }
    if let Ok(lockdown) = fs::read_to_string("/sys/kernel/security/lockdown") {
        if lockdown.contains("[confidentiality]") {
            return Err(ProbeError::Lockdown);
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK: raise it to unlimited,
/// or at least to the hard limit.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit/getrlimit read or write only the struct we pass.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0 {
            return;
        }
        let error = std::io::Error::last_os_error();
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) == 0 {
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &current);
        }
        log::debug!(
            "RLIMIT_MEMLOCK stays at {} bytes ({error}); only kernels before 5.11 need more",
            current.rlim_cur
        );
    }
}

/// The tracefs mount points to look in, newest first.
const TRACEFS_ROOTS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn tracefs_event_format(category: &str, name: &str) -> Option<String> {
    let read = || {
        TRACEFS_ROOTS.iter().find_map(|root| {
            let format = Path::new(root)
                .join("events")
                .join(category)
                .join(name)
                .join("format");
            fs::read_to_string(format).ok()
        })
    };
    read().or_else(|| mount_tracefs().then(read).flatten())
}

/// Mounts tracefs at /sys/kernel/tracing when nothing is there, as systemd does at boot; a
/// node without it (a minimal init, a container with /sys from the host) still gets classic
/// tracepoints.
fn mount_tracefs() -> bool {
    let target = TRACEFS_ROOTS[0];
    if !Path::new(target).is_dir() || Path::new(target).join("events").exists() {
        return false;
    }
    let (Ok(source), Ok(fstype), Ok(path)) = (
        std::ffi::CString::new("tracefs"),
        std::ffi::CString::new("tracefs"),
        std::ffi::CString::new(target),
    ) else {
        return false;
    };
    // SAFETY: all pointers are valid NUL-terminated strings; no mount data is passed.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result == 0 {
        info!("mounted tracefs at {target} for the classic tracepoints");
        true
    } else {
        log::debug!(
            "cannot mount tracefs at {target}: {}",
            std::io::Error::last_os_error()
        );
        false
    }
}
