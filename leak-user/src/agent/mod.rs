//! `leak trace`: the agent. Loads the probes, drains the ring buffers through the stages of
//! a kill (decode, enrich, store, serve) and serves them until SIGINT/SIGTERM, then detaches
//! every probe.

mod event_loop;

use std::{future::IntoFuture, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use log::{error, info, warn};
use tokio::sync::watch;

use crate::{
    enrich::cgroupfs::{MemoryHierarchy, Version},
    kernel::{AttachMode, LoadOptions, ProbeError, Probes},
    serve::{
        http::{self, Shared},
        metrics::{Metrics, MetricsError},
    },
    store::RecentKills,
    sys,
};

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

pub async fn run(options: TraceOptions) -> Result<(), TraceError> {
    let hierarchy = match MemoryHierarchy::discover() {
        Ok(hierarchy) => {
            info!(
                "memory cgroups: {:?} at {}",
                hierarchy.version,
                hierarchy.root.display()
            );
            Some(hierarchy)
        }
        Err(err) => {
            warn!("{err}; cgroup paths will come from the kernel's names only");
            None
        }
    };

    let mut probes = Probes::load(&LoadOptions {
        attach: options.attach,
        charge_attach: options.charge_attach,
        ring_buffer_bytes: options.ring_buffer_bytes,
        btf_path: options.btf.clone(),
        sample_interval_ns: u64::try_from(options.sample_interval.as_nanos()).unwrap_or(u64::MAX),
        only_limited: options.only_limited,
        dense_samples: options.dense_samples,
        root_memory_stat: hierarchy.as_ref().map(|h| h.root.join("memory.stat")),
        memsw_accounted: hierarchy
            .as_ref()
            .is_some_and(MemoryHierarchy::memsw_accounted),
    })?;
    let mode = probes.mode();
    info!("OOM hook attach mode: {mode}");
    match probes.charge_mode() {
        Some(charge) => info!("charge path (timeline before kills) attach mode: {charge}"),
        None => info!("charge path off: kills carry no timeline"),
    }

    let metrics = Metrics::new(&sys::kernel_release())?;
    metrics.set_attachments(probes.attachments());
    let shared = Arc::new(Shared {
        metrics,
        kills: tokio::sync::RwLock::new(RecentKills::new(options.max_kills)),
        attach_mode: mode.to_string(),
        live: tokio::sync::RwLock::new(Vec::new()),
    });

    let (listener, local) =
        http::bind(options.listen)
            .await
            .map_err(|source| TraceError::Listen {
                addr: options.listen,
                source,
            })?;
    info!("listening on http://{local} (/metrics, /kills, /healthz; pages at /)");

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

    let result = event_loop::run(
        &mut probes,
        &shared,
        hierarchy.map(|h| (h.root, h.version)),
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

/// The memory hierarchy's root and cgroup version, when one is mounted.
type Hierarchy = Option<(PathBuf, Version)>;

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
