//! The agent's Prometheus registry (its own, not the global default).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry,
};

use leak_common::layout::stat;

pub use super::agent_metrics::AgentMetrics;
use crate::{
    kernel::{Attachment, KernelCounters},
    model::{
        kill::{Breakdown, Kill},
        kubernetes::CgroupLabels,
        timeline::{Point, SampleKind},
    },
};

/// The values of [`CGROUP_LABELS`] for a cgroup.
fn cgroup_label_values(labels: &CgroupLabels) -> [&str; 4] {
    [
        &labels.cgroup,
        &labels.names.namespace,
        &labels.names.pod,
        &labels.names.container,
    ]
}

/// Labels of the live per-cgroup series.
const CGROUP_LABELS: &[&str] = &["cgroup", "namespace", "pod", "container"];

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

pub struct Metrics {
    registry: Registry,
    kills: IntCounterVec,
    exiting: IntCounterVec,
    usage: GaugeVec,
    limit: GaugeVec,
    working_set: GaugeVec,
    inactive_file: GaugeVec,
    timestamp: GaugeVec,
    victim: GaugeVec,
    working_set_ratio: Histogram,
    lost_events: IntCounter,
    read_errors: IntCounter,
    decode_errors: IntCounter,
    attach_info: IntGaugeVec,
    last_kill: Gauge,
    lost_samples: IntCounter,
    charge_state_dropped: IntCounter,
    /// The agent's own state: its store, its pins, its programs.
    pub agent: AgentMetrics,
    /// Kill series by (gauge labels), each with the counter label sets seen with it, least
    /// recently killed first.
    kill_series: std::sync::Mutex<std::collections::VecDeque<KillSeries>>,
    max_kill_series: usize,
    samples: IntCounterVec,
    live_usage: GaugeVec,
    live_working_set: GaugeVec,
    live_page_cache: GaugeVec,
    live_limit: GaugeVec,
    live_breakdown: GaugeVec,
    limit_hits: IntCounterVec,
    charge_failures: IntCounterVec,
}

/// Distinct kill series (victim cgroup, limit-hit cgroup, names) kept on /metrics; beyond it
/// the least recently killed are dropped, so container churn cannot grow the exposition
/// without bound.
pub const MAX_KILL_SERIES: usize = 2000;

/// The gauge labels of one kill series and every counter label set seen with them.
#[derive(Debug)]
struct KillSeries {
    gauge: Vec<String>,
    /// Label sets of `leak_oom_kills_total` seen with it.
    counters: Vec<Vec<String>>,
    /// Label sets of `leak_oom_kill_victim_timestamp_seconds` seen with it.
    victims: Vec<Vec<String>>,
    /// `leak_oom_victims_exiting_total` has a series with the gauge labels.
    exiting: bool,
}

/// Labels of the per-cgroup gauges: the victim's cgroup, the one that hit its limit, and the
/// victim's Kubernetes names (empty outside Kubernetes).
const KILL_LABELS: &[&str] = &["cgroup", "oom_cgroup", "namespace", "pod", "container"];

impl Metrics {
    /// Like [`Metrics::new`], keeping at most `max_kill_series` distinct kill series.
    pub fn with_kill_series_bound(
        kernel_release: &str,
        max_kill_series: usize,
    ) -> Result<Self, MetricsError> {
        let mut metrics = Self::new(kernel_release)?;
        metrics.max_kill_series = max_kill_series.max(1);
        Ok(metrics)
    }

    pub fn new(kernel_release: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(Some("leak".into()), None)?;
        let gauge = |name: &str, help: &str| -> Result<GaugeVec, MetricsError> {
            let gauge = GaugeVec::new(Opts::new(name, help), KILL_LABELS)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let kills = IntCounterVec::new(
            Opts::new(
                "oom_kills_total",
                "OOM-killer victims, by the victim's memory cgroup, the cgroup that hit its \
                 limit (empty for a global OOM), Kubernetes names, the constraint, whether \
                 the victim was its pid namespace's main process, and the cause (the largest \
                 unreclaimable component of the cgroup's usage: anon, shmem, kernel, \
                 file_dirty; empty when unknown)",
            ),
            &[
                "cgroup",
                "oom_cgroup",
                "namespace",
                "pod",
                "container",
                "constraint",
                "main_process",
                "cause",
            ],
        )?;
        registry.register(Box::new(kills.clone()))?;
        let exiting = IntCounterVec::new(
            Opts::new(
                "oom_victims_exiting_total",
                "Victims the OOM killer marked without killing them because they were already \
                 exiting (task_will_free_mem: no SIGKILL, not counted in the kernel's oom_kill \
                 nor in leak_oom_kills_total), by the victim's memory cgroup, the cgroup that hit \
                 its limit and Kubernetes names",
            ),
            KILL_LABELS,
        )?;
        registry.register(Box::new(exiting.clone()))?;
        let usage = gauge(
            "oom_kill_usage_bytes",
            "Memory usage of oom_cgroup (else the victim's cgroup) at the last kill",
        )?;
        let limit = gauge(
            "oom_kill_limit_bytes",
            "Memory limit of oom_cgroup at the last kill (+Inf when unlimited)",
        )?;
        let working_set = gauge(
            "oom_kill_working_set_bytes",
            "Working set (usage - inactive_file) of oom_cgroup at the last kill",
        )?;
        let inactive_file = gauge(
            "oom_kill_inactive_file_bytes",
            "Inactive page cache of oom_cgroup at the last kill",
        )?;
        let timestamp = gauge(
            "oom_kill_timestamp_seconds",
            "Unix time of the last kill in this cgroup",
        )?;
        let victim = GaugeVec::new(
            Opts::new(
                "oom_kill_victim_timestamp_seconds",
                "Unix time of the last kill of this process name in this cgroup, with whether it \
                 was its pid namespace's main process (a container survives the kill of any other)",
            ),
            &[
                "cgroup",
                "oom_cgroup",
                "namespace",
                "pod",
                "container",
                "process",
                "main_process",
            ],
        )?;
        registry.register(Box::new(victim.clone()))?;
        let working_set_ratio = Histogram::with_opts(
            HistogramOpts::new(
                "oom_kill_working_set_ratio",
                "Working set over limit of oom_cgroup at each memcg kill",
            )
            .buckets(vec![0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 1.0, 1.01]),
        )?;
        registry.register(Box::new(working_set_ratio.clone()))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let counter = IntCounter::new(name, help)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let lost_events = counter(
            "events_lost_total",
            "Kill events dropped in the kernel because the ring buffer was full",
        )?;
        let read_errors = counter(
            "kernel_read_errors_total",
            "Kernel memory reads that failed while taking a snapshot",
        )?;
        let decode_errors = counter(
            "events_malformed_total",
            "Ring buffer records that could not be decoded",
        )?;
        let attach_info = IntGaugeVec::new(
            Opts::new(
                "attach_info",
                "Kernel hooks in use and how they are attached",
            ),
            &["hook", "mode"],
        )?;
        registry.register(Box::new(attach_info.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Version of leak and the kernel it runs on"),
            &["version", "kernel"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel_release])
            .set(1);
        let last_kill = Gauge::new(
            "last_oom_kill_timestamp_seconds",
            "Unix time of the most recent kill seen (0 before the first)",
        )?;
        registry.register(Box::new(last_kill.clone()))?;
        let lost_samples = counter(
            "samples_lost_total",
            "Charge-path samples dropped because their ring buffer was full",
        )?;
        let charge_state_dropped = counter(
            "charge_state_dropped_total",
            "Per-thread charge states the fentry/kprobe charge path lost (evicted from its \
             bounded map) or threw away (left behind by unreported returns); each may miss a \
             limit hit or a charge failure",
        )?;
        let agent = AgentMetrics::register(&registry)?;
        let samples = IntCounterVec::new(
            Opts::new(
                "charge_samples_total",
                "Charge-path samples received, by kind (charge, limit_hit, charge_failed)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(samples.clone()))?;
        let live = |name: &str, help: &str| -> Result<GaugeVec, MetricsError> {
            let gauge = GaugeVec::new(Opts::new(name, help), CGROUP_LABELS)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let live_usage = live(
            "cgroup_usage_bytes",
            "Memory usage of a watched cgroup at its latest charge-path sample",
        )?;
        let live_working_set = live(
            "cgroup_working_set_bytes",
            "Working set (usage - inactive_file) of a watched cgroup at its latest sample",
        )?;
        let live_page_cache = live(
            "cgroup_page_cache_bytes",
            "Page cache (active + inactive file) of a watched cgroup at its latest sample",
        )?;
        let live_limit = live(
            "cgroup_limit_bytes",
            "Memory limit of a watched cgroup (+Inf when unlimited)",
        )?;
        let live_breakdown = GaugeVec::new(
            Opts::new(
                "cgroup_memory_bytes",
                "What fills a watched cgroup, by component (anon, file, shmem, file_dirty, \
                 file_writeback, slab_reclaimable, slab_unreclaimable, kernel_stack, pagetables, \
                 sock, percpu, swap), from its memory.stat every 5 s; components the cgroup \
                 version does not print are absent",
            ),
            &["cgroup", "namespace", "pod", "container", "component"],
        )?;
        registry.register(Box::new(live_breakdown.clone()))?;
        let pressure = |name: &str, help: &str| -> Result<IntCounterVec, MetricsError> {
            let counter = IntCounterVec::new(Opts::new(name, help), CGROUP_LABELS)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let limit_hits = pressure(
            "cgroup_limit_hits_total",
            "Charges that hit the cgroup's limit and sent the kernel reclaiming",
        )?;
        let charge_failures = pressure(
            "cgroup_charge_failures_total",
            "Charges that failed (-ENOMEM) after reclaim (fentry/kprobe charge path only)",
        )?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            kills,
            exiting,
            usage,
            limit,
            working_set,
            inactive_file,
            timestamp,
            victim,
            working_set_ratio,
            lost_events,
            read_errors,
            decode_errors,
            attach_info,
            last_kill,
            lost_samples,
            charge_state_dropped,
            agent,
            kill_series: std::sync::Mutex::new(std::collections::VecDeque::new()),
            max_kill_series: MAX_KILL_SERIES,
            samples,
            live_usage,
            live_working_set,
            live_page_cache,
            live_limit,
            live_breakdown,
            limit_hits,
            charge_failures,
        })
    }

    pub fn set_attachments(&self, attachments: &[Attachment]) {
        for attachment in attachments {
            self.attach_info
                .with_label_values(&[attachment.hook.name(), attachment.mode.as_str()])
                .set(1);
        }
    }

    /// Counts a kill (or, for a victim marked without a kill, an exiting victim) and sets the
    /// gauges of the last kill.
    pub fn record_kill(&self, kill: &Kill) {
        let oom_cgroup = kill.oom_cgroup.as_deref().unwrap_or("");
        let main_process = match kill.main_process {
            Some(true) => "true",
            Some(false) => "false",
            None => "",
        };
        let labels = [
            kill.cgroup.as_str(),
            oom_cgroup,
            kill.names.namespace.as_str(),
            kill.names.pod.as_str(),
            kill.names.container.as_str(),
        ];
        let counter_labels = [
            labels[0],
            labels[1],
            labels[2],
            labels[3],
            labels[4],
            kill.constraint.as_str(),
            main_process,
            kill.cause
                .as_ref()
                .map_or("", |cause| cause.component.as_str()),
        ];
        if kill.killed == Some(false) {
            // Not a kill: the kernel's oom_kill did not count it, so neither does the kill
            // counter, and the gauges keep describing the last real kill.
            self.exiting.with_label_values(&labels).inc();
            self.remember_kill_series(&labels, None);
            return;
        }
        let process = kill.victim_comm.as_deref().unwrap_or("");
        let victim_labels = [
            labels[0],
            labels[1],
            labels[2],
            labels[3],
            labels[4],
            process,
            main_process,
        ];
        self.kills.with_label_values(&counter_labels).inc();
        self.remember_kill_series(&labels, Some((&counter_labels, &victim_labels)));
        self.usage
            .with_label_values(&labels)
            .set(kill.usage_bytes as f64);
        self.limit
            .with_label_values(&labels)
            .set(kill.limit_bytes.map_or(f64::INFINITY, |limit| limit as f64));
        self.working_set
            .with_label_values(&labels)
            .set(kill.working_set_bytes as f64);
        self.inactive_file
            .with_label_values(&labels)
            .set(kill.inactive_file_bytes as f64);
        let seconds = kill.timestamp_unix_ns as f64 / 1e9;
        self.timestamp.with_label_values(&labels).set(seconds);
        self.victim.with_label_values(&victim_labels).set(seconds);
        self.last_kill.set(seconds);
        if let (Some(limit), Some(_)) = (kill.limit_bytes, &kill.oom_cgroup) {
            if limit > 0 {
                self.working_set_ratio
                    .observe(kill.working_set_bytes as f64 / limit as f64);
            }
        }
    }

    /// Records that these series were just written (the counter and victim labels of a kill,
    /// `None` for an exiting victim), and drops the least recently killed beyond the bound.
    fn remember_kill_series(&self, gauge: &[&str], kill: Option<(&[&str], &[&str])>) {
        let owned = |labels: &[&str]| labels.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
        let gauge = owned(gauge);
        let Ok(mut series) = self.kill_series.lock() else {
            return;
        };
        let mut entry = match series.iter().position(|known| known.gauge == gauge) {
            Some(index) => series.remove(index),
            None => None,
        }
        .unwrap_or(KillSeries {
            gauge,
            counters: Vec::new(),
            victims: Vec::new(),
            exiting: false,
        });
        match kill {
            Some((counter, victim)) => {
                let (counter, victim) = (owned(counter), owned(victim));
                if !entry.counters.contains(&counter) {
                    entry.counters.push(counter);
                }
                if !entry.victims.contains(&victim) {
                    entry.victims.push(victim);
                }
            }
            None => entry.exiting = true,
        }
        series.push_back(entry);
        while series.len() > self.max_kill_series {
            let Some(evicted) = series.pop_front() else {
                break;
            };
            let gauge: Vec<&str> = evicted.gauge.iter().map(String::as_str).collect();
            for family in [
                &self.usage,
                &self.limit,
                &self.working_set,
                &self.inactive_file,
                &self.timestamp,
            ] {
                let _ = family.remove_label_values(&gauge);
            }
            if evicted.exiting {
                let _ = self.exiting.remove_label_values(&gauge);
            }
            for counter in &evicted.counters {
                let counter: Vec<&str> = counter.iter().map(String::as_str).collect();
                let _ = self.kills.remove_label_values(&counter);
            }
            for victim in &evicted.victims {
                let victim: Vec<&str> = victim.iter().map(String::as_str).collect();
                let _ = self.victim.remove_label_values(&victim);
            }
        }
    }

    /// Brings the lost-event, lost-sample, read-error and dropped-charge-state counters up to the
    /// kernel's totals.
    pub fn set_kernel_counters(&self, counters: &KernelCounters) {
        let catch_up = |counter: &IntCounter, total: u64| {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        };
        catch_up(&self.lost_events, counters.lost_events);
        catch_up(&self.read_errors, counters.read_errors);
        catch_up(&self.lost_samples, counters.lost_samples);
        catch_up(&self.charge_state_dropped, counters.charge_state_dropped);
    }

    pub fn count_sample(&self, kind: SampleKind) {
        self.samples.with_label_values(&[kind.as_str()]).inc();
    }

    /// The live series of a watched cgroup, from its latest sample.
    pub fn set_cgroup_live(&self, labels: &CgroupLabels, point: &Point) {
        let values = cgroup_label_values(labels);
        self.live_usage
            .with_label_values(&values)
            .set(point.usage_bytes as f64);
        self.live_working_set
            .with_label_values(&values)
            .set(point.working_set_bytes as f64);
        self.live_page_cache
            .with_label_values(&values)
            .set(point.page_cache_bytes as f64);
        self.live_limit.with_label_values(&values).set(
            point
                .limit_bytes
                .map_or(f64::INFINITY, |limit| limit as f64),
        );
    }

    /// The breakdown series of a watched cgroup, from its latest poll.
    pub fn set_cgroup_breakdown(&self, labels: &CgroupLabels, breakdown: &Breakdown) {
        let [cgroup, namespace, pod, container] = cgroup_label_values(labels);
        for (component, value) in stat::NAMES.iter().zip(breakdown.items()) {
            let values = [cgroup, namespace, pod, container, component];
            match value {
                Some(bytes) => self
                    .live_breakdown
                    .with_label_values(&values)
                    .set(bytes as f64),
                None => {
                    let _ = self.live_breakdown.remove_label_values(&values);
                }
            }
        }
    }

    pub fn count_cgroup_pressure(&self, labels: &CgroupLabels, limit_hits: u64, failures: u64) {
        let values = cgroup_label_values(labels);
        if limit_hits > 0 {
            self.limit_hits
                .with_label_values(&values)
                .inc_by(limit_hits);
        }
        if failures > 0 {
            self.charge_failures
                .with_label_values(&values)
                .inc_by(failures);
        }
    }

    /// Drops the live series of a cgroup that is no longer watched.
    pub fn forget_cgroup(&self, labels: &CgroupLabels) {
        let values = cgroup_label_values(labels);
        for gauge in [
            &self.live_usage,
            &self.live_working_set,
            &self.live_page_cache,
            &self.live_limit,
        ] {
            let _ = gauge.remove_label_values(&values);
        }
        for component in stat::NAMES {
            let [cgroup, namespace, pod, container] = values;
            let _ = self
                .live_breakdown
                .remove_label_values(&[cgroup, namespace, pod, container, component]);
        }
    }

    pub fn count_decode_error(&self) {
        self.decode_errors.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        Ok(super::http::encode(&self.registry)?)
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
