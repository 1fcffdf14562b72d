//! A decoded record to the served [`Kill`]: which cgroup hit its limit, each level's path,
//! the headline figures. Pure apart from the path cache.

use crate::{
    decode::{KillRecord, MemcgRecord},
    model::{
        kill::{
            CgroupState, Constraint, Kill, LimitCounter, NotKilledReason, OomAttribution,
            OomControl, StatsFreshness, UsageSource,
        },
        kubernetes::WorkloadNames,
        memory::{cause, working_set_bytes, CHARGE_SLACK_PAGES},
        time::rfc3339,
    },
};

use super::cgroupfs::CgroupPaths;

/// Facts from outside the record needed to build a [`Kill`].
#[derive(Clone, Debug)]
pub struct KillContext<'a> {
    pub page_size: u64,
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME` in nanoseconds, at decoding time.
    pub realtime_offset_ns: i128,
    pub attach_mode: &'a str,
    pub seq: u64,
    /// What can be known about how fresh the statistics are.
    pub freshness: StatsFreshness,
    /// The cgroup the previous report of the same OOM (same triggering task, moments before)
    /// found at its limit: a group kill marks its members one after another while the first
    /// victims already release memory, so later members may no longer show the limit reached.
    pub same_oom_cgroup_id: Option<u64>,
    /// Whether the memory controller is on cgroup v2 (`None`: not known). It decides which
    /// limit-hit counter is served: `memory.events` on v2, `failcnt` on v1 (and on v2 where
    /// the kernel still counts it).
    pub cgroup_v2: Option<bool>,
    /// Whether a kill witness is attached, so that the record's `killed` bit means something.
    pub kill_witness: bool,
}

/// Whether `level`'s memory or memory+swap usage is within `slack` bytes of its limit.
fn reached_limit(level: &MemcgRecord, slack: u64) -> bool {
    limit_counter_within(level, slack).is_some()
}

/// Which counter of `level` is within `slack` bytes of its limit: memory+swap first, the
/// counter the kernel charges first (with equal limits and no swap, it is the one that fails).
fn limit_counter_within(level: &MemcgRecord, slack: u64) -> Option<LimitCounter> {
    let near =
        |usage: u64, limit: Option<u64>| limit.is_some_and(|l| usage.saturating_add(slack) >= l);
    let memsw = level
        .memsw
        .as_ref()
        .is_some_and(|m| near(m.usage_bytes, m.limit_bytes));
    match (memsw, near(level.usage_bytes, level.limit_bytes)) {
        (true, _) => Some(LimitCounter::Memsw),
        (false, true) => Some(LimitCounter::Memory),
        _ => None,
    }
}

/// Which counter of the cgroup that hit its limit was at it: exactly at it first, then within
/// one huge-page charge.
fn limit_counter(level: &MemcgRecord, page_size: u64) -> Option<LimitCounter> {
    limit_counter_within(level, 0)
        .or_else(|| limit_counter_within(level, CHARGE_SLACK_PAGES.saturating_mul(page_size)))
}

/// Which level of the chain hit its limit, when `oom_control` is not available: the nearest
/// whose usage (or memory+swap usage) reached its limit, else the nearest within one
/// huge-page charge of it.
fn infer_oom_level(levels: &[MemcgRecord], page_size: u64) -> Option<usize> {
    let slack = CHARGE_SLACK_PAGES.saturating_mul(page_size);
    levels
        .iter()
        .position(|s| reached_limit(s, 0))
        .or_else(|| levels.iter().position(|s| reached_limit(s, slack)))
}

/// Where the cgroup that hit its limit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OomAt {
    /// A level of the chain.
    Level(usize),
    /// Above the chain: the record's `oom_memcg`.
    Above,
    /// Not found: a global OOM, or (see `search_incomplete`) not established.
    Unknown,
}

/// The path of each level. The kernel gives each level's leaf name; when the chain reached the
/// root those names are the whole path. Otherwise the top-most level's path comes from what the
/// cgroup filesystem told us, or stays a partial path starting with `...`.
fn level_paths(record: &KillRecord, paths: &mut CgroupPaths) -> Vec<String> {
    let levels = &record.cgroups;
    let Some(top) = levels.len().checked_sub(1) else {
        return Vec::new();
    };
    let mut result = vec![String::new(); levels.len()];
    result[top] = if record.reached_root() {
        "/".to_owned()
    } else {
        paths
            .lookup(levels[top].id)
            .unwrap_or_else(|| format!(".../{}", levels[top].name))
    };
    for level in (0..top).rev() {
        // A name that filled the buffer may have been cut short: the filesystem knows better.
        if levels[level].name_may_be_truncated {
            if let Some(path) = paths.lookup(levels[level].id) {
                result[level] = path;
                continue;
            }
        }
        let (parent, name) = (&result[level + 1], &levels[level].name);
        result[level] = if parent.ends_with('/') {
            format!("{parent}{name}")
        } else {
            format!("{parent}/{name}")
        };
    }
    for (level, path) in levels.iter().zip(&result) {
        if !path.starts_with("...") {
            paths.learn(level.id, path);
        }
    }
    result
}

/// The cgroup that hit its limit, the constraint, and how both were established.
fn oom_at(record: &KillRecord, context: &KillContext<'_>) -> (OomAt, Constraint, OomAttribution) {
    let levels = &record.cgroups;
    let above = |id: u64| record.oom_memcg.as_ref().is_some_and(|m| m.id == id);
    if let Some(control) = &record.oom_control {
        let at = match control.memcg_id {
            Some(id) => match levels.iter().position(|s| s.id == id) {
                Some(level) => OomAt::Level(level),
                None if above(id) => OomAt::Above,
                None => OomAt::Unknown,
            },
            None => OomAt::Unknown,
        };
        return (at, control.constraint, OomAttribution::OomControl);
    }
    let at = infer_oom_level(levels, context.page_size)
        .map(OomAt::Level)
        .or_else(|| {
            let id = context.same_oom_cgroup_id?;
            match levels.iter().position(|s| s.id == id) {
                Some(level) => Some(OomAt::Level(level)),
                None => above(id).then_some(OomAt::Above),
            }
        })
        .or_else(|| record.oom_memcg.is_some().then_some(OomAt::Above))
        .unwrap_or(OomAt::Unknown);
    let constraint = match at {
        OomAt::Unknown if search_incomplete(record, at) => Constraint::Unknown,
        OomAt::Unknown => Constraint::None,
        _ => Constraint::Memcg,
    };
    (at, constraint, OomAttribution::Inferred)
}

/// Whether a cgroup that hit its limit may exist that the snapshot does not show: the kernel
/// named one it could not read, or, inferring, the chain was cut short and its ancestors were
/// not all searched.
fn search_incomplete(record: &KillRecord, at: OomAt) -> bool {
    if at != OomAt::Unknown {
        return false;
    }
    match &record.oom_control {
        Some(control) => control.memcg_id.is_some(),
        None => !record.reached_root() && !record.ancestors_searched,
    }
}

/// The path of the cgroup `steps` levels above the one at `path`, when `path` is whole and its
/// leaf name there is `name`.
fn ancestor_path(path: &str, steps: u32, name: &str) -> Option<String> {
    if path.starts_with("...") {
        return None;
    }
    let mut ancestor = path;
    for _ in 0..steps {
        ancestor = &ancestor[..ancestor.rfind('/')?];
    }
    let ancestor = if ancestor.is_empty() { "/" } else { ancestor };
    let leaf = ancestor.rsplit('/').next().unwrap_or_default();
    (leaf == name).then(|| ancestor.to_owned())
}

/// The path of the cgroup above the chain: from the chain's top path and the levels between,
/// else from the cgroup filesystem, else partial.
fn above_path(
    record: &KillRecord,
    above: &MemcgRecord,
    level_paths: &[String],
    paths: &mut CgroupPaths,
) -> String {
    let from_chain = record.oom_memcg_level.and_then(|level| {
        let top = level_paths.len().checked_sub(1)?;
        let steps = level.checked_sub(u32::try_from(top).ok()?)?;
        ancestor_path(&level_paths[top], steps, &above.name)
    });
    from_chain
        .or_else(|| paths.lookup(above.id))
        .unwrap_or_else(|| format!(".../{}", above.name))
}

/// One cgroup of the snapshot, in bytes. The root's usage comes from its statistics, as the
/// kernel's own v1 files compute it: its page counter is charged only by its children.
fn cgroup_state(
    s: &MemcgRecord,
    path: String,
    level: Option<u32>,
    is_root: bool,
    shown: Shown,
) -> CgroupState {
    let root_usage = is_root
        .then(|| {
            Some(
                s.breakdown
                    .anon_bytes?
                    .saturating_add(s.breakdown.file_bytes?),
            )
        })
        .flatten();
    let usage_bytes = root_usage.unwrap_or(s.usage_bytes);
    let memsw = s.memsw.as_ref();
    let memsw_usage_bytes = memsw.map(|m| match root_usage {
        Some(usage) => usage.saturating_add(s.breakdown.swap_bytes.unwrap_or(0)),
        None => m.usage_bytes,
    });
    CgroupState {
        path,
        id: s.id,
        usage_bytes,
        limit_bytes: s.limit_bytes,
        peak_bytes: s.peak_bytes,
        failcnt: s.failcnt.filter(|_| shown.failcnt),
        events: s.events.clone().filter(|_| shown.events),
        working_set_bytes: working_set_bytes(usage_bytes, s.inactive_file_bytes),
        inactive_anon_bytes: s.inactive_anon_bytes,
        active_anon_bytes: s.active_anon_bytes,
        inactive_file_bytes: s.inactive_file_bytes,
        active_file_bytes: s.active_file_bytes,
        unevictable_bytes: s.unevictable_bytes,
        breakdown: s.breakdown.clone(),
        hit_limit: false,
        level,
        usage_source: match root_usage {
            Some(_) => UsageSource::Statistics,
            None => UsageSource::PageCounter,
        },
        memsw_usage_bytes,
        memsw_limit_bytes: memsw.and_then(|m| m.limit_bytes),
        memsw_peak_bytes: memsw.map(|m| m.peak_bytes),
        memsw_failcnt: memsw
            .and_then(|m| m.failcnt)
            .filter(|_| shown.memsw_failcnt),
        limit_counter: None,
    }
}

/// Which limit-hit counters are served.
#[derive(Clone, Copy)]
struct Shown {
    failcnt: bool,
    events: bool,
    /// From 6.15 the kernel counts `failcnt` only for the memory counter of v1 cgroups;
    /// memory+swap (in a union with v2's `swap`) is never tracked and stays 0.
    memsw_failcnt: bool,
}

/// Builds the served snapshot from a decoded record: everything the record itself says.
/// Names, procfs and the timeline are the [`super::Enricher`]'s to add.
pub fn assemble(record: &KillRecord, context: &KillContext<'_>, paths: &mut CgroupPaths) -> Kill {
    let (at, constraint, attribution) = oom_at(record, context);
    let shown = Shown {
        // From 6.15 `failcnt` stays 0 on v2; where the version is unknown, serve neither guess.
        failcnt: !record.failcnt_v1_only || context.cgroup_v2 == Some(false),
        // v1 counts these events too but neither shows nor propagates them.
        events: context.cgroup_v2 != Some(false),
        memsw_failcnt: !record.failcnt_v1_only,
    };
    let top = record.cgroups.len().checked_sub(1);
    let level_paths = level_paths(record, paths);
    let mut cgroups: Vec<CgroupState> = record
        .cgroups
        .iter()
        .zip(level_paths.iter().cloned())
        .enumerate()
        .map(|(level, (s, path))| {
            let is_root = record.reached_root() && Some(level) == top;
            cgroup_state(s, path, u32::try_from(level).ok(), is_root, shown)
        })
        .collect();
    let mut oom_cgroup_state = None;
    let hit = match at {
        OomAt::Level(level) => cgroups
            .get_mut(level)
            .map(|state| (state, &record.cgroups[level])),
        OomAt::Above => record.oom_memcg.as_ref().map(|above| {
            let path = above_path(record, above, &level_paths, paths);
            let state = cgroup_state(above, path, record.oom_memcg_level, false, shown);
            (oom_cgroup_state.insert(state), above)
        }),
        OomAt::Unknown => None,
    };
    if let Some((state, s)) = hit {
        state.hit_limit = true;
        state.limit_counter = limit_counter(s, context.page_size);
    }

    let oom = oom_cgroup_state
        .as_ref()
        .or_else(|| cgroups.iter().find(|c| c.hit_limit));
    // A cgroup the kernel named but that could not be read still has a path.
    let unread_oom_id = match (at, &record.oom_control) {
        (OomAt::Unknown, Some(control)) => control.memcg_id,
        _ => None,
    };
    // For a global OOM (or one whose cgroup is not known) the headline figures describe the
    // victim's own cgroup.
    let described = oom.or(cgroups.first());
    let unix_ns = i128::from(record.boot_ns) + context.realtime_offset_ns;
    let unix_ns = u128::try_from(unix_ns).unwrap_or(0);
    let (stats_flushed, stats_max_age_ms) = context.freshness.of(record.stats_flushed);
    // Unknown where no witness is attached, or where it may have missed this OOM.
    let killed = (context.kill_witness && record.armed).then_some(record.killed);
    let limit_counter = oom.and_then(|c| c.limit_counter);
    let oom_cgroup_level = oom.and_then(|c| c.level);
    let oom_cgroup = oom
        .map(|c| c.path.clone())
        .or_else(|| unread_oom_id.map(|id| paths.lookup(id).unwrap_or_else(|| "...".into())));
    let oom_cgroup_id = oom.map(|c| c.id).or(unread_oom_id);
    let search_incomplete = search_incomplete(record, at);

    Kill {
        seq: context.seq,
        timestamp: rfc3339(unix_ns),
        timestamp_unix_ns: unix_ns,
        boot_ns: record.boot_ns,
        attach_mode: context.attach_mode.to_owned(),
        victim_hook: record.hook,
        victim_pid: record
            .victim_tgid
            .filter(|&tgid| tgid != 0)
            .unwrap_or(record.victim_tid),
        victim_tid: record.victim_tid,
        victim_start_ns: record.victim_start_ns,
        victim_tgid: record.victim_tgid,
        victim_comm: record.victim_comm.clone(),
        victim_oom_score_adj: record.victim_oom_score_adj,
        victim_rss: record.victim_rss.clone(),
        cgroup: cgroups
            .first()
            .map_or_else(|| "?".into(), |c| c.path.clone()),
        cgroup_id: cgroups.first().map_or(0, |c| c.id),
        oom_cgroup,
        oom_cgroup_id,
        usage_bytes: described.map_or(0, |c| c.usage_bytes),
        limit_bytes: described.and_then(|c| c.limit_bytes),
        working_set_bytes: described.map_or(0, |c| c.working_set_bytes),
        inactive_file_bytes: described.map_or(0, |c| c.inactive_file_bytes),
        constraint,
        cause: described.and_then(|c| cause(&c.breakdown, c.usage_bytes)),
        attribution,
        oom_control: record.oom_control.as_ref().map(|control| OomControl {
            totalpages: control.totalpages,
            chosen_points: control.chosen_points,
            gfp_mask: format!("{:#x}", control.gfp_mask),
            order: control.order,
            memcg_id: control.memcg_id,
        }),
        trigger: record.trigger.clone(),
        victim_ns_pid: record.victim_ns_pid,
        main_process: record.victim_ns_pid.map(|pid| pid == 1),
        names: WorkloadNames::default(),
        kubernetes: None,
        timeline: Vec::new(),
        victim_timeline: None,
        story: None,
        victim_task_resolved: record.victim_task_resolved,
        killed,
        not_killed_reason: (killed == Some(false)).then_some(NotKilledReason::Exiting),
        cgroups_truncated: record.chain_truncated,
        stats_flushed,
        stats_max_age_ms,
        oom_cgroup_level,
        limit_counter,
        oom_cgroup_search_incomplete: search_incomplete,
        oom_cgroup_state,
        cgroups,
    }
}

#[cfg(test)]
#[path = "kill_tests.rs"]
mod tests;
