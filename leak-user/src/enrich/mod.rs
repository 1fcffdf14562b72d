//! A decoded record becomes a [`Kill`] here, in one place: the cgroup paths from the cgroup
//! filesystem, the victim from procfs when the kernel could not read it, one report per dying
//! process, the Kubernetes names from the node, and the timeline before death.

pub mod cgroupfs;
pub mod cri;
pub mod dedup;
pub mod kernel_kills;
pub mod kill;
pub mod kubernetes;
pub mod node;
pub mod poll;
pub mod procfs;

use std::path::PathBuf;

use crate::{
    decode::KillRecord,
    model::{
        kill::{Kill, StatsFreshness, SAME_OOM_NS},
        kubernetes::CgroupLabels,
        timeline::{self, Timelines, MAX_KILL_TIMELINE_POINTS},
    },
};

use self::{
    cgroupfs::CgroupPaths,
    dedup::VictimDedup,
    kill::{assemble, KillContext},
    kubernetes::K8sNames,
    node::NodeNames,
};

/// The state enrichment keeps between records.
pub struct Enricher {
    paths: CgroupPaths,
    names: NodeNames,
    dedup: VictimDedup,
    page_size: u64,
    attach_mode: String,
    proc_root: PathBuf,
    seq: u64,
    /// (triggering thread, boot_ns, cgroup id) of the last kill attributed to a cgroup.
    last_attribution: Option<(u32, u64, u64)>,
    cgroup_v2: Option<bool>,
    freshness: StatsFreshness,
    kill_witness: bool,
}

impl Enricher {
    /// `memory` is the memory hierarchy's root directory and version, when one is mounted;
    /// `rootfs` the node's root filesystem (for the kubelet's log directories; nodes run as
    /// containers are read through their processes' roots); `cri` the runtime that names what
    /// those do not; `kill_witness` whether a kill witness is attached (the probes say so).
    pub fn new(
        memory: Option<(PathBuf, cgroupfs::Version)>,
        rootfs: PathBuf,
        cri: Option<cri::CriNames>,
        page_size: u64,
        attach_mode: &str,
        kill_witness: bool,
    ) -> Self {
        let mut names = K8sNames::new(rootfs);
        if let Err(err) = names.refresh() {
            log::warn!("{err}");
        }
        if let Some(cri) = cri {
            names = names.with_cri(cri);
        }
        let cgroup_v2 = memory
            .as_ref()
            .map(|(_, version)| *version == cgroupfs::Version::V2);
        let memory_root = memory.map(|(root, _)| root);
        let proc_root = PathBuf::from("/proc");
        Self {
            paths: CgroupPaths::new(memory_root.clone()),
            names: NodeNames::new(names, memory_root, proc_root.clone()),
            dedup: VictimDedup::default(),
            page_size,
            attach_mode: attach_mode.to_owned(),
            proc_root,
            seq: 0,
            last_attribution: None,
            cgroup_v2,
            freshness: StatsFreshness::default(),
            kill_witness,
        }
    }

    /// Numbers kills after `seq` (the last one a store on disk holds), so numbers stay unique
    /// across restarts.
    pub fn numbering_after(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    /// What the kernel and the attach mode let a kill say about how fresh its statistics are.
    pub fn with_freshness(mut self, freshness: StatsFreshness) -> Self {
        self.freshness = freshness;
        self
    }

    /// The served kill of a record, or `None` when it repeats a death already reported.
    pub fn kill(
        &mut self,
        record: &KillRecord,
        realtime_offset_ns: i128,
        timelines: &impl Timelines,
    ) -> Option<Kill> {
        self.seq += 1;
        let context = KillContext {
            page_size: self.page_size,
            realtime_offset_ns,
            attach_mode: &self.attach_mode,
            seq: self.seq,
            freshness: self.freshness,
            same_oom_cgroup_id: self
                .last_attribution
                .filter(|(trigger, at, _)| {
                    *trigger == record.trigger.pid && record.boot_ns.abs_diff(*at) < SAME_OOM_NS
                })
                .map(|(_, _, id)| id),
            cgroup_v2: self.cgroup_v2,
            kill_witness: self.kill_witness,
        };
        let mut kill = assemble(record, &context, &mut self.paths);
        procfs::fill_from_procfs(&mut kill, &self.proc_root);
        if let Some(id) = kill.oom_cgroup_id {
            self.last_attribution = Some((record.trigger.pid, record.boot_ns, id));
        }
        if !self.dedup.first_report(&kill) {
            log::debug!(
                "pid {} (thread {}) was already reported dying",
                kill.victim_pid,
                kill.victim_tid
            );
            return None;
        }
        kubernetes::attribute(&mut kill, |path, identity| {
            self.names.lookup(path, identity)
        });
        self.attach_timelines(&mut kill, timelines);
        Some(kill)
    }

    /// The timeline of the cgroup the figures describe, ended by the kill's own snapshot, its
    /// story, and the victim's own timeline when that is another cgroup; thinned to a bound.
    fn attach_timelines(&self, kill: &mut Kill, timelines: &impl Timelines) {
        let described = kill.described_cgroup_id();
        let mut points = timelines.timeline(described, kill.boot_ns);
        if !points.is_empty() {
            let mut levels = kill.cgroups.iter().chain(&kill.oom_cgroup_state);
            if let Some(level) = levels.find(|c| c.id == described) {
                points.push(level.kill_point(kill.boot_ns));
            }
        }
        // The story is read from every point; what is kept with the kill is thinned.
        kill.story = (!points.is_empty()).then(|| timeline::story(&points, self.page_size));
        kill.timeline = timeline::thin(points, MAX_KILL_TIMELINE_POINTS, self.page_size);
        if kill.cgroup_id != described {
            let victim = timelines.timeline(kill.cgroup_id, kill.boot_ns);
            kill.victim_timeline = Some(timeline::thin(
                victim,
                MAX_KILL_TIMELINE_POINTS,
                self.page_size,
            ));
        }
    }

    /// The labels of a cgroup's series: its path and Kubernetes names.
    pub fn cgroup_labels(&mut self, id: u64) -> Option<CgroupLabels> {
        let path = self.paths.lookup(id)?;
        let names = kubernetes::parse_cgroup_path(&path)
            .and_then(|identity| self.names.lookup(&path, &identity))
            .map(Into::into)
            .unwrap_or_default();
        Some(CgroupLabels {
            cgroup: path,
            names,
        })
    }
}
