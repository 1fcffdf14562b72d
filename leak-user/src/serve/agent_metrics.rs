//! Metrics of the agent's own state: its store on disk, its pinned probes, the kills the kernel
//! made while no agent watched, and what its BPF programs cost.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::metrics::MetricsError;
use crate::kernel::ProgramStats;

pub struct AgentMetrics {
    store_up: IntGauge,
    store_write_failures: IntCounter,
    probes_pinned: IntGauge,
    unobserved: IntCounterVec,
    program_runs: IntCounterVec,
    program_run_seconds: prometheus::CounterVec,
    program_verified: IntGaugeVec,
}

impl AgentMetrics {
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let store_up = IntGauge::new(
            "store_up",
            "1 while kills are written to the store on disk (--state-dir), 0 when it could not \
         be opened or its last write failed (kills are then kept in memory only)",
        )?;
        registry.register(Box::new(store_up.clone()))?;
        let store_write_failures = IntCounter::new(
            "store_write_failures_total",
            "Kills the store on disk could not take (full, read-only or failing disk, or too \
         many writes waiting); each was still served from memory",
        )?;
        registry.register(Box::new(store_write_failures.clone()))?;
        let probes_pinned = IntGauge::new(
            "probes_pinned",
            "1 while the kill path's probes are pinned under --pin-dir (they keep recording \
         kills while no agent runs, for the next agent), 0 when they end with the agent \
         (--no-pin, or pinning is not possible here: the log says why)",
        )?;
        registry.register(Box::new(probes_pinned.clone()))?;
        let unobserved = IntCounterVec::new(
            Opts::new(
                "oom_kills_unobserved_total",
                "OOM kills the kernel counted (oom_kill of memory.events.local on v2, of \
             memory.oom_control on v1) while no agent watched: between the last view the \
             agent kept in its store and the next start, less the kills it stored",
            ),
            &["cgroup"],
        )?;
        registry.register(Box::new(unobserved.clone()))?;
        let program_runs = IntCounterVec::new(
            Opts::new(
                "bpf_program_runs_total",
                "Runs of each of leak's BPF programs, as the kernel counts them (only while \
             statistics are on: --bpf-stats or kernel.bpf_stats_enabled)",
            ),
            &["program"],
        )?;
        registry.register(Box::new(program_runs.clone()))?;
        let program_run_seconds = prometheus::CounterVec::new(
            Opts::new(
                "bpf_program_run_seconds_total",
                "Time spent in each of leak's BPF programs, as the kernel counts it (only while \
             statistics are on)",
            ),
            &["program"],
        )?;
        registry.register(Box::new(program_run_seconds.clone()))?;
        let program_verified = IntGaugeVec::new(
            Opts::new(
                "bpf_program_verified_instructions",
                "Instructions the kernel's verifier processed to load each of leak's BPF \
             programs (its limit is 1,000,000; kernels 5.16+ report it)",
            ),
            &["program"],
        )?;
        registry.register(Box::new(program_verified.clone()))?;
        Ok(Self {
            store_up,
            store_write_failures,
            probes_pinned,
            unobserved,
            program_runs,
            program_run_seconds,
            program_verified,
        })
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    pub fn set_probes_pinned(&self, pinned: bool) {
        self.probes_pinned.set(i64::from(pinned));
    }

    /// Counts kills the kernel made in `cgroup` while no agent watched.
    pub fn count_unobserved(&self, cgroup: &str, kills: u64) {
        self.unobserved.with_label_values(&[cgroup]).inc_by(kills);
    }

    pub fn count_store_write_failure(&self) {
        self.store_write_failures.inc();
        self.store_up.set(0);
    }

    /// Catches the per-program counters up with the kernel's totals.
    pub fn set_program_stats(&self, stats: &[ProgramStats]) {
        for stat in stats {
            let runs = self.program_runs.with_label_values(&[stat.program]);
            if stat.run_count > runs.get() {
                runs.inc_by(stat.run_count - runs.get());
            }
            if let Some(verified) = stat.verified_instructions {
                self.program_verified
                    .with_label_values(&[stat.program])
                    .set(i64::from(verified));
            }
            let seconds = self.program_run_seconds.with_label_values(&[stat.program]);
            let total = stat.run_time_ns as f64 / 1e9;
            if total > seconds.get() {
                seconds.inc_by(total - seconds.get());
            }
        }
    }
}
