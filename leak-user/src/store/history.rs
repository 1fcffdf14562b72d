//! The seconds before death: a bounded history of points per memory cgroup (from the charge
//! path and the cgroupfs poll), from which each kill takes its timeline and the live series
//! are set.

use std::collections::{HashMap, VecDeque};

use crate::model::{
    kill::SAME_OOM_NS,
    timeline::{Point, Timelines},
};

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
    pub fn points_until(&self, cgroup_id: u64, until_boot_ns: u64) -> Vec<Point> {
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

    /// Every cgroup's points, oldest first.
    pub fn points(&self, cgroup_id: u64) -> impl Iterator<Item = &Point> {
        self.by_cgroup.get(&cgroup_id).into_iter().flatten()
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

impl Timelines for History {
    fn timeline(&self, cgroup_id: u64, until_boot_ns: u64) -> Vec<Point> {
        self.points_until(cgroup_id, until_boot_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::timeline::{fixtures::point, SampleKind};

    #[test]
    fn keeps_a_bounded_window_per_cgroup() {
        let mut history = History::new(1_000_000_000, 100, 10);
        for ms in 0..3000 {
            history.record(7, point(ms, 1, 0, SampleKind::Charge));
        }
        let timeline = history.points_until(7, 2999 * 1_000_000);
        assert_eq!(timeline.len(), 100, "bounded by points");
        assert_eq!(timeline.last().and_then(|p| p.before_kill_ms), Some(0));
        let mut history = History::new(1_000_000_000, 100_000, 10);
        for ms in 0..3000 {
            history.record(7, point(ms, 1, 0, SampleKind::Charge));
        }
        let timeline = history.points_until(7, 2999 * 1_000_000);
        assert_eq!(
            timeline.first().map(|p| p.boot_ns),
            Some(1999 * 1_000_000),
            "bounded by time"
        );
        assert!(history.points_until(8, u64::MAX).is_empty());
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
    fn a_timeline_starts_after_the_previous_kill() {
        let mut history = History::new(u64::MAX, 1000, 10);
        history.record(1, point(100, 64, 0, SampleKind::Charge));
        history.mark_kill(1, 200_000_000);
        // A second member of the same group kill still sees the shared timeline.
        history.mark_kill(1, 300_000_000);
        assert_eq!(history.points_until(1, 300_000_000).len(), 1);
        history.record(1, point(5000, 10, 0, SampleKind::Charge));
        history.record(1, point(6000, 20, 0, SampleKind::Charge));
        let timeline = history.points_until(1, 7_000_000_000);
        assert_eq!(timeline.len(), 2, "only the points after the first OOM");
        assert_eq!(timeline[0].boot_ns, 5_000_000_000);
    }
}
