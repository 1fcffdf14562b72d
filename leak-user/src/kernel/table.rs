//! The attach tables: which programs go on which kernel hooks in each attach mode, in the order
//! they are tried, and how to tell whether the running kernel has each hook. Kernel
//! compatibility is data here; [`super::attach`] walks it.

use std::fmt;

/// How the OOM hook (or the charge path) is attached.
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

/// Every program in the BPF object; [`Program::name`] is its function's name in
/// `leak-ebpf/src/oom.rs` or `leak-ebpf/src/charge.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    OomKillProcessFentry,
    OomKillProcessFexit,
    OomKillProcessKprobe,
    OomKillProcessKretprobe,
    OomVictimFentry,
    OomVictimKprobe,
    OomReportFentry,
    OomReportKprobe,
    SignalGenerateBtf,
    SignalGenerateTracepoint,
    MarkVictimBtf,
    MarkVictimTracepoint,
    TryChargeFentry,
    TryChargeFexit,
    ReclaimFentry,
    TryChargeKprobe,
    TryChargeKretprobe,
    ReclaimKprobe,
    LruvecStateBtf,
    ReclaimBeginBtf,
    ReclaimBeginTracepoint,
}

impl Program {
    pub const ALL: [Self; 21] = [
        Self::OomKillProcessFentry,
        Self::OomKillProcessFexit,
        Self::OomKillProcessKprobe,
        Self::OomKillProcessKretprobe,
        Self::OomVictimFentry,
        Self::OomVictimKprobe,
        Self::OomReportFentry,
        Self::OomReportKprobe,
        Self::SignalGenerateBtf,
        Self::SignalGenerateTracepoint,
        Self::MarkVictimBtf,
        Self::MarkVictimTracepoint,
        Self::TryChargeFentry,
        Self::TryChargeFexit,
        Self::ReclaimFentry,
        Self::TryChargeKprobe,
        Self::TryChargeKretprobe,
        Self::ReclaimKprobe,
        Self::LruvecStateBtf,
        Self::ReclaimBeginBtf,
        Self::ReclaimBeginTracepoint,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::OomKillProcessFentry => "oom_kill_process_fentry",
            Self::OomKillProcessFexit => "oom_kill_process_fexit",
            Self::OomKillProcessKprobe => "oom_kill_process_kprobe",
            Self::OomKillProcessKretprobe => "oom_kill_process_kretprobe",
            Self::OomVictimFentry => "oom_victim_fentry",
            Self::OomVictimKprobe => "oom_victim_kprobe",
            Self::OomReportFentry => "oom_report_fentry",
            Self::OomReportKprobe => "oom_report_kprobe",
            Self::SignalGenerateBtf => "signal_generate_btf",
            Self::SignalGenerateTracepoint => "signal_generate_tracepoint",
            Self::MarkVictimBtf => "mark_victim_btf",
            Self::MarkVictimTracepoint => "mark_victim_tracepoint",
            Self::TryChargeFentry => "try_charge_fentry",
            Self::TryChargeFexit => "try_charge_fexit",
            Self::ReclaimFentry => "reclaim_fentry",
            Self::TryChargeKprobe => "try_charge_kprobe",
            Self::TryChargeKretprobe => "try_charge_kretprobe",
            Self::ReclaimKprobe => "reclaim_kprobe",
            Self::LruvecStateBtf => "lruvec_state_btf",
            Self::ReclaimBeginBtf => "reclaim_begin_btf",
            Self::ReclaimBeginTracepoint => "reclaim_begin_tracepoint",
        }
    }

    /// Its `#[fentry]`/`#[kprobe]`/... attribute in leak-ebpf.
    pub const fn kind(self) -> ProgramKind {
        match self {
            Self::OomKillProcessFentry
            | Self::OomVictimFentry
            | Self::OomReportFentry
            | Self::TryChargeFentry
            | Self::ReclaimFentry => ProgramKind::FEntry,
            Self::OomKillProcessFexit | Self::TryChargeFexit => ProgramKind::FExit,
            Self::OomKillProcessKprobe
            | Self::OomVictimKprobe
            | Self::OomReportKprobe
            | Self::TryChargeKprobe
            | Self::ReclaimKprobe => ProgramKind::KProbe,
            Self::OomKillProcessKretprobe | Self::TryChargeKretprobe => ProgramKind::KRetProbe,
            Self::SignalGenerateBtf
            | Self::MarkVictimBtf
            | Self::LruvecStateBtf
            | Self::ReclaimBeginBtf => ProgramKind::BtfTracePoint,
            Self::MarkVictimTracepoint
            | Self::SignalGenerateTracepoint
            | Self::ReclaimBeginTracepoint => ProgramKind::TracePoint,
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The program types leak uses; each decides how a program is loaded, attached and reported,
/// and how to tell whether the kernel has its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    FEntry,
    FExit,
    KProbe,
    KRetProbe,
    BtfTracePoint,
    TracePoint,
}

impl ProgramKind {
    /// The mode an attachment of this kind is reported under (`leak_attach_info{mode}`).
    pub const fn mode(self) -> AttachMode {
        match self {
            Self::FEntry | Self::FExit => AttachMode::Fentry,
            Self::KProbe | Self::KRetProbe => AttachMode::Kprobe,
            Self::BtfTracePoint => AttachMode::TpBtf,
            Self::TracePoint => AttachMode::Tracepoint,
        }
    }

    pub const fn need(self) -> Need {
        match self {
            Self::FEntry | Self::FExit => Need::BtfFunction,
            Self::KProbe | Self::KRetProbe => Need::Kallsyms,
            Self::BtfTracePoint => Need::BtfTracepoint,
            Self::TracePoint => Need::TracefsFormat,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FEntry => "fentry",
            Self::FExit => "fexit",
            Self::KProbe => "kprobe",
            Self::KRetProbe => "kretprobe",
            Self::BtfTracePoint => "tp_btf",
            Self::TracePoint => "tracepoint",
        }
    }
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to tell, before loading anything, whether the running kernel has a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A function with its own BTF entry: not inlined, so a trampoline can attach to it.
    BtfFunction,
    /// A text symbol in `/proc/kallsyms`: not inlined, so a kprobe can attach to it.
    Kallsyms,
    /// A `btf_trace_<name>` typedef in BTF.
    BtfTracepoint,
    /// `events/<category>/<name>/format` under tracefs.
    TracefsFormat,
}

/// Every kernel function and tracepoint a program attaches to; [`Hook::name`] is the kernel's
/// name, which is also the `hook` label of `leak_attach_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `oom_kill_process(oc, message)`: one OOM decision, with its `struct oom_control`.
    OomKillProcess,
    /// `__oom_kill_process(victim, message)`: called once per victim it kills, with its task.
    OomKillVictim,
    /// `oom:mark_victim`: fired once per victim.
    MarkVictim,
    /// `mem_cgroup_print_oom_meminfo(memcg)`: the memory cgroup part of the kernel's OOM
    /// report, which flushes the statistics before printing them.
    OomReport,
    /// `signal:signal_generate`: the SIGKILL the OOM killer sends each victim it kills.
    SignalGenerate,
    /// `try_charge_memcg` (5.15+).
    TryChargeMemcg,
    /// `try_charge`, its name before 5.15.
    TryCharge,
    /// `try_to_free_mem_cgroup_pages`: reclaim in a cgroup, at its limit or for other reasons.
    TryToFreeMemCgroupPages,
    /// `vmscan:mm_vmscan_memcg_reclaim_begin`.
    MmVmscanMemcgReclaimBegin,
    /// `memcg:mod_memcg_lruvec_state` (6.13+).
    ModMemcgLruvecState,
}

impl Hook {
    pub const fn name(self) -> &'static str {
        match self {
            Self::OomKillProcess => "oom_kill_process",
            Self::OomKillVictim => "__oom_kill_process",
            Self::MarkVictim => "mark_victim",
            Self::OomReport => "mem_cgroup_print_oom_meminfo",
            Self::SignalGenerate => "signal_generate",
            Self::TryChargeMemcg => "try_charge_memcg",
            Self::TryCharge => "try_charge",
            Self::TryToFreeMemCgroupPages => "try_to_free_mem_cgroup_pages",
            Self::MmVmscanMemcgReclaimBegin => "mm_vmscan_memcg_reclaim_begin",
            Self::ModMemcgLruvecState => "mod_memcg_lruvec_state",
        }
    }

    /// The tracepoint's category (its tracefs directory); `None` for functions.
    pub const fn category(self) -> Option<&'static str> {
        match self {
            Self::MarkVictim => Some("oom"),
            Self::SignalGenerate => Some("signal"),
            Self::MmVmscanMemcgReclaimBegin => Some("vmscan"),
            Self::ModMemcgLruvecState => Some("memcg"),
            Self::OomKillProcess
            | Self::OomKillVictim
            | Self::OomReport
            | Self::TryChargeMemcg
            | Self::TryCharge
            | Self::TryToFreeMemCgroupPages => None,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Programs attached together to one hook (an entry and its exit, say): all or none.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub hook: Hook,
    pub programs: &'static [Program],
}

impl Probe {
    /// How to tell whether the kernel has the hook, by the kind of program (all of a probe's
    /// programs are of one family; a unit test holds the table to it).
    pub const fn need(&self) -> Need {
        self.kind().need()
    }

    /// The mode its attachment is reported under.
    pub const fn mode(&self) -> AttachMode {
        self.kind().mode()
    }

    const fn kind(&self) -> ProgramKind {
        match self.programs.first() {
            Some(program) => program.kind(),
            // No table has an empty probe (a unit test holds it to that).
            None => ProgramKind::FEntry,
        }
    }
}

/// Why a step is in a row, and so what happens when its hook is missing or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The mode fails without it.
    Required,
    /// The kill witness: it tells a victim the OOM killer killed (sent SIGKILL, counted in
    /// `oom_kill`) from one it only marked because it was already exiting, and where
    /// `oom:mark_victim` passes a bare pid (before 6.9 and its backports) it names the task of
    /// every member of a group kill, in the kernel. Without it kills say `killed: null` (and
    /// those members are named from procfs while they die), so the mode goes on, with a warning.
    KillWitness,
    /// Only with `--dense-samples`, and only where the kernel has the hook (6.13+): it fires on
    /// every LRU update, so it is opt-in. Once tried, the mode fails without it.
    DenseSamples,
    /// Wherever the kernel has the hook: it tells whether the kernel's report of an OOM (which
    /// flushes the memcg statistics) ran before the kill. Without it the mode goes on and
    /// `stats_flushed` is unknown.
    Report,
}

/// One part of a mode: the first of its choices the kernel has and accepts.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub role: Role,
    pub choices: &'static [Probe],
}

/// One attach mode of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub mode: AttachMode,
    pub steps: &'static [Step],
    /// What the mode needs from the kernel, for errors.
    pub needs: &'static str,
}

/// One hook's attach modes in priority order.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// What it attaches, for messages.
    pub name: &'static str,
    /// The command-line option that picks its mode.
    pub flag: &'static str,
    pub rows: &'static [Row],
}

use self::{Hook as H, Program as P};

const fn required(choices: &'static [Probe]) -> Step {
    Step {
        role: Role::Required,
        choices,
    }
}

/// The per-victim path that accompanies an `oom_kill_process` hook: victims are always
/// reported from `oom:mark_victim`, BTF tracepoint first.
const MARK_VICTIM: Step = required(&[
    Probe {
        hook: H::MarkVictim,
        programs: &[P::MarkVictimBtf],
    },
    Probe {
        hook: H::MarkVictim,
        programs: &[P::MarkVictimTracepoint],
    },
]);

/// The OOM hook.
pub const OOM_HOOK_CHAIN: Chain = Chain {
    name: "OOM hook",
    flag: "--attach",
    rows: &[
        Row {
            mode: AttachMode::Fentry,
            steps: &[
                required(&[Probe {
                    hook: H::OomKillProcess,
                    programs: &[P::OomKillProcessFentry, P::OomKillProcessFexit],
                }]),
                MARK_VICTIM,
                Step {
                    role: Role::KillWitness,
                    choices: &[Probe {
                        hook: H::OomKillVictim,
                        programs: &[P::OomVictimFentry],
                    }],
                },
                Step {
                    role: Role::Report,
                    choices: &[Probe {
                        hook: H::OomReport,
                        programs: &[P::OomReportFentry],
                    }],
                },
            ],
            needs: "oom_kill_process in BTF (not inlined) and BPF trampolines (fentry) allowed",
        },
        Row {
            mode: AttachMode::Kprobe,
            steps: &[
                required(&[Probe {
                    hook: H::OomKillProcess,
                    programs: &[P::OomKillProcessKprobe, P::OomKillProcessKretprobe],
                }]),
                MARK_VICTIM,
                Step {
                    role: Role::KillWitness,
                    choices: &[Probe {
                        hook: H::OomKillVictim,
                        programs: &[P::OomVictimKprobe],
                    }],
                },
                Step {
                    role: Role::Report,
                    choices: &[Probe {
                        hook: H::OomReport,
                        programs: &[P::OomReportKprobe],
                    }],
                },
            ],
            needs: "CONFIG_KPROBES and oom_kill_process in /proc/kallsyms (not inlined)",
        },
        Row {
            mode: AttachMode::TpBtf,
            steps: &[
                required(&[Probe {
                    hook: H::MarkVictim,
                    programs: &[P::MarkVictimBtf],
                }]),
                Step {
                    role: Role::KillWitness,
                    choices: &[Probe {
                        hook: H::SignalGenerate,
                        programs: &[P::SignalGenerateBtf],
                    }],
                },
            ],
            needs: "btf_trace_mark_victim in BTF (5.5+)",
        },
        Row {
            mode: AttachMode::Tracepoint,
            steps: &[
                required(&[Probe {
                    hook: H::MarkVictim,
                    programs: &[P::MarkVictimTracepoint],
                }]),
                Step {
                    role: Role::KillWitness,
                    choices: &[Probe {
                        hook: H::SignalGenerate,
                        programs: &[P::SignalGenerateTracepoint],
                    }],
                },
            ],
            needs: "tracefs with events/oom/mark_victim",
        },
    ],
};

/// The memory-cgroup charge path: samples before the kill.
pub const CHARGE_PATH_CHAIN: Chain = Chain {
    name: "charge path",
    flag: "--charge-attach",
    rows: &[
        Row {
            mode: AttachMode::Fentry,
            steps: &[
                required(&[
                    Probe {
                        hook: H::TryChargeMemcg,
                        programs: &[P::TryChargeFentry, P::TryChargeFexit],
                    },
                    Probe {
                        hook: H::TryCharge,
                        programs: &[P::TryChargeFentry, P::TryChargeFexit],
                    },
                ]),
                required(&[Probe {
                    hook: H::TryToFreeMemCgroupPages,
                    programs: &[P::ReclaimFentry],
                }]),
            ],
            needs: "try_charge_memcg (5.15+) or try_charge, and try_to_free_mem_cgroup_pages \
                    in BTF; BPF trampolines allowed",
        },
        Row {
            mode: AttachMode::Kprobe,
            steps: &[
                required(&[
                    Probe {
                        hook: H::TryChargeMemcg,
                        programs: &[P::TryChargeKprobe, P::TryChargeKretprobe],
                    },
                    Probe {
                        hook: H::TryCharge,
                        programs: &[P::TryChargeKprobe, P::TryChargeKretprobe],
                    },
                ]),
                required(&[Probe {
                    hook: H::TryToFreeMemCgroupPages,
                    programs: &[P::ReclaimKprobe],
                }]),
            ],
            needs: "CONFIG_KPROBES; try_charge_memcg or try_charge, and \
                    try_to_free_mem_cgroup_pages in /proc/kallsyms",
        },
        Row {
            mode: AttachMode::TpBtf,
            steps: &[
                required(&[Probe {
                    hook: H::MmVmscanMemcgReclaimBegin,
                    programs: &[P::ReclaimBeginBtf],
                }]),
                Step {
                    role: Role::DenseSamples,
                    choices: &[Probe {
                        hook: H::ModMemcgLruvecState,
                        programs: &[P::LruvecStateBtf],
                    }],
                },
            ],
            needs: "btf_trace_mm_vmscan_memcg_reclaim_begin in BTF (limit hits; with \
                    --dense-samples also memcg:mod_memcg_lruvec_state, 6.13+)",
        },
        Row {
            mode: AttachMode::Tracepoint,
            steps: &[required(&[Probe {
                hook: H::MmVmscanMemcgReclaimBegin,
                programs: &[P::ReclaimBeginTracepoint],
            }])],
            needs: "tracefs with events/vmscan/mm_vmscan_memcg_reclaim_begin (limit hits only)",
        },
    ],
};

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
