//! `leak trace`: the agent. Loads the probes, drains the ring buffers through the stages of
//! a kill (decode, enrich, store, serve) and serves them until SIGINT/SIGTERM, then detaches
//! every probe.

mod event_loop;
mod node_check;
mod persist;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{error, info, warn};
use tokio::sync::watch;

use crate::{
    enrich::cgroupfs::{MemoryHierarchy, Version},
    kernel::{AttachMode, LoadOptions, PinOptions, ProbeError, Probes},
    serve::{
        http::{self, Shared},
        metrics::{Metrics, MetricsError},
        server,
        webconfig::{WebConfig, WebConfigError},
    },
    store::{disk::Retention, filter::KillFilter, RecentKills},
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
    /// The runtime's CRI socket, for names the log directories do not give (`None`: none).
    pub cri_socket: Option<PathBuf>,
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
    /// Have the kernel count each program's runs and run time.
    pub bpf_stats: bool,
    /// The exporter web configuration (TLS, basic auth), if any.
    pub web_config_file: Option<PathBuf>,
    pub web_max_connections: usize,
    /// At most this many cgroups have a history and live series.
    pub max_watched_cgroups: usize,
    /// Where kills are kept across restarts; `None`: in memory only.
    pub state_dir: Option<PathBuf>,
    pub retention: Retention,
    /// Where probes are pinned, and whether this agent pins its own.
    pub pin: PinOptions,
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
    #[error(transparent)]
    WebConfig(#[from] WebConfigError),
    #[error(
        "running in a container, the agent misses the node's files it needs (see \
         deploy/daemonset.yaml):\n- {0}"
    )]
    NodeMounts(String),
}

pub async fn run(options: TraceOptions) -> Result<(), TraceError> {
    // Read first: a bad web configuration must stop the agent before it loads anything.
    let web = match &options.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
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

    // --rootfs says the agent's own root is not the node's (a container): stop at once if
    // the node's files it needs were not mounted in.
    if options.rootfs != Path::new("/") {
        let missing = node_check::missing(&node_check::Needs {
            hierarchy: hierarchy.as_ref(),
            rootfs: &options.rootfs,
            cri_socket: options.cri_socket.as_deref(),
            state_dir: options.state_dir.as_deref(),
            pin_dir: options.pin.pin.then_some(options.pin.dir.as_path()),
        });
        if !missing.is_empty() {
            return Err(TraceError::NodeMounts(missing.join("\n- ")));
        }
    }

    let mut probes = Probes::load(&LoadOptions {
        attach: options.attach,
        charge_attach: options.charge_attach,
        ring_buffer_bytes: options.ring_buffer_bytes,
        btf_path: options.btf.clone(),
        sample_interval_ns: u64::try_from(options.sample_interval.as_nanos()).unwrap_or(u64::MAX),
        only_limited: options.only_limited,
        dense_samples: options.dense_samples,
        bpf_stats: options.bpf_stats,
        root_memory_stat: hierarchy.as_ref().map(|h| h.root.join("memory.stat")),
        memsw_accounted: hierarchy
            .as_ref()
            .is_some_and(MemoryHierarchy::memsw_accounted),
        pin: options.pin.clone(),
    })?;
    // Loading parsed the kernel's BTF (megabytes, twice) and the BPF object; hand the freed
    // heap back to the system rather than keep it resident for the agent's whole life.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    let mode = probes.mode();
    info!("OOM hook attach mode: {mode}");
    match probes.charge_mode() {
        Some(charge) => info!("charge path (timeline before kills) attach mode: {charge}"),
        None => info!("charge path off: kills carry no timeline"),
    }

    // Right after this agent's probes were attached: every kill the kernel counted before
    // this is either in a ring buffer to drain (stored on the way) or was seen by no agent.
    let kernel_kills = hierarchy.as_ref().map(|hierarchy| {
        crate::enrich::kernel_kills::read_all(&hierarchy.root, hierarchy.version, sys::boot_ns)
    });

    let metrics = Metrics::new(&sys::kernel_release())?;
    metrics.set_attachments(probes.attachments());
    metrics.agent.set_probes_pinned(probes.pin_state().pinned());
    let store = match &options.state_dir {
        Some(dir) => persist::open(dir, options.retention).await,
        None => {
            info!("no --state-dir: kills are kept in memory only");
            None
        }
    };
    metrics.agent.set_store_up(store.is_some());
    // The history on disk: the most recent kills are served (and numbered on) from it.
    let mut recent = RecentKills::new(options.max_kills);
    let mut first_seq = 0;
    if let Some(store) = &store {
        if let Ok(store) = store.lock() {
            first_seq = store.last_seq().unwrap_or(0);
            let filter = KillFilter {
                limit: options.max_kills,
                ..KillFilter::default()
            };
            let kept = store.query(&filter).unwrap_or_default();
            info!(
                "{} kills kept from before (the newest #{first_seq})",
                kept.len()
            );
            for kill in kept.into_iter().rev() {
                recent.push(kill);
            }
        }
    }
    let boot_id = sys::boot_id();
    let writer = match &store {
        Some(store) => Some(persist::Writer::start(store.clone(), boot_id.clone())?),
        None => None,
    };
    let shared = Arc::new(Shared {
        metrics,
        kills: tokio::sync::RwLock::new(recent),
        attach_mode: mode.to_string(),
        live: tokio::sync::RwLock::new(Vec::new()),
        store,
        default_limit: options.max_kills,
    });

    // Before the address is announced: whoever read it may stop the agent at once.
    let stopped = shutdown_signal();
    let (listener, local) =
        http::bind(options.listen)
            .await
            .map_err(|source| TraceError::Listen {
                addr: options.listen,
                source,
            })?;
    info!(
        "listening on {}://{local} (/metrics, /kills, /healthz; pages at /){}",
        if web.tls.is_some() { "https" } else { "http" },
        if web.auth.is_some() {
            "; basic auth required"
        } else {
            ""
        }
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = server::Limits {
        max_connections: options.web_max_connections,
        ..server::Limits::default()
    };
    let server = tokio::spawn(server::serve(
        listener,
        http::router(shared.clone()),
        web,
        limits,
        stop_rx.clone(),
    ));
    tokio::spawn(async move {
        stopped.await;
        let _ = stop_tx.send(true);
    });

    let result = event_loop::run(
        &mut probes,
        &shared,
        hierarchy.map(|h| (h.root, h.version)),
        &options,
        event_loop::Persistence {
            writer: writer.as_ref(),
            first_seq,
            boot_id,
            kernel_kills,
        },
        stop_rx,
    )
    .await;
    probes.detach();
    if let Err(err) = server.await {
        error!("HTTP server task: {err}");
    }
    result
}

/// The memory hierarchy's root and cgroup version, when one is mounted.
type Hierarchy = Option<(PathBuf, Version)>;

/// Installs the SIGINT and SIGTERM handlers now (a signal from then on stops the agent
/// cleanly, however soon it comes); the future ends at the first.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut interrupt), Ok(mut terminate)) = handlers else {
            error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT received"),
            _ = terminate.recv() => info!("SIGTERM received"),
        }
    }
}
