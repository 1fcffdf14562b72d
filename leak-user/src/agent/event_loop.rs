//! The loop: ring-buffer records through decode, enrich and store to what is served, plus the
//! periodic work (kernel counters, live series, the cgroupfs poll, the statistics flush).

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd,
    time::Duration,
};

use leak_common::sample::CgroupCounters;
use log::{debug, info, warn};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

use super::{
    persist::{Writer, Written},
    Hierarchy, TraceError, TraceOptions,
};
use crate::{
    decode::{decode_kill, decode_sample},
    enrich::{
        cri::{self, Cri, CriNames},
        kernel_kills, poll, Enricher,
    },
    kernel::Probes,
    model::{
        kill::{Breakdown, KernelKillCounts, Kill, StatsFreshness},
        kubernetes::CgroupLabels,
        timeline::{self, SampleKind},
    },
    serve::{html::LiveSeries, http::Shared},
    store::History,
    sys,
};

/// How often watched cgroups are read from the cgroup filesystem.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How often the agent has the kernel flush memcg statistics.
const STATS_FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Points kept per cgroup: a minute at the default 10 ms rate limit, plus limit hits.
const MAX_POINTS_PER_CGROUP: usize = 8192;

/// Points per cgroup on the live page.
const LIVE_POINTS: usize = 200;

/// A watched cgroup that has not been sampled for this long leaves the live series.
const WATCH_IDLE_NS: u64 = 300_000_000_000;

/// The store on disk, as the event loop uses it.
pub(super) struct Persistence<'a> {
    pub writer: Option<&'a Writer>,
    /// The last sequence number the store holds; the next kill is numbered after it.
    pub first_seq: u64,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The kernel's kill counters read right after this agent's probes were attached: compared
    /// with the view the store kept, once what was pending is drained, they count the kills no
    /// agent saw.
    pub kernel_kills: Option<KernelKillCounts>,
}

/// What the loop keeps between records.
struct State<'a> {
    shared: &'a Shared,
    writer: Option<&'a Writer>,
    enricher: Enricher,
    history: History,
    page_size: u64,
    /// Labels of each watched cgroup's live series, by cgroup id.
    watched: HashMap<u64, CgroupLabels>,
    /// Kernel totals already counted, by cgroup id.
    counted: HashMap<u64, CgroupCounters>,
    /// What fills each limited cgroup, from the last poll of its memory.stat.
    breakdowns: HashMap<u64, Breakdown>,
    boot_id: String,
    /// The kernel's counters at start, until compared with the store's view.
    kernel_kills_at_start: Option<KernelKillCounts>,
}

impl State<'_> {
    async fn on_kill_record(&mut self, record: &[u8]) {
        let read_ns = sys::boot_ns();
        let record = match decode_kill(record, self.page_size) {
            Ok(record) => record,
            Err(err) => {
                warn!("dropping malformed event: {err}");
                self.shared.metrics.count_decode_error();
                return;
            }
        };
        let Some(kill) = self
            .enricher
            .kill(&record, sys::realtime_offset_ns(), &self.history)
        else {
            return;
        };
        let described = kill.described_cgroup_id();
        self.history.mark_kill(described, kill.boot_ns);
        if kill.cgroup_id != described {
            self.history.mark_kill(kill.cgroup_id, kill.boot_ns);
        }
        log_kill(&kill);
        let (pid, marked_ns) = (kill.victim_pid, kill.boot_ns);
        // Written before it is served (or once the write has had its bounded wait).
        if let Some(writer) = self.writer {
            if writer.write(&kill, &self.shared.metrics).await == Written::Duplicate {
                info!(
                    "kill of pid {pid} (thread {}) is stored already (delivered again after a \
                     restart, or seen by two agents' probes): not counted twice",
                    kill.victim_tid
                );
                return;
            }
        }
        self.shared.publish_kill(kill).await;
        let published_ns = sys::boot_ns();
        debug!(
            "kill of pid {pid}: read {} us after the kernel marked it, served {} us after",
            read_ns.saturating_sub(marked_ns) / 1000,
            published_ns.saturating_sub(marked_ns) / 1000
        );
    }

    fn on_sample_record(&mut self, record: &[u8]) {
        match decode_sample(record, self.page_size) {
            Ok(sample) => {
                self.shared.metrics.count_sample(sample.point.kind);
                self.history.record(sample.cgroup_id, sample.point);
            }
            Err(err) => {
                warn!("dropping malformed charge sample: {err}");
                self.shared.metrics.count_decode_error();
            }
        }
    }

    /// Records polled points of the cgroups the charge path has not sampled within the last
    /// poll interval (its samples are fresher and finer).
    fn on_poll(&mut self, polled: Vec<poll::Polled>) {
        self.breakdowns = polled
            .iter()
            .map(|polled| (polled.id, polled.breakdown.clone()))
            .collect();
        let now = sys::boot_ns();
        let recent: HashSet<u64> = self
            .history
            .latest()
            .filter(|(_, point)| {
                point.kind != SampleKind::Poll
                    && u128::from(now.saturating_sub(point.boot_ns)) < POLL_INTERVAL.as_nanos()
            })
            .map(|(id, _)| id)
            .collect();
        for poll::Polled { id, point, .. } in polled {
            if !recent.contains(&id) {
                self.history.record(id, point);
            }
        }
    }

    /// The labels of a cgroup's live series, learned once per watched cgroup.
    fn labels(&mut self, id: u64) -> Option<CgroupLabels> {
        if let Some(labels) = self.watched.get(&id) {
            return Some(labels.clone());
        }
        let labels = self.enricher.cgroup_labels(id)?;
        self.watched.insert(id, labels.clone());
        Some(labels)
    }

    /// Once, when the kills pending at start are stored: the kills the kernel counted that no
    /// agent saw, from the kernel's counters against the view the store kept; then that view
    /// is replaced with the counters at start.
    async fn count_unobserved(&mut self) {
        let (Some(now), Some(store)) =
            (self.kernel_kills_at_start.take(), self.shared.store.clone())
        else {
            return;
        };
        let boot_id = self.boot_id.clone();
        let counted = tokio::task::spawn_blocking(move || {
            let mut store = store
                .lock()
                .map_err(|_| "kill store: poisoned lock".to_owned())?;
            let unobserved = store
                .unobserved(&boot_id, &now)
                .map_err(|e| e.to_string())?;
            store
                .save_kernel_view(&boot_id, &now)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(unobserved)
        })
        .await;
        match counted {
            Ok(Ok(None)) => info!(
                "the kernel's OOM kill counters are kept from now on, to count kills while no \
                 agent watches"
            ),
            Ok(Ok(Some(unobserved))) => {
                let total: u64 = unobserved.iter().map(|(_, kills)| kills).sum();
                match total {
                    0 => info!("no OOM kill went unobserved since the last agent"),
                    _ => warn!(
                        "{total} OOM kills happened while no agent watched (the kernel's \
                         counters against the last agent's view): {}",
                        unobserved
                            .iter()
                            .map(|(cgroup, kills)| format!("{cgroup} {kills}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
                for (cgroup, kills) in unobserved {
                    self.shared.metrics.agent.count_unobserved(&cgroup, kills);
                }
            }
            Ok(Err(err)) => warn!("kills while no agent watched are not counted: {err}"),
            Err(err) => warn!("kills while no agent watched are not counted: {err}"),
        }
    }

    /// Keeps the kernel's kill counters, as of now, in the store.
    async fn save_kernel_view(&self, hierarchy: &Hierarchy) {
        let (Some((root, version)), Some(store)) = (hierarchy.clone(), self.shared.store.clone())
        else {
            return;
        };
        let boot_id = self.boot_id.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let now = kernel_kills::read_all(&root, version, sys::boot_ns);
            let mut store = store
                .lock()
                .map_err(|_| "kill store: poisoned lock".to_owned())?;
            store
                .save_kernel_view(&boot_id, &now)
                .map_err(|e| e.to_string())
        })
        .await;
        if let Ok(Err(err)) = saved {
            debug!("the kernel's kill counters are not kept: {err}");
        }
    }

    /// Once a second: kernel counters, live gauges, expiry of idle cgroups.
    fn tick(&mut self, probes: &Probes) {
        let metrics = &self.shared.metrics;
        metrics.set_kernel_counters(&probes.kernel_counters());
        metrics.agent.set_program_stats(&probes.program_stats());

        for id in self.history.expire(sys::boot_ns(), WATCH_IDLE_NS) {
            if let Some(labels) = self.watched.remove(&id) {
                metrics.forget_cgroup(&labels);
            }
        }
        let latest: Vec<_> = self
            .history
            .latest()
            .map(|(id, point)| (id, point.clone()))
            .collect();
        let mut live = Vec::new();
        for (id, point) in latest {
            if let Some(labels) = self.labels(id) {
                self.shared.metrics.set_cgroup_live(&labels, &point);
                if let Some(breakdown) = self.breakdowns.get(&id) {
                    self.shared.metrics.set_cgroup_breakdown(&labels, breakdown);
                }
                let points = self.history.points(id).cloned().collect();
                live.push(LiveSeries {
                    labels,
                    points: timeline::thin(points, LIVE_POINTS, self.page_size),
                });
            }
        }
        live.sort_by(|a, b| a.labels.cgroup.cmp(&b.labels.cgroup));
        // The page may be rendering the previous second's; it will get the next one.
        if let Ok(mut shared) = self.shared.live.try_write() {
            *shared = live;
        }
        for (id, totals) in probes.cgroup_counters() {
            let seen = self.counted.entry(id).or_default();
            // An entry the kernel's LRU map evicted and recreated starts again from zero.
            let delta = |total: u64, seen: u64| if total >= seen { total - seen } else { total };
            let limit_hits = delta(totals.limit_hits, seen.limit_hits);
            let failures = delta(totals.charge_failures, seen.charge_failures);
            *seen = totals;
            if limit_hits == 0 && failures == 0 {
                continue;
            }
            if let Some(labels) = self.labels(id) {
                self.shared
                    .metrics
                    .count_cgroup_pressure(&labels, limit_hits, failures);
            }
        }
    }
}

pub(super) async fn run(
    probes: &mut Probes,
    shared: &Shared,
    hierarchy: Hierarchy,
    options: &TraceOptions,
    persistence: Persistence<'_>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), TraceError> {
    let retired = probes.take_retired();
    let mut ring = readable(probes.take_events()?)?;
    let mut samples = match probes.charge_mode() {
        Some(_) => Some(readable(probes.take_samples()?)?),
        None => None,
    };
    let mut logger = match probes.take_logger() {
        Some(logger) => Some(readable(logger)?),
        None => None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut flush_tick = tokio::time::interval(STATS_FLUSH_INTERVAL);
    // The root's memory.stat, read on every flush tick; where it cannot be read (the root has
    // none, or no memory hierarchy is mounted) the statistics are as of the kernel's own flushes.
    let stats_file = hierarchy
        .as_ref()
        .map(|(root, _)| root.join("memory.stat"))
        .filter(|file| std::fs::File::open(file).is_ok());
    let freshness = StatsFreshness {
        report_hooked: probes.report_hooked(),
        live_counters: probes.live_stat_counters(),
        flush_interval_ms: stats_file
            .as_ref()
            .map(|_| u64::try_from(STATS_FLUSH_INTERVAL.as_millis()).unwrap_or(u64::MAX)),
    };
    let mut poll_tick = tokio::time::interval(POLL_INTERVAL);
    let page_size = sys::page_size();
    let cri = match &options.cri_socket {
        Some(socket) => start_cri(socket).await,
        None => None,
    };
    let mut state = State {
        shared,
        writer: persistence.writer,
        enricher: Enricher::new(
            hierarchy.clone(),
            options.rootfs.clone(),
            cri,
            page_size,
            probes.mode().as_str(),
            probes.kill_witness(),
        )
        .with_freshness(freshness)
        .numbering_after(persistence.first_seq),
        history: History::new(
            u64::try_from(options.history.as_nanos()).unwrap_or(u64::MAX),
            MAX_POINTS_PER_CGROUP,
            options.max_watched_cgroups,
        ),
        page_size,
        watched: HashMap::new(),
        counted: HashMap::new(),
        breakdowns: HashMap::new(),
        boot_id: persistence.boot_id,
        kernel_kills_at_start: persistence.kernel_kills,
    };
    // What earlier agents' pinned probes recorded while no agent read: samples first (the
    // timelines of those kills), then the kills, each once.
    if let Some(mut retired) = retired {
        let (mut samples_drained, mut kills_drained) = (0, 0);
        for ring in &mut retired.samples {
            while let Some(record) = ring.next() {
                state.on_sample_record(&record);
                samples_drained += 1;
            }
        }
        for ring in &mut retired.events {
            while let Some(record) = ring.next() {
                let record = record.to_vec();
                state.on_kill_record(&record).await;
                kills_drained += 1;
            }
        }
        info!(
            "drained what the replaced probes recorded: {kills_drained} kill records, \
             {samples_drained} charge samples"
        );
    }
    let (mut unobserved_pending, mut ticks) = (true, 0u32);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => {
                info!("shutting down");
                break;
            }
            // Samples first: a kill's timeline should include what led up to it.
            guard = async { samples.as_mut()?.readable_mut().await.ok() }, if samples.is_some() => {
                if let Some(mut guard) = guard {
                    let ring = guard.get_inner_mut();
                    while let Some(record) = ring.next() {
                        state.on_sample_record(&record);
                    }
                    guard.clear_ready();
                }
            }
            guard = ring.readable_mut() => {
                // Drain pending samples before the kill, so its timeline is complete.
                if let Some(samples) = samples.as_mut() {
                    while let Some(record) = samples.get_mut().next() {
                        state.on_sample_record(&record);
                    }
                }
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(record) = ring.next() {
                    let record = record.to_vec();
                    state.on_kill_record(&record).await;
                }
                guard.clear_ready();
            }
            guard = async { logger.as_mut()?.readable_mut().await.ok() }, if logger.is_some() => {
                if let Some(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                state.tick(probes);
                // The first tick comes a second after the drain: what the kernel counted
                // before the counters were read is stored by now.
                ticks += 1;
                if unobserved_pending && ticks >= 2 {
                    unobserved_pending = false;
                    state.count_unobserved().await;
                }
            }
            // Watched cgroups the charge path has not sampled lately, from the filesystem.
            _ = poll_tick.tick(), if hierarchy.is_some() => {
                if let Some((root, version)) = hierarchy.clone() {
                    let max = options.max_watched_cgroups;
                    let polled = tokio::task::spawn_blocking(move || {
                        poll::poll_limited(&root, version, sys::boot_ns(), page_size, max)
                    })
                    .await
                    .unwrap_or_default();
                    state.on_poll(polled);
                }
                if !unobserved_pending {
                    state.save_kernel_view(&hierarchy).await;
                }
            }
            // The kernel batches memcg statistics and flushes them when read or when enough
            // piled up (5.13+); the LRU lists and breakdown of a kill the kernel's report did
            // not flush, and of every charge sample, are as fresh as the last flush. Reading
            // the root's memory.stat flushes the whole hierarchy (from 6.8 only when more than
            // a batch per CPU is pending), as a cAdvisor scrape would, so those figures are
            // never older than this interval.
            _ = flush_tick.tick(), if stats_file.is_some() => {
                if let Some(file) = &stats_file {
                    let _ = tokio::fs::read(file).await;
                }
            }
        }
    }
    // Counted to here: the next agent counts from this view.
    if !unobserved_pending {
        state.save_kernel_view(&hierarchy).await;
    }
    Ok(())
}

/// Registers a map's file descriptor with tokio for readability.
fn readable<T: AsRawFd>(map: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `map` owns its file descriptor (an aya map) and keeps it open, unchanged, for as
    // long as it lives, which is as long as the AsyncFd that owns it.
    unsafe { AsyncFd::register_with_interest(map, Interest::READABLE) }.map_err(Into::into)
}

fn log_kill(kill: &Kill) {
    info!(
        "OOM kill: pid {} ({}) in {}{}; limit hit by {}; usage {} limit {} working set {} \
         inactive_file {} bytes",
        kill.victim_pid,
        kill.victim_comm.as_deref().unwrap_or("?"),
        kill.cgroup,
        if kill.names.pod.is_empty() {
            String::new()
        } else {
            format!(
                " (pod {}/{} container {:?})",
                kill.names.namespace, kill.names.pod, kill.names.container
            )
        },
        kill.oom_cgroup.as_deref().unwrap_or("(global OOM)"),
        kill.usage_bytes,
        kill.limit_bytes
            .map_or_else(|| "unlimited".into(), |l| l.to_string()),
        kill.working_set_bytes,
        kill.inactive_file_bytes,
    );
}

/// The runtime that names containers the log directories do not. One call at start says
/// whether it answers; if not, a warning, and lookups are still tried (it may come up later).
async fn start_cri(socket: &std::path::Path) -> Option<CriNames> {
    let answered = match Cri::connect(socket, cri::CALL_TIMEOUT).await {
        Ok(mut cri) => cri.version().await,
        Err(err) => Err(err),
    };
    match answered {
        Ok(version) => log::info!(
            "naming containers the log directories do not through {} {} (CRI {}) at {}",
            version.runtime_name,
            version.runtime_version,
            version.runtime_api_version,
            socket.display()
        ),
        Err(err) => log::warn!(
            "{err}; containers the log directories do not name stay unnamed until it answers \
             (--cri-socket chooses the socket, an empty value none)"
        ),
    }
    match CriNames::start(socket.to_owned()) {
        Ok(names) => Some(names),
        Err(err) => {
            log::warn!("{err}");
            None
        }
    }
}
