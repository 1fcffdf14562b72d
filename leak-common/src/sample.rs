//! What the charge-path programs send: samples of a memory cgroup on its way to the limit.

/// Why a sample was taken (`u32` tag).
pub mod kind {
    /// A charge went through the hooked path (rate-limited per cgroup).
    pub const CHARGE: u32 = 1;
    /// A charge hit the limit and the kernel started reclaiming in this cgroup.
    pub const LIMIT_HIT: u32 = 2;
    /// A charge failed (`-ENOMEM`): reclaim could not make room.
    pub const CHARGE_FAILED: u32 = 3;
}

/// Which program took a sample (`u32` tag).
pub mod source {
    pub const FENTRY_CHARGE: u32 = 1;
    pub const FEXIT_CHARGE: u32 = 2;
    pub const FENTRY_RECLAIM: u32 = 3;
    pub const KPROBE_CHARGE: u32 = 4;
    pub const KRETPROBE_CHARGE: u32 = 5;
    pub const KPROBE_RECLAIM: u32 = 6;
    pub const TP_BTF_LRUVEC_STATE: u32 = 7;
    pub const TP_BTF_RECLAIM: u32 = 8;
    pub const TRACEPOINT_RECLAIM: u32 = 9;
}

/// One memory cgroup at one moment, in pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeSample {
    /// `bpf_ktime_get_boot_ns()`.
    pub boot_ns: u64,
    pub cgroup_id: u64,
    pub usage_pages: u64,
    pub limit_pages: u64,
    pub inactive_file_pages: u64,
    pub active_file_pages: u64,
    /// Inactive plus active anonymous pages.
    pub anon_pages: u64,
    /// One of [`kind`].
    pub kind: u32,
    /// One of [`source`].
    pub source: u32,
}

const _: () = assert!(size_of::<ChargeSample>() == 8 * 7 + 4 * 2);

/// Per-cgroup counters kept in the kernel, keyed by cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    /// Charges that hit the limit and sent the kernel reclaiming.
    pub limit_hits: u64,
    /// Charges that failed with -ENOMEM.
    pub charge_failures: u64,
}

const _: () = assert!(size_of::<CgroupCounters>() == 16);

/// Settings userspace gives the charge-path programs before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeConfig {
    /// At most one sample of each kind per cgroup per this many nanoseconds.
    pub min_interval_ns: u64,
    /// `PAGE_COUNTER_MAX`: a limit at or above it means "no limit".
    pub unlimited_pages: u64,
    /// 1: sample only cgroups with a memory limit (and their limited ancestors).
    pub only_limited: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<ChargeConfig>() == 24);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, integers only, padding explicit, every bit pattern valid.
unsafe impl aya::Pod for CgroupCounters {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ChargeConfig {}
