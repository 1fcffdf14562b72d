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

/// A single charge can ask for up to one PMD-sized huge page, 512 base pages (2 MiB with 4 KiB
/// pages), so a cgroup within this many pages of its limit is at it: its next charge may not fit.
pub const CHARGE_SLACK_PAGES: u64 = 512;

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
    pub _pad: u32,
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
