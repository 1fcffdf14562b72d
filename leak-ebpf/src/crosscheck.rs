//! The start-up cross-check: userspace runs this program once on its own thread
//! (`BPF_PROG_TEST_RUN`, never attached) to read the root memory cgroup's statistics through the
//! indices it resolved, and compares them with the root's `memory.stat`. A wrong index (the
//! compact memcg index of 6.10+ follows an order BTF does not carry) shows there before any
//! kill is misreported.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use leak_common::{
    event::root_stats,
    layout::{stat, LRU_COUNT},
};

use crate::{
    kernel::{current_memcg, layout, memcg_state, parent_memcg, state_item},
    maps::ROOT_STATS,
};

/// Deeper than any cgroup tree leak runs in.
const MAX_NESTING: usize = 32;

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn root_memcg_stats(_ctx: RawTracePointContext) -> i32 {
    match read_root() {
        Some(()) => 0,
        None => 1,
    }
}

#[inline(always)]
fn store(slot: u32, value: u64) {
    if let Some(entry) = ROOT_STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from the map lookup; userspace reads it only after the run.
        unsafe { *entry = value };
    }
}

fn read_root() -> Option<()> {
    let mut memcg = current_memcg();
    for _ in 0..MAX_NESTING {
        let parent = parent_memcg(memcg);
        if parent == 0 {
            break;
        }
        memcg = parent;
    }
    if memcg == 0 || parent_memcg(memcg) != 0 {
        return None;
    }
    let state = memcg_state(memcg)?;
    for lru in 0..LRU_COUNT {
        let value = state_item(state, layout!(lru_stat_index[lru])).unwrap_or(0);
        store(root_stats::LRU + lru as u32, value);
    }
    for item in 0..stat::COUNT {
        let value = state_item(state, layout!(stat_index[item])).unwrap_or(0);
        store(root_stats::STATS + item as u32, value);
    }
    store(root_stats::FOUND, 1);
    Some(())
}
