//! The memory-cgroup charge path: samples of a cgroup's memory on its way to the limit, limit
//! hits and charge failures. This is a hot path, so every sample is rate-limited per cgroup in
//! the kernel, and cgroups without a limit are skipped unless userspace asks for them.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_ktime_get_boot_ns},
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext,
        TracePointContext,
    },
};
use leak_common::{
    event::{counter, MAX_CGROUP_DEPTH},
    layout::{LRU_ACTIVE_ANON, LRU_ACTIVE_FILE, LRU_INACTIVE_ANON, LRU_INACTIVE_FILE},
    sample::{kind, CgroupCounters, ChargeConfig, ChargeSample, CHARGE_SLACK_PAGES},
};

use crate::{
    kernel::{current_memcg, layout, lru_pages, memcg_cgroup_id, parent_memcg, read},
    maps::{count, CGROUP_COUNTERS, CHARGING, CPU_GATE, LAST_SAMPLE, SAMPLES},
};

/// Filled in by userspace before load.
#[unsafe(no_mangle)]
static CHARGE_CONFIG: ChargeConfig = ChargeConfig {
    min_interval_ns: 10_000_000,
    unlimited_pages: u64::MAX,
    only_limited: 1,
    _pad: 0,
};

macro_rules! config {
    ($field:ident) => {
        // SAFETY: a plain static; read volatile so the initialiser is not folded in.
        unsafe { core::ptr::read_volatile(&raw const CHARGE_CONFIG.$field) }
    };
}

/// The charge entry point: `try_charge_memcg` (5.15+) or `try_charge` (before), chosen by
/// userspace at load.
#[fentry(function = "try_charge_memcg")]
pub fn try_charge_fentry(ctx: FEntryContext) -> i32 {
    sample_chain(ctx.arg(0), kind::CHARGE);
    0
}

#[fexit(function = "try_charge_memcg")]
pub fn try_charge_fexit(ctx: FExitContext) -> i32 {
    // fexit sees the arguments, then the return value: (memcg, gfp_mask, nr_pages) -> int.
    let result: u64 = ctx.arg(3);
    if result as i32 != 0 {
        charge_failed(ctx.arg(0));
    }
    0
}

#[fentry(function = "try_to_free_mem_cgroup_pages")]
pub fn reclaim_fentry(ctx: FEntryContext) -> i32 {
    limit_hit(ctx.arg(0));
    0
}

#[kprobe]
pub fn try_charge_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(memcg) = ctx.arg::<u64>(0) {
        let _ = CHARGING.insert(bpf_get_current_pid_tgid() as u32, memcg, 0);
        sample_chain(memcg, kind::CHARGE);
    }
    0
}

#[kretprobe]
pub fn try_charge_kretprobe(ctx: RetProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is plain data, copied out before the entry is removed.
    let memcg = unsafe { CHARGING.get(tid) }.copied();
    let _ = CHARGING.remove(tid);
    let result: u64 = ctx.ret();
    let result = result as i32;
    if let (Some(memcg), true) = (memcg, result != 0) {
        charge_failed(memcg);
    }
    0
}

#[kprobe]
pub fn reclaim_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(memcg) = ctx.arg::<u64>(0) {
        limit_hit(memcg);
    }
    0
}

/// 6.13+: every LRU statistics update names its memory cgroup.
#[btf_tracepoint(function = "mod_memcg_lruvec_state")]
pub fn lruvec_state_btf(ctx: BtfTracePointContext) -> i32 {
    sample_chain(ctx.arg(0), kind::CHARGE);
    0
}

/// Reclaim on behalf of a cgroup at its limit. The cgroup is not an argument; the charging
/// task sits below it, so the nearest limited cgroup at its limit up the task's chain is it.
#[btf_tracepoint(function = "mm_vmscan_memcg_reclaim_begin")]
pub fn reclaim_begin_btf(_ctx: BtfTracePointContext) -> i32 {
    limit_hit_of_current();
    0
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_memcg_reclaim_begin")]
pub fn reclaim_begin_tracepoint(_ctx: TracePointContext) -> u32 {
    limit_hit_of_current();
    0
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

#[inline(always)]
fn limit_pages(memcg: u64) -> u64 {
    read::<u64>(memcg, layout!(memcg_memory) + layout!(counter_max)).unwrap_or(u64::MAX)
}

#[inline(always)]
fn usage_pages(memcg: u64) -> u64 {
    read::<u64>(memcg, layout!(memcg_memory) + layout!(counter_usage)).unwrap_or(0)
}

/// Whether a sample of `kind` for `memcg` is due, recording it if so.
#[inline(always)]
fn due(memcg: u64, kind: u32, now: u64) -> bool {
    // Keyed by the cgroup's address, read from memory so that the verifier sees a plain
    // number (it forbids bit operations on a tp_btf argument's pointer); kernel objects are at
    // least 8-byte aligned, so the low bits are free for the kind.
    let Ok(cgroup) = read::<u64>(memcg, layout!(memcg_css) + layout!(css_cgroup)) else {
        return false;
    };
    let key = cgroup | u64::from(kind);
    // SAFETY: the value is plain data, copied out before the map can change.
    if let Some(last) = unsafe { LAST_SAMPLE.get(key) } {
        if now.saturating_sub(*last) < config!(min_interval_ns) {
            return false;
        }
    }
    let _ = LAST_SAMPLE.insert(key, now, 0);
    true
}

/// Samples `memcg` and its ancestors (limited ones only, by default), each at most once per
/// interval.
#[inline(always)]
fn sample_chain(memcg: u64, sample_kind: u32) {
    let now = now();
    // The cheapest check first: on a hot path (every LRU update with tp_btf) at most one walk
    // per CPU per tenth of the per-cgroup interval, so one CPU can still serve ten busy cgroups
    // at the full rate.
    let gate = config!(min_interval_ns) / 10;
    if let Some(last) = CPU_GATE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; BPF programs do not migrate mid-run.
        unsafe {
            if now.saturating_sub(*last) < gate {
                return;
            }
            *last = now;
        }
    }
    let only_limited = config!(only_limited) == 1;
    let unlimited = config!(unlimited_pages);
    let mut current = memcg;
    for _ in 0..MAX_CGROUP_DEPTH {
        if current == 0 {
            break;
        }
        let limited = limit_pages(current) < unlimited;
        if (limited || !only_limited) && due(current, sample_kind, now) {
            emit(current, sample_kind, now);
        }
        current = parent_memcg(current);
    }
}

fn limit_hit(memcg: u64) {
    bump(memcg, |counters| &mut counters.limit_hits);
    let now = now();
    if due(memcg, kind::LIMIT_HIT, now) {
        emit(memcg, kind::LIMIT_HIT, now);
    }
}

fn charge_failed(memcg: u64) {
    bump(memcg, |counters| &mut counters.charge_failures);
    let now = now();
    if due(memcg, kind::CHARGE_FAILED, now) {
        emit(memcg, kind::CHARGE_FAILED, now);
    }
}

/// Counts a limit hit for the nearest limited cgroup, from the running task's up, whose usage is
/// within one charge of its limit: the reclaim that just began is on its behalf.
fn limit_hit_of_current() {
    let unlimited = config!(unlimited_pages);
    let mut current = current_memcg();
    for _ in 0..MAX_CGROUP_DEPTH {
        if current == 0 {
            return;
        }
        let limit = limit_pages(current);
        if limit < unlimited && usage_pages(current).saturating_add(CHARGE_SLACK_PAGES) >= limit {
            limit_hit(current);
            return;
        }
        current = parent_memcg(current);
    }
}

/// Adds one to a per-cgroup counter.
#[inline(always)]
fn bump(memcg: u64, field: fn(&mut CgroupCounters) -> &mut u64) {
    let id = memcg_cgroup_id(memcg);
    if id == 0 {
        return;
    }
    if CGROUP_COUNTERS.get_ptr_mut(id).is_none() {
        let _ = CGROUP_COUNTERS.insert(id, CgroupCounters::default(), 0);
    }
    if let Some(counters) = CGROUP_COUNTERS.get_ptr_mut(id) {
        // SAFETY: the pointer is the map's value for `id`; a racing CPU may lose an increment,
        // which a counter of limit hits can afford.
        unsafe {
            let slot = field(&mut *counters);
            *slot += 1;
        }
    }
}

#[inline(never)]
fn emit(memcg: u64, sample_kind: u32, now: u64) {
    let Some(mut entry) = SAMPLES.reserve::<ChargeSample>(0) else {
        count(counter::LOST_SAMPLES);
        return;
    };
    let lru = |index: usize| lru_pages(memcg, index);
    entry.write(ChargeSample {
        boot_ns: now,
        cgroup_id: memcg_cgroup_id(memcg),
        usage_pages: usage_pages(memcg),
        limit_pages: limit_pages(memcg),
        inactive_file_pages: lru(LRU_INACTIVE_FILE),
        active_file_pages: lru(LRU_ACTIVE_FILE),
        anon_pages: lru(LRU_INACTIVE_ANON) + lru(LRU_ACTIVE_ANON),
        kind: sample_kind,
        _pad: 0,
    });
    entry.submit(0);
}
