//! The kernel's own count of OOM kills per memory cgroup: `oom_kill` of `memory.events.local`
//! on cgroup v2 (the cgroup's own tasks; `memory.events` adds its descendants') and of
//! `memory.oom_control` on v1 (its own tasks). Compared between the agent's last view and a
//! start, it counts the kills that happened while no agent watched.

use std::{ops::ControlFlow, path::Path};

use super::cgroupfs::{walk, Version};
use crate::model::kill::{KernelKillCount as Counted, KernelKillCounts as Counters};

/// The file holding a cgroup's own `oom_kill`.
pub fn counter_file(version: Version) -> &'static str {
    match version {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events.local",
    }
}

/// `oom_kill N` of a `memory.events(.local)` or `memory.oom_control` text.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// Reads every memory cgroup's counter under `root` (cgroups without the file are left out).
pub fn read_all(root: &Path, version: Version, boot_ns: impl Fn() -> u64) -> Counters {
    let mut counters = Counters::new();
    walk(root, |dir, _| {
        let read_boot_ns = boot_ns();
        if let Some(oom_kill) = std::fs::read_to_string(dir.join(counter_file(version)))
            .ok()
            .as_deref()
            .and_then(parse_oom_kill)
        {
            let path = dir.strip_prefix(root).map_or_else(
                |_| "/".to_owned(),
                |rel| format!("/{}", rel.to_string_lossy()),
            );
            counters.insert(
                path,
                Counted {
                    oom_kill,
                    read_boot_ns,
                },
            );
        }
        ControlFlow::Continue(())
    });
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_versions() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v1), Some(3));
        assert_eq!(parse_oom_kill(v2), Some(2));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn reads_a_tree() {
        let root = std::env::temp_dir().join(format!("leak-kernel-kills-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/memory.events.local"), "oom 1\noom_kill 1\n").expect("write");
        std::fs::write(root.join("a/b/memory.events.local"), "oom_kill 4\n").expect("write");
        let counters = read_all(&root, Version::V2, || 7);
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(counters.get("/a").map(|c| c.oom_kill), Some(1));
        assert_eq!(counters.get("/a/b").map(|c| c.oom_kill), Some(4));
        assert_eq!(counters.get("/a/b").map(|c| c.read_boot_ns), Some(7));
        assert!(!counters.contains_key("/"));
    }
}
