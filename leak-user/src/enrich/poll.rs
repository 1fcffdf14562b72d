//! The cgroup filesystem's view of watched cgroups, every few seconds: live series for cgroups
//! the charge path has not sampled lately (with the tracepoint modes it samples only at limit
//! hits), and coarse points before the limit in their timelines. Reading memory.stat also
//! flushes the kernel's statistics.

use std::{fs, ops::ControlFlow, os::unix::fs::MetadataExt, path::Path};

use super::cgroupfs::{walk, Version};
use crate::model::{
    memory::{is_unlimited_bytes, working_set_bytes},
    timeline::{Point, SampleKind},
};

/// A cgroup's memory as its files show it; `None` when it has no limit or is gone.
pub fn read_point(dir: &Path, version: Version, boot_ns: u64, page_size: u64) -> Option<Point> {
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
    // v1 lists this cgroup's own counters and then hierarchical `total_` ones; v2's are
    // hierarchical already.
    let field = |name: &str| -> u64 {
        let wanted = match version {
            Version::V1 => format!("total_{name}"),
            Version::V2 => name.to_owned(),
        };
        stat.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == wanted).then(|| value.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    };
    let inactive_file = field("inactive_file");
    Some(Point {
        boot_ns,
        before_kill_ms: None,
        kind: SampleKind::Poll,
        usage_bytes: usage,
        limit_bytes: Some(limit),
        working_set_bytes: working_set_bytes(usage, inactive_file),
        page_cache_bytes: inactive_file + field("active_file"),
        inactive_file_bytes: inactive_file,
        anon_bytes: field("inactive_anon") + field("active_anon"),
    })
}

/// Every cgroup with a memory limit below `root` (at most `max`), as (id, point).
pub fn poll_limited(
    root: &Path,
    version: Version,
    boot_ns: u64,
    page_size: u64,
    max: usize,
) -> Vec<(u64, Point)> {
    let mut found = Vec::new();
    walk(root, |dir, metadata| {
        if found.len() >= max {
            return ControlFlow::Break(());
        }
        if let Some(point) = read_point(dir, version, boot_ns, page_size) {
            found.push((metadata.ino(), point));
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
            ("memory.stat", "anon 60000000\nfile 40000000\ninactive_anon 50000000\nactive_anon 10000000\ninactive_file 30000000\nactive_file 10000000\n"),
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
        assert_eq!(
            poll_limited(&root.join("v2"), Version::V2, 5, 4096, 10).len(),
            1
        );
        assert_eq!(
            poll_limited(&root.join("v2"), Version::V2, 5, 4096, 0).len(),
            0
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
