//! The start-up cross-check of the memcg statistics indices: the kernel program reads the root
//! memory cgroup's counters through the indices resolved from BTF (run once, on this thread,
//! with `BPF_PROG_TEST_RUN`), and each must agree with what the root's `memory.stat` prints.
//! The compact index of 6.10+ follows `memcg_node_stat_items[]`, an order BTF does not carry:
//! if the kernel's order is not the one leak knows, the figures land on the wrong names, and
//! this is where that shows, before any kill is misreported.

use std::{collections::HashMap, path::Path};

use aya::{
    maps::Array,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use leak_common::{
    event::root_stats,
    layout::{stat, Layout, LRU_COUNT},
};

/// The kernel program and its output map.
const PROGRAM: &str = "root_memcg_stats";
const ROOT_STATS: &str = "ROOT_STATS";

/// The names of the LRU lists in `memory.stat`, in `LRU_*` order.
const LRU_NAMES: [&str; LRU_COUNT] = [
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
];

#[derive(Debug, thiserror::Error)]
pub enum CrossCheckError {
    #[error(
        "the memcg statistics read through the indices resolved from BTF disagree with the \
         root cgroup's memory.stat ({0}): this kernel orders its memcg statistics in a way leak \
         does not know, so every breakdown would be misreported; leak refuses to start. \
         Report it with `uname -r` and the root's memory.stat"
    )]
    Disagree(String),
    #[error("cannot run the cross-check program: {0}")]
    Program(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// The root memory cgroup's counters as the kernel program read them, raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootStats {
    pub lru: [u64; LRU_COUNT],
    pub stats: [u64; stat::COUNT],
}

/// Runs the kernel program once and returns what it read.
pub fn read_root(ebpf: &mut Ebpf) -> Result<RootStats, CrossCheckError> {
    let failed = |what: &str, err: &dyn std::fmt::Display| {
        CrossCheckError::Program(format!("{what}: {err}"))
    };
    let program: &mut RawTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| failed(PROGRAM, &"not in the BPF object"))?
        .try_into()
        .map_err(|err| failed(PROGRAM, &err))?;
    if program.fd().is_err() {
        program.load().map_err(|err| failed("load", &err))?;
    }
    let result = program
        .test_run(RawTracePointRunOptions::new())
        .map_err(|err| failed("BPF_PROG_TEST_RUN", &err))?;
    if result.return_value != 0 {
        return Err(failed(PROGRAM, &"the root memory cgroup was not reached"));
    }
    let map = ebpf
        .map(ROOT_STATS)
        .ok_or_else(|| failed(ROOT_STATS, &"not in the BPF object"))?;
    let array: Array<_, u64> = Array::try_from(map).map_err(|err| failed(ROOT_STATS, &err))?;
    let slot = |index: u32| array.get(&index, 0).map_err(|err| failed(ROOT_STATS, &err));
    if slot(root_stats::FOUND)? != 1 {
        return Err(failed(PROGRAM, &"the root memory cgroup was not read"));
    }
    let mut root = RootStats::default();
    for (lru, value) in root.lru.iter_mut().enumerate() {
        *value = slot(root_stats::LRU + lru as u32)?;
    }
    for (item, value) in root.stats.iter_mut().enumerate() {
        *value = slot(root_stats::STATS + item as u32)?;
    }
    Ok(root)
}

/// `memory.stat` as name -> bytes.
pub fn parse_memory_stat(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name, value.trim().parse().ok()?))
        })
        .collect()
}

/// The bytes `memory.stat` shows for an item: v1's hierarchical `total_<v1>` first, then the
/// v2 name.
fn shown(stat: &HashMap<&str, u64>, v2: Option<&str>, v1: Option<&str>) -> Option<u64> {
    v1.and_then(|name| stat.get(format!("total_{name}").as_str()).copied())
        .or_else(|| v2.and_then(|name| stat.get(name).copied()))
}

/// Compares what the kernel program read with `memory.stat` read just before and just after
/// it (the root moves in between): each figure must lie between the two readings, give or
/// take `slack_bytes` plus 2% (the statistics flush batches per CPU). Returns how many figures
/// were compared.
pub fn compare(
    layout: &Layout,
    root: &RootStats,
    before: &str,
    after: &str,
    page_size: u64,
    slack_bytes: u64,
) -> Result<usize, CrossCheckError> {
    let (before, after) = (parse_memory_stat(before), parse_memory_stat(after));
    let mut figures: Vec<(String, u64, Option<&str>, Option<&str>)> = Vec::new();
    for (lru, name) in LRU_NAMES.iter().enumerate() {
        let bytes = root.lru[lru].saturating_mul(page_size);
        figures.push(((*name).to_owned(), bytes, Some(name), Some(name)));
    }
    for (item, &(v2, v1)) in stat::MEMORY_STAT_NAMES.iter().enumerate() {
        if layout.stat_index[item] == Layout::ABSENT {
            continue;
        }
        let value = root.stats[item];
        let bytes = match stat::UNITS[item] {
            stat::unit::BYTES => value,
            stat::unit::KIB => value.saturating_mul(1024),
            _ => value.saturating_mul(page_size),
        };
        let name = v2.or(v1).unwrap_or("?").to_owned();
        figures.push((name, bytes, v2, v1));
    }
    let mut compared = 0;
    let mut disagree = Vec::new();
    for (name, ours, v2, v1) in figures {
        let (Some(first), Some(second)) = (shown(&before, v2, v1), shown(&after, v2, v1)) else {
            continue;
        };
        let slack = slack_bytes.saturating_add(first.max(second) / 50);
        let low = first.min(second).saturating_sub(slack);
        let high = first.max(second).saturating_add(slack);
        if !(low..=high).contains(&ours) {
            disagree.push(format!(
                "{name}: read {ours}, memory.stat {first}..{second}"
            ));
        }
        compared += 1;
    }
    if disagree.is_empty() {
        Ok(compared)
    } else {
        Err(CrossCheckError::Disagree(disagree.join("; ")))
    }
}

/// Runs the cross-check against `memory_stat` (the root's), a few times before concluding that
/// a disagreement is not the root moving under a busy machine. Returns how many figures agreed.
pub fn cross_check(
    ebpf: &mut Ebpf,
    layout: &Layout,
    memory_stat: &Path,
    page_size: u64,
) -> Result<usize, CrossCheckError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // The statistics flush threshold: one charge batch (64 pages) per CPU.
    let slack = 64 * page_size * cpus;
    let read = || {
        std::fs::read_to_string(memory_stat).map_err(|source| CrossCheckError::Read {
            path: memory_stat.display().to_string(),
            source,
        })
    };
    let mut last = None;
    for _ in 0..3 {
        // Reading memory.stat flushes the statistics, so the program reads fresh ones.
        let before = read()?;
        let root = read_root(ebpf)?;
        let after = read()?;
        match compare(layout, &root, &before, &after, page_size, slack) {
            Ok(compared) => return Ok(compared),
            Err(err) => last = Some(err),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(last.unwrap_or_else(|| CrossCheckError::Program("no attempt ran".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// A v2 root's memory.stat (the items the check reads, from a 6.12 VM).
    const V2: &str = "anon 66809856\nfile 8192000\nkernel 4000000\nkernel_stack 327680\n\
        pagetables 204800\nsec_pagetables 0\npercpu 1000000\nsock 0\nvmalloc 0\nshmem 409600\n\
        file_mapped 12288\nfile_dirty 8192\nfile_writeback 0\nswapcached 0\nanon_thp 0\n\
        inactive_anon 1048576\nactive_anon 66170880\ninactive_file 4096000\n\
        active_file 4096000\nunevictable 0\nslab_reclaimable 700000\n\
        slab_unreclaimable 1700000\nslab 2400000\nworkingset_refault_anon 0\n";

    /// Every item, as the kernel would keep it for [`V2`].
    fn matching() -> (Layout, RootStats) {
        let layout = Layout {
            stat_index: [0; stat::COUNT],
            ..Layout::default()
        };
        let root = RootStats {
            lru: [256, 16155, 1000, 1000, 0],
            stats: [
                66809856 / PAGE,
                8192000 / PAGE,
                409600 / PAGE,
                2,
                0,
                700000,
                1700000,
                320,
                50,
                0,
                1000000,
                0,
            ],
        };
        (layout, root)
    }

    #[test]
    fn agrees_when_every_figure_matches() {
        let (layout, root) = matching();
        let compared = compare(&layout, &root, V2, V2, PAGE, 64 * PAGE).expect("agrees");
        assert_eq!(compared, 5 + 11, "the LRU lists and every v2 item but swap");
    }

    #[test]
    fn catches_an_index_one_off() {
        // What an index one slot off in the compact order reads: anon gets file_mapped's value,
        // kernel_stack gets pagetables'.
        let (layout, mut root) = matching();
        root.stats[stat::ANON] = 12288 / PAGE;
        root.stats[stat::KERNEL_STACK] = 50;
        let err = compare(&layout, &root, V2, V2, PAGE, 64 * PAGE).expect_err("disagrees");
        let text = err.to_string();
        assert!(text.contains("anon: read 12288"), "{text}");
        assert!(text.contains("kernel_stack: read 51200"), "{text}");
        assert!(text.contains("refuses to start"), "{text}");
    }

    #[test]
    fn allows_the_root_to_move_between_readings() {
        let (layout, mut root) = matching();
        let after = V2.replace("anon 66809856", "anon 76809856");
        root.stats[stat::ANON] = 70000000 / PAGE;
        compare(&layout, &root, V2, &after, PAGE, 64 * PAGE).expect("within the two readings");
    }

    #[test]
    fn reads_v1_totals() {
        let (mut layout, mut root) = matching();
        layout.stat_index[stat::SLAB_RECLAIMABLE] = Layout::ABSENT;
        root.stats[stat::SWAP] = 3;
        let v1 = "rss 1\ncache 2\ntotal_rss 66809856\ntotal_cache 8192000\ntotal_shmem 409600\n\
            total_dirty 8192\ntotal_writeback 0\ntotal_swap 12288\ntotal_inactive_anon 1048576\n\
            total_active_anon 66170880\ntotal_inactive_file 4096000\n\
            total_active_file 4096000\ntotal_unevictable 0\ninactive_anon 5\n";
        let compared = compare(&layout, &root, v1, v1, PAGE, 64 * PAGE).expect("agrees");
        assert_eq!(
            compared,
            5 + 6,
            "the LRU lists, rss, cache, shmem, dirty, writeback, swap"
        );
        root.stats[stat::FILE] = root.stats[stat::SHMEM];
        assert!(compare(&layout, &root, v1, v1, PAGE, 64 * PAGE).is_err());
    }
}
