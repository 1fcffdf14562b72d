use std::{io, path::PathBuf};

use aya::{
    programs::{KProbeError, ProgramError},
    sys::SyscallError,
};

use super::*;
use crate::kernel::table::{CHARGE_PATH_CHAIN, OOM_HOOK_CHAIN};

/// A kernel made of lists: the hooks it has, the programs it refuses and how.
#[derive(Default)]
struct FakeKernel {
    has: Vec<(Need, Hook)>,
    /// Programs the kernel refuses with EPERM at load.
    not_permitted: Vec<ProgramKind>,
    /// Programs that load but fail to attach.
    fail_attach: Vec<Program>,
    /// No kprobe PMU: every kprobe fails at attach, as aya reports it.
    no_kprobes: bool,
    loaded: Vec<Program>,
    ever_loaded: Vec<Program>,
}

fn eperm(call: &'static str) -> ProgramError {
    ProgramError::SyscallError(SyscallError {
        call,
        io_error: io::Error::from_raw_os_error(libc::EPERM),
    })
}

impl Kernel for FakeKernel {
    fn check(&self, need: Need, hook: Hook) -> Result<(), Refusal> {
        match self.has.contains(&(need, hook)) {
            true => Ok(()),
            false => Err(Refusal::Absent { hook, need }),
        }
    }

    fn attach(&mut self, program: Program, hook: Hook) -> Result<(), Refusal> {
        let refused = |source| Err(Refusal::from_program_error(program, hook, source));
        if self.not_permitted.contains(&program.kind()) {
            return refused(eperm("bpf_prog_load"));
        }
        self.loaded.push(program);
        self.ever_loaded.push(program);
        let kprobe = matches!(program.kind(), ProgramKind::KProbe | ProgramKind::KRetProbe);
        if self.no_kprobes && kprobe {
            return refused(ProgramError::KProbeError(KProbeError::FileError {
                filename: PathBuf::from("/sys/bus/event_source/devices/kprobe/type"),
                io_error: io::Error::from(io::ErrorKind::NotFound),
            }));
        }
        if self.fail_attach.contains(&program) {
            return refused(eperm("bpf_link_create"));
        }
        Ok(())
    }

    fn unload(&mut self, program: Program) {
        self.loaded.retain(|&loaded| loaded != program);
    }
}

/// Every hook of both tables, for every kind of program: a kernel that has everything.
fn everything() -> Vec<(Need, Hook)> {
    [OOM_HOOK_CHAIN, CHARGE_PATH_CHAIN]
        .iter()
        .flat_map(|chain| chain.rows)
        .flat_map(|row| row.steps)
        .flat_map(|step| step.choices)
        .map(|probe| (probe.need(), probe.hook))
        .filter(|&(_, hook)| hook != Hook::TryCharge)
        .collect()
}

/// The development machines: kernel 6.18, fentry refused with EPERM, no CONFIG_KPROBES.
fn development_machine() -> FakeKernel {
    FakeKernel {
        has: everything(),
        not_permitted: vec![ProgramKind::FEntry, ProgramKind::FExit],
        no_kprobes: true,
        ..FakeKernel::default()
    }
}

const TASK: Wants = Wants {
    bare_pid: false,
    dense_samples: false,
};
const PID_ONLY: Wants = Wants {
    bare_pid: true,
    dense_samples: false,
};

fn attachment(hook: Hook, mode: AttachMode) -> Attachment {
    Attachment { hook, mode }
}

fn attached_programs(kernel: &FakeKernel) -> Vec<&'static str> {
    let mut names: Vec<_> = kernel.loaded.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    names
}

#[test]
fn auto_lands_on_tp_btf_where_fentry_and_kprobes_are_refused() {
    let mut kernel = development_machine();
    let mut walker = Walker::new(&mut kernel, TASK);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::TpBtf)
    );
    assert_eq!(
        walker.attach(&CHARGE_PATH_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::TpBtf)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::MarkVictim, AttachMode::TpBtf),
            attachment(Hook::SignalGenerate, AttachMode::TpBtf),
            attachment(Hook::MmVmscanMemcgReclaimBegin, AttachMode::TpBtf),
        ]
    );
    // The kprobe rows loaded programs before failing to attach: they are unloaded.
    assert!(kernel.ever_loaded.contains(&Program::OomKillProcessKprobe));
    assert_eq!(
        attached_programs(&kernel),
        [
            "mark_victim_btf",
            "reclaim_begin_btf",
            "signal_generate_btf"
        ]
    );
}

#[test]
fn a_forced_mode_fails_with_the_kernels_reason_and_what_to_do() {
    for (mode, advice) in [
        (
            AttachMode::Fentry,
            "the kernel refused it: not root, or this program type is disabled",
        ),
        (
            AttachMode::Kprobe,
            "the kernel has no kprobe PMU (CONFIG_KPROBES is off)",
        ),
    ] {
        let mut kernel = development_machine();
        let mut walker = Walker::new(&mut kernel, TASK);
        let err = walker
            .attach(&OOM_HOOK_CHAIN, mode)
            .expect_err("refused on this kernel");
        assert!(
            matches!(&err, AttachError::Forced { unavailable, .. } if unavailable.mode == mode),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(advice), "{message}");
        assert!(message.contains("(needs "), "{message}");
        assert!(message.contains("`--attach auto`"), "{message}");
        assert!(walker.into_attachments().is_empty());
        assert!(kernel.loaded.is_empty(), "{:?}", kernel.loaded);
    }
}

#[test]
fn auto_lands_on_fentry_with_the_victim_path_and_the_charge_path() {
    let mut kernel = FakeKernel {
        has: everything(),
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, PID_ONLY);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Fentry)
    );
    assert_eq!(
        walker.attach(&CHARGE_PATH_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Fentry)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::OomKillProcess, AttachMode::Fentry),
            attachment(Hook::MarkVictim, AttachMode::TpBtf),
            attachment(Hook::OomKillVictim, AttachMode::Fentry),
            attachment(Hook::OomReport, AttachMode::Fentry),
            attachment(Hook::TryChargeMemcg, AttachMode::Fentry),
            attachment(Hook::TryToFreeMemCgroupPages, AttachMode::Fentry),
        ]
    );
}

#[test]
fn before_5_15_the_charge_path_hooks_try_charge() {
    let mut has = everything();
    has.retain(|&(_, hook)| hook != Hook::TryChargeMemcg);
    has.push((Need::Kallsyms, Hook::TryCharge));
    let mut kernel = FakeKernel {
        has,
        not_permitted: vec![ProgramKind::FEntry],
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, TASK);
    assert_eq!(
        walker.attach(&CHARGE_PATH_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Kprobe)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::TryCharge, AttachMode::Kprobe),
            attachment(Hook::TryToFreeMemCgroupPages, AttachMode::Kprobe),
        ]
    );
}

#[test]
fn a_half_attached_row_is_undone_before_the_next() {
    let mut kernel = FakeKernel {
        has: everything(),
        fail_attach: vec![Program::OomKillProcessFexit, Program::ReclaimFentry],
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, TASK);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Kprobe)
    );
    assert_eq!(
        walker.attach(&CHARGE_PATH_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Kprobe)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::OomKillProcess, AttachMode::Kprobe),
            attachment(Hook::MarkVictim, AttachMode::TpBtf),
            attachment(Hook::OomKillVictim, AttachMode::Kprobe),
            attachment(Hook::OomReport, AttachMode::Kprobe),
            attachment(Hook::TryChargeMemcg, AttachMode::Kprobe),
            attachment(Hook::TryToFreeMemCgroupPages, AttachMode::Kprobe),
        ]
    );
    assert!(kernel.ever_loaded.contains(&Program::TryChargeFexit));
    assert_eq!(
        attached_programs(&kernel),
        [
            "mark_victim_btf",
            "oom_kill_process_kprobe",
            "oom_kill_process_kretprobe",
            "oom_report_kprobe",
            "oom_victim_kprobe",
            "reclaim_kprobe",
            "try_charge_kprobe",
            "try_charge_kretprobe",
        ]
    );
}

#[test]
fn the_victim_path_falls_back_to_the_classic_tracepoint() {
    let mut kernel = FakeKernel {
        has: everything(),
        fail_attach: vec![Program::MarkVictimBtf],
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, TASK);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Fentry)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::OomKillProcess, AttachMode::Fentry),
            attachment(Hook::MarkVictim, AttachMode::Tracepoint),
            attachment(Hook::OomKillVictim, AttachMode::Fentry),
            attachment(Hook::OomReport, AttachMode::Fentry),
        ]
    );
    assert!(!kernel.loaded.contains(&Program::MarkVictimBtf));
}

#[test]
fn without_any_victim_path_nothing_is_loaded() {
    let mut has = everything();
    has.retain(|&(_, hook)| hook != Hook::MarkVictim);
    let mut kernel = FakeKernel {
        has,
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, TASK);
    let err = walker
        .attach(&OOM_HOOK_CHAIN, AttachMode::Auto)
        .expect_err("no mark_victim");
    assert!(kernel.ever_loaded.is_empty(), "{:?}", kernel.ever_loaded);
    let message = err.to_string();
    for mode in ["fentry", "kprobe", "tp_btf", "tracepoint"] {
        assert!(message.contains(&format!("\n  {mode}: ")), "{message}");
    }
}

#[test]
fn a_refused_kill_witness_leaves_the_mode_attached() {
    let mut kernel = FakeKernel {
        has: everything(),
        fail_attach: vec![Program::OomVictimFentry],
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, PID_ONLY);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Fentry)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::OomKillProcess, AttachMode::Fentry),
            attachment(Hook::MarkVictim, AttachMode::TpBtf),
            attachment(Hook::OomReport, AttachMode::Fentry),
        ]
    );
    assert!(!kernel.loaded.contains(&Program::OomVictimFentry));
}

#[test]
fn every_mode_hooks_a_kill_witness_whatever_mark_victim_passes() {
    for wants in [TASK, PID_ONLY] {
        for (mode, witness) in [
            (AttachMode::Fentry, Hook::OomKillVictim),
            (AttachMode::Kprobe, Hook::OomKillVictim),
            (AttachMode::TpBtf, Hook::SignalGenerate),
            (AttachMode::Tracepoint, Hook::SignalGenerate),
        ] {
            let mut kernel = FakeKernel {
                has: everything(),
                ..FakeKernel::default()
            };
            let mut walker = Walker::new(&mut kernel, wants);
            assert_eq!(walker.attach(&OOM_HOOK_CHAIN, mode).ok(), Some(mode));
            let attachments = walker.into_attachments();
            assert!(
                attachments.contains(&attachment(witness, mode)),
                "{mode}: {attachments:?}"
            );
        }
    }
}

#[test]
fn dense_samples_are_opt_in_optional_where_absent_and_required_once_tried() {
    let dense = Wants {
        bare_pid: false,
        dense_samples: true,
    };
    let lruvec = (Need::BtfTracepoint, Hook::ModMemcgLruvecState);
    let reclaim = attachment(Hook::MmVmscanMemcgReclaimBegin, AttachMode::TpBtf);

    for (wants, has_lruvec, expected) in [
        (TASK, true, vec![reclaim]),
        (dense, false, vec![reclaim]),
        (
            dense,
            true,
            vec![
                reclaim,
                attachment(Hook::ModMemcgLruvecState, AttachMode::TpBtf),
            ],
        ),
    ] {
        let mut kernel = development_machine();
        kernel.has.retain(|&has| has_lruvec || has != lruvec);
        let mut walker = Walker::new(&mut kernel, wants);
        assert_eq!(
            walker.attach(&CHARGE_PATH_CHAIN, AttachMode::TpBtf).ok(),
            Some(AttachMode::TpBtf)
        );
        assert_eq!(walker.into_attachments(), expected);
    }

    let mut kernel = development_machine();
    kernel.fail_attach.push(Program::LruvecStateBtf);
    let mut walker = Walker::new(&mut kernel, dense);
    assert_eq!(
        walker.attach(&CHARGE_PATH_CHAIN, AttachMode::Auto).ok(),
        Some(AttachMode::Tracepoint)
    );
    assert_eq!(
        walker.into_attachments(),
        [attachment(
            Hook::MmVmscanMemcgReclaimBegin,
            AttachMode::Tracepoint
        )]
    );
    assert_eq!(attached_programs(&kernel), ["reclaim_begin_tracepoint"]);
}

#[test]
fn errors_are_read_by_type_not_by_text() {
    let refusal =
        Refusal::from_program_error(Program::MarkVictimBtf, Hook::MarkVictim, eperm("bpf"));
    assert!(matches!(refusal, Refusal::NotPermitted { .. }), "{refusal}");
    let refusal = Refusal::from_program_error(
        Program::OomKillProcessKprobe,
        Hook::OomKillProcess,
        ProgramError::KProbeError(KProbeError::FileError {
            filename: PathBuf::from("/sys/bus/event_source/devices/kprobe/type"),
            io_error: io::Error::from(io::ErrorKind::NotFound),
        }),
    );
    assert!(matches!(refusal, Refusal::NoKprobePmu { .. }), "{refusal}");
    // Another errno is the kernel's own reason, with its cause.
    let refusal = Refusal::from_program_error(
        Program::MarkVictimTracepoint,
        Hook::MarkVictim,
        ProgramError::SyscallError(SyscallError {
            call: "perf_event_open",
            io_error: io::Error::from_raw_os_error(libc::ENOENT),
        }),
    );
    assert!(matches!(refusal, Refusal::Rejected { .. }), "{refusal}");
    let message = refusal.to_string();
    assert!(
        message.starts_with("tracepoint mark_victim: `perf_event_open` failed: "),
        "{message}"
    );
    assert!(message.contains("os error 2"), "{message}");
}

#[test]
fn a_kernel_without_the_report_hook_keeps_the_mode() {
    let mut has = everything();
    has.retain(|&(_, hook)| hook != Hook::OomReport);
    let mut kernel = FakeKernel {
        has,
        ..FakeKernel::default()
    };
    let mut walker = Walker::new(&mut kernel, TASK);
    assert_eq!(
        walker.attach(&OOM_HOOK_CHAIN, AttachMode::Fentry).ok(),
        Some(AttachMode::Fentry)
    );
    assert_eq!(
        walker.into_attachments(),
        [
            attachment(Hook::OomKillProcess, AttachMode::Fentry),
            attachment(Hook::MarkVictim, AttachMode::TpBtf),
            attachment(Hook::OomKillVictim, AttachMode::Fentry),
        ]
    );
    assert!(!kernel.ever_loaded.contains(&Program::OomReportFentry));
}
