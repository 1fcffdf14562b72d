//! The running kernel's struct layout, resolved from BTF into the table the kernel programs
//! read (`leak_common::layout::Layout`). Rust eBPF has no CO-RE, so this is where kernel
//! version differences are absorbed; anything not understood is an error naming the type or
//! member, never a guessed offset.

pub mod btf;

use std::path::Path;

use leak_common::layout::{memory_event, rss_scheme, stat, stats_scheme, Layout, LRU_COUNT};

pub use self::btf::{Btf, BtfError, Kind};

/// How deep anonymous structs and unions may nest inside one another (the kernel's own nest two
/// or three deep).
const MAX_ANONYMOUS_NESTING: usize = 16;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "cannot read kernel BTF at {path}: {source}; leak needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.4)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse BTF: {0}")]
    Parse(#[from] BtfError),
    #[error("kernel BTF has no type `{0}`")]
    MissingType(String),
    #[error("kernel BTF: `{ty}` has no member `{member}`")]
    MissingMember { ty: String, member: String },
    #[error("kernel BTF has no enumerator `{0}`")]
    MissingEnumerator(String),
    #[error("kernel layout not understood: {0}")]
    Unsupported(String),
}

/// A member found inside a struct, anonymous sub-structs and unions included.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    /// Byte offset from the start of the outer struct.
    pub offset: u32,
    pub type_id: u32,
}

/// Resolves struct layouts against one BTF.
pub struct Resolver {
    btf: Btf,
}

impl Resolver {
    pub fn new(btf: Btf) -> Self {
        Self { btf }
    }

    pub fn from_file(path: &Path) -> Result<Self, LayoutError> {
        let data = std::fs::read(path).map_err(|source| LayoutError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::new(Btf::parse(&data)?))
    }

    /// The id of the complete definition of `struct name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, LayoutError> {
        self.btf
            .find(name, Kind::Struct)
            .max_by_key(|&id| self.btf.get(id).map(|ty| ty.members.len()).unwrap_or(0))
            .ok_or_else(|| LayoutError::MissingType(format!("struct {name}")))
    }

    /// Finds `member` in `struct_id`, looking through anonymous structs and unions.
    pub fn member_in(&self, struct_id: u32, member: &str) -> Result<Option<Found>, LayoutError> {
        self.member_within(struct_id, member, 0)
    }

    /// [`Self::member_in`], `depth` anonymous members down. Real kernels nest a few levels; a
    /// BTF file that nests a struct in itself (a hostile or corrupt `--btf`) must end in an
    /// error, not in a stack overflow.
    fn member_within(
        &self,
        struct_id: u32,
        member: &str,
        depth: usize,
    ) -> Result<Option<Found>, LayoutError> {
        if depth > MAX_ANONYMOUS_NESTING {
            return Err(LayoutError::Unsupported(format!(
                "anonymous members nested more than {MAX_ANONYMOUS_NESTING} deep looking for \
                 `{member}`: the BTF is corrupt"
            )));
        }
        let (_, ty) = self.btf.resolve(struct_id)?;
        for candidate in &ty.members {
            if candidate.bitfield_size != 0 || candidate.bit_offset % 8 != 0 {
                if candidate.name == member {
                    return Err(LayoutError::Unsupported(format!(
                        "`{}.{member}` is a bitfield",
                        ty.name
                    )));
                }
                continue;
            }
            let offset = candidate.bit_offset / 8;
            if candidate.name == member {
                return Ok(Some(Found {
                    offset,
                    type_id: candidate.type_id,
                }));
            }
            if candidate.name.is_empty() {
                let (inner, inner_ty) = self.btf.resolve(candidate.type_id)?;
                if matches!(inner_ty.kind, Kind::Struct | Kind::Union) {
                    if let Some(found) = self.member_within(inner, member, depth + 1)? {
                        return Ok(Some(Found {
                            offset: offset + found.offset,
                            type_id: found.type_id,
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// `offsetof(struct ty, member)`, an error when absent.
    pub fn member(&self, ty: &str, member: &str) -> Result<Found, LayoutError> {
        self.member_in(self.struct_id(ty)?, member)?
            .ok_or_else(|| LayoutError::MissingMember {
                ty: format!("struct {ty}"),
                member: member.into(),
            })
    }

    pub fn offset(&self, ty: &str, member: &str) -> Result<u32, LayoutError> {
        Ok(self.member(ty, member)?.offset)
    }

    /// `offsetof(struct ty, member)`, or [`Layout::ABSENT`] when this kernel has no such member.
    pub fn optional_offset(&self, ty: &str, member: &str) -> Result<u32, LayoutError> {
        Ok(self
            .member_in(self.struct_id(ty)?, member)?
            .map_or(Layout::ABSENT, |found| found.offset))
    }

    pub fn enumerator(&self, name: &str) -> Result<i64, LayoutError> {
        self.btf
            .enumerator(name)
            .ok_or_else(|| LayoutError::MissingEnumerator(name.into()))
    }

    /// The value of enumerator `name` of `enum enum_name`, `None` when that enum lacks it.
    pub fn enumerator_in(&self, enum_name: &str, name: &str) -> Option<i64> {
        [Kind::Enum, Kind::Enum64]
            .into_iter()
            .flat_map(|kind| self.btf.find(enum_name, kind))
            .filter_map(|id| self.btf.get(id).ok())
            .flat_map(|ty| ty.enumerators.iter())
            .find(|(enumerator, _)| enumerator == name)
            .map(|&(_, value)| value)
    }

    /// The element count of the array member `ty.member`.
    fn array_len(&self, ty: &str, member: &str) -> Result<u32, LayoutError> {
        let found = self.member(ty, member)?;
        let (_, array) = self.btf.resolve(found.type_id)?;
        array
            .array
            .map(|(_, count)| count)
            .ok_or_else(|| LayoutError::Unsupported(format!("`{ty}.{member}` is not an array")))
    }

    /// Whether `name` is a function with its own BTF entry (so not inlined away).
    pub fn has_function(&self, name: &str) -> bool {
        self.btf.find(name, Kind::Func).next().is_some()
    }

    /// Whether the BTF-enabled tracepoint `name` exists (`btf_trace_<name>` typedef).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.btf
            .find(&format!("btf_trace_{name}"), Kind::Typedef)
            .next()
            .is_some()
    }

    /// The parameter types of tracepoint `name` (the leading `void *` context dropped).
    fn tracepoint_params(&self, name: &str) -> Result<Vec<u32>, LayoutError> {
        let typedef = format!("btf_trace_{name}");
        let id = self
            .btf
            .find(&typedef, Kind::Typedef)
            .next()
            .ok_or(LayoutError::MissingType(typedef))?;
        let (_, pointer) = self.btf.resolve(self.btf.get(id)?.referenced)?;
        let (_, proto) = self.btf.resolve(pointer.referenced)?;
        if pointer.kind != Kind::Ptr || proto.kind != Kind::FuncProto {
            return Err(LayoutError::Unsupported(format!(
                "btf_trace_{name} is not a pointer to a function prototype"
            )));
        }
        Ok(proto.params.iter().skip(1).copied().collect())
    }

    /// Whether `oom:mark_victim` passes the victim's `struct task_struct *` (6.9+ and its
    /// backports) rather than its pid.
    pub fn mark_victim_passes_task(&self) -> Result<bool, LayoutError> {
        let params = self.tracepoint_params("mark_victim")?;
        let first = params.first().ok_or_else(|| {
            LayoutError::Unsupported("btf_trace_mark_victim has no arguments".into())
        })?;
        let (_, ty) = self.btf.resolve(*first)?;
        match ty.kind {
            Kind::Ptr => {
                let (_, pointee) = self.btf.resolve(ty.referenced)?;
                if pointee.name == "task_struct" {
                    Ok(true)
                } else {
                    Err(LayoutError::Unsupported(format!(
                        "mark_victim's first argument points to `{}`, not task_struct",
                        pointee.name
                    )))
                }
            }
            Kind::Int => Ok(false),
            other => Err(LayoutError::Unsupported(format!(
                "mark_victim's first argument is a {other:?}"
            ))),
        }
    }

    /// The whole table the kernel programs need. `tracepoint_pid_offset` comes from the classic
    /// tracepoint's format file when that mode is used.
    pub fn layout(&self) -> Result<Layout, LayoutError> {
        let mut layout = Layout {
            task_pid: self.offset("task_struct", "pid")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_comm: self.offset("task_struct", "comm")?,
            task_mm: self.offset("task_struct", "mm")?,
            task_signal: self.offset("task_struct", "signal")?,
            task_cgroups: self.offset("task_struct", "cgroups")?,
            task_thread_pid: self.offset("task_struct", "thread_pid")?,
            pid_level: self.offset("pid", "level")?,
            pid_numbers: self.offset("pid", "numbers")?,
            upid_size: self.btf.size_of(self.struct_id("upid")?)? as u32,
            upid_nr: self.offset("upid", "nr")?,
            signal_oom_score_adj: self.offset("signal_struct", "oom_score_adj")?,
            css_set_subsys: self.offset("css_set", "subsys")?,
            memory_subsys_id: self.memory_subsys_id()?,
            css_cgroup: self.offset("cgroup_subsys_state", "cgroup")?,
            css_parent: self.offset("cgroup_subsys_state", "parent")?,
            cgroup_kn: self.offset("cgroup", "kn")?,
            kn_id: self.kernfs_id_offset()?,
            kn_name: self.offset("kernfs_node", "name")?,
            memcg_css: self.offset("mem_cgroup", "css")?,
            memcg_memory: self.page_counter_member()?,
            counter_usage: self.offset("page_counter", "usage")?,
            counter_max: self.offset("page_counter", "max")?,
            counter_watermark: self.offset("page_counter", "watermark")?,
            counter_failcnt: self.optional_offset("page_counter", "failcnt")?,
            oc_memcg: self.offset("oom_control", "memcg")?,
            oc_chosen: self.offset("oom_control", "chosen")?,
            oc_chosen_points: self.offset("oom_control", "chosen_points")?,
            oc_totalpages: self.offset("oom_control", "totalpages")?,
            oc_constraint: self.offset("oom_control", "constraint")?,
            oc_gfp_mask: self.offset("oom_control", "gfp_mask")?,
            oc_order: self.offset("oom_control", "order")?,
            mark_victim_has_task: u32::from(self.mark_victim_passes_task()?),
            tp_mark_victim_pid: Layout::ABSENT,
            task_group_leader: self.offset("task_struct", "group_leader")?,
            task_thread_node: self.offset("task_struct", "thread_node")?,
            signal_thread_head: self.offset("signal_struct", "thread_head")?,
            tp_signal_generate_sig: Layout::ABSENT,
            tp_signal_generate_code: Layout::ABSENT,
            tp_signal_generate_pid: Layout::ABSENT,
            memcg_memsw: self.memsw_member()?,
            task_start_time: self.offset("task_struct", "start_time")?,
            ..Layout::default()
        };
        self.resolve_rss(&mut layout)?;
        self.resolve_stats(&mut layout)?;
        self.resolve_stat_items(&mut layout)?;
        self.resolve_memory_events(&mut layout)?;
        Ok(layout)
    }

    fn memory_subsys_id(&self) -> Result<u32, LayoutError> {
        let id = self.enumerator("memory_cgrp_id").map_err(|_| {
            LayoutError::Unsupported(
                "enum cgroup_subsys_id has no memory_cgrp_id: this kernel has no memory \
                 controller (CONFIG_MEMCG)"
                    .into(),
            )
        })?;
        let subsys = self.member("css_set", "subsys")?;
        let (_, array) = self.btf.resolve(subsys.type_id)?;
        let slots = array.array.map_or(0, |(_, count)| count as i64);
        if !(0..slots).contains(&id) {
            return Err(LayoutError::Unsupported(format!(
                "memory_cgrp_id {id} is outside css_set.subsys[{slots}]"
            )));
        }
        Ok(id as u32)
    }

    /// `kernfs_node.id` is a `u64` holding the inode number since 5.5.
    fn kernfs_id_offset(&self) -> Result<u32, LayoutError> {
        let found = self.member("kernfs_node", "id")?;
        let (_, ty) = self.btf.resolve(found.type_id)?;
        if ty.kind != Kind::Int || ty.size != 8 {
            return Err(LayoutError::Unsupported(
                "kernfs_node.id is not a u64 (kernels before 5.5 are not supported)".into(),
            ));
        }
        Ok(found.offset)
    }

    fn page_counter_member(&self) -> Result<u32, LayoutError> {
        let found = self.member("mem_cgroup", "memory")?;
        let (_, ty) = self.btf.resolve(found.type_id)?;
        if ty.kind != Kind::Struct || ty.name != "page_counter" {
            return Err(LayoutError::Unsupported(
                "mem_cgroup.memory is not an embedded struct page_counter".into(),
            ));
        }
        Ok(found.offset)
    }

    /// `mem_cgroup.memsw`, cgroup v1's memory+swap counter, where the kernel has it (in a union
    /// with v2's `swap` since 5.19, so whether it is charged is for the loader to say).
    fn memsw_member(&self) -> Result<u32, LayoutError> {
        let Some(found) = self.member_in(self.struct_id("mem_cgroup")?, "memsw")? else {
            return Ok(Layout::ABSENT);
        };
        let (_, ty) = self.btf.resolve(found.type_id)?;
        if ty.kind != Kind::Struct || ty.name != "page_counter" {
            return Err(LayoutError::Unsupported(
                "mem_cgroup.memsw is not an embedded struct page_counter".into(),
            ));
        }
        Ok(found.offset)
    }

    /// `mm_struct.rss_stat`: `struct mm_rss_stat { atomic_long_t count[]; }` before 6.2,
    /// `struct percpu_counter rss_stat[]` since.
    fn resolve_rss(&self, layout: &mut Layout) -> Result<(), LayoutError> {
        let found = self.member("mm_struct", "rss_stat")?;
        layout.mm_rss_stat = found.offset;
        let (id, ty) = self.btf.resolve(found.type_id)?;
        match ty.kind {
            Kind::Struct if ty.name == "mm_rss_stat" => {
                let count =
                    self.member_in(id, "count")?
                        .ok_or_else(|| LayoutError::MissingMember {
                            ty: "struct mm_rss_stat".into(),
                            member: "count".into(),
                        })?;
                let (_, array) = self.btf.resolve(count.type_id)?;
                let (element, _) = array.array.ok_or_else(|| {
                    LayoutError::Unsupported("mm_rss_stat.count is not an array".into())
                })?;
                layout.rss_scheme = rss_scheme::ATOMIC_ARRAY;
                layout.rss_stride = self.btf.size_of(element)? as u32;
                layout.rss_value = count.offset;
            }
            Kind::Array => {
                let (element, _) = ty.array.unwrap_or((0, 0));
                let (element_id, element_ty) = self.btf.resolve(element)?;
                if element_ty.name != "percpu_counter" {
                    return Err(LayoutError::Unsupported(format!(
                        "mm_struct.rss_stat is an array of `{}`",
                        element_ty.name
                    )));
                }
                let count = self.member_in(element_id, "count")?.ok_or_else(|| {
                    LayoutError::MissingMember {
                        ty: "struct percpu_counter".into(),
                        member: "count".into(),
                    }
                })?;
                layout.rss_scheme = rss_scheme::PERCPU_COUNTER_ARRAY;
                layout.rss_stride = element_ty.size;
                layout.rss_value = count.offset;
            }
            _ => {
                return Err(LayoutError::Unsupported(
                    "mm_struct.rss_stat has an unknown shape".into(),
                ))
            }
        }
        layout.rss_file_index = self.enumerator("MM_FILEPAGES")? as u32;
        layout.rss_anon_index = self.enumerator("MM_ANONPAGES")? as u32;
        layout.rss_shmem_index = self.enumerator("MM_SHMEMPAGES")? as u32;
        Ok(())
    }

    /// `mem_cgroup.vmstats`: an inline `atomic_long_t[]` up to 5.12, an embedded
    /// `struct memcg_vmstats` 5.13 to 6.0, a pointer to one since 6.1.
    fn resolve_stats(&self, layout: &mut Layout) -> Result<(), LayoutError> {
        let found = self.member("mem_cgroup", "vmstats")?;
        layout.memcg_vmstats = found.offset;
        let (_, ty) = self.btf.resolve(found.type_id)?;
        let (scheme, state) = match ty.kind {
            Kind::Array => (stats_scheme::INLINE_ARRAY, 0),
            Kind::Struct if ty.name == "memcg_vmstats" => (
                stats_scheme::EMBEDDED_STRUCT,
                self.offset("memcg_vmstats", "state")?,
            ),
            Kind::Ptr => {
                let (_, pointee) = self.btf.resolve(ty.referenced)?;
                if pointee.name != "memcg_vmstats" {
                    return Err(LayoutError::Unsupported(format!(
                        "mem_cgroup.vmstats points to `{}`",
                        pointee.name
                    )));
                }
                (
                    stats_scheme::POINTER,
                    self.offset("memcg_vmstats", "state")?,
                )
            }
            _ => {
                return Err(LayoutError::Unsupported(
                    "mem_cgroup.vmstats has an unknown shape".into(),
                ))
            }
        };
        layout.stats_scheme = scheme;
        layout.vmstats_state = state;
        // The LRU items lead `enum node_stat_item` and, since 6.10, the compact memcg index
        // too, so both schemes index them alike; insist on that rather than assume it.
        let names = [
            "NR_INACTIVE_ANON",
            "NR_ACTIVE_ANON",
            "NR_INACTIVE_FILE",
            "NR_ACTIVE_FILE",
            "NR_UNEVICTABLE",
        ];
        for (lru, name) in names.iter().enumerate().take(LRU_COUNT) {
            let value = self.enumerator(name)?;
            if value != lru as i64 {
                return Err(LayoutError::Unsupported(format!(
                    "{name} is {value}, expected {lru}: memcg stat indexing changed"
                )));
            }
            layout.lru_stat_index[lru] = value as u32;
        }
        Ok(())
    }

    /// The number of slots of the memcg state array.
    fn state_slots(&self, layout: &Layout) -> Result<u32, LayoutError> {
        if layout.stats_scheme == stats_scheme::INLINE_ARRAY {
            self.array_len("mem_cgroup", "vmstats")
        } else {
            self.array_len("memcg_vmstats", "state")
        }
    }

    /// Where each [`stat`] item sits in the memcg state array. Up to 6.9 the array is indexed
    /// by `enum node_stat_item` then `enum memcg_stat_item`, so BTF's enumerators are the
    /// indices (an item that is not in its enum, such as `NR_PAGETABLE` before 5.11, is
    /// absent). From 6.10 it holds only the items memcg keeps, in the order of
    /// `memcg_node_stat_items[]` then `memcg_stat_items[]`, arrays BTF does not carry: the
    /// order is [`COMPACT_NODE_ITEMS`], checked against the array lengths BTF does give, and
    /// at start-up against the root cgroup's `memory.stat` (`kernel::crosscheck`).
    fn resolve_stat_items(&self, layout: &mut Layout) -> Result<(), LayoutError> {
        let slots = self.state_slots(layout)?;
        let all_items = self.enumerator("MEMCG_NR_STAT")?;
        let compact = i64::from(slots) < all_items;
        layout.stat_index = [Layout::ABSENT; stat::COUNT];
        for (item, &(enum_name, name)) in STAT_ITEMS.iter().enumerate() {
            let Some(value) = self.enumerator_in(enum_name, name) else {
                continue;
            };
            let index = if !compact {
                value
            } else if enum_name == "memcg_stat_item" {
                let first = self
                    .enumerator_in("memcg_stat_item", "MEMCG_SWAP")
                    .ok_or_else(|| LayoutError::MissingEnumerator("MEMCG_SWAP".into()))?;
                i64::from(self.compact_node_items()?) + value - first
            } else {
                match self
                    .compact_node_order()
                    .iter()
                    .position(|known| *known == name)
                {
                    Some(position) => position as i64,
                    None => continue,
                }
            };
            if !(0..i64::from(slots)).contains(&index) {
                return Err(LayoutError::Unsupported(format!(
                    "{name} resolves to index {index}, outside the memcg state array of {slots}"
                )));
            }
            layout.stat_index[item] = index as u32;
        }
        Ok(())
    }

    /// `NR_MEMCG_NODE_STAT_ITEMS` (6.10+): the length of `lruvec_stats.state`, checked
    /// against the state array, which holds those then one slot per `enum memcg_stat_item`.
    fn compact_node_items(&self) -> Result<u32, LayoutError> {
        let node_items = self.array_len("lruvec_stats", "state")?;
        let slots = self.array_len("memcg_vmstats", "state")?;
        let memcg_items = self.enumerator("MEMCG_NR_STAT")?
            - self
                .enumerator_in("memcg_stat_item", "MEMCG_SWAP")
                .ok_or_else(|| LayoutError::MissingEnumerator("MEMCG_SWAP".into()))?;
        if i64::from(slots) - i64::from(node_items) != memcg_items {
            return Err(LayoutError::Unsupported(format!(
                "memcg_vmstats.state has {slots} slots, lruvec_stats.state {node_items}: not \
                 one per memcg_stat_item ({memcg_items}) after the node items"
            )));
        }
        let known = self.compact_node_order().len() as u32;
        if node_items < known {
            return Err(LayoutError::Unsupported(format!(
                "lruvec_stats.state has {node_items} slots, fewer than the {known} leading \
                 memcg_node_stat_items leak knows: the compact memcg index changed"
            )));
        }
        Ok(node_items)
    }

    /// The leading entries of `memcg_node_stat_items[]` (6.10 to 6.18 and on), as far as
    /// the items leak reads, keeping only those this kernel's `enum node_stat_item` has.
    fn compact_node_order(&self) -> Vec<&'static str> {
        // NR_VMALLOC joined the node items when MEMCG_VMALLOC left the memcg items.
        let vmalloc_is_node_item = self
            .enumerator_in("memcg_stat_item", "MEMCG_VMALLOC")
            .is_none();
        COMPACT_NODE_ORDER
            .iter()
            .copied()
            .filter(|&name| name != "NR_VMALLOC" || vmalloc_is_node_item)
            .filter(|name| self.enumerator_in("node_stat_item", name).is_some())
            .collect()
    }

    /// `mem_cgroup.memory_events[]` and the index of each [`memory_event`] in it, and whether
    /// `page_counter.failcnt` is kept for cgroup v1 only (`track_failcnt`, 6.15+).
    fn resolve_memory_events(&self, layout: &mut Layout) -> Result<(), LayoutError> {
        layout.memory_event_index = [Layout::ABSENT; memory_event::COUNT];
        layout.memcg_memory_events = self.optional_offset("mem_cgroup", "memory_events")?;
        if layout.memcg_memory_events != Layout::ABSENT {
            let slots = i64::from(self.array_len("mem_cgroup", "memory_events")?);
            for (event, name) in MEMORY_EVENTS.iter().enumerate() {
                if let Some(value) = self.enumerator_in("memcg_memory_event", name) {
                    if (0..slots).contains(&value) {
                        layout.memory_event_index[event] = value as u32;
                    }
                }
            }
        }
        let page_counter = self.struct_id("page_counter")?;
        layout.failcnt_v1_only = u32::from(matches!(
            self.member_in(page_counter, "track_failcnt"),
            Ok(Some(_)) | Err(LayoutError::Unsupported(_))
        ));
        Ok(())
    }
}

/// The enum and enumerator of each [`stat`] item, in [`stat`] order.
pub const STAT_ITEMS: [(&str, &str); stat::COUNT] = [
    ("node_stat_item", "NR_ANON_MAPPED"),
    ("node_stat_item", "NR_FILE_PAGES"),
    ("node_stat_item", "NR_SHMEM"),
    ("node_stat_item", "NR_FILE_DIRTY"),
    ("node_stat_item", "NR_WRITEBACK"),
    ("node_stat_item", "NR_SLAB_RECLAIMABLE_B"),
    ("node_stat_item", "NR_SLAB_UNRECLAIMABLE_B"),
    ("node_stat_item", "NR_KERNEL_STACK_KB"),
    ("node_stat_item", "NR_PAGETABLE"),
    ("memcg_stat_item", "MEMCG_SOCK"),
    ("memcg_stat_item", "MEMCG_PERCPU_B"),
    ("memcg_stat_item", "MEMCG_SWAP"),
];

/// `memcg_node_stat_items[]` in mm/memcontrol.c up to `NR_PAGETABLE`, the last item leak
/// reads; identical from 6.10 to 6.18 but for `NR_VMALLOC`, which later kernels insert.
const COMPACT_NODE_ORDER: &[&str] = &[
    "NR_INACTIVE_ANON",
    "NR_ACTIVE_ANON",
    "NR_INACTIVE_FILE",
    "NR_ACTIVE_FILE",
    "NR_UNEVICTABLE",
    "NR_SLAB_RECLAIMABLE_B",
    "NR_SLAB_UNRECLAIMABLE_B",
    "WORKINGSET_REFAULT_ANON",
    "WORKINGSET_REFAULT_FILE",
    "WORKINGSET_ACTIVATE_ANON",
    "WORKINGSET_ACTIVATE_FILE",
    "WORKINGSET_RESTORE_ANON",
    "WORKINGSET_RESTORE_FILE",
    "WORKINGSET_NODERECLAIM",
    "NR_ANON_MAPPED",
    "NR_FILE_MAPPED",
    "NR_FILE_PAGES",
    "NR_FILE_DIRTY",
    "NR_WRITEBACK",
    "NR_SHMEM",
    "NR_SHMEM_THPS",
    "NR_FILE_THPS",
    "NR_ANON_THPS",
    "NR_VMALLOC",
    "NR_KERNEL_STACK_KB",
    "NR_PAGETABLE",
];

/// The enumerators of `enum memcg_memory_event`, in [`memory_event`] order.
const MEMORY_EVENTS: [&str; memory_event::COUNT] = [
    "MEMCG_MAX",
    "MEMCG_OOM",
    "MEMCG_OOM_KILL",
    "MEMCG_OOM_GROUP_KILL",
];

/// Reads the offset of `field` from a classic tracepoint's `format` file text.
pub fn tracepoint_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut declaration = None;
        let mut offset = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(rest) = part.strip_prefix("field:") {
                declaration = rest.split_whitespace().last().map(str::to_owned);
            } else if let Some(rest) = part.strip_prefix("offset:") {
                offset = rest.trim().parse().ok();
            }
        }
        (declaration.as_deref() == Some(field))
            .then_some(offset)
            .flatten()
    })
}

#[cfg(test)]
mod tests;
