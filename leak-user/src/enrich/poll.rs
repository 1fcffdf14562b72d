//! The cgroup filesystem's view of watched cgroups, every few seconds: live series for cgroups
//! the charge path has not sampled lately (with the tracepoint modes it samples only at limit
//! hits), and coarse points before the limit in their timelines. Reading memory.stat also
//! flushes the kernel's statistics.

use std::{fs, ops::ControlFlow, os::unix::fs::MetadataExt, path::Path};

use leak_common::layout::stat;

use super::cgroupfs::{walk, Version};
use crate::model::{
    kill::Breakdown,
    memory::{is_unlimited_bytes, working_set_bytes},
    timeline::{Point, SampleKind},
};

/// One limited cgroup as its files show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Polled {
    /// The inode of its directory.
    pub id: u64,
    pub point: Point,
    /// What fills it, from `memory.stat`.
    pub breakdown: Breakdown,
}

/// The figure `name` of a `memory.stat` text, hierarchical: v1 lists the cgroup's own counters
/// and then `total_` ones; v2's are hierarchical already.
fn stat_field(stat: &str, version: Version, name: &str) -> Option<u64> {
    let wanted = match version {
        Version::V1 => format!("total_{name}"),
        Version::V2 => name.to_owned(),
    };
    stat.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == wanted).then(|| value.trim().parse().ok()).flatten()
    })
}

/// What fills a cgroup, from its `memory.stat` (bytes); `None` for what that version does
/// not print.
pub fn read_breakdown(stat: &str, version: Version) -> Breakdown {
    let mut items = [None; stat::COUNT];
    for (item, (v2, v1)) in items.iter_mut().zip(stat::MEMORY_STAT_NAMES) {
        let name = match version {
            Version::V1 => v1,
            Version::V2 => v2,
        };
        *item = name.and_then(|name| stat_field(stat, version, name));
    }
    Breakdown::from_items(items)
}

/// A cgroup's memory as its files show it; `None` when it has no limit or is gone.
pub fn read_point(dir: &Path, version: Version, boot_ns: u64, page_size: u64) -> Option<Point> {
    read_polled(dir, version, boot_ns, page_size).map(|(point, _)| point)
}

fn read_polled(
    dir: &Path,
    version: Version,
    boot_ns: u64,
    page_size: u64,
) -> Option<(Point, Breakdown)> {
    let number = |file: &str| -> Option<u64> {
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    };
    // "max" on v2 does not parse: no limit.
    let limit = number(version.limit_file())?;
    if is_unlimited_bytes(limit, page_size) {
        return None;
    }
    let usage = number(version.usage_file())?;
    let stat = fs::read_to_string(dir.join("memory.stat")).ok()?;
    let field = |name: &str| stat_field(&stat, version, name).unwrap_or(0);
    let inactive_file = field("inactive_file");
    let point = Point {
        boot_ns,
        before_kill_ms: None,
        kind: SampleKind::Poll,
        usage_bytes: usage,
        limit_bytes: Some(limit),
        working_set_bytes: working_set_bytes(usage, inactive_file),
        page_cache_bytes: inactive_file + field("active_file"),
        inactive_file_bytes: inactive_file,
        anon_bytes: field("inactive_anon") + field("active_anon"),
    };
    Some((point, read_breakdown(&stat, version)))
}

/// Every cgroup with a memory limit below `root` (at most `max`).
pub fn poll_limited(
    root: &Path,
    version: Version,
    boot_ns: u64,
    page_size: u64,
    max: usize,
) -> Vec<Polled> {
    let mut found = Vec::new();
    walk(root, |dir, metadata| {
        if found.len() >= max {
            return ControlFlow::Break(());
        }
        if let Some((point, breakdown)) = read_polled(dir, version, boot_ns, page_size) {
            found.push(Polled {
                id: metadata.ino(),
                point,
                breakdown,
            });
        }
        ControlFlow::Continue(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, files: &[(&str, &str)]) {
        fs::create_dir_all(dir).unwrap();
        for (name, content) in files {
            fs::write(dir.join(name), content).unwrap();
        }
    }

    #[test]
    fn reads_v1_and_v2_cgroups_with_a_limit_only() {
        let root = std::env::temp_dir().join(format!("leak-poll-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake(&root.join("v2"), &[
            ("memory.max", "134217728\n"),
            ("memory.current", "100000000\n"),
            ("memory.stat", "anon 60000000\nfile 40000000\nshmem 1000\nslab_unreclaimable 2000\ninactive_anon 50000000\nactive_anon 10000000\ninactive_file 30000000\nactive_file 10000000\n"),
        ]);
        fake(
            &root.join("v2/unlimited"),
            &[
                ("memory.max", "max\n"),
                ("memory.current", "5\n"),
                ("memory.stat", ""),
            ],
        );
        fake(&root.join("v1"), &[
            ("memory.limit_in_bytes", "67108864\n"),
            ("memory.usage_in_bytes", "67000000\n"),
            ("memory.stat", "inactive_file 1\ntotal_inactive_file 7000000\ntotal_active_file 0\ntotal_inactive_anon 60000000\ntotal_active_anon 0\n"),
        ]);
        let v2 = read_point(&root.join("v2"), Version::V2, 5, 4096).expect("limited v2 cgroup");
        assert_eq!(v2.working_set_bytes, 70_000_000);
        assert_eq!(v2.page_cache_bytes, 40_000_000);
        assert_eq!(v2.anon_bytes, 60_000_000);
        assert_eq!(v2.kind, SampleKind::Poll);
        assert!(read_point(&root.join("v2/unlimited"), Version::V2, 5, 4096).is_none());
        let v1 = read_point(&root.join("v1"), Version::V1, 5, 4096).expect("limited v1 cgroup");
        assert_eq!(
            v1.inactive_file_bytes, 7_000_000,
            "hierarchical total_ figures on v1"
        );
        let polled = poll_limited(&root.join("v2"), Version::V2, 5, 4096, 10);
        assert_eq!(polled.len(), 1);
        let breakdown = &polled[0].breakdown;
        assert_eq!(breakdown.anon_bytes, Some(60_000_000));
        assert_eq!(breakdown.shmem_bytes, Some(1000));
        assert_eq!(breakdown.slab_unreclaimable_bytes, Some(2000));
        assert_eq!(breakdown.swap_bytes, None, "v2 has no swap in memory.stat");
        assert_eq!(breakdown.sock_bytes, None, "not in this file");
        assert_eq!(
            poll_limited(&root.join("v2"), Version::V2, 5, 4096, 0).len(),
            0
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
