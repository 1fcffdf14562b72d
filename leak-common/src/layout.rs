//! The kernel struct layout, resolved from BTF in userspace and handed to the programs as a
//! read-only global before load (Rust eBPF has no CO-RE relocations).

/// Number of LRU lists the snapshot carries, in the kernel's `enum lru_list` order.
pub const LRU_COUNT: usize = 5;
pub const LRU_INACTIVE_ANON: usize = 0;
pub const LRU_ACTIVE_ANON: usize = 1;
pub const LRU_INACTIVE_FILE: usize = 2;
pub const LRU_ACTIVE_FILE: usize = 3;
pub const LRU_UNEVICTABLE: usize = 4;

/// The memory figures beyond the LRU lists that explain a cgroup's usage, in this order in
/// [`Layout::stat_index`] and `MemcgSnapshot::stats`, named as `memory.stat` (v2) names them.
pub mod stat {
    /// `NR_ANON_MAPPED`: anonymous memory (shmem excluded).
    pub const ANON: usize = 0;
    /// `NR_FILE_PAGES`: page cache, shmem and tmpfs included.
    pub const FILE: usize = 1;
    /// `NR_SHMEM`: tmpfs and shared memory.
    pub const SHMEM: usize = 2;
    /// `NR_FILE_DIRTY`.
    pub const FILE_DIRTY: usize = 3;
    /// `NR_WRITEBACK`.
    pub const FILE_WRITEBACK: usize = 4;
    /// `NR_SLAB_RECLAIMABLE_B` (bytes).
    pub const SLAB_RECLAIMABLE: usize = 5;
    /// `NR_SLAB_UNRECLAIMABLE_B` (bytes).
    pub const SLAB_UNRECLAIMABLE: usize = 6;
    /// `NR_KERNEL_STACK_KB` (KiB).
    pub const KERNEL_STACK: usize = 7;
    /// `NR_PAGETABLE`.
    pub const PAGETABLES: usize = 8;
    /// `MEMCG_SOCK`.
    pub const SOCK: usize = 9;
    /// `MEMCG_PERCPU_B` (bytes).
    pub const PERCPU: usize = 10;
    /// `MEMCG_SWAP`.
    pub const SWAP: usize = 11;
    pub const COUNT: usize = 12;

    /// Each item's name in `memory.stat`: on cgroup v2, then on v1 (where v1 also prints a
    /// hierarchical `total_<name>`); `None` where that version does not print it.
    pub const MEMORY_STAT_NAMES: [(Option<&str>, Option<&str>); COUNT] = [
        (Some("anon"), Some("rss")),
        (Some("file"), Some("cache")),
        (Some("shmem"), Some("shmem")),
        (Some("file_dirty"), Some("dirty")),
        (Some("file_writeback"), Some("writeback")),
        (Some("slab_reclaimable"), None),
        (Some("slab_unreclaimable"), None),
        (Some("kernel_stack"), None),
        (Some("pagetables"), None),
        (Some("sock"), None),
        (Some("percpu"), None),
        (None, Some("swap")),
    ];

    /// Each item's name in leak's JSON (with `_bytes`) and in the `component` label.
    pub const NAMES: [&str; COUNT] = [
        "anon",
        "file",
        "shmem",
        "file_dirty",
        "file_writeback",
        "slab_reclaimable",
        "slab_unreclaimable",
        "kernel_stack",
        "pagetables",
        "sock",
        "percpu",
        "swap",
    ];

    /// The unit each item counts in (`memcg_page_state_unit` in mm/memcontrol.c).
    pub mod unit {
        pub const PAGES: u32 = 0;
        pub const BYTES: u32 = 1;
        pub const KIB: u32 = 2;
    }

    /// The unit of each item, by index.
    pub const UNITS: [u32; COUNT] = [
        unit::PAGES,
        unit::PAGES,
        unit::PAGES,
        unit::PAGES,
        unit::PAGES,
        unit::BYTES,
        unit::BYTES,
        unit::KIB,
        unit::PAGES,
        unit::PAGES,
        unit::BYTES,
        unit::PAGES,
    ];
}

/// The events of `mem_cgroup.memory_events[]` (`enum memcg_memory_event`) a snapshot carries,
/// in this order; `memory.events` (v2) names them.
pub mod memory_event {
    /// `MEMCG_MAX`: charges that hit `memory.max` (what v2 counts instead of `failcnt`).
    pub const MAX: usize = 0;
    /// `MEMCG_OOM`.
    pub const OOM: usize = 1;
    /// `MEMCG_OOM_KILL`.
    pub const OOM_KILL: usize = 2;
    /// `MEMCG_OOM_GROUP_KILL` (5.16+).
    pub const OOM_GROUP_KILL: usize = 3;
    pub const COUNT: usize = 4;
}

/// How a `struct mem_cgroup` stores its hierarchical page-state counters.
pub mod stats_scheme {
    /// `atomic_long_t vmstats[MEMCG_NR_STAT]` directly in `mem_cgroup` (up to 5.12).
    pub const INLINE_ARRAY: u32 = 1;
    /// `struct memcg_vmstats vmstats` embedded in `mem_cgroup` (5.13 to 6.0).
    pub const EMBEDDED_STRUCT: u32 = 2;
    /// `struct memcg_vmstats *vmstats` (6.1 on).
    pub const POINTER: u32 = 3;
}

/// How `mm_struct::rss_stat` is laid out.
pub mod rss_scheme {
    /// `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }` (before 6.2).
    pub const ATOMIC_ARRAY: u32 = 1;
    /// `struct percpu_counter rss_stat[NR_MM_COUNTERS]` (6.2 on); the shared `count` is read,
    /// which is exactly what the kernel's own OOM report (`get_mm_counter`) prints.
    pub const PERCPU_COUNTER_ARRAY: u32 = 2;
}

/// Byte offsets (and a few facts) about the running kernel's structures.
///
/// A value of [`Layout::ABSENT`] means the member does not exist on this kernel and the program
/// must not read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    // struct task_struct
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_mm: u32,
    pub task_signal: u32,
    pub task_cgroups: u32,
    pub task_thread_pid: u32,
    // struct pid / struct upid: the pid as the task's own namespace sees it
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_nr: u32,
    // struct signal_struct
    pub signal_oom_score_adj: u32,
    // struct mm_struct
    pub mm_rss_stat: u32,
    /// One of [`rss_scheme`].
    pub rss_scheme: u32,
    /// Size of one counter in the `rss_stat` array.
    pub rss_stride: u32,
    /// Offset of the value inside one counter (0 for `atomic_long_t`, `count` for
    /// `percpu_counter`).
    pub rss_value: u32,
    pub rss_file_index: u32,
    pub rss_anon_index: u32,
    pub rss_shmem_index: u32,
    // struct css_set
    pub css_set_subsys: u32,
    /// `memory_cgrp_id` of `enum cgroup_subsys_id`.
    pub memory_subsys_id: u32,
    // struct cgroup_subsys_state
    pub css_cgroup: u32,
    pub css_parent: u32,
    // struct cgroup / struct kernfs_node
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub kn_name: u32,
    // struct mem_cgroup
    pub memcg_css: u32,
    pub memcg_memory: u32,
    /// One of [`stats_scheme`].
    pub stats_scheme: u32,
    pub memcg_vmstats: u32,
    /// Offset of `state[]` inside `struct memcg_vmstats` (0 for [`stats_scheme::INLINE_ARRAY`]).
    pub vmstats_state: u32,
    /// Index of each LRU item in the state array, in [`LRU_INACTIVE_ANON`].. order.
    pub lru_stat_index: [u32; LRU_COUNT],
    /// Index of each [`stat`] item in the state array, or [`Layout::ABSENT`].
    pub stat_index: [u32; stat::COUNT],
    /// `mem_cgroup.memory_events` (`atomic_long_t[]`).
    pub memcg_memory_events: u32,
    /// Index of each [`memory_event`] in it, or [`Layout::ABSENT`].
    pub memory_event_index: [u32; memory_event::COUNT],
    /// 1 when the kernel counts `page_counter.failcnt` for cgroup v1 only
    /// (`page_counter.track_failcnt`, 6.15+).
    pub failcnt_v1_only: u32,
    // struct page_counter
    pub counter_usage: u32,
    pub counter_max: u32,
    pub counter_watermark: u32,
    pub counter_failcnt: u32,
    // struct oom_control
    pub oc_memcg: u32,
    pub oc_chosen: u32,
    pub oc_chosen_points: u32,
    pub oc_totalpages: u32,
    pub oc_constraint: u32,
    pub oc_gfp_mask: u32,
    pub oc_order: u32,
    /// 1 when `oom:mark_victim` passes `struct task_struct *` (6.9+ and backports), 0 when it
    /// passes `int pid`.
    pub mark_victim_has_task: u32,
    /// Offset of `pid` in the classic `oom:mark_victim` trace record (from its `format` file).
    pub tp_mark_victim_pid: u32,
    pub _pad: u32,
    // The thread group: the process's leader, and its threads in `for_each_thread` order.
    pub task_group_leader: u32,
    /// `task_struct.thread_node`, linked into `signal_struct.thread_head` (3.14+).
    pub task_thread_node: u32,
    pub signal_thread_head: u32,
    /// Offsets of `sig`, `code` and `pid` in the classic `signal:signal_generate` trace record
    /// (from its `format` file); [`Layout::ABSENT`] where it has none.
    pub tp_signal_generate_sig: u32,
    pub tp_signal_generate_code: u32,
    pub tp_signal_generate_pid: u32,
    /// `mem_cgroup.memsw`, the memory+swap `page_counter` of cgroup v1 (from 5.19 it shares a
    /// union with v2's `swap`), or [`Layout::ABSENT`].
    pub memcg_memsw: u32,
    /// 1 when the kernel charges `memsw`: the memory controller is on cgroup v1 with swap
    /// accounting (the `memory.memsw.*` files exist). Set by the loader, not from BTF.
    pub memsw_accounted: u32,
    /// `task_struct.start_time` (ns of the monotonic clock at fork): with the tid, the key of a
    /// victim task, marked once in its life, that deduplicates kills across agents.
    pub task_start_time: u32,
}

impl Layout {
    pub const ABSENT: u32 = u32::MAX;
}

const _: () =
    assert!(size_of::<Layout>() == (50 + stat::COUNT + 1 + memory_event::COUNT + 1 + 6 + 3) * 4);

#[cfg(feature = "user")]
// SAFETY: `Layout` is `#[repr(C)]`, made only of `u32`s, with no padding and no invalid bit
// patterns.
unsafe impl aya::Pod for Layout {}
