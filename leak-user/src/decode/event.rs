//! OOM-kill records: the victim, the triggering task, the kernel's `oom_control` when it was
//! captured, and the memory cgroup chain, in bytes.

use leak_common::{
    event::{constraint, flags, hook, MemcgSnapshot, OomKillEvent, MAX_CGROUP_DEPTH},
    layout::{
        memory_event, stat, LRU_ACTIVE_ANON, LRU_ACTIVE_FILE, LRU_INACTIVE_ANON, LRU_INACTIVE_FILE,
        LRU_UNEVICTABLE,
    },
};

use super::{bytes, read_record, DecodeError};
use crate::model::{
    kill::{Breakdown, Constraint, MemoryEvents, Rss, Trigger, VictimHook},
    memory::is_unlimited,
};

/// One memory cgroup of the chain, as the kernel program read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemcgRecord {
    pub id: u64,
    /// The kernfs leaf name.
    pub name: String,
    /// The name filled the kernel's buffer and may have been cut short.
    pub name_may_be_truncated: bool,
    pub usage_bytes: u64,
    /// `None` when the cgroup has no limit.
    pub limit_bytes: Option<u64>,
    pub peak_bytes: u64,
    /// `None` where the kernel does not keep it.
    pub failcnt: Option<u64>,
    pub inactive_anon_bytes: u64,
    pub active_anon_bytes: u64,
    pub inactive_file_bytes: u64,
    pub active_file_bytes: u64,
    pub unevictable_bytes: u64,
    /// The memcg statistics beyond the LRU lists, in bytes.
    pub breakdown: Breakdown,
    /// `memory_events[]`, `None` where the kernel has none.
    pub events: Option<MemoryEvents>,
    /// The memory+swap counter (cgroup v1 with swap accounting), `None` where not charged.
    pub memsw: Option<MemswRecord>,
}

/// cgroup v1's memory+swap `page_counter`, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemswRecord {
    pub usage_bytes: u64,
    /// `None` when memory+swap has no limit.
    pub limit_bytes: Option<u64>,
    pub peak_bytes: u64,
    pub failcnt: Option<u64>,
}

/// The kernel's `oom_control`, captured on `oom_kill_process`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomControlRecord {
    pub totalpages: u64,
    pub chosen_points: i64,
    /// The cgroup id of `oc->memcg`; `None` for a global OOM.
    pub memcg_id: Option<u64>,
    pub constraint: Constraint,
    pub gfp_mask: u32,
    pub order: i32,
}

/// A decoded OOM-kill record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KillRecord {
    pub boot_ns: u64,
    pub hook: VictimHook,
    /// The thread the kernel marked.
    pub victim_tid: u32,
    /// Its `start_time` (the kernel marks a task once in its life, so tid and start time name
    /// the kill); `None` where the task was not read.
    pub victim_start_ns: Option<u64>,
    /// The victim's task was read in the kernel; otherwise `cgroups` are the triggering
    /// task's and the victim's other fields are unknown.
    pub victim_task_resolved: bool,
    pub victim_tgid: Option<u32>,
    pub victim_comm: Option<String>,
    pub victim_oom_score_adj: Option<i32>,
    /// The victim's pid in its own pid namespace.
    pub victim_ns_pid: Option<u32>,
    pub victim_rss: Option<Rss>,
    pub trigger: Trigger,
    pub oom_control: Option<OomControlRecord>,
    /// The victim's memory cgroup first, then its ancestors.
    pub cgroups: Vec<MemcgRecord>,
    /// The chain stopped early because a pointer could not be read.
    pub chain_truncated: bool,
    /// The kernel counts `failcnt` for cgroup v1 only (6.15+).
    pub failcnt_v1_only: bool,
    /// The kernel's report of this OOM flushed the memcg statistics before the kill; `None`
    /// when the `oom_control` was not captured (the report is hooked only with it).
    pub stats_flushed: Option<bool>,
    /// The kill witness saw the OOM killer kill this victim (meaningful only where a witness
    /// is attached: otherwise always false).
    pub killed: bool,
    /// Every program of the reporting set was attached when this OOM began, so [`killed`]
    /// (and `stats_flushed`) can be trusted (false when the agent attached in its middle).
    ///
    /// [`killed`]: KillRecord::killed
    pub armed: bool,
    /// The chain ends at the root memory cgroup.
    pub root_reached: bool,
    /// The cgroup that hit its limit, when the kernel found it above `cgroups`.
    pub oom_memcg: Option<MemcgRecord>,
    /// How many levels above the victim's cgroup `oom_memcg` is, where known.
    pub oom_memcg_level: Option<u32>,
    /// Without `oom_control`: the chain stopped at its depth bound and the kernel searched
    /// every ancestor above it up to the root for one at its limit.
    pub ancestors_searched: bool,
}

impl KillRecord {
    /// Whether `cgroups` end at the root of the hierarchy (so their names make whole paths).
    pub fn reached_root(&self) -> bool {
        self.root_reached || self.cgroups.len() < MAX_CGROUP_DEPTH && !self.chain_truncated
    }
}

fn victim_hook(tag: u32) -> Result<VictimHook, DecodeError> {
    match tag {
        hook::TP_BTF_MARK_VICTIM => Ok(VictimHook::TpBtf),
        hook::TRACEPOINT_MARK_VICTIM => Ok(VictimHook::Tracepoint),
        other => Err(DecodeError::UnknownHook(other)),
    }
}

fn constraint(tag: u32) -> Constraint {
    match tag {
        constraint::NONE => Constraint::None,
        constraint::CPUSET => Constraint::Cpuset,
        constraint::MEMORY_POLICY => Constraint::MemoryPolicy,
        constraint::MEMCG => Constraint::Memcg,
        _ => Constraint::Unknown,
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One [`stat`] item in bytes, from the unit the kernel keeps it in.
fn stat_bytes(item: usize, value: u64, page: u64) -> Result<u64, DecodeError> {
    let field = stat::NAMES[item];
    match stat::UNITS[item] {
        stat::unit::BYTES => Ok(value),
        stat::unit::KIB => bytes(field, value, 1024),
        _ => bytes(field, value, page),
    }
}

fn breakdown(snapshot: &MemcgSnapshot, present: u32, page: u64) -> Result<Breakdown, DecodeError> {
    let mut items = [None; stat::COUNT];
    for (index, item) in items.iter_mut().enumerate() {
        if present & (1 << index) != 0 {
            *item = Some(stat_bytes(index, snapshot.stats[index], page)?);
        }
    }
    Ok(Breakdown::from_items(items))
}

fn memory_events(snapshot: &MemcgSnapshot, present: u32) -> Option<MemoryEvents> {
    if present == 0 {
        return None;
    }
    let event = |index: usize| (present & (1 << index) != 0).then_some(snapshot.events[index]);
    Some(MemoryEvents {
        max: event(memory_event::MAX),
        oom: event(memory_event::OOM),
        oom_kill: event(memory_event::OOM_KILL),
        oom_group_kill: event(memory_event::OOM_GROUP_KILL),
    })
}

fn memcg(
    snapshot: &MemcgSnapshot,
    event: &OomKillEvent,
    page: u64,
) -> Result<MemcgRecord, DecodeError> {
    let failcnt_valid = event.flags & flags::FAILCNT_VALID != 0;
    let lru = |index: usize, field: &'static str| bytes(field, snapshot.lru_pages[index], page);
    let name = c_string(&snapshot.name);
    Ok(MemcgRecord {
        id: snapshot.cgroup_id,
        name_may_be_truncated: name.len() + 1 >= snapshot.name.len(),
        name,
        usage_bytes: bytes("usage", snapshot.usage_pages, page)?,
        limit_bytes: match is_unlimited(snapshot.limit_pages, page) {
            true => None,
            false => Some(bytes("limit", snapshot.limit_pages, page)?),
        },
        peak_bytes: bytes("peak", snapshot.watermark_pages, page)?,
        failcnt: failcnt_valid.then_some(snapshot.failcnt),
        inactive_anon_bytes: lru(LRU_INACTIVE_ANON, "inactive_anon")?,
        active_anon_bytes: lru(LRU_ACTIVE_ANON, "active_anon")?,
        inactive_file_bytes: lru(LRU_INACTIVE_FILE, "inactive_file")?,
        active_file_bytes: lru(LRU_ACTIVE_FILE, "active_file")?,
        unevictable_bytes: lru(LRU_UNEVICTABLE, "unevictable")?,
        breakdown: breakdown(snapshot, event.stats_present, page)?,
        events: memory_events(snapshot, event.events_present),
        memsw: match event.flags & flags::MEMSW_VALID {
            0 => None,
            _ => Some(MemswRecord {
                usage_bytes: bytes("memsw_usage", snapshot.memsw_usage_pages, page)?,
                limit_bytes: match is_unlimited(snapshot.memsw_limit_pages, page) {
                    true => None,
                    false => Some(bytes("memsw_limit", snapshot.memsw_limit_pages, page)?),
                },
                peak_bytes: bytes("memsw_peak", snapshot.memsw_watermark_pages, page)?,
                failcnt: failcnt_valid.then_some(snapshot.memsw_failcnt),
            }),
        },
    })
}

/// Decodes an [`OomKillEvent`] record.
pub fn decode_kill(record: &[u8], page_size: u64) -> Result<KillRecord, DecodeError> {
    let event: OomKillEvent = read_record(record)?;
    let hook = victim_hook(event.hook)?;
    let depth = event.depth as usize;
    if depth > MAX_CGROUP_DEPTH {
        return Err(DecodeError::Depth {
            got: event.depth,
            max: MAX_CGROUP_DEPTH,
        });
    }
    let has = |flag: u32| event.flags & flag != 0;
    let resolved = has(flags::VICTIM_TASK);
    let cgroups = event.cgroups[..depth]
        .iter()
        .map(|snapshot| memcg(snapshot, &event, page_size))
        .collect::<Result<Vec<_>, _>>()?;
    let victim_rss = match has(flags::RSS_VALID) {
        true => Some(Rss {
            anon_bytes: bytes("rss_anon", event.rss_anon_pages, page_size)?,
            file_bytes: bytes("rss_file", event.rss_file_pages, page_size)?,
            shmem_bytes: bytes("rss_shmem", event.rss_shmem_pages, page_size)?,
        }),
        false => None,
    };
    Ok(KillRecord {
        boot_ns: event.boot_ns,
        hook,
        victim_tid: event.victim_pid,
        victim_start_ns: (resolved && event.victim_start_ns != 0).then_some(event.victim_start_ns),
        victim_task_resolved: resolved,
        victim_tgid: resolved.then_some(event.victim_tgid),
        victim_comm: resolved.then(|| c_string(&event.victim_comm)),
        victim_oom_score_adj: has(flags::OOM_SCORE_ADJ_VALID).then_some(event.victim_oom_score_adj),
        victim_ns_pid: (resolved && has(flags::NS_PID_VALID)).then_some(event.victim_ns_pid),
        victim_rss,
        trigger: Trigger {
            pid: event.trigger_pid,
            tgid: event.trigger_tgid,
            comm: c_string(&event.trigger_comm),
        },
        oom_control: has(flags::HAS_OOM_CONTROL).then(|| OomControlRecord {
            totalpages: event.oc_totalpages,
            chosen_points: event.oc_chosen_points,
            memcg_id: (event.oc_memcg_cgroup_id != 0).then_some(event.oc_memcg_cgroup_id),
            constraint: constraint(event.oc_constraint),
            gfp_mask: event.oc_gfp_mask,
            order: event.oc_order,
        }),
        cgroups,
        chain_truncated: has(flags::CHAIN_TRUNCATED),
        failcnt_v1_only: has(flags::FAILCNT_V1_ONLY),
        stats_flushed: (has(flags::HAS_OOM_CONTROL) && !has(flags::UNARMED))
            .then_some(has(flags::STATS_FLUSHED)),
        killed: has(flags::KILLED),
        armed: !has(flags::UNARMED),
        root_reached: has(flags::REACHED_ROOT),
        oom_memcg: match has(flags::OOM_MEMCG) {
            true => Some(memcg(&event.oom_memcg, &event, page_size)?),
            false => None,
        },
        oom_memcg_level: has(flags::OOM_MEMCG_LEVEL).then_some(event.oom_memcg_level),
        ancestors_searched: has(flags::ANCESTORS_SEARCHED),
    })
}

/// Records as the kernel programs write them, for the tests of every stage after decoding.
#[cfg(test)]
pub(crate) mod fixtures {
    use leak_common::event::{
        flags, hook, MemcgSnapshot, OomKillEvent, CGROUP_NAME_LEN, MAX_CGROUP_DEPTH, TASK_COMM_LEN,
    };

    pub const PAGE: u64 = 4096;
    pub const UNLIMITED: u64 = (i64::MAX as u64) / PAGE;

    fn name(text: &str) -> [u8; CGROUP_NAME_LEN] {
        let mut out = [0u8; CGROUP_NAME_LEN];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    fn comm(text: &str) -> [u8; TASK_COMM_LEN] {
        let mut out = [0u8; TASK_COMM_LEN];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    pub fn level(id: u64, leaf: &str, usage: u64, limit: u64, inactive_file: u64) -> MemcgSnapshot {
        MemcgSnapshot {
            cgroup_id: id,
            usage_pages: usage,
            limit_pages: limit,
            watermark_pages: usage,
            failcnt: 7,
            lru_pages: [usage - inactive_file, 0, inactive_file, 0, 0],
            // anon, file, shmem, dirty, writeback, slab (bytes), stack (KiB), pagetables,
            // sock, percpu (bytes), swap
            stats: [
                usage - inactive_file,
                inactive_file,
                0,
                0,
                0,
                4096,
                8192,
                16,
                1,
                0,
                1024,
                0,
            ],
            events: [3, 1, 1, 0],
            name: name(leaf),
            memsw_usage_pages: usage,
            memsw_limit_pages: UNLIMITED,
            memsw_watermark_pages: usage,
            memsw_failcnt: 0,
        }
    }

    pub fn event(levels: &[MemcgSnapshot]) -> OomKillEvent {
        let mut cgroups = [level(0, "", 0, 0, 0); MAX_CGROUP_DEPTH];
        cgroups[..levels.len()].copy_from_slice(levels);
        OomKillEvent {
            boot_ns: 5_000_000_000,
            hook: hook::TP_BTF_MARK_VICTIM,
            flags: flags::VICTIM_TASK
                | flags::FAILCNT_VALID
                | flags::RSS_VALID
                | flags::NS_PID_VALID
                | flags::KILLED,
            victim_pid: 4242,
            victim_tgid: 4242,
            victim_comm: comm("leak"),
            victim_oom_score_adj: 0,
            victim_ns_pid: 1,
            rss_anon_pages: 100,
            rss_file_pages: 2,
            rss_shmem_pages: 0,
            trigger_pid: 4242,
            trigger_tgid: 4242,
            trigger_comm: comm("leak"),
            oc_totalpages: 0,
            oc_chosen_points: 0,
            oc_memcg_cgroup_id: 0,
            oc_constraint: 0,
            oc_gfp_mask: 0,
            oc_order: 0,
            depth: levels.len() as u32,
            stats_present: (1 << leak_common::layout::stat::COUNT) - 1,
            events_present: 0b0111,
            cgroups,
            oom_memcg_level: 0,
            _pad_oom_memcg: 0,
            oom_memcg: level(0, "", 0, 0, 0),
            victim_start_ns: 77,
        }
    }

    pub fn bytes_of(event: &OomKillEvent) -> Vec<u8> {
        // SAFETY: OomKillEvent is plain old data; we only read its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const OomKillEvent).cast::<u8>(),
                size_of::<OomKillEvent>(),
            )
        }
        .to_vec()
    }

    /// Decodes an event the way the agent does.
    pub fn record(event: &OomKillEvent) -> super::KillRecord {
        super::decode_kill(&bytes_of(event), PAGE).expect("a well-formed event decodes")
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    /// The fuzz target's committed seeds follow the record layout (make_seeds.py writes them).
    #[test]
    fn the_fuzz_seeds_decode() {
        let seed = include_bytes!("../../fuzz/corpus/decode/memcg-kill-tp-btf");
        let kill = decode_kill(seed, PAGE).expect("the memcg-kill seed decodes");
        assert_eq!(kill.cgroups.len(), 3);
        assert_eq!(
            kill.cgroups[0].breakdown.kernel_stack_bytes,
            Some(64 * 1024)
        );
        assert_eq!(
            kill.cgroups[0].breakdown.slab_reclaimable_bytes,
            Some(81_920)
        );
        let seed = include_bytes!("../../fuzz/corpus/decode/pid-only-tracepoint");
        let kill = decode_kill(seed, PAGE).expect("the pid-only seed decodes");
        assert_eq!(kill.cgroups[0].breakdown.pagetables_bytes, None);
        assert!(kill.failcnt_v1_only);
        let events = kill.cgroups[0].events.as_ref().expect("events");
        assert_eq!((events.oom_kill, events.oom_group_kill), (Some(1), None));
    }

    #[test]
    fn decode_checks_size_hook_and_depth() {
        let good = event(&[level(10, "a", 10, 10, 0), level(1, "", 100, UNLIMITED, 0)]);
        let bytes = bytes_of(&good);
        let decoded = decode_kill(&bytes, PAGE).expect("decodes");
        assert_eq!(decoded.victim_tid, 4242);
        assert_eq!(decoded.hook, VictimHook::TpBtf);
        assert_eq!(decoded.cgroups[0].limit_bytes, Some(10 * PAGE));
        assert_eq!(decoded.cgroups[1].limit_bytes, None);
        assert!(matches!(
            decode_kill(&bytes[1..], PAGE),
            Err(DecodeError::Size { .. })
        ));
        assert!(matches!(
            decode_kill(&[], PAGE),
            Err(DecodeError::Size { .. })
        ));

        let mut bad_hook = good;
        bad_hook.hook = 99;
        assert_eq!(
            decode_kill(&bytes_of(&bad_hook), PAGE).err(),
            Some(DecodeError::UnknownHook(99))
        );
        let mut bad_depth = good;
        bad_depth.depth = 9;
        assert_eq!(
            decode_kill(&bytes_of(&bad_depth), PAGE).err(),
            Some(DecodeError::Depth {
                got: 9,
                max: MAX_CGROUP_DEPTH
            })
        );
    }

    #[test]
    fn page_counts_that_overflow_bytes_are_an_error_not_a_panic() {
        let mut huge = event(&[level(10, "a", 10, 10, 0)]);
        huge.cgroups[0].watermark_pages = u64::MAX / 3;
        assert!(matches!(
            decode_kill(&bytes_of(&huge), PAGE),
            Err(DecodeError::Overflow { field: "peak", .. })
        ));
        let mut huge = event(&[level(10, "a", 10, 10, 0)]);
        huge.rss_anon_pages = u64::MAX;
        assert!(matches!(
            decode_kill(&bytes_of(&huge), PAGE),
            Err(DecodeError::Overflow {
                field: "rss_anon",
                ..
            })
        ));
    }

    #[test]
    fn an_unresolved_victim_keeps_only_its_thread_id() {
        let mut ev = event(&[level(30, "a", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)]);
        ev.flags &= !(flags::VICTIM_TASK | flags::RSS_VALID);
        let record = record(&ev);
        assert_eq!(record.victim_tid, 4242);
        assert_eq!(
            (record.victim_tgid, record.victim_comm, record.victim_rss),
            (None, None, None)
        );
        assert_eq!(record.victim_ns_pid, None, "a pid namespace is the task's");
        assert!(!record.victim_task_resolved);
    }

    #[test]
    fn unknown_constraints_are_named_unknown() {
        let mut ev = event(&[level(30, "a", 10, 10, 0)]);
        ev.flags |= flags::HAS_OOM_CONTROL;
        ev.oc_constraint = 17;
        let control = record(&ev).oom_control.expect("oom_control");
        assert_eq!(control.constraint, Constraint::Unknown);
        assert_eq!(control.memcg_id, None);
    }
}
