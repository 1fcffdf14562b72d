//! A victim of the OOM killer with its cgroups' memory at the kill: what `/kills` serves and
//! `/metrics` counts.

use serde::{Deserialize, Serialize};

use super::{
    kubernetes::{KubernetesKill, WorkloadNames},
    timeline::{Point, Story},
};

/// Kills this close together, from the same triggering thread or in the same cgroup, are one
/// OOM: a group kill marks its members one by one.
pub const SAME_OOM_NS: u64 = 1_000_000_000;

/// Which program reported the victim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimHook {
    TpBtf,
    Tracepoint,
}

/// `oom_control::constraint` (`enum oom_constraint`), or what inference concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    None,
    Cpuset,
    MemoryPolicy,
    Memcg,
    /// A value this version of leak does not know (a newer kernel), or, inferring, a cgroup
    /// at its limit may exist above the levels the snapshot could search.
    Unknown,
}

impl Constraint {
    /// As `/kills` and the `constraint` label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Cpuset => "cpuset",
            Self::MemoryPolicy => "memory_policy",
            Self::Memcg => "memcg",
            Self::Unknown => "unknown",
        }
    }
}

/// Why the OOM killer marked a victim without killing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotKilledReason {
    /// The victim was already exiting (a fatal signal or `exit_group` under way, or its last
    /// thread exiting: `task_will_free_mem`): the kernel gave it access to memory reserves and
    /// queued the OOM reaper for its memory, sent no SIGKILL and counted no `oom_kill`.
    Exiting,
}

/// How `oom_cgroup` and `constraint` were established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OomAttribution {
    /// From the kernel's own `oom_control` (fentry/kprobe on `oom_kill_process`).
    OomControl,
    /// The nearest cgroup, from the victim's up, whose usage had reached its limit.
    Inferred,
}

/// What fills a cgroup beyond its LRU lists, from the kernel's hierarchical memcg statistics
/// (the items of `memory.stat`), in bytes; `None` where this kernel does not keep the item.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Anonymous memory, shmem excluded (`anon`; `rss` on v1).
    pub anon_bytes: Option<u64>,
    /// Page cache, shmem and tmpfs included (`file`; `cache` on v1).
    pub file_bytes: Option<u64>,
    /// tmpfs and shared memory: on the anon LRU, counted in `file`, never reclaimable
    /// without swap.
    pub shmem_bytes: Option<u64>,
    pub file_dirty_bytes: Option<u64>,
    pub file_writeback_bytes: Option<u64>,
    pub slab_reclaimable_bytes: Option<u64>,
    pub slab_unreclaimable_bytes: Option<u64>,
    pub kernel_stack_bytes: Option<u64>,
    pub pagetables_bytes: Option<u64>,
    /// Socket buffers (charged to the memcg on v2 only).
    pub sock_bytes: Option<u64>,
    pub percpu_bytes: Option<u64>,
    /// Swapped out (not part of usage).
    pub swap_bytes: Option<u64>,
}

impl Breakdown {
    /// From the items in [`leak_common::layout::stat`] order, in bytes.
    pub fn from_items(items: [Option<u64>; leak_common::layout::stat::COUNT]) -> Self {
        let [anon, file, shmem, file_dirty, file_writeback, slab_reclaimable, slab_unreclaimable, kernel_stack, pagetables, sock, percpu, swap] =
            items;
        Self {
            anon_bytes: anon,
            file_bytes: file,
            shmem_bytes: shmem,
            file_dirty_bytes: file_dirty,
            file_writeback_bytes: file_writeback,
            slab_reclaimable_bytes: slab_reclaimable,
            slab_unreclaimable_bytes: slab_unreclaimable,
            kernel_stack_bytes: kernel_stack,
            pagetables_bytes: pagetables,
            sock_bytes: sock,
            percpu_bytes: percpu,
            swap_bytes: swap,
        }
    }

    /// The items in [`leak_common::layout::stat`] order.
    pub fn items(&self) -> [Option<u64>; leak_common::layout::stat::COUNT] {
        [
            self.anon_bytes,
            self.file_bytes,
            self.shmem_bytes,
            self.file_dirty_bytes,
            self.file_writeback_bytes,
            self.slab_reclaimable_bytes,
            self.slab_unreclaimable_bytes,
            self.kernel_stack_bytes,
            self.pagetables_bytes,
            self.sock_bytes,
            self.percpu_bytes,
            self.swap_bytes,
        ]
    }

    /// Kernel memory: slab, kernel stacks, page tables, socket buffers and per-CPU data.
    pub fn kernel_bytes(&self) -> Option<u64> {
        let parts = [
            self.slab_reclaimable_bytes,
            self.slab_unreclaimable_bytes,
            self.kernel_stack_bytes,
            self.pagetables_bytes,
            self.sock_bytes,
            self.percpu_bytes,
        ];
        parts.iter().flatten().copied().reduce(u64::saturating_add)
    }

    /// Dirty page cache and pages under writeback.
    pub fn dirty_bytes(&self) -> Option<u64> {
        match (self.file_dirty_bytes, self.file_writeback_bytes) {
            (None, None) => None,
            (dirty, writeback) => Some(dirty.unwrap_or(0).saturating_add(writeback.unwrap_or(0))),
        }
    }
}

/// The limit-hit and OOM counters of a cgroup (`memory.events` on cgroup v2), hierarchical;
/// `None` where this kernel has no such event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEvents {
    /// Charges that hit `memory.max` (what the kernel reports instead of `failcnt` on v2).
    pub max: Option<u64>,
    pub oom: Option<u64>,
    pub oom_kill: Option<u64>,
    pub oom_group_kill: Option<u64>,
}

/// The component of usage that could not be reclaimed and filled the cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// Anonymous memory (heap, stacks, private mappings).
    Anon,
    /// tmpfs and shared memory, which look like files but cannot be dropped.
    Shmem,
    /// Slab, kernel stacks, page tables, socket buffers, per-CPU data.
    Kernel,
    /// Dirty page cache and pages under writeback, which must be written before reclaim.
    FileDirty,
}

impl CauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Shmem => "shmem",
            Self::Kernel => "kernel",
            Self::FileDirty => "file_dirty",
        }
    }
}

/// What filled the cgroup that hit its limit: the largest component that could not be
/// reclaimed, and its share of that cgroup's usage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    pub component: CauseKind,
    pub bytes: u64,
    /// `bytes` over usage (can exceed 1 a little: the statistics lag usage by a flush).
    pub share_of_usage: f64,
}

/// One memory cgroup at the moment of the kill, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupState {
    pub path: String,
    pub id: u64,
    pub usage_bytes: u64,
    /// `None` when the cgroup has no limit.
    pub limit_bytes: Option<u64>,
    pub peak_bytes: u64,
    /// `page_counter.failcnt`: limit hits on cgroup v1 (and v2 before 6.15); `None` where the
    /// kernel no longer counts it.
    pub failcnt: Option<u64>,
    /// `memory.events` (cgroup v2); `None` on v1.
    #[serde(default)]
    pub events: Option<MemoryEvents>,
    pub working_set_bytes: u64,
    pub inactive_anon_bytes: u64,
    pub active_anon_bytes: u64,
    pub inactive_file_bytes: u64,
    pub active_file_bytes: u64,
    pub unevictable_bytes: u64,
    #[serde(flatten)]
    pub breakdown: Breakdown,
    /// This is the cgroup whose limit the kill was about.
    pub hit_limit: bool,
    /// How many levels above the victim's cgroup this one is (0: the victim's own); `None`
    /// for a cgroup above the chain whose distance the kernel did not establish.
    #[serde(default)]
    pub level: Option<u32>,
    /// Where `usage_bytes` comes from: the cgroup's page counter, or, for the root, its
    /// statistics (the root's page counter only sums its children's charges).
    #[serde(default)]
    pub usage_source: UsageSource,
    /// cgroup v1's memory+swap counter (`memory.memsw.usage_in_bytes`); `None` where the kernel
    /// does not charge it (cgroup v2, or v1 without swap accounting).
    #[serde(default)]
    pub memsw_usage_bytes: Option<u64>,
    /// `memory.memsw.limit_in_bytes`; `None` without a limit or without memsw accounting.
    #[serde(default)]
    pub memsw_limit_bytes: Option<u64>,
    /// `memory.memsw.max_usage_in_bytes`.
    #[serde(default)]
    pub memsw_peak_bytes: Option<u64>,
    /// `memory.memsw.failcnt`; `None` from 6.15 on, where the kernel no longer counts it
    /// (it tracks `failcnt` for the memory counter only, so the file stays 0).
    #[serde(default)]
    pub memsw_failcnt: Option<u64>,
    /// On the level that hit its limit: which of its counters was at its limit, memory+swap
    /// first as the kernel charges it; `None` elsewhere, or where neither was.
    #[serde(default)]
    pub limit_counter: Option<LimitCounter>,
}

/// Which `page_counter` of a cgroup was at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitCounter {
    /// `memory` (`memory.limit_in_bytes` on v1, `memory.max` on v2).
    Memory,
    /// cgroup v1's memory+swap (`memory.memsw.limit_in_bytes`).
    Memsw,
}

/// Where a level's `usage_bytes` comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The cgroup's `page_counter`, as `memory.current` (v2) and `memory.usage_in_bytes` (v1)
    /// read it.
    #[default]
    PageCounter,
    /// The root's hierarchical statistics, `anon + file` (`rss + cache` on v1, plus `swap` for
    /// memory+swap): what v1's root `memory.usage_in_bytes` computed up to 6.3 and what it
    /// approximates with node-wide counters since.
    Statistics,
}

impl CgroupState {
    pub fn page_cache_bytes(&self) -> u64 {
        self.inactive_file_bytes
            .saturating_add(self.active_file_bytes)
    }

    pub fn anon_bytes(&self) -> u64 {
        self.inactive_anon_bytes
            .saturating_add(self.active_anon_bytes)
    }

    /// This cgroup at the kill, as the last point of its timeline.
    pub fn kill_point(&self, boot_ns: u64) -> Point {
        Point {
            boot_ns,
            before_kill_ms: Some(0),
            kind: super::timeline::SampleKind::Kill,
            usage_bytes: self.usage_bytes,
            limit_bytes: self.limit_bytes,
            working_set_bytes: self.working_set_bytes,
            page_cache_bytes: self.page_cache_bytes(),
            inactive_file_bytes: self.inactive_file_bytes,
            anon_bytes: self.anon_bytes(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rss {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomControl {
    pub totalpages: u64,
    pub chosen_points: i64,
    pub gfp_mask: String,
    pub order: i32,
    pub memcg_id: Option<u64>,
}

/// A victim of the OOM killer with its cgroups' memory at the kill.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kill {
    /// Monotonic sequence number assigned by the agent.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub timestamp_unix_ns: u128,
    pub boot_ns: u64,
    pub attach_mode: String,
    pub victim_hook: VictimHook,
    /// The victim process (its thread-group id; the kernel's pid when the task was not read).
    pub victim_pid: u32,
    /// The thread the kernel marked (differs from `victim_pid` when a group kill marks threads).
    pub victim_tid: u32,
    /// The marked task's `start_time` (kernel monotonic ns at its fork): with `victim_tid` it
    /// names the kill across agents (the kernel marks a task once); `None` where the task was
    /// not read in the kernel.
    #[serde(default)]
    pub victim_start_ns: Option<u64>,
    pub victim_tgid: Option<u32>,
    pub victim_comm: Option<String>,
    pub victim_oom_score_adj: Option<i32>,
    pub victim_rss: Option<Rss>,
    /// Path of the victim's memory cgroup (relative to the memory hierarchy's root).
    pub cgroup: String,
    pub cgroup_id: u64,
    /// Path of the cgroup that hit its limit; `None` for a global OOM.
    pub oom_cgroup: Option<String>,
    pub oom_cgroup_id: Option<u64>,
    /// `usage_bytes` .. `inactive_file_bytes` describe `oom_cgroup` (or, for a global OOM, the
    /// victim's cgroup).
    pub usage_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub working_set_bytes: u64,
    pub inactive_file_bytes: u64,
    pub constraint: Constraint,
    /// What filled `oom_cgroup` (the victim's cgroup for a global OOM); `None` where the
    /// kernel's statistics were not read.
    #[serde(default)]
    pub cause: Option<Cause>,
    pub attribution: OomAttribution,
    pub oom_control: Option<OomControl>,
    pub trigger: Trigger,
    /// The victim's cgroup first, then its ancestors up to the root (or the depth bound).
    pub cgroups: Vec<CgroupState>,
    /// The victim's pid inside its own pid namespace.
    pub victim_ns_pid: Option<u32>,
    /// Whether the victim was pid 1 of its pid namespace: a container's main process. When
    /// false inside a container, the container survives the kill and the kubelet never
    /// reports it as `OOMKilled`.
    pub main_process: Option<bool>,
    /// Kubernetes names of the victim's cgroup (`namespace`, `pod`, `container`); empty
    /// outside Kubernetes.
    #[serde(flatten)]
    pub names: WorkloadNames,
    /// What the cgroup path and the node's logs say about the victim's pod, when it is one.
    pub kubernetes: Option<KubernetesKill>,
    /// The seconds before death of `oom_cgroup` (or the victim's cgroup for a global OOM),
    /// from the charge path, oldest first.
    pub timeline: Vec<Point>,
    /// The victim's own cgroup's timeline, when it is not `oom_cgroup`.
    pub victim_timeline: Option<Vec<Point>>,
    /// What the timeline says: when usage reached the limit, when the working set did.
    pub story: Option<Story>,
    /// The victim's task could not be read in the kernel; `cgroups` are the trigger's.
    pub victim_task_resolved: bool,
    /// Whether the OOM killer killed the victim (sent SIGKILL and counted it in the cgroup's
    /// `oom_kill`), as the kill witness saw it; `None` where no witness is attached.
    #[serde(default)]
    pub killed: Option<bool>,
    /// Why a victim was marked but not killed (`killed: false`).
    #[serde(default)]
    pub not_killed_reason: Option<NotKilledReason>,
    /// The cgroup chain ended early on an unreadable pointer.
    pub cgroups_truncated: bool,
    /// Whether the kernel flushed the memcg statistics for this kill (its OOM report prints
    /// them, flushing first, unless the report is rate-limited: at most 10 per 5 s; never for a
    /// global OOM). `None` where it cannot be known: the report is not hooked (tp_btf and
    /// tracepoint modes), or the kernel keeps live counters with no flush at all (5.10 to 5.12).
    /// Usage, limit and peak are page counters and always exact; this is about the LRU lists
    /// and the breakdown.
    #[serde(default)]
    pub stats_flushed: Option<bool>,
    /// How old, at most, the memcg statistics of this kill are: 0 when the kernel flushed them
    /// for it (to within its flush threshold) or keeps live counters, else the interval of the
    /// agent's own flush; `None` when nothing bounds it.
    #[serde(default)]
    pub stats_max_age_ms: Option<u64>,
    /// How many levels above the victim's cgroup `oom_cgroup` is (0: the victim's own).
    #[serde(default)]
    pub oom_cgroup_level: Option<u32>,
    /// The cgroup that hit its limit when it is above the levels in `cgroups` (which stop at
    /// eight); `hit_limit` is set on it.
    #[serde(default)]
    pub oom_cgroup_state: Option<CgroupState>,
    /// Which counter of `oom_cgroup` was at its limit (`memsw` on cgroup v1 with a
    /// memory+swap limit).
    #[serde(default)]
    pub limit_counter: Option<LimitCounter>,
    /// No cgroup was found at its limit, but the search could not cover every ancestor (the
    /// chain was cut short and, without `oom_control`, the ancestors above it were not all
    /// read): `oom_cgroup: null` does not mean a global OOM here, and the figures describe
    /// the victim's cgroup, which is not known to be the one that hit its limit.
    #[serde(default)]
    pub oom_cgroup_search_incomplete: bool,
}

/// What can be known about how fresh the memcg statistics of a kill are, for the running
/// kernel and attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsFreshness {
    /// The kernel's OOM report is hooked, along with `oom_kill_process` (fentry, kprobe).
    pub report_hooked: bool,
    /// The kernel keeps live hierarchical counters, updated in per-CPU batches of 32 pages,
    /// and has nothing to flush (5.10 to 5.12).
    pub live_counters: bool,
    /// How often the agent has the kernel flush the statistics, when it can.
    pub flush_interval_ms: Option<u64>,
}

impl StatsFreshness {
    /// `stats_flushed` and `stats_max_age_ms` of a kill whose record says `flushed` (`None`
    /// when its `oom_control` was not captured).
    pub fn of(&self, flushed: Option<bool>) -> (Option<bool>, Option<u64>) {
        if self.live_counters {
            return (None, Some(0));
        }
        let flushed = flushed.filter(|_| self.report_hooked);
        match flushed {
            Some(true) => (Some(true), Some(0)),
            _ => (flushed, self.flush_interval_ms),
        }
    }
}

impl Kill {
    /// The cgroup the figures describe: `oom_cgroup`, or the victim's for a global OOM.
    pub fn described_cgroup_id(&self) -> u64 {
        self.oom_cgroup_id.unwrap_or(self.cgroup_id)
    }

    /// The cgroup that hit its limit: a level of `cgroups`, or the one above them.
    pub fn oom_level(&self) -> Option<&CgroupState> {
        self.cgroups
            .iter()
            .find(|c| c.hit_limit)
            .or(self.oom_cgroup_state.as_ref())
    }
}

/// One memory cgroup's `oom_kill` counter as the kernel keeps it, and when it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelKillCount {
    pub oom_kill: u64,
    /// `CLOCK_BOOTTIME` ns just before the counter was read: a kill marked after it is not in it.
    pub read_boot_ns: u64,
}

/// Every memory cgroup's counter, by path as `/kills` names cgroups.
pub type KernelKillCounts = std::collections::HashMap<String, KernelKillCount>;
