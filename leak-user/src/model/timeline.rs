//! The seconds before death: points of a cgroup's memory over time, and what they say.

use serde::{Deserialize, Serialize};

use super::memory::at_limit;

/// Why a point was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// A charge went through the hooked path (rate-limited per cgroup in the kernel).
    Charge,
    /// A charge hit the limit and the kernel started reclaiming in the cgroup.
    LimitHit,
    /// A charge failed (`-ENOMEM`) after reclaim.
    ChargeFailed,
    /// The kill's own snapshot, ending a kill's timeline.
    Kill,
    /// Read from the cgroup filesystem by the agent (every few seconds).
    Poll,
}

impl SampleKind {
    /// The `kind` label of `leak_charge_samples_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::LimitHit => "limit_hit",
            Self::ChargeFailed => "charge_failed",
            Self::Kill => "kill",
            Self::Poll => "poll",
        }
    }
}

/// One point of a cgroup's timeline, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub boot_ns: u64,
    /// Milliseconds before the kill (filled in when attached to one).
    pub before_kill_ms: Option<u64>,
    pub kind: SampleKind,
    pub usage_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub working_set_bytes: u64,
    /// Page cache: inactive plus active file pages.
    pub page_cache_bytes: u64,
    pub inactive_file_bytes: u64,
    pub anon_bytes: u64,
}

/// Where timelines come from (the agent's history of each cgroup).
pub trait Timelines {
    /// The cgroup's points up to `until_boot_ns`, oldest first, each marked with how long
    /// before that moment it was taken.
    fn timeline(&self, cgroup_id: u64, until_boot_ns: u64) -> Vec<Point>;
}

/// At most this many points of a timeline travel with a kill (kills are kept, up to
/// `--max-kills`, with their timelines: this bounds the agent's memory).
pub const MAX_KILL_TIMELINE_POINTS: usize = 300;

/// What a timeline says about the road to the kill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Story {
    /// First moment usage was at the limit (within one huge page), ms before the kill.
    pub usage_at_limit_ms_before_kill: Option<u64>,
    /// First moment the working set was, ms before the kill.
    pub working_set_at_limit_ms_before_kill: Option<u64>,
    /// The most page cache seen in the window.
    pub peak_page_cache_bytes: Option<u64>,
    pub limit_hits: usize,
    pub charge_failures: usize,
}

/// The first points where usage, and where the working set, reached the limit.
fn turning_points(timeline: &[Point], page_size: u64) -> (Option<usize>, Option<usize>) {
    let reached = |value: u64, point: &Point| {
        point
            .limit_bytes
            .is_some_and(|limit| at_limit(value, limit, page_size))
    };
    (
        timeline.iter().position(|p| reached(p.usage_bytes, p)),
        timeline
            .iter()
            .position(|p| reached(p.working_set_bytes, p)),
    )
}

/// Reads the story from every point of a timeline (before it is thinned).
pub fn story(timeline: &[Point], page_size: u64) -> Story {
    let (usage, working_set) = turning_points(timeline, page_size);
    let before_kill = |index: Option<usize>| index.and_then(|i| timeline[i].before_kill_ms);
    Story {
        usage_at_limit_ms_before_kill: before_kill(usage),
        working_set_at_limit_ms_before_kill: before_kill(working_set),
        peak_page_cache_bytes: timeline.iter().map(|p| p.page_cache_bytes).max(),
        limit_hits: timeline
            .iter()
            .filter(|p| p.kind == SampleKind::LimitHit)
            .count(),
        charge_failures: timeline
            .iter()
            .filter(|p| p.kind == SampleKind::ChargeFailed)
            .count(),
    }
}

/// Thins a timeline to at most `max` points, evenly over time, keeping the first, the last,
/// the first point of each kind (the first limit hit, the first charge failure) and the points
/// the story is told from (usage, then the working set, reaching the limit).
pub fn thin(timeline: Vec<Point>, max: usize, page_size: u64) -> Vec<Point> {
    if timeline.len() <= max || max < 8 {
        return timeline;
    }
    let (usage_at_limit, working_set_at_limit) = turning_points(&timeline, page_size);
    let mut firsts: Vec<usize> = usage_at_limit
        .into_iter()
        .chain(working_set_at_limit)
        .collect();
    for kind in [
        SampleKind::Charge,
        SampleKind::LimitHit,
        SampleKind::ChargeFailed,
    ] {
        if let Some(index) = timeline.iter().position(|p| p.kind == kind) {
            firsts.push(index);
        }
    }
    let last = timeline.len() - 1;
    let even = max - firsts.len();
    let step = last as f64 / (even - 1).max(1) as f64;
    let mut keep: Vec<usize> = (0..even)
        .map(|i| ((i as f64 * step).round() as usize).min(last))
        .chain(firsts)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    keep.into_iter().map(|i| timeline[i].clone()).collect()
}

/// Points for the tests of every stage that keeps or draws timelines.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{Point, SampleKind};

    /// A point at `ms`, in a 128 MiB cgroup, with that much usage and inactive page cache.
    pub fn point(ms: u64, usage_mib: u64, inactive_file_mib: u64, kind: SampleKind) -> Point {
        let mib = 1 << 20;
        Point {
            boot_ns: ms * 1_000_000,
            before_kill_ms: None,
            kind,
            usage_bytes: usage_mib * mib,
            limit_bytes: Some(128 * mib),
            working_set_bytes: (usage_mib - inactive_file_mib) * mib,
            page_cache_bytes: inactive_file_mib * mib,
            inactive_file_bytes: inactive_file_mib * mib,
            anon_bytes: (usage_mib - inactive_file_mib) * mib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::point, *};

    #[test]
    fn the_page_cache_story_usage_first_then_working_set() {
        // Usage reaches the limit at 500 ms while cache fills it; the cache is reclaimed as
        // anonymous memory grows; the working set reaches the limit at 900 ms; death at 1000.
        let mut timeline = vec![
            point(100, 64, 32, SampleKind::Charge),
            point(500, 128, 64, SampleKind::LimitHit),
            point(700, 128, 20, SampleKind::LimitHit),
            point(900, 128, 0, SampleKind::ChargeFailed),
        ];
        for p in &mut timeline {
            p.before_kill_ms = Some((1_000_000_000 - p.boot_ns) / 1_000_000);
        }
        let story = story(&timeline, 4096);
        assert_eq!(story.usage_at_limit_ms_before_kill, Some(500));
        assert_eq!(story.working_set_at_limit_ms_before_kill, Some(100));
        assert_eq!(story.peak_page_cache_bytes, Some(64 << 20));
        assert_eq!((story.limit_hits, story.charge_failures), (2, 1));
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_first_limit_hit() {
        let mut timeline: Vec<Point> = (0..1000)
            .map(|ms| point(ms, 1, 0, SampleKind::Charge))
            .collect();
        timeline[777].kind = SampleKind::LimitHit;
        timeline[501].usage_bytes = 128 << 20;
        let thinned = thin(timeline, 50, 4096);
        assert!(
            thinned.iter().any(|p| p.boot_ns == 501_000_000),
            "usage reached the limit"
        );
        assert!(thinned.len() <= 50, "{}", thinned.len());
        assert_eq!(thinned.first().map(|p| p.boot_ns), Some(0));
        assert_eq!(thinned.last().map(|p| p.boot_ns), Some(999_000_000));
        assert!(thinned.iter().any(|p| p.kind == SampleKind::LimitHit));
        assert!(thinned.windows(2).all(|w| w[0].boot_ns < w[1].boot_ns));
    }
}
