//! Every map the programs share with userspace.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leak_common::{
    event::{counter, OomContext},
    sample::CgroupCounters,
};

/// OOM victims, one `OomKillEvent` each. Userspace may resize it before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// The `oom_control` of a running `oom_kill_process`, keyed by the thread running it, for the
/// `mark_victim` programs that fire inside it.
#[map]
pub static OOM_CONTEXT: HashMap<u32, OomContext> = HashMap::with_max_entries(1024, 0);

/// The task each thread last sent SIGKILL to, where the BTF tracepoint `mark_victim` gives a
/// bare pid and nothing else names the victim: the OOM killer sends SIGKILL to a victim just
/// before marking it, on the same thread.
#[map]
pub static SIGKILLED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);

/// Charge-path samples (`ChargeSample`), apart from the kills so that a burst of samples can
/// never crowd a kill out. Userspace may resize it before load.
#[map]
pub static SAMPLES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// When each (memory cgroup, sample kind) was last sampled: the per-cgroup rate limit.
#[map]
pub static LAST_SAMPLE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// When this CPU last walked a cgroup chain for charge samples.
#[map]
pub static CPU_GATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Limit hits and charge failures per cgroup id.
#[map]
pub static CGROUP_COUNTERS: LruHashMap<u64, CgroupCounters> = LruHashMap::with_max_entries(4096, 0);

/// The memory cgroup a thread is charging, from the kprobe to the kretprobe.
#[map]
pub static CHARGING: HashMap<u32, u64> = HashMap::with_max_entries(4096, 0);

/// Counters indexed by `leak_common::event::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
        unsafe { *value += 1 };
    }
}
