//! Every map the programs share with userspace.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leak_common::{
    event::{counter, root_stats, OomContext, OomKillEvent},
    sample::CgroupCounters,
};

use crate::charge::ChargeState;

/// OOM victims, one `OomKillEvent` each. Userspace may resize it before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Where a victim's report is assembled, one per CPU, before it is copied into [`EVENTS`]: the
/// functions that fill it are verified apart from the programs that call them, and may only
/// take and return scalars.
#[map]
pub static SNAPSHOT: PerCpuArray<OomKillEvent> = PerCpuArray::with_max_entries(1, 0);

/// 1 once userspace attached every program of this set: an OOM that began earlier may have been
/// missed by the kill witness or the report hook (`flags::UNARMED`).
#[map]
pub static ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// The `oom_control` of a running `oom_kill_process`, keyed by the thread running it, for the
/// `mark_victim` programs that fire inside it.
#[map]
pub static OOM_CONTEXT: HashMap<u32, OomContext> = HashMap::with_max_entries(1024, 0);

/// The task each thread last sent the kernel's SIGKILL to (tp_btf): the OOM killer sends
/// SIGKILL to a victim just before marking it, on the same thread, but not to a victim that was
/// already exiting. It tells a kill from a mere mark, and names the victim's task where the BTF
/// tracepoint `mark_victim` gives a bare pid.
#[map]
pub static SIGKILLED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);

/// The thread id each thread last sent the kernel's SIGKILL to, from the classic tracepoint
/// `signal:signal_generate` (which names its target by pid only): the kill witness of the
/// classic tracepoint mode.
#[map]
pub static SIGKILLED_PID: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

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

/// Which threads are inside a charge (and inside its memory.high handler), from the charge
/// function's entry to its return. An LRU map, so that states a lost return leaves behind are
/// evicted rather than filling it; what is evicted or found stale is counted.
#[map]
pub static CHARGING: LruHashMap<u32, ChargeState> = LruHashMap::with_max_entries(4096, 0);

/// The root memory cgroup's statistics as the start-up cross-check read them
/// (`leak_common::event::root_stats`).
#[map]
pub static ROOT_STATS: Array<u64> = Array::with_max_entries(root_stats::LEN, 0);

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

/// Adds `value` to a counter that other CPUs update too (a shared map value), with one
/// `BPF_ATOMIC_ADD` instruction (XADD, on every kernel the programs support), so no increment
/// is lost. The result is unused, as the kernels before 5.12 require.
///
/// # Safety
///
/// `slot` must point to a live, 8-byte aligned `u64` in a map value.
#[inline(always)]
pub unsafe fn atomic_add(slot: *mut u64, value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, value,
        );
    }
}
