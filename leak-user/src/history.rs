//! The seconds before death: a bounded history of charge-path samples per memory cgroup, and
//! the live view of the watched cgroups built from it.

use std::collections::{HashMap, VecDeque};

use leak_common::sample::{kind, ChargeSample};
use serde::Serialize;

use crate::events::working_set_bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error("sample of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("unknown sample kind {0}")]
    UnknownKind(u32),
}

/// Why a sample was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    Charge,
    LimitHit,
    ChargeFailed,
    /// The kill's own snapshot, ending a kill's timeline.
    Kill,
    /// Read from the cgroup filesystem by the agent (every few seconds).
    Poll,
}

impl TryFrom<u32> for SampleKind {
    type Error = SampleError;
    fn try_from(tag: u32) -> Result<Self, SampleError> {
        match tag {
            kind::CHARGE => Ok(Self::Charge),
            kind::LIMIT_HIT => Ok(Self::LimitHit),
            kind::CHARGE_FAILED => Ok(Self::ChargeFailed),
            other => Err(SampleError::UnknownKind(other)),
        }
    }
}

/// Copies a ring buffer record into a [`ChargeSample`], checking its size and kind.
pub fn decode_sample(bytes: &[u8]) -> Result<ChargeSample, SampleError> {
    let expected = size_of::<ChargeSample>();
    if bytes.len() != expected {
        return Err(SampleError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked; ChargeSample is plain old data (every bit pattern valid);
    // read_unaligned copes with any alignment.
    let sample = unsafe { bytes.as_ptr().cast::<ChargeSample>().read_unaligned() };
    SampleKind::try_from(sample.kind)?;
    Ok(sample)
}

/// One point of a cgroup's timeline, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

impl Point {
    pub fn from_sample(sample: &ChargeSample, page_size: u64) -> Self {
        let usage_bytes = sample.usage_pages * page_size;
        let inactive_file_bytes = sample.inactive_file_pages * page_size;
        let unlimited = sample.limit_pages >= (i64::MAX as u64) / page_size;
        Self {
            boot_ns: sample.boot_ns,
            before_kill_ms: None,
            kind: SampleKind::try_from(sample.kind).unwrap_or(SampleKind::Charge),
            usage_bytes,
            limit_bytes: (!unlimited).then_some(sample.limit_pages * page_size),
            working_set_bytes: working_set_bytes(usage_bytes, inactive_file_bytes),
            page_cache_bytes: (sample.inactive_file_pages + sample.active_file_pages) * page_size,
            inactive_file_bytes,
            anon_bytes: sample.anon_pages * page_size,
        }
    }
}

/// Bounded per-cgroup history: at most `window_ns` of samples, at most `max_points` per cgroup,
/// at most `max_cgroups` cgroups (the least recently sampled one is dropped first).
#[derive(Debug)]
pub struct History {
    window_ns: u64,
    max_points: usize,
    max_cgroups: usize,
    by_cgroup: HashMap<u64, VecDeque<Point>>,
    /// When each cgroup last saw a kill: a timeline starts after the previous OOM.
    last_kill: HashMap<u64, u64>,
}

/// Kills this close together are one OOM (a group kill marks its members one by one).
const SAME_OOM_NS: u64 = 1_000_000_000;

impl History {
    pub fn new(window_ns: u64, max_points: usize, max_cgroups: usize) -> Self {
        Self {
            window_ns,
            max_points: max_points.max(1),
            max_cgroups: max_cgroups.max(1),
            by_cgroup: HashMap::new(),
            last_kill: HashMap::new(),
        }
    }

    /// Records an OOM kill in `cgroup_id` at `boot_ns`; later timelines of the cgroup start
    /// after it, so one OOM's story does not borrow the previous one's.
    pub fn mark_kill(&mut self, cgroup_id: u64, boot_ns: u64) {
        let previous = self.last_kill.insert(cgroup_id, boot_ns);
        // Keep the first kill of a burst: the members of one group kill share a timeline.
        if let Some(previous) = previous {
            if boot_ns.saturating_sub(previous) < SAME_OOM_NS {
                self.last_kill.insert(cgroup_id, previous);
            }
        }
    }

    pub fn record(&mut self, cgroup_id: u64, point: Point) {
        if !self.by_cgroup.contains_key(&cgroup_id) && self.by_cgroup.len() >= self.max_cgroups {
            let oldest = self
                .by_cgroup
                .iter()
                .min_by_key(|(_, points)| points.back().map_or(0, |p| p.boot_ns))
                .map(|(&id, _)| id);
            if let Some(oldest) = oldest {
                self.by_cgroup.remove(&oldest);
            }
        }
        let points = self.by_cgroup.entry(cgroup_id).or_default();
        let newest = point.boot_ns;
        points.push_back(point);
        while points.len() > self.max_points
            || points
                .front()
                .is_some_and(|p| newest.saturating_sub(p.boot_ns) > self.window_ns)
        {
            points.pop_front();
        }
    }

    /// The cgroup's points up to `until_boot_ns`, oldest first, each marked with how long
    /// before that moment it was taken.
    pub fn timeline(&self, cgroup_id: u64, until_boot_ns: u64) -> Vec<Point> {
        let since = self
            .last_kill
            .get(&cgroup_id)
            .copied()
            .filter(|&kill| kill + SAME_OOM_NS <= until_boot_ns)
            .unwrap_or(0);
        self.by_cgroup
            .get(&cgroup_id)
            .into_iter()
            .flatten()
            .filter(|p| {
                p.boot_ns > since
                    && p.boot_ns <= until_boot_ns
                    && until_boot_ns - p.boot_ns <= self.window_ns
            })
            .map(|p| Point {
                before_kill_ms: Some((until_boot_ns - p.boot_ns) / 1_000_000),
                ..p.clone()
            })
            .collect()
    }

    /// The newest point of every cgroup.
    pub fn latest(&self) -> impl Iterator<Item = (u64, &Point)> {
        self.by_cgroup
            .iter()
            .filter_map(|(&id, points)| points.back().map(|p| (id, p)))
    }

    /// Drops cgroups whose newest point is older than `idle_ns` at `now_boot_ns`; returns them.
    pub fn expire(&mut self, now_boot_ns: u64, idle_ns: u64) -> Vec<u64> {
        let expired: Vec<u64> = self
            .by_cgroup
            .iter()
            .filter(|(_, points)| {
                points
                    .back()
                    .is_none_or(|p| now_boot_ns.saturating_sub(p.boot_ns) > idle_ns)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &expired {
            self.by_cgroup.remove(id);
            self.last_kill.remove(id);
        }
        expired
    }
}

/// At most this many points of a timeline travel with a kill (kills are kept, up to
/// `--max-kills`, with their timelines: this bounds the agent's memory).
pub const MAX_KILL_TIMELINE_POINTS: usize = 300;

/// Thins a timeline to at most `max` points, evenly over time, keeping the first, the last,
/// the first point of each kind (the first limit hit, the first charge failure) and the points
/// the story is told from (usage, then the working set, reaching the limit).
pub fn thin(timeline: Vec<Point>, max: usize) -> Vec<Point> {
    if timeline.len() <= max || max < 8 {
        return timeline;
    }
    let (usage_at_limit, working_set_at_limit) = turning_points(&timeline);
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

/// What a timeline says about the road to the kill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Story {
    /// First moment usage was at the limit (within one huge page), ms before the kill.
    pub usage_at_limit_ms_before_kill: Option<u64>,
    /// First moment the working set was, ms before the kill.
    pub working_set_at_limit_ms_before_kill: Option<u64>,
    /// The most page cache seen in the window, and the least at the limit.
    pub peak_page_cache_bytes: Option<u64>,
    pub limit_hits: usize,
    pub charge_failures: usize,
}

/// A charge can ask for up to a huge page: "at the limit" means within that.
const AT_LIMIT_SLACK_BYTES: u64 = 2 << 20;

/// The first points where usage, and where the working set, reached the limit.
fn turning_points(timeline: &[Point]) -> (Option<usize>, Option<usize>) {
    let at_limit = |value: u64, point: &Point| {
        point.limit_bytes.is_some_and(|limit| {
            value.saturating_add(AT_LIMIT_SLACK_BYTES.min(limit / 16)) >= limit
        })
    };
    (
        timeline.iter().position(|p| at_limit(p.usage_bytes, p)),
        timeline
            .iter()
            .position(|p| at_limit(p.working_set_bytes, p)),
    )
}

pub fn story(timeline: &[Point]) -> Story {
    let (usage, working_set) = turning_points(timeline);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ms: u64, usage_mib: u64, inactive_file_mib: u64, kind: SampleKind) -> Point {
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

    #[test]
    fn keeps_a_bounded_window_per_cgroup() {
        let mut history = History::new(1_000_000_000, 100, 10);
        for ms in 0..3000 {
            history.record(7, point(ms, 1, 0, SampleKind::Charge));
        }
        let timeline = history.timeline(7, 2999 * 1_000_000);
        assert_eq!(timeline.len(), 100, "bounded by points");
        assert_eq!(timeline.last().and_then(|p| p.before_kill_ms), Some(0));
        let mut history = History::new(1_000_000_000, 100_000, 10);
        for ms in 0..3000 {
            history.record(7, point(ms, 1, 0, SampleKind::Charge));
        }
        let timeline = history.timeline(7, 2999 * 1_000_000);
        assert_eq!(
            timeline.first().map(|p| p.boot_ns),
            Some(1999 * 1_000_000),
            "bounded by time"
        );
        assert!(history.timeline(8, u64::MAX).is_empty());
    }

    #[test]
    fn evicts_the_least_recently_sampled_cgroup() {
        let mut history = History::new(u64::MAX, 10, 2);
        history.record(1, point(10, 1, 0, SampleKind::Charge));
        history.record(2, point(20, 1, 0, SampleKind::Charge));
        history.record(1, point(30, 1, 0, SampleKind::Charge));
        history.record(3, point(40, 1, 0, SampleKind::Charge));
        let mut ids: Vec<u64> = history.latest().map(|(id, _)| id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 3]);
        assert!(history.expire(300_000_000, 500_000_000).is_empty());
        let mut expired = history.expire(10_000_000_000, 500_000_000);
        expired.sort_unstable();
        assert_eq!(expired, vec![1, 3]);
    }

    #[test]
    fn the_page_cache_story_usage_first_then_working_set() {
        // Usage reaches the limit at 500 ms while cache fills it; the cache is reclaimed as
        // anonymous memory grows; the working set reaches the limit at 900 ms; death at 1000.
        let mut history = History::new(u64::MAX, 1000, 10);
        history.record(1, point(100, 64, 32, SampleKind::Charge));
        history.record(1, point(500, 128, 64, SampleKind::LimitHit));
        history.record(1, point(700, 128, 20, SampleKind::LimitHit));
        history.record(1, point(900, 128, 0, SampleKind::ChargeFailed));
        let timeline = history.timeline(1, 1_000_000_000);
        let story = story(&timeline);
        assert_eq!(story.usage_at_limit_ms_before_kill, Some(500));
        assert_eq!(story.working_set_at_limit_ms_before_kill, Some(100));
        assert_eq!(story.peak_page_cache_bytes, Some(64 << 20));
        assert_eq!((story.limit_hits, story.charge_failures), (2, 1));
    }

    #[test]
    fn a_timeline_starts_after_the_previous_kill() {
        let mut history = History::new(u64::MAX, 1000, 10);
        history.record(1, point(100, 64, 0, SampleKind::Charge));
        history.mark_kill(1, 200_000_000);
        // A second member of the same group kill still sees the shared timeline.
        history.mark_kill(1, 300_000_000);
        assert_eq!(history.timeline(1, 300_000_000).len(), 1);
        history.record(1, point(5000, 10, 0, SampleKind::Charge));
        history.record(1, point(6000, 20, 0, SampleKind::Charge));
        let timeline = history.timeline(1, 7_000_000_000);
        assert_eq!(timeline.len(), 2, "only the points after the first OOM");
        assert_eq!(timeline[0].boot_ns, 5_000_000_000);
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_first_limit_hit() {
        let mut timeline: Vec<Point> = (0..1000)
            .map(|ms| point(ms, 1, 0, SampleKind::Charge))
            .collect();
        timeline[777].kind = SampleKind::LimitHit;
        timeline[501].usage_bytes = 128 << 20;
        let thinned = thin(timeline, 50);
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

    #[test]
    fn decodes_samples_and_rejects_garbage() {
        let sample = ChargeSample {
            boot_ns: 1,
            cgroup_id: 2,
            usage_pages: 3,
            limit_pages: 4,
            inactive_file_pages: 1,
            active_file_pages: 1,
            anon_pages: 1,
            kind: kind::LIMIT_HIT,
            source: 1,
        };
        // SAFETY: reading the bytes of a plain-old-data value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&sample as *const ChargeSample).cast::<u8>(),
                size_of::<ChargeSample>(),
            )
        };
        assert_eq!(decode_sample(bytes), Ok(sample));
        assert!(decode_sample(&bytes[1..]).is_err());
        let mut bad = sample;
        bad.kind = 77;
        // SAFETY: as above.
        let bad_bytes = unsafe {
            std::slice::from_raw_parts(
                (&bad as *const ChargeSample).cast::<u8>(),
                size_of::<ChargeSample>(),
            )
        };
        assert_eq!(decode_sample(bad_bytes), Err(SampleError::UnknownKind(77)));
        let point = Point::from_sample(&sample, 4096);
        assert_eq!(point.working_set_bytes, 2 * 4096);
        assert_eq!(point.page_cache_bytes, 2 * 4096);
    }
}
