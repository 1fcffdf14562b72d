//! Ring buffer records to typed kill snapshots. Decoding is a pure function of the bytes, the
//! page size and the clock, so it is unit-tested and fuzzed without a kernel.

use leak_common::{
    event::{constraint, flags, hook, MemcgSnapshot, OomKillEvent, MAX_CGROUP_DEPTH},
    layout::{
        LRU_ACTIVE_ANON, LRU_ACTIVE_FILE, LRU_INACTIVE_ANON, LRU_INACTIVE_FILE, LRU_UNEVICTABLE,
    },
};
use serde::Serialize;

use crate::cgroup::CgroupPaths;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("unknown hook tag {0}")]
    UnknownHook(u32),
    #[error("cgroup depth {0} exceeds {MAX_CGROUP_DEPTH}")]
    Depth(u32),
}

/// Which program reported the victim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimHook {
    TpBtf,
    Tracepoint,
}

impl TryFrom<u32> for VictimHook {
    type Error = DecodeError;
    fn try_from(tag: u32) -> Result<Self, DecodeError> {
        match tag {
            hook::TP_BTF_MARK_VICTIM => Ok(Self::TpBtf),
            hook::TRACEPOINT_MARK_VICTIM => Ok(Self::Tracepoint),
            other => Err(DecodeError::UnknownHook(other)),
        }
    }
}

/// Copies a ring buffer record into an [`OomKillEvent`], checking its size and tags.
pub fn decode(bytes: &[u8]) -> Result<OomKillEvent, DecodeError> {
    let expected = size_of::<OomKillEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length was checked, OomKillEvent is plain old data (integers and byte
    // arrays, every bit pattern valid) and read_unaligned copes with any alignment.
    let event = unsafe { bytes.as_ptr().cast::<OomKillEvent>().read_unaligned() };
    VictimHook::try_from(event.hook)?;
    if event.depth as usize > MAX_CGROUP_DEPTH {
        return Err(DecodeError::Depth(event.depth));
    }
    Ok(event)
}

/// `PAGE_COUNTER_MAX` is `LONG_MAX / PAGE_SIZE`: a limit at or above it means "no limit".
fn unlimited(limit_pages: u64, page_size: u64) -> bool {
    limit_pages >= (i64::MAX as u64) / page_size
}

/// cAdvisor's and the kubelet's working set: usage minus inactive file cache, floored at 0.
pub fn working_set_bytes(usage_bytes: u64, inactive_file_bytes: u64) -> u64 {
    usage_bytes.saturating_sub(inactive_file_bytes)
}

/// One memory cgroup at the moment of the kill, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupState {
    pub path: String,
    pub id: u64,
    pub usage_bytes: u64,
    /// `None` when the cgroup has no limit.
    pub limit_bytes: Option<u64>,
    pub peak_bytes: u64,
    pub failcnt: Option<u64>,
    pub working_set_bytes: u64,
    pub inactive_anon_bytes: u64,
    pub active_anon_bytes: u64,
    pub inactive_file_bytes: u64,
    pub active_file_bytes: u64,
    pub unevictable_bytes: u64,
    /// This is the cgroup whose limit the kill was about.
    pub hit_limit: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rss {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Trigger {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OomControl {
    pub totalpages: u64,
    pub chosen_points: i64,
    pub gfp_mask: String,
    pub order: i32,
    pub memcg_id: Option<u64>,
}

/// How `oom_cgroup` and `constraint` were established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// From the kernel's own `oom_control` (fentry/kprobe on `oom_kill_process`).
    OomControl,
    /// The nearest cgroup, from the victim's up, whose usage had reached its limit.
    Inferred,
}

/// A victim of the OOM killer with its cgroups' memory at the kill: what `/kills` serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kill {
    /// Monotonic sequence number assigned by the agent.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub timestamp_unix_ns: u128,
    pub boot_ns: u64,
    pub attach_mode: String,
    pub victim_hook: VictimHook,
    /// The victim process (its thread-group id; the kernel's pid when the task was not read).
    pub victim_pid: u32,
    /// The thread the kernel marked (differs from `victim_pid` when a group kill marks threads).
    pub victim_tid: u32,
    pub victim_tgid: Option<u32>,
    pub victim_comm: Option<String>,
    pub victim_oom_score_adj: Option<i32>,
    pub victim_rss: Option<Rss>,
    /// Path of the victim's memory cgroup (relative to the memory hierarchy's root).
    pub cgroup: String,
    pub cgroup_id: u64,
    /// Path of the cgroup that hit its limit; `None` for a global OOM.
    pub oom_cgroup: Option<String>,
    pub oom_cgroup_id: Option<u64>,
    /// `usage_bytes` .. `inactive_file_bytes` describe `oom_cgroup` (or, for a global OOM, the
    /// victim's cgroup).
    pub usage_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub working_set_bytes: u64,
    pub inactive_file_bytes: u64,
    pub constraint: &'static str,
    pub attribution: Attribution,
    pub oom_control: Option<OomControl>,
    pub trigger: Trigger,
    /// The victim's cgroup first, then its ancestors up to the root (or the depth bound).
    pub cgroups: Vec<CgroupState>,
    /// The victim's pid inside its own pid namespace.
    pub victim_ns_pid: Option<u32>,
    /// Whether the victim was pid 1 of its pid namespace: a container's main process. When
    /// false inside a container, the container survives the kill and the kubelet never
    /// reports it as `OOMKilled`.
    pub main_process: Option<bool>,
    /// Kubernetes names of the victim's cgroup; empty outside Kubernetes.
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// What the cgroup path and the node's logs say about the victim's pod, when it is one.
    pub kubernetes: Option<crate::k8s::Attribution>,
    /// The seconds before death of `oom_cgroup` (or the victim's cgroup for a global OOM),
    /// from the charge path, oldest first.
    pub timeline: Vec<crate::history::Point>,
    /// The victim's own cgroup's timeline, when it is not `oom_cgroup`.
    pub victim_timeline: Option<Vec<crate::history::Point>>,
    /// What the timeline says: when usage reached the limit, when the working set did.
    pub story: Option<crate::history::Story>,
    /// The victim's task could not be read in the kernel; `cgroups` are the trigger's.
    pub victim_task_resolved: bool,
    /// The cgroup chain ended early on an unreadable pointer.
    pub cgroups_truncated: bool,
}

/// Facts from outside the event needed to build a [`Kill`].
pub struct Context<'a> {
    pub page_size: u64,
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME` in nanoseconds, at decoding time.
    pub realtime_offset_ns: i128,
    pub attach_mode: &'a str,
    pub seq: u64,
    /// The cgroup the previous report of the same OOM (same triggering task, moments before)
    /// found at its limit: a group kill marks its members one after another while the first
    /// victims already release memory, so later members may no longer show the limit reached.
    pub same_oom_cgroup_id: Option<u64>,
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn constraint_name(tag: u32) -> &'static str {
    match tag {
        constraint::NONE => "none",
        constraint::CPUSET => "cpuset",
        constraint::MEMORY_POLICY => "memory_policy",
        constraint::MEMCG => "memcg",
        _ => "unknown",
    }
}

/// Pages a single charge may ask for (a THP) beyond which "reached the limit" stops being
/// plausible; used only when the kernel's `oom_control` is not available.
const CHARGE_SLACK_PAGES: u64 = 512;

/// Which level of the chain hit its limit, when `oom_control` is not available: the nearest
/// whose usage reached its limit, else the nearest within one huge-page charge of it.
fn infer_oom_level(levels: &[MemcgSnapshot], page_size: u64) -> Option<usize> {
    let limited = |s: &MemcgSnapshot| !unlimited(s.limit_pages, page_size);
    levels
        .iter()
        .position(|s| limited(s) && s.usage_pages >= s.limit_pages)
        .or_else(|| {
            levels.iter().position(|s| {
                limited(s) && s.usage_pages.saturating_add(CHARGE_SLACK_PAGES) >= s.limit_pages
            })
        })
}

/// The path of each level. The kernel gives each level's leaf name; when the chain reached the
/// root those names are the whole path. Otherwise the top-most level's path comes from what the
/// cgroup filesystem told us, or stays a partial path starting with `...`.
fn level_paths(
    event: &OomKillEvent,
    levels: &[MemcgSnapshot],
    paths: &mut CgroupPaths,
) -> Vec<String> {
    let Some(top) = levels.len().checked_sub(1) else {
        return Vec::new();
    };
    let reached_root = levels.len() < MAX_CGROUP_DEPTH && event.flags & flags::CHAIN_TRUNCATED == 0;
    let mut result = vec![String::new(); levels.len()];
    result[top] = if reached_root {
        "/".to_owned()
    } else {
        paths
            .lookup(levels[top].cgroup_id)
            .unwrap_or_else(|| format!(".../{}", c_string(&levels[top].name)))
    };
    for level in (0..top).rev() {
        let parent = &result[level + 1];
        let name = c_string(&levels[level].name);
        // A name that filled the buffer may have been cut short: the filesystem knows better.
        if name.len() + 1 >= levels[level].name.len() {
            if let Some(path) = paths.lookup(levels[level].cgroup_id) {
                result[level] = path;
                continue;
            }
        }
        result[level] = if parent.ends_with('/') {
            format!("{parent}{name}")
        } else {
            format!("{parent}/{name}")
        };
    }
    for (snapshot, path) in levels.iter().zip(&result) {
        if !path.starts_with("...") {
            paths.learn(snapshot.cgroup_id, path);
        }
    }
    result
}

/// Builds the served snapshot from a decoded event.
pub fn build_kill(event: &OomKillEvent, context: &Context<'_>, paths: &mut CgroupPaths) -> Kill {
    let page = context.page_size;
    let depth = (event.depth as usize).min(MAX_CGROUP_DEPTH);
    let levels = &event.cgroups[..depth];
    let has_control = event.flags & flags::HAS_OOM_CONTROL != 0;

    let (oom_level, attribution, constraint) = if has_control {
        let level = (event.oc_memcg_cgroup_id != 0)
            .then(|| {
                levels
                    .iter()
                    .position(|s| s.cgroup_id == event.oc_memcg_cgroup_id)
            })
            .flatten();
        (
            level,
            Attribution::OomControl,
            constraint_name(event.oc_constraint),
        )
    } else {
        let level = infer_oom_level(levels, page).or_else(|| {
            let id = context.same_oom_cgroup_id?;
            levels.iter().position(|s| s.cgroup_id == id)
        });
        let constraint = if level.is_some() { "memcg" } else { "none" };
        (level, Attribution::Inferred, constraint)
    };

    let level_paths = level_paths(event, levels, paths);
    let failcnt_valid = event.flags & flags::FAILCNT_VALID != 0;
    let cgroups: Vec<CgroupState> = levels
        .iter()
        .zip(&level_paths)
        .enumerate()
        .map(|(level, (s, path))| {
            let usage_bytes = s.usage_pages * page;
            let inactive_file_bytes = s.lru_pages[LRU_INACTIVE_FILE] * page;
            CgroupState {
                path: path.clone(),
                id: s.cgroup_id,
                usage_bytes,
                limit_bytes: (!unlimited(s.limit_pages, page)).then_some(s.limit_pages * page),
                peak_bytes: s.watermark_pages * page,
                failcnt: failcnt_valid.then_some(s.failcnt),
                working_set_bytes: working_set_bytes(usage_bytes, inactive_file_bytes),
                inactive_anon_bytes: s.lru_pages[LRU_INACTIVE_ANON] * page,
                active_anon_bytes: s.lru_pages[LRU_ACTIVE_ANON] * page,
                inactive_file_bytes,
                active_file_bytes: s.lru_pages[LRU_ACTIVE_FILE] * page,
                unevictable_bytes: s.lru_pages[LRU_UNEVICTABLE] * page,
                hit_limit: Some(level) == oom_level,
            }
        })
        .collect();

    let described = oom_level.or(if cgroups.is_empty() { None } else { Some(0) });
    let described = described.and_then(|level| cgroups.get(level));
    let victim_resolved = event.flags & flags::VICTIM_TASK != 0;
    let ns_pid =
        (victim_resolved && event.flags & flags::NS_PID_VALID != 0).then_some(event.victim_ns_pid);
    let unix_ns = event.boot_ns as i128 + context.realtime_offset_ns;
    let unix_ns = unix_ns.max(0) as u128;

    Kill {
        seq: context.seq,
        timestamp: rfc3339(unix_ns),
        timestamp_unix_ns: unix_ns,
        boot_ns: event.boot_ns,
        attach_mode: context.attach_mode.to_owned(),
        victim_hook: VictimHook::try_from(event.hook).unwrap_or(VictimHook::TpBtf),
        victim_pid: if victim_resolved && event.victim_tgid != 0 {
            event.victim_tgid
        } else {
            event.victim_pid
        },
        victim_tid: event.victim_pid,
        victim_tgid: victim_resolved.then_some(event.victim_tgid),
        victim_comm: victim_resolved.then(|| c_string(&event.victim_comm)),
        victim_oom_score_adj: (event.flags & flags::OOM_SCORE_ADJ_VALID != 0)
            .then_some(event.victim_oom_score_adj),
        victim_rss: (event.flags & flags::RSS_VALID != 0).then(|| Rss {
            anon_bytes: event.rss_anon_pages * page,
            file_bytes: event.rss_file_pages * page,
            shmem_bytes: event.rss_shmem_pages * page,
        }),
        cgroup: cgroups
            .first()
            .map_or_else(|| "?".into(), |c| c.path.clone()),
        cgroup_id: cgroups.first().map_or(0, |c| c.id),
        oom_cgroup: oom_level
            .and_then(|level| cgroups.get(level))
            .map(|c| c.path.clone()),
        oom_cgroup_id: oom_level.and_then(|level| cgroups.get(level)).map(|c| c.id),
        usage_bytes: described.map_or(0, |c| c.usage_bytes),
        limit_bytes: described.and_then(|c| c.limit_bytes),
        working_set_bytes: described.map_or(0, |c| c.working_set_bytes),
        inactive_file_bytes: described.map_or(0, |c| c.inactive_file_bytes),
        constraint,
        attribution,
        oom_control: has_control.then(|| OomControl {
            totalpages: event.oc_totalpages,
            chosen_points: event.oc_chosen_points,
            gfp_mask: format!("{:#x}", event.oc_gfp_mask),
            order: event.oc_order,
            memcg_id: (event.oc_memcg_cgroup_id != 0).then_some(event.oc_memcg_cgroup_id),
        }),
        trigger: Trigger {
            pid: event.trigger_pid,
            tgid: event.trigger_tgid,
            comm: c_string(&event.trigger_comm),
        },
        cgroups,
        victim_ns_pid: ns_pid,
        main_process: ns_pid.map(|pid| pid == 1),
        namespace: String::new(),
        pod: String::new(),
        container: String::new(),
        kubernetes: None,
        timeline: Vec::new(),
        victim_timeline: None,
        story: None,
        victim_task_resolved: victim_resolved,
        cgroups_truncated: event.flags & flags::CHAIN_TRUNCATED != 0,
    }
}

/// Fills in the victim's process id and name from procfs when the kernel program could not
/// read its task (the classic tracepoint gives a thread id only). The victim is dying but stays
/// in procfs until it is reaped, which is usually long after we look.
pub fn fill_from_procfs(kill: &mut Kill, proc_root: &std::path::Path) {
    if kill.victim_task_resolved {
        return;
    }
    let status = proc_root.join(kill.victim_tid.to_string()).join("status");
    let Ok(status) = std::fs::read_to_string(status) else {
        return;
    };
    for line in status.lines() {
        if let Some(name) = line.strip_prefix("Name:") {
            kill.victim_comm = Some(name.trim().to_owned());
        } else if let Some(tgid) = line.strip_prefix("Tgid:") {
            // A task already detached from its pids (the last moments of exit) reads as 0.
            match tgid.trim().parse() {
                Ok(0) | Err(_) => {}
                Ok(tgid) => {
                    kill.victim_tgid = Some(tgid);
                    kill.victim_pid = tgid;
                }
            }
        }
    }
}

/// How long after a process's first report further reports of it are taken as the same death.
const SAME_DEATH_NS: u64 = 30_000_000_000;

/// Keeps one report per dying process. The kernel marks victims per task: a group kill
/// (`memory.oom.group`) walks every thread of every member, and the chosen victim is met again
/// on that walk, but a process dies once.
#[derive(Debug, Default)]
pub struct VictimDedup {
    /// Process id to the `boot_ns` of its first report.
    seen: std::collections::HashMap<u32, u64>,
}

impl VictimDedup {
    /// Whether this kill is the first report of its process (and remembers it).
    pub fn first_report(&mut self, kill: &Kill) -> bool {
        self.seen
            .retain(|_, first| kill.boot_ns.saturating_sub(*first) < SAME_DEATH_NS);
        match self.seen.get(&kill.victim_pid) {
            Some(_) => false,
            None => {
                self.seen.insert(kill.victim_pid, kill.boot_ns);
                true
            }
        }
    }
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 in UTC with microseconds.
pub fn rfc3339(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
