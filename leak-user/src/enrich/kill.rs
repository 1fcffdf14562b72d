//! A decoded record to the served [`Kill`]: which cgroup hit its limit, each level's path,
//! the headline figures. Pure apart from the path cache.

use crate::{
    decode::{KillRecord, MemcgRecord},
    model::{
        kill::{
            CgroupState, Constraint, Kill, NotKilledReason, OomAttribution, OomControl,
            StatsFreshness,
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

/// Which level of the chain hit its limit, when `oom_control` is not available: the nearest
/// whose usage reached its limit, else the nearest within one huge-page charge of it.
fn infer_oom_level(levels: &[MemcgRecord], page_size: u64) -> Option<usize> {
    let slack = CHARGE_SLACK_PAGES.saturating_mul(page_size);
    levels
        .iter()
        .position(|s| s.limit_bytes.is_some_and(|limit| s.usage_bytes >= limit))
        .or_else(|| {
            levels.iter().position(|s| {
                s.limit_bytes
                    .is_some_and(|limit| s.usage_bytes.saturating_add(slack) >= limit)
            })
        })
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

/// The cgroup that hit its limit (a level of the chain), the constraint, and how both were
/// established.
fn oom_level(
    record: &KillRecord,
    context: &KillContext<'_>,
) -> (Option<usize>, Constraint, OomAttribution) {
    let levels = &record.cgroups;
    if let Some(control) = &record.oom_control {
        let level = control
            .memcg_id
            .and_then(|id| levels.iter().position(|s| s.id == id));
        return (level, control.constraint, OomAttribution::OomControl);
    }
    let level = infer_oom_level(levels, context.page_size).or_else(|| {
        let id = context.same_oom_cgroup_id?;
        levels.iter().position(|s| s.id == id)
    });
    let constraint = match level {
        Some(_) => Constraint::Memcg,
        None => Constraint::None,
    };
    (level, constraint, OomAttribution::Inferred)
}

/// Builds the served snapshot from a decoded record: everything the record itself says.
/// Names, procfs and the timeline are the [`super::Enricher`]'s to add.
pub fn assemble(record: &KillRecord, context: &KillContext<'_>, paths: &mut CgroupPaths) -> Kill {
    let (oom_level, constraint, attribution) = oom_level(record, context);
    // From 6.15 `failcnt` stays 0 on v2; where the version is unknown, serve neither guess.
    let failcnt_kept = !record.failcnt_v1_only || context.cgroup_v2 == Some(false);
    // v1 counts these events too but neither shows nor propagates them.
    let events_shown = context.cgroup_v2 != Some(false);
    let cgroups: Vec<CgroupState> = record
        .cgroups
        .iter()
        .zip(level_paths(record, paths))
        .enumerate()
        .map(|(level, (s, path))| CgroupState {
            path,
            id: s.id,
            usage_bytes: s.usage_bytes,
            limit_bytes: s.limit_bytes,
            peak_bytes: s.peak_bytes,
            failcnt: s.failcnt.filter(|_| failcnt_kept),
            events: s.events.clone().filter(|_| events_shown),
            working_set_bytes: working_set_bytes(s.usage_bytes, s.inactive_file_bytes),
            inactive_anon_bytes: s.inactive_anon_bytes,
            active_anon_bytes: s.active_anon_bytes,
            inactive_file_bytes: s.inactive_file_bytes,
            active_file_bytes: s.active_file_bytes,
            unevictable_bytes: s.unevictable_bytes,
            breakdown: s.breakdown.clone(),
            hit_limit: Some(level) == oom_level,
        })
        .collect();

    let oom = oom_level.and_then(|level| cgroups.get(level));
    // For a global OOM the headline figures describe the victim's own cgroup.
    let described = oom.or(cgroups.first());
    let unix_ns = i128::from(record.boot_ns) + context.realtime_offset_ns;
    let unix_ns = u128::try_from(unix_ns).unwrap_or(0);
    let (stats_flushed, stats_max_age_ms) = context.freshness.of(record.stats_flushed);
    let killed = context.kill_witness.then_some(record.killed);

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
        victim_tgid: record.victim_tgid,
        victim_comm: record.victim_comm.clone(),
        victim_oom_score_adj: record.victim_oom_score_adj,
        victim_rss: record.victim_rss.clone(),
        cgroup: cgroups
            .first()
            .map_or_else(|| "?".into(), |c| c.path.clone()),
        cgroup_id: cgroups.first().map_or(0, |c| c.id),
        oom_cgroup: oom.map(|c| c.path.clone()),
        oom_cgroup_id: oom.map(|c| c.id),
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
        cgroups,
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
    }
}

#[cfg(test)]
#[path = "kill_tests.rs"]
mod tests;
