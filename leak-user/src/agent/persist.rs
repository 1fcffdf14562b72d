//! The kill store, from the agent's side: opened at start (a store that cannot be opened is a
//! warning and `leak_store_up 0`, never fatal: the agent serves from memory), and written by a
//! thread of its own, so that the event loop waits for the disk a bounded time per kill and a
//! slow, full or read-only disk never holds the kill path.

use std::{
    path::Path,
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::sync::oneshot;

use crate::{
    model::kill::Kill,
    serve::metrics::Metrics,
    store::disk::{KillStore, Retention, SharedStore, StoreError},
};

/// How long a kill waits for its write before it is served anyway.
const WRITE_WAIT: Duration = Duration::from_millis(250);

/// Kills waiting for the writer; beyond this they are served unwritten (and counted).
const QUEUE: usize = 4096;

/// Retention runs after this many writes (and once at start).
const PRUNE_EVERY: u64 = 64;

/// Opens the store under `dir`; `None` (with a warning saying why) when it cannot be used.
pub async fn open(dir: &Path, retention: Retention) -> Option<SharedStore> {
    let dir = dir.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        let mut store = KillStore::open(&dir, retention)?;
        let pruned = store.prune(crate::sys::unix_ns())?;
        Ok::<_, StoreError>((store, pruned))
    })
    .await;
    match opened {
        Ok(Ok((store, pruned))) => {
            info!(
                "kill store {} (schema {}; {pruned} kills past retention removed)",
                store.path().display(),
                crate::store::disk::SCHEMA_VERSION
            );
            Some(Arc::new(Mutex::new(store)))
        }
        Ok(Err(err)) => {
            warn!("{err}; kills are kept in memory only");
            None
        }
        Err(err) => {
            warn!("kill store: {err}; kills are kept in memory only");
            None
        }
    }
}

struct Job {
    kill: Kill,
    done: oneshot::Sender<Result<bool, String>>,
}

/// What became of a kill sent to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Stored,
    /// The store holds it already: delivered twice (replayed from a pinned ring buffer, or
    /// reported by an earlier agent's probes and this one's while both were attached).
    Duplicate,
    /// Not known to be stored (failed, or still being written): served all the same.
    Unknown,
}

/// The writer thread's end.
pub struct Writer {
    jobs: mpsc::SyncSender<Job>,
}

impl Writer {
    pub fn start(store: SharedStore, boot_id: String) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("leak-store".into())
            .spawn(move || {
                let mut written = 0u64;
                for job in queue {
                    let result = match store.lock() {
                        Ok(mut store) => {
                            let result = store.insert(&job.kill, &boot_id);
                            written += 1;
                            if result.is_ok() && written.is_multiple_of(PRUNE_EVERY) {
                                if let Err(err) = store.prune(crate::sys::unix_ns()) {
                                    warn!("{err}");
                                }
                            }
                            result.map_err(|err| err.to_string())
                        }
                        Err(_) => Err("kill store: poisoned lock".to_owned()),
                    };
                    let _ = job.done.send(result);
                }
            })?;
        Ok(Self { jobs })
    }

    /// Writes `kill`, waiting at most [`WRITE_WAIT`]; a failure is logged and counted, and the
    /// kill is served all the same.
    pub async fn write(&self, kill: &Kill, metrics: &Metrics) -> Written {
        let (done, done_rx) = oneshot::channel();
        let job = Job {
            kill: kill.clone(),
            done,
        };
        let mut written = Written::Unknown;
        let failure = match self.jobs.try_send(job) {
            Err(mpsc::TrySendError::Full(_)) => Some(format!(
                "kill store: {QUEUE} writes waiting; kill #{} not stored",
                kill.seq
            )),
            Err(mpsc::TrySendError::Disconnected(_)) => {
                Some("kill store: the writer thread is gone".to_owned())
            }
            Ok(()) => match tokio::time::timeout(WRITE_WAIT, done_rx).await {
                Ok(Ok(Ok(stored))) => {
                    written = match stored {
                        true => Written::Stored,
                        false => Written::Duplicate,
                    };
                    None
                }
                Ok(Ok(Err(err))) => Some(err),
                Ok(Err(_)) => Some("kill store: the writer thread is gone".to_owned()),
                // Still being written: served now, stored when the disk lets it.
                Err(_) => {
                    warn!(
                        "kill store: kill #{} is slow to write; served first",
                        kill.seq
                    );
                    return Written::Unknown;
                }
            },
        };
        match failure {
            None => metrics.agent.set_store_up(true),
            Some(err) => {
                warn!("{err}");
                metrics.agent.count_store_write_failure();
            }
        }
        written
    }
}
