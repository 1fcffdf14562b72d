//! `leak trace`: the agent. Loads the probes, drains the ring buffer, enriches each kill and
//! serves it until SIGINT/SIGTERM, then detaches every probe.

use std::{
    collections::VecDeque,
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
    cgroup::{CgroupPaths, MemoryHierarchy},
    events::{self, Context, Kill},
    http::{self, Shared},
    k8s::{self, K8sNames},
    metrics::{Metrics, MetricsError},
    probes::{AttachMode, LoadOptions, ProbeError, Probes},
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
    let mut probes = Probes::load(&LoadOptions {
        attach: options.attach,
        ring_buffer_bytes: options.ring_buffer_bytes,
        btf_path: options.btf.clone(),
    })?;
    let mode = probes.mode();
    info!("OOM hook attach mode: {mode}");

    let hierarchy = match MemoryHierarchy::discover() {
        Ok(hierarchy) => {
            info!(
                "memory cgroups: {:?} at {}",
                hierarchy.version,
                hierarchy.root.display()
            );
            Some(hierarchy.root)
        }
        Err(err) => {
            warn!("{err}; cgroup paths will come from the kernel's names only");
            None
        }
    };
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
    let result = event_loop(&mut probes, &shared, &mut paths, &mut names, stop_rx).await;
    probes.detach();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => error!("HTTP server: {err}"),
        Err(err) => error!("HTTP server task: {err}"),
    }
    result
}

async fn event_loop(
    probes: &mut Probes,
    shared: &Shared,
    paths: &mut CgroupPaths,
    names: &mut K8sNames,
    mut stop: watch::Receiver<bool>,
) -> Result<(), TraceError> {
    let mut ring = readable(probes.take_events()?)?;
    let mut logger = match probes.take_logger() {
        Some(logger) => Some(readable(logger)?),
        None => None,
    };
    let mut counters_tick = tokio::time::interval(Duration::from_secs(1));
    let page_size = page_size();
    let mode = probes.mode().to_string();
    let mut seq = 0u64;
    let mut dedup = events::VictimDedup::default();
    // (triggering thread, boot_ns, cgroup id) of the last kill attributed to a cgroup.
    let mut last_attribution: Option<(u32, u64, u64)> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => {
                info!("shutting down");
                break;
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(record) = ring.next() {
                    match events::decode(&record) {
                        Ok(event) => {
                            seq += 1;
                            let context = Context {
                                page_size,
                                realtime_offset_ns: realtime_offset_ns(),
                                attach_mode: &mode,
                                seq,
                                same_oom_cgroup_id: last_attribution
                                    .filter(|(trigger, at, _)| {
                                        *trigger == event.trigger_pid
                                            && event.boot_ns.abs_diff(*at) < SAME_OOM_NS
                                    })
                                    .map(|(_, _, id)| id),
                            };
                            let mut kill = events::build_kill(&event, &context, paths);
                            events::fill_from_procfs(&mut kill, Path::new("/proc"));
                            if let Some(id) = kill.oom_cgroup_id {
                                last_attribution = Some((event.trigger_pid, event.boot_ns, id));
                            }
                            k8s::attribute(&mut kill, names);
                            if !dedup.first_report(&kill) {
                                log::debug!(
                                    "pid {} (thread {}) was already reported dying",
                                    kill.victim_pid,
                                    kill.victim_tid
                                );
                                continue;
                            }
                            log_kill(&kill);
                            shared.metrics.record_kill(&kill);
                            shared.push_kill(kill).await;
                        }
                        Err(err) => {
                            warn!("dropping malformed event: {err}");
                            shared.metrics.count_decode_error();
                        }
                    }
                }
                guard.clear_ready();
            }
            guard = async { logger.as_mut()?.readable_mut().await.ok() }, if logger.is_some() => {
                if let Some(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = counters_tick.tick() => {
                let counters = probes.kernel_counters();
                shared.metrics.set_kernel_counters(counters.lost_events, counters.read_errors);
            }
        }
    }
    Ok(())
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
