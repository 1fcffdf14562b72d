//! The one walker over the attach tables in [`super::table`], for the OOM hook and the charge
//! path alike, and why the kernel refused a mode, in words that say what to do.

use std::{error::Error as _, fmt, io, path::PathBuf};

use aya::{
    programs::{
        links::FdLink, trace_point::TracePointError, BtfTracePoint, FEntry, FExit, KProbe,
        KProbeError, ProgramError, TracePoint,
    },
    sys::SyscallError,
    Btf, Ebpf,
};
use log::{debug, info, warn};

use super::{
    host::Tracefs,
    layout::Resolver,
    pin::HeldLink,
    table::{AttachMode, Chain, Hook, Need, Probe, Program, ProgramKind, Role, Row, Step},
};
use crate::sys::kallsyms_has;

/// One attached hook, in the mode its programs are of (`leak_attach_info{hook,mode}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub hook: Hook,
    pub mode: AttachMode,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "{chain}: attach mode `{}` is not available on this kernel: {} (needs {}); \
         `{flag} auto` takes the first mode this kernel supports",
        .unavailable.mode, .unavailable.reason, .unavailable.needs
    )]
    Forced {
        chain: &'static str,
        flag: &'static str,
        unavailable: Unavailable,
    },
    #[error("no {chain} could be attached:{}", Listed(.reasons))]
    NoMode {
        chain: &'static str,
        reasons: Vec<Unavailable>,
    },
}

/// A mode the kernel refused, and why.
#[derive(Debug)]
pub struct Unavailable {
    pub mode: AttachMode,
    pub reason: Refusal,
    pub needs: &'static str,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (needs {})", self.mode, self.reason, self.needs)
    }
}

/// Why one hook could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{}", absent(*.hook, *.need))]
    Absent { hook: Hook, need: Need },
    #[error(
        "{hook}: tracefs is not mounted and could not be mounted; mount it \
         (`mount -t tracefs nodev /sys/kernel/tracing`) or debugfs at /sys/kernel/debug"
    )]
    NoTracefs { hook: Hook },
    #[error("{} does not exist: this kernel has no {hook} tracepoint", .path.display())]
    NoTracepoint { hook: Hook, path: PathBuf },
    #[error("{} has no `pid` field for the victim; use another attach mode", .path.display())]
    NoPidField { path: PathBuf },
    #[error(
        "{} lacks one of the `sig`, `code` and `pid` fields the kill witness reads",
        .path.display()
    )]
    NoSignalFields { path: PathBuf },
    #[error(
        "the BPF object has no program `{program}`: the agent and its kernel programs are out of \
         step; rebuild leak"
    )]
    MissingProgram { program: Program },
    #[error(
        "{kind} {hook}: {} (the kernel refused it: not root, or this program type is disabled)",
        Summary(.source)
    )]
    NotPermitted {
        kind: ProgramKind,
        hook: Hook,
        source: Box<ProgramError>,
    },
    #[error(
        "{kind} {hook}: `{}` is missing: the kernel has no kprobe PMU (CONFIG_KPROBES is off)",
        .path.display()
    )]
    NoKprobePmu {
        kind: ProgramKind,
        hook: Hook,
        path: PathBuf,
    },
    #[error("{kind} {hook}: {}", Summary(.source))]
    Rejected {
        kind: ProgramKind,
        hook: Hook,
        source: Box<ProgramError>,
    },
    #[error("{}", Joined(.0))]
    NoneOf(Vec<Refusal>),
}

/// aya's kprobe PMU: its `type` file is missing when the kernel has no kprobes.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

impl Refusal {
    /// Reads what the kernel said, by the error's type and errno.
    pub fn from_program_error(program: Program, hook: Hook, source: ProgramError) -> Self {
        let kind = program.kind();
        if let ProgramError::KProbeError(KProbeError::FileError { filename, io_error }) = &source {
            if io_error.kind() == io::ErrorKind::NotFound && filename.starts_with(KPROBE_PMU) {
                return Self::NoKprobePmu {
                    kind,
                    hook,
                    path: filename.clone(),
                };
            }
        }
        let refused = os_error(&source) == Some(libc::EPERM);
        let source = Box::new(source);
        match refused {
            true => Self::NotPermitted { kind, hook, source },
            false => Self::Rejected { kind, hook, source },
        }
    }

    fn all(mut refusals: Vec<Refusal>) -> Self {
        match refusals.len() {
            1 => refusals.remove(0),
            _ => Self::NoneOf(refusals),
        }
    }
}

fn absent(hook: Hook, need: Need) -> String {
    match need {
        Need::BtfFunction => format!("{hook} is not in BTF (inlined?)"),
        Need::Kallsyms => format!("{hook} is not in /proc/kallsyms (inlined or renamed)"),
        Need::BtfTracepoint => format!("btf_trace_{hook} is not in BTF (no such tracepoint)"),
        Need::TracefsFormat => format!("{hook} is not a tracepoint"),
    }
}

/// The errno inside an aya error, wherever aya put it.
fn os_error(err: &ProgramError) -> Option<i32> {
    match err {
        ProgramError::LoadError { io_error, .. }
        | ProgramError::SyscallError(SyscallError { io_error, .. })
        | ProgramError::IOError(io_error)
        | ProgramError::KProbeError(KProbeError::FileError { io_error, .. })
        | ProgramError::TracePointError(TracePointError::FileError { io_error, .. }) => {
            io_error.raw_os_error()
        }
        _ => None,
    }
}

/// A program error on one line: the verifier's reason rather than its whole log, and the
/// causes aya keeps as sources (a file name alone says little).
struct Summary<'a>(&'a ProgramError);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let ProgramError::LoadError {
            io_error,
            verifier_log,
        } = self.0
        {
            write!(f, "load failed: {io_error}")?;
            let log = verifier_log.to_string();
            // The verifier ends with statistics; the reason is the line or two before them.
            let reason: Vec<&str> = log
                .trim()
                .lines()
                .rev()
                .filter(|line| {
                    !(line.starts_with("processed ")
                        || line.starts_with("stack depth")
                        || line.starts_with("verification time"))
                })
                .take(2)
                .collect();
            if !reason.is_empty() {
                let reason: Vec<&str> = reason.into_iter().rev().collect();
                write!(f, "; verifier: {}", reason.join(" | "))?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

struct Joined<'a>(&'a [Refusal]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, refusal) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{refusal}")?;
        }
        Ok(())
    }
}

struct Listed<'a>(&'a [Unavailable]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|err| write!(f, "\n  {err}"))
    }
}

/// What the walker asks of the kernel. [`Loader`] is the real one; the tests use a fake.
pub trait Kernel {
    /// Whether the kernel has `hook` for programs that need `need`, before anything is loaded.
    fn check(&self, need: Need, hook: Hook) -> Result<(), Refusal>;
    /// Loads `program` for `hook` and attaches it.
    fn attach(&mut self, program: Program, hook: Hook) -> Result<(), Refusal>;
    /// Unloads (so detaches) `program`; one never loaded is left alone.
    fn unload(&mut self, program: Program);
}

/// What the optional steps of a row depend on.
#[derive(Clone, Copy, Debug)]
pub struct Wants {
    /// `oom:mark_victim` passes a bare pid, so the [`Role::KillWitness`] steps also name
    /// group-kill members' tasks (for the warning when they cannot be attached).
    pub bare_pid: bool,
    /// `--dense-samples`: [`Role::DenseSamples`] steps are wanted.
    pub dense_samples: bool,
}

/// Walks attach chains, keeping what is attached.
pub struct Walker<'k, K> {
    kernel: &'k mut K,
    wants: Wants,
    attachments: Vec<Attachment>,
}

impl<'k, K: Kernel> Walker<'k, K> {
    pub fn new(kernel: &'k mut K, wants: Wants) -> Self {
        Self {
            kernel,
            wants,
            attachments: Vec::new(),
        }
    }

    pub fn into_attachments(self) -> Vec<Attachment> {
        self.attachments
    }

    /// Attaches `chain` in the `requested` mode: `auto` tries every row in order and keeps the
    /// first that attaches; a forced mode tries only its row and fails with the kernel's
    /// reason. A row that fails half-way is undone before the next is tried.
    pub fn attach(
        &mut self,
        chain: &Chain,
        requested: AttachMode,
    ) -> Result<AttachMode, AttachError> {
        let mut reasons = Vec::new();
        let rows = chain
            .rows
            .iter()
            .filter(|row| requested == AttachMode::Auto || row.mode == requested);
        for row in rows {
            let unavailable = match self.attach_row(row) {
                Ok(()) => return Ok(row.mode),
                Err(reason) => Unavailable {
                    mode: row.mode,
                    reason,
                    needs: row.needs,
                },
            };
            if requested != AttachMode::Auto {
                return Err(AttachError::Forced {
                    chain: chain.name,
                    flag: chain.flag,
                    unavailable,
                });
            }
            info!("{} mode {unavailable}; skipped", chain.name);
            reasons.push(unavailable);
        }
        Err(AttachError::NoMode {
            chain: chain.name,
            reasons,
        })
    }

    fn attach_row(&mut self, row: &Row) -> Result<(), Refusal> {
        // What the mode needs is checked before anything is loaded.
        for step in row.steps.iter().filter(|step| step.role == Role::Required) {
            self.available(step)?;
        }
        let attached = self.attachments.len();
        let mut loaded = Vec::new();
        for step in row.steps {
            if let Err(reason) = self.attach_role(step, &mut loaded) {
                self.unload(&loaded);
                self.attachments.truncate(attached);
                return Err(reason);
            }
        }
        Ok(())
    }

    fn attach_role(&mut self, step: &Step, loaded: &mut Vec<Program>) -> Result<(), Refusal> {
        match step.role {
            Role::Required => self.attach_step(step, loaded),
            Role::KillWitness => {
                if let Err(reason) = self.attach_step(step, loaded) {
                    let hook = step.choices.first().map_or("", |probe| probe.hook.name());
                    let members = match self.wants.bare_pid {
                        true => {
                            "; oom:mark_victim gives only a pid here, so group-kill members \
                             other than the chosen victim are named from procfs"
                        }
                        false => "",
                    };
                    warn!(
                        "{hook} cannot be hooked ({reason}): whether the OOM killer killed a \
                         victim or only marked one that was already exiting is unknown \
                         (`killed: null`){members}"
                    );
                }
                Ok(())
            }
            Role::Report => {
                if let Err(reason) = self.attach_step(step, loaded) {
                    warn!(
                        "the kernel's OOM report cannot be hooked ({reason}): whether it flushed \
                         the statistics before a kill (stats_flushed) is unknown"
                    );
                }
                Ok(())
            }
            Role::DenseSamples => {
                if !self.wants.dense_samples {
                    info!(
                        "tp_btf charge path samples at limit hits (--dense-samples adds every \
                         LRU update)"
                    );
                    return Ok(());
                }
                if self.available(step).is_err() {
                    info!(
                        "no memcg:mod_memcg_lruvec_state (6.13+): charge samples only at limit \
                         hits"
                    );
                    return Ok(());
                }
                self.attach_step(step, loaded)
            }
        }
    }

    /// Whether the kernel has one of the step's hooks.
    fn available(&self, step: &Step) -> Result<(), Refusal> {
        let mut refusals = Vec::new();
        for probe in step.choices {
            match self.kernel.check(probe.need(), probe.hook) {
                Ok(()) => return Ok(()),
                Err(refusal) => refusals.push(refusal),
            }
        }
        Err(Refusal::all(refusals))
    }

    /// Attaches the first of the step's choices the kernel has and accepts. The reason it
    /// gives is why the kernel refused the choices it has, or, if it has none, why not: that
    /// `try_charge` is absent says nothing where `try_charge_memcg` was refused.
    fn attach_step(&mut self, step: &Step, loaded: &mut Vec<Program>) -> Result<(), Refusal> {
        let (mut absent, mut refused) = (Vec::new(), Vec::new());
        for probe in step.choices {
            if let Err(refusal) = self.kernel.check(probe.need(), probe.hook) {
                absent.push(refusal);
                continue;
            }
            match self.attach_probe(probe, loaded) {
                Ok(()) => return Ok(()),
                Err(refusal) => refused.push(refusal),
            }
        }
        Err(Refusal::all(match refused.is_empty() {
            true => absent,
            false => refused,
        }))
    }

    /// Attaches every program of `probe`, or unloads the ones it loaded.
    fn attach_probe(&mut self, probe: &Probe, loaded: &mut Vec<Program>) -> Result<(), Refusal> {
        let before = loaded.len();
        for &program in probe.programs {
            // Recorded before the attempt: a program that loads but fails to attach stays
            // loaded until unloaded.
            loaded.push(program);
            if let Err(refusal) = self.kernel.attach(program, probe.hook) {
                let tried = loaded.split_off(before);
                self.unload(&tried);
                return Err(refusal);
            }
        }
        self.attachments.push(Attachment {
            hook: probe.hook,
            mode: probe.mode(),
        });
        Ok(())
    }

    fn unload(&mut self, programs: &[Program]) {
        for &program in programs.iter().rev() {
            self.kernel.unload(program);
        }
    }
}

/// The real kernel: the loaded BPF object, the kernel's BTF, `/proc/kallsyms` and tracefs.
pub struct Loader<'a> {
    pub ebpf: &'a mut Ebpf,
    pub btf: &'a Btf,
    pub resolver: &'a Resolver,
    pub tracefs: Option<&'a Tracefs>,
    /// Whether `oom:mark_victim`'s format gave the offset of its `pid` field.
    pub mark_victim_pid_known: bool,
    /// Whether `signal:signal_generate`'s format gave the offsets of `sig`, `code` and `pid`.
    pub signal_generate_fields_known: bool,
    /// The link of every attached program, held by the agent (so that it can pin them).
    pub links: Vec<(Program, HeldLink)>,
}

/// A perf-event link (kprobe, classic tracepoint) as a BPF link where the kernel makes one
/// (`BPF_LINK_TYPE_PERF_EVENT`, 5.15+: pinnable), else as the perf event aya holds.
fn perf_link<L>(link: L, held: fn(L) -> HeldLink) -> Result<HeldLink, ProgramError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: fmt::Display,
{
    if !aya::features().bpf_perf_link() {
        return Ok(held(link));
    }
    // aya made it with BPF_LINK_CREATE, so it is a BPF link; should it not be, the conversion
    // has dropped (detached) it, and the attach fails.
    FdLink::try_from(link)
        .map(HeldLink::Fd)
        .map_err(|err| ProgramError::IOError(io::Error::other(err.to_string())))
}

impl Loader<'_> {
    fn check_tracepoint(&self, hook: Hook) -> Result<(), Refusal> {
        let Some(tracefs) = self.tracefs else {
            return Err(Refusal::NoTracefs { hook });
        };
        let Some(path) = tracefs.format_path(hook) else {
            return Err(Refusal::Absent {
                hook,
                need: Need::TracefsFormat,
            });
        };
        if !path.exists() {
            return Err(Refusal::NoTracepoint { hook, path });
        }
        // The classic mark_victim program reads the victim's pid at the offset its format
        // gives; without it the program would report no victim.
        if hook == Hook::MarkVictim && !self.mark_victim_pid_known {
            return Err(Refusal::NoPidField { path });
        }
        if hook == Hook::SignalGenerate && !self.signal_generate_fields_known {
            return Err(Refusal::NoSignalFields { path });
        }
        Ok(())
    }
}

impl Kernel for Loader<'_> {
    fn check(&self, need: Need, hook: Hook) -> Result<(), Refusal> {
        let present = match need {
            Need::BtfFunction => self.resolver.has_function(hook.name()),
            Need::Kallsyms => kallsyms_has(hook.name()),
            Need::BtfTracepoint => self.resolver.has_btf_tracepoint(hook.name()),
            Need::TracefsFormat => return self.check_tracepoint(hook),
        };
        match present {
            true => Ok(()),
            false => Err(Refusal::Absent { hook, need }),
        }
    }

    fn attach(&mut self, program: Program, hook: Hook) -> Result<(), Refusal> {
        let Some(object) = self.ebpf.program_mut(program.name()) else {
            return Err(Refusal::MissingProgram { program });
        };
        let btf = self.btf;
        // Loading is where the kernel verifies the program: on a slow machine (an emulated
        // one, an old kernel) the time it takes is what to look at first.
        let started = std::time::Instant::now();
        let result = match program.kind() {
            ProgramKind::FEntry => <&mut FEntry>::try_from(object).and_then(|entry| {
                entry.load(hook.name(), btf)?;
                let id = entry.attach()?;
                Ok(HeldLink::Fd(entry.take_link(id)?.into()))
            }),
            ProgramKind::FExit => <&mut FExit>::try_from(object).and_then(|exit| {
                exit.load(hook.name(), btf)?;
                let id = exit.attach()?;
                Ok(HeldLink::Fd(exit.take_link(id)?.into()))
            }),
            ProgramKind::KProbe | ProgramKind::KRetProbe => <&mut KProbe>::try_from(object)
                .and_then(|probe| {
                    probe.load()?;
                    let id = probe.attach(hook.name(), 0)?;
                    let link = probe.take_link(id)?;
                    perf_link(link, HeldLink::KProbe)
                }),
            ProgramKind::BtfTracePoint => {
                <&mut BtfTracePoint>::try_from(object).and_then(|tracepoint| {
                    tracepoint.load(hook.name(), btf)?;
                    let id = tracepoint.attach()?;
                    Ok(HeldLink::Fd(tracepoint.take_link(id)?.into()))
                })
            }
            ProgramKind::TracePoint => {
                let Some(category) = hook.category() else {
                    return Err(Refusal::Absent {
                        hook,
                        need: Need::TracefsFormat,
                    });
                };
                <&mut TracePoint>::try_from(object).and_then(|tracepoint| {
                    tracepoint.load()?;
                    let id = tracepoint.attach(category, hook.name())?;
                    let link = tracepoint.take_link(id)?;
                    perf_link(link, HeldLink::TracePoint)
                })
            }
        };
        let verified = self
            .ebpf
            .program(program.name())
            .and_then(|loaded| loaded.info().ok())
            .and_then(|info| info.verified_instruction_count())
            .map_or_else(
                || "the kernel does not say how many instructions it verified".to_owned(),
                |count| format!("{count} instructions verified"),
            );
        let result = result.map(|link| self.links.push((program, link)));
        debug!(
            "{program} on {hook}: loaded and attached in {} ms ({verified})",
            started.elapsed().as_millis()
        );
        result.map_err(|source| Refusal::from_program_error(program, hook, source))
    }

    fn unload(&mut self, program: Program) {
        use aya::programs::Program as Loaded;
        // Dropping the agent's link detaches the program.
        self.links.retain(|(linked, _)| *linked != program);
        let result = match self.ebpf.program_mut(program.name()) {
            Some(Loaded::FEntry(entry)) => entry.unload(),
            Some(Loaded::FExit(exit)) => exit.unload(),
            Some(Loaded::KProbe(probe)) => probe.unload(),
            Some(Loaded::BtfTracePoint(tracepoint)) => tracepoint.unload(),
            Some(Loaded::TracePoint(tracepoint)) => tracepoint.unload(),
            _ => Ok(()),
        };
        match result {
            Ok(()) | Err(ProgramError::NotLoaded) => {}
            Err(err) => debug!("unloading {program}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests;
