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
    layout::{Layout, LRU_ACTIVE_ANON, LRU_ACTIVE_FILE, LRU_INACTIVE_ANON, LRU_INACTIVE_FILE},
    sample::{kind, CgroupCounters, ChargeConfig, ChargeSample, CHARGE_SLACK_PAGES},
};

use crate::{
    kernel::{current_memcg, layout, lru_pages, memcg_cgroup_id, parent_memcg, read},
    maps::{atomic_add, count, CGROUP_COUNTERS, CHARGING, CPU_GATE, LAST_SAMPLE, SAMPLES},
};

/// A thread inside the charge function, from its entry to its return.
///
/// Only reclaim inside a charge, for a cgroup whose usage plus the charge's pages reach its
/// limit, is a limit hit: `try_to_free_mem_cgroup_pages` is also called by memory.high reclaim
/// (on return to user mode, from a work item, and synchronously from the charge itself after a
/// charge that went through, for a cgroup over `memory.high` but below `memory.max`), by writes
/// to memory.high/memory.max, by memory.reclaim and by cgroup v1 limit changes and force_empty.
///
/// The memory.high handler itself is not hooked: it runs on every return to user mode with
/// work pending, and patching a trampoline into that path hung 5.10 (a CPU spinning at the
/// handler's patched entry while another waited on the text patching; seen under QEMU TCG).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ChargeState {
    /// The cgroup the outermost charge is for.
    memcg: u64,
    /// When the outermost charge began (boot ns).
    entered_ns: u64,
    /// Charges in progress on this thread: one, or more when a charge nests (one made while
    /// reclaiming, or from an interrupt).
    depth: u32,
    _pad: u32,
}

/// Deeper than this, the state is taken for one left behind by returns the kernel did not
/// report (kretprobe instances ran out), and started afresh.
const MAX_CHARGE_DEPTH: u32 = 4;

/// A state older than this when the thread enters another charge is taken for one left behind
/// by a lost return: a charge that reclaims, and even one that waits for an OOM kill, is over
/// in far less.
const STALE_CHARGE_NS: u64 = 30_000_000_000;

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
    let memcg: u64 = ctx.arg(0);
    charge_entered(memcg);
    sample_chain(memcg, kind::CHARGE);
    0
}

#[fexit(function = "try_charge_memcg")]
pub fn try_charge_fexit(ctx: FExitContext) -> i32 {
    // fexit sees the arguments, then the return value: (memcg, gfp_mask, nr_pages) -> int.
    let result: u64 = ctx.arg(3);
    charge_returned();
    if result as i32 != 0 {
        charge_failed(ctx.arg(0));
    }
    0
}

/// `try_to_free_mem_cgroup_pages(memcg, nr_pages, ...)`.
#[fentry(function = "try_to_free_mem_cgroup_pages")]
pub fn reclaim_fentry(ctx: FEntryContext) -> i32 {
    let memcg: u64 = ctx.arg(0);
    let nr_pages: u64 = ctx.arg(1);
    if reclaiming_at_max(memcg, nr_pages) {
        limit_hit(memcg);
    }
    0
}

#[kprobe]
pub fn try_charge_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(memcg) = ctx.arg::<u64>(0) {
        charge_entered(memcg);
        sample_chain(memcg, kind::CHARGE);
    }
    0
}

#[kretprobe]
pub fn try_charge_kretprobe(ctx: RetProbeContext) -> u32 {
    let result: u64 = ctx.ret();
    if let Some(memcg) = charge_returned() {
        if result as i32 != 0 {
            charge_failed(memcg);
        }
    }
    0
}

#[kprobe]
pub fn reclaim_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(memcg), Some(nr_pages)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        if reclaiming_at_max(memcg, nr_pages) {
            limit_hit(memcg);
        }
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

/// Records that the running thread entered a charge for `memcg`.
#[inline(always)]
fn charge_entered(memcg: u64) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let now = now();
    if let Some(state) = CHARGING.get_ptr_mut(tid) {
        // SAFETY: the map's value for this thread; only this thread writes it.
        let state = unsafe { &mut *state };
        let stale = now.saturating_sub(state.entered_ns) > STALE_CHARGE_NS;
        if state.depth > 0 && state.depth < MAX_CHARGE_DEPTH && !stale {
            // A nested charge: the outermost one's cgroup is the one a failure is reported for.
            state.depth += 1;
            return;
        }
        if state.depth > 0 {
            count(counter::CHARGE_STATE_DROPPED);
        }
    }
    let state = ChargeState {
        memcg,
        entered_ns: now,
        depth: 1,
        _pad: 0,
    };
    let _ = CHARGING.insert(tid, state, 0);
}

/// Records that the running thread returned from a charge; the outermost charge's cgroup when
/// that was the outermost one.
#[inline(always)]
fn charge_returned() -> Option<u64> {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(state) = CHARGING.get_ptr_mut(tid) else {
        count(counter::CHARGE_STATE_DROPPED);
        return None;
    };
    // SAFETY: the map's value for this thread; only this thread writes it.
    let state = unsafe { &mut *state };
    if state.depth > 1 {
        // A nested charge returned: its own cgroup is not known here, so its failure is not
        // attributed (nested charges are forced or atomic ones).
        state.depth -= 1;
        return None;
    }
    let memcg = state.memcg;
    let _ = CHARGING.remove(tid);
    Some(memcg)
}

/// Whether the reclaim the running thread is starting is the charge path's at the limit: it
/// runs inside a charge, for a cgroup whose usage plus the pages it needs reach its limit
/// (memory, or memory+swap where the kernel charges that), give or take a huge page of
/// concurrent charges.
#[inline(always)]
fn reclaiming_at_max(memcg: u64, nr_pages: u64) -> bool {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is plain data, copied out.
    let in_charge = match unsafe { CHARGING.get(tid) } {
        Some(state) => state.depth > 0,
        None => false,
    };
    if !in_charge {
        return false;
    }
    let needed = nr_pages
        .min(CHARGE_SLACK_PAGES)
        .saturating_add(CHARGE_SLACK_PAGES);
    if usage_pages(memcg).saturating_add(needed) >= limit_pages(memcg) {
        return true;
    }
    match memsw_pages(memcg) {
        Some((usage, limit)) => usage.saturating_add(needed) >= limit,
        None => false,
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Memory+swap usage and limit, where the kernel charges that counter (cgroup v1 with swap
/// accounting).
#[inline(always)]
fn memsw_pages(memcg: u64) -> Option<(u64, u64)> {
    let memsw = layout!(memcg_memsw);
    if memsw == Layout::ABSENT || layout!(memsw_accounted) != 1 {
        return None;
    }
    let usage = read::<u64>(memcg, memsw + layout!(counter_usage)).ok()?;
    let limit = read::<u64>(memcg, memsw + layout!(counter_max)).ok()?;
    Some((usage, limit))
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
        // SAFETY: the pointer is the map's value for `id`, valid and 8-byte aligned while the
        // program runs; every CPU updates it, so only through atomic adds (BPF_ATOMIC_ADD,
        // which every supported kernel has).
        unsafe { atomic_add(field(&mut *counters), 1) };
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
