//! The record a kernel program writes to the ring buffer for every OOM victim.

use crate::layout::{memory_event, stat, LRU_COUNT};

/// How many memory cgroups, from the victim's own up towards the root, a snapshot carries.
pub const MAX_CGROUP_DEPTH: usize = 8;
/// How many levels above the chain the kernel looks for the cgroup that hit its limit: 32
/// levels in all, far deeper than real hierarchies nest (Kubernetes nests 4 or 5, systemd
/// slices 3 or 4). Each level is one call of a separately verified step function, so the
/// bound costs the verifier little.
pub const MAX_ANCESTOR_SEARCH: usize = 24;
/// Length of the kernfs leaf name kept per cgroup (longer names are truncated).
pub const CGROUP_NAME_LEN: usize = 128;
pub const TASK_COMM_LEN: usize = 16;

/// Which program produced the event (`u32` tag, decoded with `TryFrom` in userspace).
pub mod hook {
    pub const TP_BTF_MARK_VICTIM: u32 = 1;
    pub const TRACEPOINT_MARK_VICTIM: u32 = 2;
}

/// `OomKillEvent::flags` bits.
pub mod flags {
    /// The `oom_control` of the kill was captured (fentry/kprobe on `oom_kill_process`).
    pub const HAS_OOM_CONTROL: u32 = 1 << 0;
    /// The victim's `task_struct` was found; otherwise the cgroup chain is the triggering
    /// task's and the victim fields other than the pid are unknown.
    pub const VICTIM_TASK: u32 = 1 << 1;
    /// `rss_*` are valid (the victim still had an `mm`).
    pub const RSS_VALID: u32 = 1 << 2;
    /// `oom_score_adj` is valid.
    pub const OOM_SCORE_ADJ_VALID: u32 = 1 << 3;
    /// `failcnt` of each cgroup is valid (the kernel keeps it).
    pub const FAILCNT_VALID: u32 = 1 << 4;
    /// The cgroup chain stopped early because a pointer could not be read.
    pub const CHAIN_TRUNCATED: u32 = 1 << 5;
    /// `victim_ns_pid` is valid.
    pub const NS_PID_VALID: u32 = 1 << 6;
    /// The kernel counts `failcnt` for cgroup v1 only (6.15+): on v2 it reads a stale 0.
    pub const FAILCNT_V1_ONLY: u32 = 1 << 7;
    /// The kernel's report of this OOM (`dump_header`, rate-limited to 10 per 5 s) printed the
    /// memory cgroup's statistics, flushing them first: set only where the report is hooked
    /// (with `oom_kill_process`, fentry and kprobe modes).
    pub const STATS_FLUSHED: u32 = 1 << 24;
    /// The kill witness saw this thread kill this victim just before marking it:
    /// `__oom_kill_process` was killing its process (fentry, kprobe), or this thread had just
    /// sent it the OOM killer's SIGKILL (tp_btf, tracepoint). Only `__oom_kill_process` kills,
    /// and counts `oom_kill`; without this bit, where a witness is attached, the victim was
    /// marked without a kill because it was already exiting (`task_will_free_mem`).
    pub const KILLED: u32 = 1 << 8;
    /// `oom_memcg` holds the cgroup that hit its limit, found above the `cgroups` chain: with
    /// `oom_control`, its `memcg`; without, the nearest ancestor above the chain whose usage
    /// (or memory+swap usage) is within one huge-page charge of its limit.
    pub const OOM_MEMCG: u32 = 1 << 16;
    /// `oom_memcg_level` is valid.
    pub const OOM_MEMCG_LEVEL: u32 = 1 << 17;
    /// The `memsw_*` figures of each cgroup are valid (cgroup v1 with swap accounting).
    pub const MEMSW_VALID: u32 = 1 << 18;
    /// The chain ended at the root memory cgroup.
    pub const REACHED_ROOT: u32 = 1 << 19;
    /// Without `oom_control`, the chain stopped at its depth bound and every ancestor above it,
    /// up to the root, was searched for one at its limit (so none unreported is).
    pub const ANCESTORS_SEARCHED: u32 = 1 << 20;
    /// This OOM began before every program of the reporting set was attached (userspace sets
    /// `ARMED` once they all are): its kill witness or report hook may have missed it, so
    /// [`KILLED`] and [`STATS_FLUSHED`] say nothing. Seen when an agent (or a replacement of
    /// pinned probes) attaches in the middle of an OOM.
    pub const UNARMED: u32 = 1 << 21;
}

/// One memory cgroup at the moment of the kill. Pages, not bytes: userspace multiplies by the
/// page size.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemcgSnapshot {
    /// `css.cgroup->kn->id`: the inode number of the cgroup's directory.
    pub cgroup_id: u64,
    pub usage_pages: u64,
    pub limit_pages: u64,
    pub watermark_pages: u64,
    pub failcnt: u64,
    /// Hierarchical LRU page counts, indexed by [`crate::layout::LRU_INACTIVE_ANON`]...
    pub lru_pages: [u64; LRU_COUNT],
    /// Hierarchical [`stat`] items, each in its own unit ([`stat::UNITS`]); valid where
    /// `OomKillEvent::stats_present` has its bit.
    pub stats: [u64; stat::COUNT],
    /// `memory_events[]`, by [`memory_event`]; valid where `OomKillEvent::events_present` has
    /// its bit.
    pub events: [u64; memory_event::COUNT],
    /// Kernfs leaf name, NUL-terminated unless truncated.
    pub name: [u8; CGROUP_NAME_LEN],
    /// The memory+swap `page_counter` (cgroup v1 with swap accounting); valid with
    /// [`flags::MEMSW_VALID`].
    pub memsw_usage_pages: u64,
    pub memsw_limit_pages: u64,
    pub memsw_watermark_pages: u64,
    pub memsw_failcnt: u64,
}

const _: () = assert!(
    size_of::<MemcgSnapshot>()
        == (10 + stat::COUNT + memory_event::COUNT) * 8 + CGROUP_NAME_LEN + 4 * 8
);

/// `oom_control::constraint`, `enum oom_constraint`.
pub mod constraint {
    pub const NONE: u32 = 0;
    pub const CPUSET: u32 = 1;
    pub const MEMORY_POLICY: u32 = 2;
    pub const MEMCG: u32 = 3;
}

/// A victim of the OOM killer and its memory cgroups, as read in the kernel at the kill.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomKillEvent {
    /// `bpf_ktime_get_boot_ns()` at the kill.
    pub boot_ns: u64,
    /// One of [`hook`].
    pub hook: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    pub victim_pid: u32,
    pub victim_tgid: u32,
    pub victim_comm: [u8; TASK_COMM_LEN],
    pub victim_oom_score_adj: i32,
    /// The victim process's pid (its thread group leader's) in its own pid namespace (1 for a
    /// container's main process).
    pub victim_ns_pid: u32,
    pub rss_anon_pages: u64,
    pub rss_file_pages: u64,
    pub rss_shmem_pages: u64,
    /// The task that ran the OOM killer (the one whose allocation failed).
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: [u8; TASK_COMM_LEN],
    // oom_control, valid with flags::HAS_OOM_CONTROL
    pub oc_totalpages: u64,
    pub oc_chosen_points: i64,
    /// cgroup id of `oc->memcg`, 0 for a global OOM.
    pub oc_memcg_cgroup_id: u64,
    pub oc_constraint: u32,
    pub oc_gfp_mask: u32,
    pub oc_order: i32,
    /// How many entries of `cgroups` are filled.
    pub depth: u32,
    /// Bit `i` set: `stats[i]` of every level was read (the kernel has that item).
    pub stats_present: u32,
    /// Bit `i` set: `events[i]` of every level was read.
    pub events_present: u32,
    /// Victim's memory cgroup first, then its ancestors.
    pub cgroups: [MemcgSnapshot; MAX_CGROUP_DEPTH],
    /// How many levels above the victim's cgroup `oom_memcg` is (0 would be the victim's
    /// own); valid with [`flags::OOM_MEMCG_LEVEL`].
    pub oom_memcg_level: u32,
    pub _pad_oom_memcg: u32,
    /// The cgroup that hit its limit when it is above `cgroups`; valid with
    /// [`flags::OOM_MEMCG`].
    pub oom_memcg: MemcgSnapshot,
    /// The victim task's `start_time` (0 when its task was not read): with the tid, the key of
    /// the kill, which the kernel reports once per task, whichever agent's programs saw it.
    pub victim_start_ns: u64,
}

const _: () = assert!(
    size_of::<OomKillEvent>()
        == 8 + 4 * 6
            + TASK_COMM_LEN
            + 8 * 3
            + 8
            + TASK_COMM_LEN
            + 8 * 3
            + 4 * 6
            + MAX_CGROUP_DEPTH * size_of::<MemcgSnapshot>()
            + 4 * 2
            + size_of::<MemcgSnapshot>()
            + 8
);

/// What `oom_kill_process` entry records for the `oom:mark_victim` programs that follow it on
/// the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomContext {
    pub memcg: u64,
    pub chosen: u64,
    /// The task `__oom_kill_process` is killing right now: the chosen victim, then each member
    /// of a group kill in turn. Zero where that function is not hooked.
    pub killing: u64,
    pub totalpages: u64,
    pub chosen_points: i64,
    pub constraint: u32,
    pub gfp_mask: u32,
    pub order: i32,
    /// 1 once the kernel's report of this OOM printed the memory cgroup's statistics
    /// (`mem_cgroup_print_oom_meminfo`, which flushes them first).
    pub reported: u32,
    /// `ARMED` when this OOM began: every program of the set was attached.
    pub armed: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<OomContext>() == 64);

/// Index of each counter in the `COUNTERS` per-CPU array.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const LOST_EVENTS: u32 = 0;
    /// Kernel reads that failed (a pointer chain broke mid-way).
    pub const READ_ERRORS: u32 = 1;
    /// Charge samples dropped because their ring buffer was full.
    pub const LOST_SAMPLES: u32 = 2;
    /// Per-thread charge states the charge path lost or threw away: a return with no state (its
    /// entry was evicted from the bounded map, or never stored), or a state left behind by a
    /// return the kernel did not report (kretprobe instances ran out) found stale or too deep.
    pub const CHARGE_STATE_DROPPED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Slots of the `ROOT_STATS` array the start-up cross-check program fills: whether it reached
/// the root memory cgroup, then the root's LRU lists and [`stat`] items, raw (each in the unit
/// the kernel keeps it in).
pub mod root_stats {
    use crate::layout::{stat, LRU_COUNT};

    /// 1 once the root was read.
    pub const FOUND: u32 = 0;
    pub const LRU: u32 = 1;
    pub const STATS: u32 = LRU + LRU_COUNT as u32;
    pub const LEN: u32 = STATS + stat::COUNT as u32;
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, integers only, padding explicit, every bit pattern valid.
unsafe impl aya::Pod for OomContext {}
