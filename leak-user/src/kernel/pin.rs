//! Probes that outlive the agent: the links of the attached programs and the ring buffers they
//! write to, pinned under bpffs (`--pin-dir`, `/sys/fs/bpf/leak` by default), so that the
//! kernel keeps recording kills while no agent runs (SIGKILL, a crash, a rolling update).
//!
//! Each agent pins one *generation*, a directory of its own:
//!
//! ```text
//! /sys/fs/bpf/leak/<unix ms>-<pid>/events         the kill ring buffer
//!                                  samples        the charge-path ring buffer
//!                                  counters       the programs' counters (lost events...)
//!                                  link-<program> one link per attached program
//! ```
//!
//! It is pinned as `partial-<name>` (bpffs refuses names with a dot) and renamed when complete. A starting agent opens every
//! generation it finds (complete or not: an agent that died while pinning leaves a partial
//! one), attaches its own programs, and only then detaches the old links (removing a link's
//! pin and closing the last descriptor detaches it), so some probe is attached at every
//! instant; the old ring buffers are drained after their links are gone and then unpinned.
//! If the new programs cannot be attached, the old generation is left as it was: still
//! attached, still recording.

use std::{
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, PerCpuArray, RingBuf},
    programs::{
        kprobe::KProbeLink,
        links::{FdLink, PinnedLink},
        trace_point::TracePointLink,
    },
    Ebpf,
};
use log::{debug, info, warn};

use super::table::{Chain, Program, OOM_HOOK_CHAIN};

/// Where the probes are pinned unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/leak";

/// `statfs.f_type` of the BPF filesystem.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

const EVENTS_PIN: &str = "events";
const SAMPLES_PIN: &str = "samples";
const COUNTERS_PIN: &str = "counters";
const LINK_PREFIX: &str = "link-";
const PARTIAL_PREFIX: &str = "partial-";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{path} is not on a BPF filesystem (bpffs): mount one (`mount -t bpf bpf /sys/fs/bpf`; \
         in Kubernetes, mount the host's /sys/fs/bpf) or pass --no-pin"
    )]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether `path` is on bpffs.
fn on_bpffs(path: &Path) -> Result<bool, PinError> {
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| PinError::Io {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `stat` is a valid, writable statfs.
    if unsafe { libc::statfs(name.as_ptr(), &mut stat) } != 0 {
        return Err(PinError::Io {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(stat.f_type as u32 == BPF_FS_MAGIC)
}

/// Where systemd mounts bpffs at boot, and where leak mounts it when nothing is there.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS_MOUNT`], as systemd does at boot (in a container, the host's must be
/// mounted there instead: pins in a bpffs of the container's own end with it).
fn mount_bpffs() -> bool {
    let (source, target, kind) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no mount data.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    match mounted {
        true => info!("mounted bpffs at {BPFFS_MOUNT} to pin the probes"),
        false => warn!(
            "cannot mount bpffs at {BPFFS_MOUNT}: {}",
            std::io::Error::last_os_error()
        ),
    }
    mounted
}

/// The pin directory, made if missing; an error when it is not on bpffs.
pub fn prepare_dir(dir: &Path) -> Result<(), PinError> {
    let standard = Path::new(BPFFS_MOUNT);
    if dir.starts_with(standard) && standard.is_dir() && !on_bpffs(standard)? {
        mount_bpffs();
    }
    if !dir.exists() {
        // Its parent must be bpffs; a directory made elsewhere would hide that.
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !on_bpffs(parent)? {
            return Err(PinError::NotBpffs {
                path: parent.to_owned(),
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    match on_bpffs(dir)? {
        true => Ok(()),
        false => Err(PinError::NotBpffs {
            path: dir.to_owned(),
        }),
    }
}

/// A link the agent holds. Only a BPF link (`bpf_link`) can be pinned: fentry, fexit and BTF
/// tracepoints always are one; kprobes and classic tracepoints are perf events, a BPF link
/// only where the kernel has `BPF_LINK_TYPE_PERF_EVENT` (5.15+), otherwise the program is set
/// on the perf event by ioctl and lives as long as the agent's descriptor.
#[derive(Debug)]
pub enum HeldLink {
    Fd(FdLink),
    KProbe(KProbeLink),
    TracePoint(TracePointLink),
}

impl HeldLink {
    pub fn pinnable(&self) -> bool {
        matches!(self, Self::Fd(_))
    }
}

/// A generation of another agent: what it pinned, opened.
struct Generation {
    dir: PathBuf,
    events: Option<MapData>,
    samples: Option<MapData>,
    counters: Option<MapData>,
    links: Vec<(String, PinnedLink)>,
}

impl Generation {
    fn open(dir: PathBuf) -> Result<Self, PinError> {
        let map = |name: &str| {
            let path = dir.join(name);
            match path.exists() {
                false => None,
                true => MapData::from_pin(&path)
                    .inspect_err(|err| warn!("pinned map {}: {err}", path.display()))
                    .ok(),
            }
        };
        let (events, samples, counters) = (map(EVENTS_PIN), map(SAMPLES_PIN), map(COUNTERS_PIN));
        let mut links = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(program) = name.strip_prefix(LINK_PREFIX) else {
                continue;
            };
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => links.push((program.to_owned(), link)),
                Err(err) => warn!("pinned link {}: {err}", entry.path().display()),
            }
        }
        Ok(Self {
            dir,
            events,
            samples,
            counters,
            links,
        })
    }
}

/// What earlier agents left pinned, opened but untouched: until [`Previous::retire`] their
/// probes stay attached and keep recording.
#[derive(Default)]
pub struct Previous {
    generations: Vec<Generation>,
}

impl Previous {
    /// Opens every generation under `dir` (none when `dir` does not exist).
    pub fn open(dir: &Path) -> Result<Self, PinError> {
        if !dir.exists() {
            return Ok(Self::default());
        }
        let mut generations = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
            .map(|entry| entry.path())
            .collect();
        entries.sort();
        for path in entries {
            generations.push(Generation::open(path)?);
        }
        for generation in &generations {
            info!(
                "pinned by an earlier agent: {} ({} links{})",
                generation.dir.display(),
                generation.links.len(),
                match generation.events.is_some() {
                    true => ", a kill ring buffer",
                    false => ", no kill ring buffer",
                }
            );
        }
        Ok(Self { generations })
    }

    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// Whether a previous generation had the victim hook pinned with a ring buffer: then its
    /// probes saw the kills while no agent ran.
    pub fn recorded_kills(&self) -> bool {
        self.generations.iter().any(|generation| {
            generation.events.is_some()
                && generation
                    .links
                    .iter()
                    .any(|(program, _)| program.starts_with("mark_victim"))
        })
    }

    /// Detaches the old links (the caller has attached its own programs first) and unpins the
    /// old generations; returns their ring buffers to drain and what their programs counted.
    pub fn retire(self) -> Retired {
        let mut retired = Retired::default();
        for mut generation in self.generations {
            let count = generation.links.len();
            // The victim report first: once it is gone the old set reports nothing more, so no
            // kill in flight is reported by a set whose kill witness or `oom_control` hook was
            // detached under it (a real kill read as a mark without one). This agent's own
            // set, attached whole, reports it.
            generation
                .links
                .sort_by_key(|(program, _)| !program.starts_with("mark_victim"));
            for (program, link) in generation.links {
                // Removing the pin and dropping the last descriptor detaches the program.
                match link.unpin() {
                    Ok(link) => drop(link),
                    Err(err) => warn!("unpinning {program}'s link: {err}"),
                }
            }
            if let Some(counters) = generation.counters {
                match PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(counters)) {
                    Ok(counters) => {
                        let sum = |index: u32| -> u64 {
                            counters
                                .get(&index, 0)
                                .map(|values| values.iter().copied().sum())
                                .unwrap_or(0)
                        };
                        retired.lost_events += sum(leak_common::event::counter::LOST_EVENTS);
                        retired.lost_samples += sum(leak_common::event::counter::LOST_SAMPLES);
                    }
                    Err(err) => warn!("the earlier agent's counters: {err}"),
                }
            }
            let ring = |map: Option<MapData>| {
                map.and_then(|map| RingBuf::try_from(Map::RingBuf(map)).ok())
            };
            if let Some(events) = ring(generation.events) {
                retired.events.push(events);
            }
            if let Some(samples) = ring(generation.samples) {
                retired.samples.push(samples);
            }
            match remove_generation(&generation.dir) {
                Ok(_) => info!(
                    "replaced {} ({count} links detached after this agent's programs were \
                     attached)",
                    generation.dir.display()
                ),
                Err(err) => warn!("removing {}: {err}", generation.dir.display()),
            }
        }
        retired
    }
}

/// The old generations' ring buffers (still open, no longer pinned, no program feeding them)
/// and what their programs counted.
#[derive(Default)]
pub struct Retired {
    pub events: Vec<RingBuf<MapData>>,
    pub samples: Vec<RingBuf<MapData>>,
    pub lost_events: u64,
    pub lost_samples: u64,
}

/// Whether `program` is one of the OOM hook's (the kill path's), not the charge path's.
fn in_chain(chain: &Chain, program: Program) -> bool {
    chain.rows.iter().any(|row| {
        row.steps.iter().any(|step| {
            step.choices
                .iter()
                .any(|probe| probe.programs.contains(&program))
        })
    })
}

/// What was pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Everything under this generation directory.
    All(PathBuf),
    /// The kill path under this directory; these charge-path programs are not pinnable here.
    KillPath(PathBuf, Vec<&'static str>),
    /// Nothing: a program of the kill path cannot be pinned on this kernel.
    Nothing(Vec<&'static str>),
}

/// Pins a new generation under `dir`: the ring buffers and counters of `ebpf` and every
/// pinnable link of `links`. The links of the kill path must all be pinnable, else nothing is
/// pinned (part of a kill path would record kills the next agent cannot read right).
///
/// A map that cannot be pinned leaves nothing pinned and every link attached. aya's
/// `FdLink::pin` drops the link when the kernel refuses the pin, so a link that cannot be
/// pinned is detached: that is an error the agent must not run on ([`PinError::Pin`] with
/// `link: true`), and the caller stops with the earlier agent's probes still pinned.
pub fn pin_generation(
    dir: &Path,
    ebpf: &Ebpf,
    links: Vec<(Program, HeldLink)>,
) -> (Vec<(Program, HeldLink)>, Result<Pinned, GenerationError>) {
    let unpinnable = |kill_path: bool| -> Vec<&'static str> {
        links
            .iter()
            .filter(|(program, link)| {
                !link.pinnable() && in_chain(&OOM_HOOK_CHAIN, *program) == kill_path
            })
            .map(|(program, _)| program.name())
            .collect()
    };
    let kill_path_unpinnable = unpinnable(true);
    if !kill_path_unpinnable.is_empty() {
        return (links, Ok(Pinned::Nothing(kill_path_unpinnable)));
    }
    let charge_unpinnable = unpinnable(false);

    let name = format!(
        "{}-{}",
        crate::sys::unix_ns() / 1_000_000,
        std::process::id()
    );
    let partial = dir.join(format!("{PARTIAL_PREFIX}{name}"));
    if let Err(err) = fs::create_dir(&partial).map_err(io(&partial)) {
        return (links, Err(GenerationError::Maps(err)));
    }
    for (map, file) in [
        ("EVENTS", EVENTS_PIN),
        ("SAMPLES", SAMPLES_PIN),
        ("COUNTERS", COUNTERS_PIN),
    ] {
        if let Some(map) = ebpf.map(map) {
            let path = partial.join(file);
            if let Err(source) = map.pin(&path) {
                let _ = remove_generation(&partial);
                return (
                    links,
                    Err(GenerationError::Maps(PinError::Pin { path, source })),
                );
            }
        }
    }
    let mut held = Vec::with_capacity(links.len());
    let mut failure = None;
    for (program, link) in links {
        let link = match link {
            HeldLink::Fd(fd) if failure.is_none() => {
                let path = partial.join(format!("{LINK_PREFIX}{}", program.name()));
                match fd.pin(&path) {
                    Ok(pinned) => HeldLink::Fd(FdLink::from(pinned)),
                    Err(source) => {
                        failure = Some(PinError::Pin { path, source });
                        continue;
                    }
                }
            }
            other => other,
        };
        held.push((program, link));
    }
    if let Some(err) = failure {
        let _ = remove_generation(&partial);
        return (held, Err(GenerationError::Link(err)));
    }
    let complete = dir.join(&name);
    if let Err(source) = fs::rename(&partial, &complete) {
        // Complete all the same, under its partial name: the next agent takes it over too.
        warn!("renaming {}: {source}", partial.display());
        return (held, Ok(Pinned::All(partial)));
    }
    let pinned = match charge_unpinnable.is_empty() {
        true => Pinned::All(complete),
        false => Pinned::KillPath(complete, charge_unpinnable),
    };
    (held, Ok(pinned))
}

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// Nothing is pinned; every link is still attached.
    #[error("{0}")]
    Maps(PinError),
    /// A link could not be pinned and is detached.
    #[error("{0}; that program is detached")]
    Link(PinError),
}

/// Removes a generation directory: its pins (a link's pin removed while no descriptor holds
/// it detaches the program) and the directory. The files removed, by name.
fn remove_generation(dir: &Path) -> Result<Vec<String>, PinError> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        removed.push(entry.file_name().to_string_lossy().into_owned());
    }
    fs::remove_dir(dir).map_err(io(dir))?;
    debug!("removed {} ({})", dir.display(), removed.join(", "));
    Ok(removed)
}

/// `leak unpin`: removes every generation under `dir` (every probe pinned there is detached
/// and its ring buffer freed, with what it held) and `dir` itself; the paths removed.
pub fn unpin_all(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(fs::DirEntry::path);
    for entry in entries {
        let path = entry.path();
        match entry.file_type().map_err(io(&path))?.is_dir() {
            true => {
                for file in remove_generation(&path)? {
                    removed.push(path.join(file));
                }
                removed.push(path);
            }
            false => {
                fs::remove_file(&path).map_err(io(&path))?;
                removed.push(path);
            }
        }
    }
    fs::remove_dir(dir).map_err(io(dir))?;
    removed.push(dir.to_owned());
    Ok(removed)
}
