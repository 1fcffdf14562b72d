//! `leak trace`: the agent. Loads the probes, drains the ring buffer, enriches each kill and
//! serves it until SIGINT/SIGTERM, then detaches every probe.

use std::{
    collections::{HashMap, VecDeque},
    future::IntoFuture,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{error, info, warn};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

use crate::{
    cgroup::{CgroupPaths, MemoryHierarchy, Version},
    events::{self, Context, Kill},
    history::{self, History, Point, SampleKind},
    http::{self, Shared},
    k8s::{self, K8sNames},
    metrics::CgroupLabels,
    metrics::{Metrics, MetricsError},
    poll,
    probes::{AttachMode, LoadOptions, ProbeError, Probes},
};
use leak_common::sample::CgroupCounters;

#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub listen: SocketAddr,
    pub attach: AttachMode,
    pub max_kills: usize,
    pub ring_buffer_bytes: u32,
    pub btf: PathBuf,
    /// Where the node's root filesystem is (`/`, or the host's mounted into a container).
    pub rootfs: PathBuf,
    /// How to attach the charge path (`None`: off).
    pub charge_attach: Option<AttachMode>,
    /// At most one charge sample per cgroup and kind per this interval.
    pub sample_interval: Duration,
    /// How much of each cgroup's history to keep (and attach to kills).
    pub history: Duration,
    /// Watch only cgroups with a memory limit (else every cgroup).
    pub only_limited: bool,
    /// With tp_btf, also sample on every memcg LRU update (6.13+).
    pub dense_samples: bool,
    /// At most this many cgroups have a history and live series.
    pub max_watched_cgroups: usize,
    /// Set by `run`: the memory hierarchy's root directory and cgroup version.
    pub memory_root: Option<PathBuf>,
    pub memory_version: Option<Version>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
}

pub async fn run(mut options: TraceOptions) -> Result<(), TraceError> {
    let mut probes = Probes::load(&LoadOptions {
        attach: options.attach,
        charge_attach: options.charge_attach,
        ring_buffer_bytes: options.ring_buffer_bytes,
        btf_path: options.btf.clone(),
        sample_interval_ns: options.sample_interval.as_nanos() as u64,
        only_limited: options.only_limited,
        dense_samples: options.dense_samples,
    })?;
    let mode = probes.mode();
    info!("OOM hook attach mode: {mode}");
    match probes.charge_mode() {
        Some(charge) => info!("charge path (timeline before kills) attach mode: {charge}"),
        None => info!("charge path off: kills carry no timeline"),
    }

    let hierarchy = match MemoryHierarchy::discover() {
        Ok(hierarchy) => {
            info!(
                "memory cgroups: {:?} at {}",
                hierarchy.version,
                hierarchy.root.display()
            );
            options.memory_version = Some(hierarchy.version);
            Some(hierarchy.root)
        }
        Err(err) => {
            warn!("{err}; cgroup paths will come from the kernel's names only");
            None
        }
    };
    options.memory_root = hierarchy.clone();
    let mut paths = CgroupPaths::new(hierarchy);

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let metrics = Metrics::new(&release)?;
    metrics.set_attachments(probes.attachments());
    let shared = Arc::new(Shared {
        metrics,
        kills: tokio::sync::RwLock::new(VecDeque::new()),
        max_kills: options.max_kills,
        attach_mode: mode.to_string(),
    });

    let (listener, local) =
        http::bind(options.listen)
            .await
            .map_err(|source| TraceError::Listen {
                addr: options.listen,
                source,
            })?;
    info!("listening on http://{local} (/metrics, /kills, /healthz)");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(
        axum::serve(listener, http::router(shared.clone()))
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut names = K8sNames::new(options.rootfs.clone());
    if let Err(err) = names.refresh() {
        warn!("{err}");
    }
    let result = event_loop(
        &mut probes,
        &shared,
        &mut paths,
        &mut names,
        &options,
        stop_rx,
    )
    .await;
    probes.detach();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => error!("HTTP server: {err}"),
        Err(err) => error!("HTTP server task: {err}"),
    }
    result
}

/// What the event loop keeps between records.
struct Enricher<'a> {
    shared: &'a Shared,
    paths: &'a mut CgroupPaths,
    names: &'a mut K8sNames,
    history: History,
    page_size: u64,
    mode: String,
    seq: u64,
    dedup: events::VictimDedup,
    /// (triggering thread, boot_ns, cgroup id) of the last kill attributed to a cgroup.
    last_attribution: Option<(u32, u64, u64)>,
    /// Labels of each watched cgroup's live series, by cgroup id.
    watched: HashMap<u64, CgroupLabels>,
    /// Kernel totals already counted, by cgroup id.
    counted: HashMap<u64, CgroupCounters>,
}

impl Enricher<'_> {
    async fn on_kill_record(&mut self, record: &[u8]) {
        let event = match events::decode(record) {
            Ok(event) => event,
            Err(err) => {
                warn!("dropping malformed event: {err}");
                self.shared.metrics.count_decode_error();
                return;
            }
        };
        self.seq += 1;
        let context = Context {
            page_size: self.page_size,
            realtime_offset_ns: realtime_offset_ns(),
            attach_mode: &self.mode,
            seq: self.seq,
            same_oom_cgroup_id: self
                .last_attribution
                .filter(|(trigger, at, _)| {
                    *trigger == event.trigger_pid && event.boot_ns.abs_diff(*at) < SAME_OOM_NS
                })
                .map(|(_, _, id)| id),
        };
        let mut kill = events::build_kill(&event, &context, self.paths);
        events::fill_from_procfs(&mut kill, Path::new("/proc"));
        if let Some(id) = kill.oom_cgroup_id {
            self.last_attribution = Some((event.trigger_pid, event.boot_ns, id));
        }
        if !self.dedup.first_report(&kill) {
            log::debug!(
                "pid {} (thread {}) was already reported dying",
                kill.victim_pid,
                kill.victim_tid
            );
            return;
        }
        k8s::attribute(&mut kill, self.names);
        let described = kill.oom_cgroup_id.unwrap_or(kill.cgroup_id);
        kill.timeline = self.history.timeline(described, kill.boot_ns);
        if !kill.timeline.is_empty() {
            if let Some(level) = kill.cgroups.iter().find(|c| c.id == described) {
                kill.timeline.push(Point {
                    boot_ns: kill.boot_ns,
                    before_kill_ms: Some(0),
                    kind: SampleKind::Kill,
                    usage_bytes: level.usage_bytes,
                    limit_bytes: level.limit_bytes,
                    working_set_bytes: level.working_set_bytes,
                    page_cache_bytes: level.inactive_file_bytes + level.active_file_bytes,
                    inactive_file_bytes: level.inactive_file_bytes,
                    anon_bytes: level.inactive_anon_bytes + level.active_anon_bytes,
                });
            }
        }
        if kill.cgroup_id != described {
            kill.victim_timeline = Some(self.history.timeline(kill.cgroup_id, kill.boot_ns));
        }
        // The story is read from every point; what is kept with the kill is thinned.
        kill.story = (!kill.timeline.is_empty()).then(|| history::story(&kill.timeline));
        kill.timeline = history::thin(
            std::mem::take(&mut kill.timeline),
            history::MAX_KILL_TIMELINE_POINTS,
        );
        if let Some(victim) = kill.victim_timeline.take() {
            kill.victim_timeline = Some(history::thin(victim, history::MAX_KILL_TIMELINE_POINTS));
        }
        self.history.mark_kill(described, kill.boot_ns);
        if kill.cgroup_id != described {
            self.history.mark_kill(kill.cgroup_id, kill.boot_ns);
        }
        log_kill(&kill);
        self.shared.metrics.record_kill(&kill);
        self.shared.push_kill(kill).await;
    }

    fn on_sample_record(&mut self, record: &[u8]) {
        match history::decode_sample(record) {
            Ok(sample) => {
                self.shared.metrics.count_sample(&sample);
                self.history.record(
                    sample.cgroup_id,
                    Point::from_sample(&sample, self.page_size),
                );
            }
            Err(err) => {
                warn!("dropping malformed charge sample: {err}");
                self.shared.metrics.count_decode_error();
            }
        }
    }

    /// Records polled points of the cgroups the charge path has not sampled within the last
    /// poll interval (its samples are fresher and finer).
    fn on_poll(&mut self, polled: Vec<(u64, Point)>) {
        let recent: std::collections::HashSet<u64> = self
            .history
            .latest()
            .filter(|(_, point)| {
                point.kind != SampleKind::Poll
                    && boot_ns().saturating_sub(point.boot_ns) < POLL_INTERVAL.as_nanos() as u64
            })
            .map(|(id, _)| id)
            .collect();
        for (id, point) in polled {
            if !recent.contains(&id) {
                self.history.record(id, point);
            }
        }
    }

    /// The labels of a cgroup's live series: its path and Kubernetes names.
    fn labels(&mut self, id: u64) -> Option<CgroupLabels> {
        if let Some(labels) = self.watched.get(&id) {
            return Some(labels.clone());
        }
        let path = self.paths.lookup(id)?;
        let mut labels = CgroupLabels {
            cgroup: path.clone(),
            ..CgroupLabels::default()
        };
        if let Some(identity) = k8s::parse_cgroup_path(&path) {
            if let Some(found) = self.names.lookup(&identity) {
                labels.namespace = found.namespace;
                labels.pod = found.pod;
                labels.container = found.container.unwrap_or_default();
            }
        }
        self.watched.insert(id, labels.clone());
        Some(labels)
    }

    /// Once a second: kernel counters, live gauges, expiry of idle cgroups.
    fn tick(&mut self, probes: &Probes) {
        let counters = probes.kernel_counters();
        let metrics = &self.shared.metrics;
        metrics.set_kernel_counters(&counters);

        let now = boot_ns();
        for id in self.history.expire(now, WATCH_IDLE_NS) {
            if let Some(labels) = self.watched.remove(&id) {
                metrics.forget_cgroup(&labels);
            }
        }
        let latest: Vec<(u64, Point)> = self
            .history
            .latest()
            .map(|(id, point)| (id, point.clone()))
            .collect();
        for (id, point) in latest {
            if let Some(labels) = self.labels(id) {
                metrics.set_cgroup_live(&labels, &point);
            }
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
                metrics.count_cgroup_pressure(&labels, limit_hits, failures);
            }
        }
    }
}

/// A watched cgroup that has not been sampled for this long leaves the live series.
const WATCH_IDLE_NS: u64 = 300_000_000_000;

async fn event_loop(
    probes: &mut Probes,
    shared: &Shared,
    paths: &mut CgroupPaths,
    names: &mut K8sNames,
    options: &TraceOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(), TraceError> {
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
    let stats_file = options
        .memory_root
        .as_ref()
        .map(|root| root.join("memory.stat"));
    let mut poll_tick = tokio::time::interval(POLL_INTERVAL);
    let poll_target = options.memory_root.clone().zip(options.memory_version);
    let mut enricher = Enricher {
        shared,
        paths,
        names,
        history: History::new(
            options.history.as_nanos() as u64,
            MAX_POINTS_PER_CGROUP,
            options.max_watched_cgroups,
        ),
        page_size: page_size(),
        mode: probes.mode().to_string(),
        seq: 0,
        dedup: events::VictimDedup::default(),
        last_attribution: None,
        watched: HashMap::new(),
        counted: HashMap::new(),
    };
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
                        enricher.on_sample_record(&record);
                    }
                    guard.clear_ready();
                }
            }
            guard = ring.readable_mut() => {
                // Drain pending samples before the kill, so its timeline is complete.
                if let Some(samples) = samples.as_mut() {
                    while let Some(record) = samples.get_mut().next() {
                        enricher.on_sample_record(&record);
                    }
                }
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(record) = ring.next() {
                    let record = record.to_vec();
                    enricher.on_kill_record(&record).await;
                }
                guard.clear_ready();
            }
            guard = async { logger.as_mut()?.readable_mut().await.ok() }, if logger.is_some() => {
                if let Some(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => enricher.tick(probes),
            // Watched cgroups the charge path has not sampled lately, from the filesystem.
            _ = poll_tick.tick(), if poll_target.is_some() => {
                if let Some((root, version)) = poll_target.clone() {
                    let (page, max) = (enricher.page_size, options.max_watched_cgroups);
                    let polled = tokio::task::spawn_blocking(move || {
                        poll::poll_limited(&root, version, boot_ns(), page, max)
                    })
                    .await
                    .unwrap_or_default();
                    enricher.on_poll(polled);
                }
            }
            // The kernel batches memcg statistics and flushes them when read or when enough
            // piled up; the LRU figures of charge samples are as fresh as the last flush.
            // Reading the root's memory.stat flushes the whole hierarchy, as a cAdvisor scrape
            // would, so that even a cgroup's first limit hit carries current figures.
            _ = flush_tick.tick(), if samples.is_some() && stats_file.is_some() => {
                if let Some(file) = &stats_file {
                    let _ = tokio::fs::read(file).await;
                }
            }
        }
    }
    Ok(())
}

/// How often watched cgroups are read from the cgroup filesystem.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How often the agent has the kernel flush memcg statistics while the charge path is on.
const STATS_FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Points kept per cgroup: a minute at the default 10 ms rate limit, plus limit hits.
const MAX_POINTS_PER_CGROUP: usize = 8192;

fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME).max(0) as u64
}

/// Registers a map's file descriptor with tokio for readability.
fn readable<T: AsRawFd>(map: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `map` owns its file descriptor (an aya map) and keeps it open, unchanged, for as
    // long as it lives, which is as long as the AsyncFd that owns it.
    unsafe { AsyncFd::register_with_interest(map, Interest::READABLE) }.map_err(Into::into)
}

/// Reports this close together from the same triggering thread belong to one OOM.
const SAME_OOM_NS: u64 = 1_000_000_000;

fn log_kill(kill: &Kill) {
    info!(
        "OOM kill: pid {} ({}) in {}{}; limit hit by {}; usage {} limit {} working set {} \
         inactive_file {} bytes",
        kill.victim_pid,
        kill.victim_comm.as_deref().unwrap_or("?"),
        kill.cgroup,
        if kill.pod.is_empty() {
            String::new()
        } else {
            format!(
                " (pod {}/{} container {:?})",
                kill.namespace, kill.pod, kill.container
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => info!("SIGINT received"),
        _ = terminate.recv() => info!("SIGTERM received"),
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks exist on every supported kernel.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// `CLOCK_REALTIME - CLOCK_BOOTTIME`, to turn `bpf_ktime_get_boot_ns` into wall-clock time.
pub fn realtime_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME)
}
