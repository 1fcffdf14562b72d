//! `leak workload`: the original experiment's leaking program. Every `interval` it allocates and
//! keeps `chunk` bytes, writing to every byte so the pages are charged to its memory cgroup;
//! with a file it also appends a chunk and fsyncs, growing page cache. It serves its own
//! `/metrics`.

use std::{fs::OpenOptions, io::Write, net::SocketAddr, path::PathBuf, time::Duration};

use log::info;
use prometheus::{IntCounter, Registry};

#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    pub interval: Duration,
    pub chunk: usize,
    pub file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// Stop leaking (but keep running) after this many bytes; `None` leaks until killed.
    pub max_bytes: Option<u64>,
    /// Leak from a worker thread while the main thread (the thread group leader) exits.
    pub leader_exits: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("--chunk must be at least one byte")]
    EmptyChunk,
    #[error("cannot start the leaking thread: {0}")]
    Thread(std::io::Error),
}

struct WorkloadMetrics {
    registry: Registry,
    leaked: IntCounter,
    written: IntCounter,
}

impl WorkloadMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("leak_workload".into()), None)?;
        let leaked = IntCounter::new("leaked_bytes_total", "Anonymous memory allocated and kept")?;
        let written = IntCounter::new(
            "written_bytes_total",
            "Bytes appended (and fsynced) to the file",
        )?;
        registry.register(Box::new(leaked.clone()))?;
        registry.register(Box::new(written.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            leaked,
            written,
        })
    }
}

pub async fn run(options: WorkloadOptions) -> Result<(), WorkloadError> {
    if options.chunk == 0 {
        return Err(WorkloadError::EmptyChunk);
    }
    match options.leader_exits {
        true => leak_after_the_leader_exits(options),
        false => leak(options).await,
    }
}

/// Leaks from a thread of its own while the calling (main) thread exits on its own, leaving
/// the process running without its leader's mm: the OOM killer chooses the process by its
/// leader and kills (and marks) the first thread that still has the memory.
fn leak_after_the_leader_exits(options: WorkloadOptions) -> Result<(), WorkloadError> {
    // An idle thread ahead of the leaking one, so that the thread the kernel marks is not the
    // one whose allocation ran the OOM killer.
    std::thread::Builder::new()
        .name("idle".into())
        .spawn(|| loop {
            std::thread::park();
        })
        .map_err(WorkloadError::Thread)?;
    std::thread::Builder::new()
        .name("leaker".into())
        .spawn(move || {
            let leaked = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(WorkloadError::Thread)
                .and_then(|runtime| runtime.block_on(leak(options)));
            if let Err(err) = leaked {
                log::error!("{err}");
                std::process::exit(1);
            }
        })
        .map_err(WorkloadError::Thread)?;
    info!("the main thread exits; leaking goes on in a worker thread");
    loop {
        // SAFETY: exit(2) ends the calling thread only and does not return, so nothing on this
        // thread's stack is used again; the threads started above own everything they use.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
}

async fn leak(options: WorkloadOptions) -> Result<(), WorkloadError> {
    let metrics = WorkloadMetrics::new()?;
    if let Some(addr) = options.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WorkloadError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| WorkloadError::Listen { addr, source })?;
        info!("workload metrics on http://{local}/metrics");
        crate::serve::http::serve_registry(listener, metrics.registry.clone());
    }

    let mut file = match &options.file {
        Some(path) => Some((
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| WorkloadError::Open {
                    path: path.clone(),
                    source,
                })?,
            path.clone(),
        )),
        None => None,
    };
    info!(
        "leaking {} bytes every {:?}{}",
        options.chunk,
        options.interval,
        options
            .file
            .as_ref()
            .map(|p| format!(", appending and fsyncing {}", p.display()))
            .unwrap_or_default()
    );

    let mut kept: Vec<Box<[u8]>> = Vec::new();
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let page = vec![0x5au8; options.chunk];
    loop {
        ticker.tick().await;
        let leaked = metrics.leaked.get();
        if options.max_bytes.is_some_and(|max| leaked >= max) {
            continue;
        }
        // Filled with a non-zero byte so every page is written, faulted in and charged.
        let chunk = page.clone().into_boxed_slice();
        kept.push(std::hint::black_box(chunk));
        metrics.leaked.inc_by(options.chunk as u64);

        if let Some((file, path)) = file.as_mut() {
            file.write_all(&page)
                .and_then(|()| file.sync_all())
                .map_err(|source| WorkloadError::Write {
                    path: path.clone(),
                    source,
                })?;
            metrics.written.inc_by(options.chunk as u64);
        }
    }
}

/// `leak churn`: a page-fault-heavy loop for benchmarks. Each round maps `bytes` of anonymous
/// memory, writes every page (each fault charges the memory cgroup) and unmaps it; with a file,
/// each round instead writes `bytes` to it, fsyncs and drops the cached pages, so the next round
/// charges page cache again. Returns bytes per second.
pub fn churn(
    bytes: usize,
    duration: Duration,
    file: Option<&std::path::Path>,
) -> Result<f64, WorkloadError> {
    if bytes == 0 {
        return Err(WorkloadError::EmptyChunk);
    }
    let page = crate::sys::page_size() as usize;
    let mut file = match file {
        Some(path) => Some((
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| WorkloadError::Open {
                    path: path.to_owned(),
                    source,
                })?,
            path.to_owned(),
        )),
        None => None,
    };
    let block = vec![0x5au8; 1 << 20];
    let started = std::time::Instant::now();
    let mut done = 0u64;
    while started.elapsed() < duration {
        match file.as_mut() {
            None => {
                // SAFETY: a fresh private anonymous mapping, written within its bounds and
                // unmapped before the loop goes on; no Rust reference to it escapes.
                unsafe {
                    let memory = libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if memory == libc::MAP_FAILED {
                        return Err(WorkloadError::Write {
                            path: "anonymous mapping".into(),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    let base = memory.cast::<u8>();
                    for offset in (0..bytes).step_by(page) {
                        base.add(offset).write_volatile(1);
                    }
                    libc::munmap(memory, bytes);
                }
            }
            Some((handle, path)) => {
                use std::{io::Seek, os::fd::AsRawFd};
                let error = |source| WorkloadError::Write {
                    path: path.clone(),
                    source,
                };
                handle.seek(std::io::SeekFrom::Start(0)).map_err(error)?;
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(block.len());
                    handle.write_all(&block[..n]).map_err(error)?;
                    left -= n;
                }
                handle.sync_data().map_err(error)?;
                // SAFETY: advice on our own open descriptor; no memory is touched.
                unsafe {
                    libc::posix_fadvise(handle.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
        done += bytes as u64;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}
