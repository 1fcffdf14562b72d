//! The OOM hooks.
//!
//! Every victim is reported from `oom:mark_victim` (BTF or classic tracepoint), which the kernel
//! fires once per victim, group kills (`memory.oom.group`) included. Where the kernel lets us
//! hook `oom_kill_process` itself (fentry or kprobe), its entry records the `oom_control` for
//! the thread and the victim report picks it up; its exit forgets it. A kill witness
//! (`__oom_kill_process`, or the SIGKILL it sends) tells a kill from a victim marked only
//! because it was already exiting (`task_will_free_mem`), which the kernel does not kill.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task, bpf_ktime_get_boot_ns},
    },
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext,
        TracePointContext,
    },
};
use aya_log_ebpf::debug;
use leak_common::{
    event::{
        counter, flags, hook, MemcgSnapshot, OomContext, OomKillEvent, CGROUP_NAME_LEN,
        MAX_ANCESTOR_SEARCH, MAX_CGROUP_DEPTH, TASK_COMM_LEN,
    },
    layout::{memory_event, rss_scheme, stat, Layout, LRU_COUNT},
    sample::CHARGE_SLACK_PAGES,
};

use crate::{
    kernel::{
        layout, memcg_cgroup_id, memcg_state, parent_memcg, read, read_into, read_str_into,
        state_item, task_memcg,
    },
    maps::{count, ARMED, EVENTS, OOM_CONTEXT, SIGKILLED, SIGKILLED_PID, SNAPSHOT},
};

#[fentry(function = "oom_kill_process")]
pub fn oom_kill_process_fentry(ctx: FEntryContext) -> i32 {
    remember_oom_control(ctx.arg(0));
    0
}

#[fexit(function = "oom_kill_process")]
pub fn oom_kill_process_fexit(_ctx: FExitContext) -> i32 {
    forget_oom_control();
    0
}

#[kprobe]
pub fn oom_kill_process_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(oc) = ctx.arg::<u64>(0) {
        remember_oom_control(oc);
    }
    0
}

#[kretprobe]
pub fn oom_kill_process_kretprobe(_ctx: RetProbeContext) -> u32 {
    forget_oom_control();
    0
}

/// `mem_cgroup_print_oom_meminfo(memcg)`: the memory cgroup part of the kernel's OOM report,
/// which flushes the statistics it prints. `oom_kill_process` calls it (through `dump_header`)
/// before killing, unless the report is rate-limited; never for a global OOM.
#[fentry(function = "mem_cgroup_print_oom_meminfo")]
pub fn oom_report_fentry(_ctx: FEntryContext) -> i32 {
    remember_report();
    0
}

#[kprobe]
pub fn oom_report_kprobe(_ctx: ProbeContext) -> u32 {
    remember_report();
    0
}

/// `__oom_kill_process(victim, message)` kills one task: the chosen victim, then each member of
/// a group kill. The kill witness of the fentry and kprobe modes (a victim marked outside it was
/// not killed), and where `oom:mark_victim` gives a bare pid it names every member's task.
#[fentry(function = "__oom_kill_process")]
pub fn oom_victim_fentry(ctx: FEntryContext) -> i32 {
    remember_killing(ctx.arg(0));
    0
}

#[kprobe]
pub fn oom_victim_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(task) = ctx.arg::<u64>(0) {
        remember_killing(task);
    }
    0
}

const SIGKILL: i32 = 9;
/// `SEND_SIG_PRIV`: the siginfo of a signal the kernel itself sends, as `__oom_kill_process`
/// sends its SIGKILL; `SI_KERNEL` is the code the classic tracepoint records for it.
const SEND_SIG_PRIV: u64 = 1;
const SI_KERNEL: i32 = 0x80;

/// `signal:signal_generate(sig, info, task, group, result)`: `__oom_kill_process` sends SIGKILL
/// to each victim right before marking it: the kill witness of tp_btf mode, and where
/// `mark_victim` gives a bare pid the name of every group-kill member's task. `result` is not
/// looked at: the kernel counted the kill before sending, whether SIGKILL was already pending
/// or not.
#[btf_tracepoint(function = "signal_generate")]
pub fn signal_generate_btf(ctx: BtfTracePointContext) -> i32 {
    let sig = ctx.arg::<u64>(0) as i32;
    if sig == SIGKILL && ctx.arg::<u64>(1) == SEND_SIG_PRIV {
        let task: u64 = ctx.arg(2);
        let _ = SIGKILLED.insert(current_tid(), task, 0);
    }
    0
}

/// The classic `signal:signal_generate`: the kill witness of the classic tracepoint mode, by
/// pid (the fields' offsets come from its format file).
#[tracepoint(category = "signal", name = "signal_generate")]
pub fn signal_generate_tracepoint(ctx: TracePointContext) -> u32 {
    let field = |offset: u32| -> Option<i32> {
        if offset == Layout::ABSENT {
            return None;
        }
        // SAFETY: the offset comes from the tracepoint's own format file and points at an
        // `int` (`pid_t` for the pid).
        unsafe { ctx.read_at::<i32>(offset as usize) }.ok()
    };
    if field(layout!(tp_signal_generate_sig)) == Some(SIGKILL)
        && field(layout!(tp_signal_generate_code)) == Some(SI_KERNEL)
    {
        if let Some(pid) = field(layout!(tp_signal_generate_pid)) {
            let _ = SIGKILLED_PID.insert(current_tid(), pid as u32, 0);
        }
    }
    0
}

#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim_btf(ctx: BtfTracePointContext) -> i32 {
    if layout!(mark_victim_has_task) == 1 {
        let task: u64 = ctx.arg(0);
        let pid = read::<i32>(task, layout!(task_pid)).unwrap_or(0) as u32;
        debug!(&ctx, "oom:mark_victim (tp_btf) pid {}", pid);
        report_victim(hook::TP_BTF_MARK_VICTIM, task, pid);
    } else {
        let pid = ctx.arg::<u64>(0) as u32;
        debug!(&ctx, "oom:mark_victim (tp_btf, pid only) pid {}", pid);
        report_victim(hook::TP_BTF_MARK_VICTIM, find_victim_task(pid), pid);
    }
    0
}

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim_tracepoint(ctx: TracePointContext) -> u32 {
    let offset = layout!(tp_mark_victim_pid) as usize;
    // SAFETY: the offset comes from the tracepoint's own format file and points at an `int`.
    let pid = unsafe { ctx.read_at::<i32>(offset) }.unwrap_or(0);
    let pid = pid as u32;
    debug!(&ctx, "oom:mark_victim (tracepoint) pid {}", pid);
    report_victim(hook::TRACEPOINT_MARK_VICTIM, find_victim_task(pid), pid);
    0
}

#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_current_task() }
}

fn remember_oom_control(oc: u64) {
    let context = OomContext {
        memcg: read::<u64>(oc, layout!(oc_memcg)).unwrap_or(0),
        chosen: read::<u64>(oc, layout!(oc_chosen)).unwrap_or(0),
        killing: 0,
        totalpages: read::<u64>(oc, layout!(oc_totalpages)).unwrap_or(0),
        chosen_points: read::<i64>(oc, layout!(oc_chosen_points)).unwrap_or(0),
        constraint: read::<u32>(oc, layout!(oc_constraint)).unwrap_or(u32::MAX),
        gfp_mask: read::<u32>(oc, layout!(oc_gfp_mask)).unwrap_or(0),
        order: read::<i32>(oc, layout!(oc_order)).unwrap_or(0),
        reported: 0,
        armed: armed(),
        _pad: 0,
    };
    if OOM_CONTEXT.insert(current_tid(), context, 0).is_err() {
        count(counter::READ_ERRORS);
    }
}

/// Whether every program of this set is attached (`ARMED`).
#[inline(always)]
fn armed() -> u32 {
    ARMED.get(0).copied().unwrap_or(0)
}

fn remember_killing(task: u64) {
    if let Some(context) = OOM_CONTEXT.get_ptr_mut(current_tid()) {
        // SAFETY: the entry belongs to this thread (keyed by its tid) and a thread runs one
        // program at a time, so nothing else writes it concurrently.
        unsafe { (*context).killing = task };
    }
}

fn remember_report() {
    if let Some(context) = OOM_CONTEXT.get_ptr_mut(current_tid()) {
        // SAFETY: the entry belongs to this thread (keyed by its tid) and a thread runs one
        // program at a time, so nothing else writes it concurrently.
        unsafe { (*context).reported = 1 };
    }
}

fn forget_oom_control() {
    let _ = OOM_CONTEXT.remove(current_tid());
}

/// Finds the victim's `task_struct` when the hook only gives its pid: the OOM killer often
/// kills the process that failed to allocate, `__oom_kill_process` names the task it is
/// killing, `oom_kill_process` told us its choice, and the SIGKILL just sent names its target.
/// The thread marked may be another of that process than the one named (`find_lock_task_mm`),
/// so each candidate's threads are looked at too.
#[inline(always)]
fn find_victim_task(pid: u32) -> u64 {
    // The task that ran out of memory, or another thread of its process.
    let current = thread_with_pid(current_task(), pid);
    if current != 0 {
        return current;
    }
    // SAFETY: the value is plain data, copied out before the map can change.
    if let Some(context) = unsafe { OOM_CONTEXT.get(current_tid()) } {
        // `__oom_kill_process` marks the first thread of its victim that still has an mm
        // (`find_lock_task_mm`): another thread than the one named when the leader has exited.
        for task in [context.killing, context.chosen] {
            let thread = thread_with_pid(task, pid);
            if thread != 0 {
                return thread;
            }
        }
    }
    // SAFETY: the value is plain data, copied out before the map can change.
    if let Some(&task) = unsafe { SIGKILLED.get(current_tid()) } {
        if read::<u32>(task, layout!(task_pid)) == Ok(pid) {
            return task;
        }
    }
    0
}

/// How many threads of a process [`leak_thread_with_pid`] looks at. The thread the OOM killer
/// marks is the first in `for_each_thread` order that still has an mm: the leader, or one of the
/// first few threads after it (exited threads leave the list).
const THREADS_WALKED: u32 = 32;

#[inline(always)]
fn thread_with_pid(task: u64, pid: u32) -> u64 {
    if task == 0 {
        return 0;
    }
    leak_thread_with_pid(task, pid as u64)
}

// The global functions below (`#[no_mangle] extern "C"`, BTF linkage global) are verified
// once each, on their own, with any value for their arguments, rather than once per call and
// per path leading to the call as the verifier treats inlined code and static functions. A
// victim report inlined whole was too much for the verifiers of 5.10 (minutes under emulation)
// and 6.1 (past its million instructions) on the classic tracepoint, where three thread walks
// precede the snapshot. Their arguments and results are scalars (what the 5.10 verifier allows
// a global function); what they fill is the per-CPU [`SNAPSHOT`].

/// `task` if its pid is `pid`, else the thread of its process with that pid, walking
/// `task->signal->thread_head` (bounded); 0 when there is none.
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_thread_with_pid(task: u64, pid: u64) -> u64 {
    let pid = pid as u32;
    if read::<u32>(task, layout!(task_pid)) == Ok(pid) {
        return task;
    }
    let Ok(signal) = read::<u64>(task, layout!(task_signal)) else {
        return 0;
    };
    let head = signal + layout!(signal_thread_head) as u64;
    let mut node = read::<u64>(head, 0).unwrap_or(head);
    for _ in 0..THREADS_WALKED {
        if node == head || node == 0 {
            return 0;
        }
        let next = leak_thread_step(node, pid as u64);
        if next == THREAD_FOUND {
            return node - layout!(task_thread_node) as u64;
        }
        node = next;
    }
    0
}

/// [`leak_thread_step`]'s answer when the thread is the one looked for (never a kernel address).
const THREAD_FOUND: u64 = 1;

/// One step of [`leak_thread_with_pid`]'s walk: [`THREAD_FOUND`] when the thread whose
/// `thread_node` is at `node` has pid `pid`, else the next node (0 when it cannot be read).
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_thread_step(node: u64, pid: u64) -> u64 {
    let thread_node = layout!(task_thread_node) as u64;
    if node < thread_node {
        return 0;
    }
    if read::<u32>(node - thread_node, layout!(task_pid)) == Ok(pid as u32) {
        return THREAD_FOUND;
    }
    read::<u64>(node, 0).unwrap_or(0)
}

/// Whether this thread just killed the victim, by whichever kill witness is attached (only
/// the attached one fills its map): `__oom_kill_process` is killing the victim's process, or
/// this thread's last kernel SIGKILL went to the victim. Each witness's note is used once.
#[inline(always)]
fn witnessed_kill(victim: u64, victim_pid: u32) -> bool {
    let tid = current_tid();
    let mut killed = false;
    let victim_tgid = read::<u32>(victim, layout!(task_tgid));
    // SAFETY: the value is plain data, copied out before the map can change.
    if let Some(context) = unsafe { OOM_CONTEXT.get(tid) } {
        killed |=
            victim_tgid.is_ok() && read::<u32>(context.killing, layout!(task_tgid)) == victim_tgid;
    }
    // SAFETY: as above.
    if let Some(&task) = unsafe { SIGKILLED.get(tid) } {
        killed |=
            task != 0 && (task == victim || read::<u32>(task, layout!(task_pid)) == Ok(victim_pid));
        let _ = SIGKILLED.remove(tid);
    }
    // SAFETY: as above.
    if let Some(&pid) = unsafe { SIGKILLED_PID.get(tid) } {
        killed |= pid == victim_pid;
        let _ = SIGKILLED_PID.remove(tid);
    }
    killed
}

/// The snapshot being assembled on this CPU. Victims are marked under the kernel's `oom_lock`
/// (every caller of `out_of_memory` holds it), so one report at a time uses it.
#[inline(always)]
fn snapshot() -> Option<&'static mut OomKillEvent> {
    // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot; only the
    // report in progress (serialised by `oom_lock`) uses it.
    SNAPSHOT.get_ptr_mut(0).map(|event| unsafe { &mut *event })
}

/// Assembles the victim's report in [`SNAPSHOT`] and copies it into [`EVENTS`].
fn report_victim(hook: u32, victim: u64, victim_pid: u32) {
    let killed = witnessed_kill(victim, victim_pid);
    let mut memcg = leak_fill_header(
        hook as u64,
        untyped(victim),
        victim_pid as u64,
        killed as u64,
    );
    if memcg == SNAPSHOT_UNAVAILABLE {
        count(counter::LOST_EVENTS);
        return;
    }
    for level in 0..MAX_CGROUP_DEPTH as u64 {
        if memcg == 0 || memcg == CHAIN_BROKEN {
            break;
        }
        memcg = fill_level(level, memcg);
    }
    leak_snapshot_oom_memcg(memcg);
    let Some(event) = snapshot() else {
        count(counter::LOST_EVENTS);
        return;
    };
    if EVENTS.output::<OomKillEvent>(&*event, 0).is_err() {
        count(counter::LOST_EVENTS);
    }
}

/// `value` as a plain number: a pointer the verifier knows the type of (a BTF tracepoint's or
/// fentry's argument) cannot be handed to a global function, which takes scalars only.
#[inline(always)]
fn untyped(value: u64) -> u64 {
    read::<u64>(&raw const value as u64, 0).unwrap_or(0)
}

/// [`leak_fill_header`]'s answer when there is no snapshot to fill.
const SNAPSHOT_UNAVAILABLE: u64 = u64::MAX - 1;
/// [`fill_level`]'s answer when a pointer of the chain could not be read.
const CHAIN_BROKEN: u64 = u64::MAX;

/// Clears the snapshot and fills everything but the cgroups: the victim, the task that ran
/// out of memory, the `oom_control`. Returns the memory cgroup the chain starts at (0 when
/// none), or [`SNAPSHOT_UNAVAILABLE`].
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_fill_header(hook: u64, victim: u64, victim_pid: u64, killed: u64) -> u64 {
    let (hook, victim_pid) = (hook as u32, victim_pid as u32);
    let Some(event) = snapshot() else {
        return SNAPSHOT_UNAVAILABLE;
    };
    // SAFETY: `event` is one whole OomKillEvent of the map's value; zeroed first so that
    // nothing of a previous report stays behind.
    unsafe { core::ptr::write_bytes(event as *mut OomKillEvent, 0, 1) };
    // SAFETY: the helper has no preconditions.
    event.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.hook = hook;
    event.victim_pid = victim_pid;

    let pid_tgid = bpf_get_current_pid_tgid();
    event.trigger_pid = pid_tgid as u32;
    event.trigger_tgid = (pid_tgid >> 32) as u32;
    if let Ok(comm) = bpf_get_current_comm() {
        event.trigger_comm = comm;
    }

    let mut event_flags = 0;
    if killed != 0 {
        event_flags |= flags::KILLED;
    }
    let chain_start = if victim != 0 {
        event_flags |= flags::VICTIM_TASK;
        fill_victim(event, victim, &mut event_flags);
        task_memcg(victim)
    } else {
        // Without the victim's task the best we have is the task that ran out of memory: for a
        // memcg OOM it sits below the cgroup that hit its limit.
        task_memcg(current_task())
    };

    // Whether the witness and the report hook were attached when this OOM began: when its
    // `oom_control` was recorded, else (no `oom_kill_process` hook) now.
    let mut was_armed = armed();
    // SAFETY: the value is plain data, copied out before the map can change.
    if let Some(context) = unsafe { OOM_CONTEXT.get(current_tid()) } {
        was_armed = context.armed;
        event_flags |= flags::HAS_OOM_CONTROL;
        event.oc_totalpages = context.totalpages;
        event.oc_chosen_points = context.chosen_points;
        event.oc_constraint = context.constraint;
        event.oc_gfp_mask = context.gfp_mask;
        event.oc_order = context.order;
        if context.reported == 1 {
            event_flags |= flags::STATS_FLUSHED;
        }
        if context.memcg != 0 {
            event.oc_memcg_cgroup_id = memcg_cgroup_id(context.memcg);
        }
    }

    if was_armed == 0 {
        event_flags |= flags::UNARMED;
    }
    if layout!(counter_failcnt) != Layout::ABSENT {
        event_flags |= flags::FAILCNT_VALID;
    }
    if layout!(failcnt_v1_only) == 1 {
        event_flags |= flags::FAILCNT_V1_ONLY;
    }
    if memsw_charged() {
        event_flags |= flags::MEMSW_VALID;
    }
    event.stats_present = present_bits(&raw const crate::kernel::LAYOUT.stat_index);
    if layout!(memcg_memory_events) != Layout::ABSENT {
        event.events_present = present_bits(&raw const crate::kernel::LAYOUT.memory_event_index);
    }
    event.flags = event_flags;
    chain_start
}

/// Snapshots `memcg` as level `level` of the chain (the victim's cgroup is level 0). Returns
/// its parent (0 above the root), or [`CHAIN_BROKEN`] when it could not be read.
#[inline(always)]
fn fill_level(level: u64, memcg: u64) -> u64 {
    if leak_fill_memcg(level, memcg) != 0 {
        return CHAIN_BROKEN;
    }
    if let Some(event) = snapshot() {
        event.depth = level as u32 + 1;
    }
    parent_memcg(memcg)
}

/// Where [`leak_fill_memcg`] puts the cgroup that hit its limit (`oom_memcg`); smaller slots
/// are the levels of the chain.
const OOM_MEMCG_SLOT: u64 = MAX_CGROUP_DEPTH as u64;

/// Snapshots `memcg` into `slot` of the snapshot: a level of the chain, or
/// [`OOM_MEMCG_SLOT`]. Returns 0, or 1 when it could not be read (counted, and flagged where it
/// cuts the chain short).
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_fill_memcg(slot: u64, memcg: u64) -> u64 {
    let Some(event) = snapshot() else {
        return 1;
    };
    let target = if slot == OOM_MEMCG_SLOT {
        &mut event.oom_memcg
    } else if let Some(level) = event.cgroups.get_mut(slot as usize) {
        level
    } else {
        return 1;
    };
    if fill_memcg(target, memcg).is_ok() {
        return 0;
    }
    count(counter::READ_ERRORS);
    if slot != OOM_MEMCG_SLOT {
        event.flags |= flags::CHAIN_TRUNCATED;
    }
    1
}

/// Snapshots the cgroup that hit its limit into `oom_memcg` when the chain does not hold it:
/// `oc->memcg` (when `oom_kill_process` was hooked), else the nearest ancestor at its limit
/// above the chain. `above` is the first ancestor the chain left out (0 past the root,
/// [`CHAIN_BROKEN`] when the chain broke off).
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_snapshot_oom_memcg(above: u64) -> u32 {
    let Some(event) = snapshot() else {
        return 0;
    };
    if above == 0 {
        event.flags |= flags::REACHED_ROOT;
    }
    let (found, level) = if event.flags & flags::HAS_OOM_CONTROL != 0 {
        // SAFETY: the value is plain data, copied out before the map can change.
        let oom_memcg = match unsafe { OOM_CONTEXT.get(current_tid()) } {
            Some(context) => context.memcg,
            None => 0,
        };
        if oom_memcg == 0 || in_chain(event) {
            return 0;
        }
        match levels_up_to(above, oom_memcg) {
            Some(steps) => (oom_memcg, Some(MAX_CGROUP_DEPTH as u32 + steps)),
            // Not an ancestor within reach: still the cgroup that hit its limit.
            None => (oom_memcg, None),
        }
    } else {
        if above == 0 || above == CHAIN_BROKEN {
            return 0;
        }
        match nearest_at_limit(above) {
            Search::Found(found, steps) => (found, Some(MAX_CGROUP_DEPTH as u32 + steps)),
            Search::NoneUpToRoot => {
                event.flags |= flags::ANCESTORS_SEARCHED;
                return 0;
            }
            Search::Unfinished => return 0,
        }
    };
    if leak_fill_memcg(OOM_MEMCG_SLOT, found) == 0 {
        event.flags |= flags::OOM_MEMCG;
    }
    if let Some(steps) = level {
        event.oom_memcg_level = steps;
        event.flags |= flags::OOM_MEMCG_LEVEL;
    }
    1
}

#[inline(always)]
fn fill_victim(event: &mut OomKillEvent, task: u64, event_flags: &mut u32) {
    event.victim_pid = read::<u32>(task, layout!(task_pid)).unwrap_or(event.victim_pid);
    event.victim_tgid = read::<u32>(task, layout!(task_tgid)).unwrap_or(0);
    event.victim_start_ns = read::<u64>(task, layout!(task_start_time)).unwrap_or(0);
    let comm = task + layout!(task_comm) as u64;
    // SAFETY: `victim_comm` is TASK_COMM_LEN writable bytes, borrowed mutably for the call.
    let _ = unsafe { read_into(event.victim_comm.as_mut_ptr(), TASK_COMM_LEN as u32, comm) };
    // The process's pid in its namespace, as its leader holds it: the marked thread may be
    // another one (`find_lock_task_mm` when the leader has exited).
    let leader = match read::<u64>(task, layout!(task_group_leader)) {
        Ok(leader) if leader != 0 => leader,
        _ => task,
    };
    if let Some(ns_pid) = namespace_pid(leader) {
        event.victim_ns_pid = ns_pid;
        *event_flags |= flags::NS_PID_VALID;
    }
    if let Ok(signal) = read::<u64>(task, layout!(task_signal)) {
        if let Ok(adj) = read::<i16>(signal, layout!(signal_oom_score_adj)) {
            event.victim_oom_score_adj = adj as i32;
            *event_flags |= flags::OOM_SCORE_ADJ_VALID;
        }
    }
    let Ok(mm) = read::<u64>(task, layout!(task_mm)) else {
        return;
    };
    if mm == 0 {
        return;
    }
    let scheme = layout!(rss_scheme);
    if scheme != rss_scheme::ATOMIC_ARRAY && scheme != rss_scheme::PERCPU_COUNTER_ARRAY {
        return;
    }
    let base = layout!(mm_rss_stat) + layout!(rss_value);
    let stride = layout!(rss_stride);
    let rss = |index: u32| read::<i64>(mm, base + index * stride).map(|pages| pages.max(0) as u64);
    if let (Ok(anon), Ok(file), Ok(shmem)) = (
        rss(layout!(rss_anon_index)),
        rss(layout!(rss_file_index)),
        rss(layout!(rss_shmem_index)),
    ) {
        event.rss_anon_pages = anon;
        event.rss_file_pages = file;
        event.rss_shmem_pages = shmem;
        *event_flags |= flags::RSS_VALID;
    }
}

/// Whether the kernel charges the memory+swap counter (cgroup v1 with swap accounting).
#[inline(always)]
fn memsw_charged() -> bool {
    layout!(memcg_memsw) != Layout::ABSENT && layout!(memsw_accounted) == 1
}

/// Whether `oc->memcg` is a level of the chain, by cgroup id.
#[inline(always)]
fn in_chain(event: &OomKillEvent) -> bool {
    let id = event.oc_memcg_cgroup_id;
    for level in 0..MAX_CGROUP_DEPTH {
        if level as u32 >= event.depth {
            return false;
        }
        if id != 0 && event.cgroups[level].cgroup_id == id {
            return true;
        }
    }
    false
}

/// How many levels above `from` the memory cgroup `target` is, within [`MAX_ANCESTOR_SEARCH`].
#[inline(always)]
fn levels_up_to(from: u64, target: u64) -> Option<u32> {
    let mut memcg = from;
    for steps in 0..MAX_ANCESTOR_SEARCH as u32 {
        if memcg == 0 {
            return None;
        }
        if memcg == target {
            return Some(steps);
        }
        memcg = leak_parent_memcg(memcg);
    }
    None
}

enum Search {
    /// The memcg and how many levels above the start it is.
    Found(u64, u32),
    NoneUpToRoot,
    /// [`MAX_ANCESTOR_SEARCH`] levels searched without reaching the root.
    Unfinished,
}

/// The nearest memory cgroup from `from` up whose usage, or memory+swap usage, is within one
/// huge-page charge of its limit: without `oom_control`, the best guess at the one that hit it.
#[inline(always)]
fn nearest_at_limit(from: u64) -> Search {
    let mut memcg = from;
    for steps in 0..MAX_ANCESTOR_SEARCH as u32 {
        if memcg == 0 {
            return Search::NoneUpToRoot;
        }
        let next = leak_search_step(memcg);
        if next == AT_LIMIT {
            return Search::Found(memcg, steps);
        }
        memcg = next;
    }
    match memcg {
        0 => Search::NoneUpToRoot,
        _ => Search::Unfinished,
    }
}

/// The parent of a memory cgroup (0 for the root, or when it cannot be read). A function of
/// its own so that each step of a walk up costs the verifier one call, not every path
/// through the reads.
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_parent_memcg(memcg: u64) -> u64 {
    parent_memcg(memcg)
}

/// [`leak_search_step`]'s answer for a cgroup at its limit (never a kernel address).
const AT_LIMIT: u64 = 1;

/// One step of [`nearest_at_limit`]: [`AT_LIMIT`] when `memcg` is within one huge-page charge
/// of its memory (or memory+swap) limit, else its parent (0 above the root).
#[no_mangle]
#[inline(never)]
pub extern "C" fn leak_search_step(memcg: u64) -> u64 {
    if at_limit(memcg, layout!(memcg_memory))
        || memsw_charged() && at_limit(memcg, layout!(memcg_memsw))
    {
        return AT_LIMIT;
    }
    parent_memcg(memcg)
}

/// Whether the `page_counter` at `counter` in `memcg` is within one huge-page charge of its
/// limit (a counter without a limit never is: its `max` is `PAGE_COUNTER_MAX`).
#[inline(always)]
fn at_limit(memcg: u64, counter: u32) -> bool {
    match (
        read::<u64>(memcg, counter + layout!(counter_usage)),
        read::<u64>(memcg, counter + layout!(counter_max)),
    ) {
        (Ok(usage), Ok(max)) => usage.saturating_add(CHARGE_SLACK_PAGES) >= max,
        _ => false,
    }
}

/// The task's pid in the innermost pid namespace it lives in:
/// `task->thread_pid->numbers[task->thread_pid->level].nr`.
#[inline(always)]
fn namespace_pid(task: u64) -> Option<u32> {
    let pid = read::<u64>(task, layout!(task_thread_pid)).ok()?;
    let level = read::<u32>(pid, layout!(pid_level)).ok()?;
    // Pid namespaces nest at most 32 deep (MAX_PID_NS_LEVEL).
    if level > 32 {
        return None;
    }
    let upid = layout!(pid_numbers) + level * layout!(upid_size);
    read::<u32>(pid, upid + layout!(upid_nr)).ok()
}

/// Bit `i` set for each entry of an index table that is not [`Layout::ABSENT`].
#[inline(always)]
fn present_bits<const N: usize>(table: *const [u32; N]) -> u32 {
    let mut bits = 0;
    for i in 0..N {
        // SAFETY: `table` points into the LAYOUT static and `i < N`; volatile so the compiler
        // cannot fold the zero initialiser.
        let index = unsafe { core::ptr::read_volatile((table as *const u32).add(i)) };
        if index != Layout::ABSENT {
            bits |= 1 << i;
        }
    }
    bits
}

#[inline(always)]
fn fill_memcg(snapshot: &mut MemcgSnapshot, memcg: u64) -> Result<(), i64> {
    let counter = layout!(memcg_memory);
    snapshot.usage_pages = read::<u64>(memcg, counter + layout!(counter_usage))?;
    snapshot.limit_pages = read::<u64>(memcg, counter + layout!(counter_max))?;
    snapshot.watermark_pages =
        read::<u64>(memcg, counter + layout!(counter_watermark)).unwrap_or(0);
    let failcnt = layout!(counter_failcnt);
    if failcnt != Layout::ABSENT {
        snapshot.failcnt = read::<u64>(memcg, counter + failcnt).unwrap_or(0);
    }

    if let Some(state) = memcg_state(memcg) {
        for lru in 0..LRU_COUNT {
            snapshot.lru_pages[lru] = state_item(state, layout!(lru_stat_index[lru])).unwrap_or(0);
        }
        for item in 0..stat::COUNT {
            snapshot.stats[item] = state_item(state, layout!(stat_index[item])).unwrap_or(0);
        }
    }
    let events = layout!(memcg_memory_events);
    if events != Layout::ABSENT {
        for event in 0..memory_event::COUNT {
            let index = layout!(memory_event_index[event]);
            if index != Layout::ABSENT {
                snapshot.events[event] =
                    read::<i64>(memcg, events + index * 8).map_or(0, |value| value.max(0) as u64);
            }
        }
    }

    if memsw_charged() {
        let memsw = layout!(memcg_memsw);
        snapshot.memsw_usage_pages =
            read::<u64>(memcg, memsw + layout!(counter_usage)).unwrap_or(0);
        snapshot.memsw_limit_pages = read::<u64>(memcg, memsw + layout!(counter_max)).unwrap_or(0);
        snapshot.memsw_watermark_pages =
            read::<u64>(memcg, memsw + layout!(counter_watermark)).unwrap_or(0);
        if failcnt != Layout::ABSENT {
            snapshot.memsw_failcnt = read::<u64>(memcg, memsw + failcnt).unwrap_or(0);
        }
    }

    let cgroup = read::<u64>(memcg, layout!(memcg_css) + layout!(css_cgroup))?;
    let kn = read::<u64>(cgroup, layout!(cgroup_kn))?;
    snapshot.cgroup_id = read::<u64>(kn, layout!(kn_id))?;
    if let Ok(name) = read::<u64>(kn, layout!(kn_name)) {
        // SAFETY: `snapshot.name` is CGROUP_NAME_LEN writable bytes, borrowed mutably for the call.
        let _ = unsafe { read_str_into(snapshot.name.as_mut_ptr(), CGROUP_NAME_LEN as u32, name) };
    }
    Ok(())
}
