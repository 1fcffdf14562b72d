//! Kill snapshots on disk, so that history outlives the agent: an embedded SQLite database
//! (`kills.db` under `--state-dir`) in WAL mode, with a schema version (`PRAGMA user_version`)
//! and retention by count and age. One row per kill: the columns `/kills` filters on, and the
//! whole snapshot as JSON. A kill is keyed by the boot it happened in, its kernel timestamp and
//! the marked thread, so the same record delivered twice (a restart replaying what a pinned ring
//! buffer kept) is stored once; and by the boot, the marked thread and that task's start time,
//! so the same kill reported by two sets of programs (an old agent's pinned probes and a new
//! agent's, both attached while one replaces the other) is stored once too. The kernel's own
//! kill counters as the agent last saw them are kept beside the kills, to count the kills that
//! happened while no agent watched.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::filter::KillFilter;
use crate::model::kill::{KernelKillCounts, Kill};

/// The schema this agent writes; a database with a newer one is refused, not rewritten.
pub const SCHEMA_VERSION: i64 = 2;

/// The database's file name under the state directory.
pub const FILE_NAME: &str = "kills.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kill store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "kill store {path}: the integrity check failed ({detail}); move it away to start afresh"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "kill store {path}: schema version {found}, newer than this agent's {SCHEMA_VERSION} \
         (written by a newer leak); it is left alone"
    )]
    Newer { path: PathBuf, found: i64 },
    #[error("kill store: a snapshot could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How much history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// At most this many kills (the oldest go first).
    pub max_kills: u64,
    /// Kills older than this go.
    pub max_age: Duration,
}

/// The store as the agent's writer thread and its HTTP handlers share it.
pub type SharedStore = std::sync::Arc<std::sync::Mutex<KillStore>>;

pub struct KillStore {
    conn: Connection,
    path: PathBuf,
    retention: Retention,
}

impl KillStore {
    /// Opens (creating if needed) the store under `dir`, checking its integrity and schema.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(sqlite)?;
        conn.busy_timeout(Duration::from_secs(1)).map_err(sqlite)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(sqlite)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: path.clone(),
                detail: check,
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "kill store {}: journal mode {mode}, not WAL",
                path.display()
            );
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sqlite)?;
        match version {
            0 => {
                create_schema(&conn).map_err(sqlite)?;
                migrate_to_2(&conn).map_err(sqlite)?;
            }
            1 => migrate_to_2(&conn).map_err(sqlite)?,
            SCHEMA_VERSION => {}
            found => return Err(StoreError::Newer { path, found }),
        }
        Ok(Self {
            conn,
            path,
            retention,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The highest sequence number stored (0 when empty): the agent numbers on from it.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .conn
            .query_row("SELECT MAX(seq) FROM kills", [], |row| row.get(0))
            .map_err(|err| self.sqlite(err))?;
        Ok(seq.map_or(0, |seq| seq.max(0) as u64))
    }

    /// Stores `kill` (of the boot `boot_id`); `false` when it was stored already (the same
    /// record, or the same task's kill from another set of programs).
    pub fn insert(&mut self, kill: &Kill, boot_id: &str) -> Result<bool, StoreError> {
        let json = serde_json::to_string(kill)?;
        let unix_ns = i64::try_from(kill.timestamp_unix_ns).unwrap_or(i64::MAX);
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO kills (seq, unix_ns, boot_id, boot_ns, victim_tid, cgroup, \
                 namespace, pod, container, kill, victim_start_ns) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    i64::try_from(kill.seq).unwrap_or(i64::MAX),
                    unix_ns,
                    boot_id,
                    i64::try_from(kill.boot_ns).unwrap_or(i64::MAX),
                    kill.victim_tid,
                    kill.cgroup,
                    kill.names.namespace,
                    kill.names.pod,
                    kill.names.container,
                    json,
                    kill.victim_start_ns
                        .map_or(0, |start| i64::try_from(start).unwrap_or(i64::MAX)),
                ],
            )
            .map_err(|err| self.sqlite(err))?;
        Ok(inserted == 1)
    }

    /// Applies the retention; how many kills went.
    pub fn prune(&mut self, now_unix_ns: u128) -> Result<usize, StoreError> {
        let cutoff = now_unix_ns.saturating_sub(self.retention.max_age.as_nanos());
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let by_age = self
            .conn
            .execute("DELETE FROM kills WHERE unix_ns < ?1", params![cutoff])
            .map_err(|err| self.sqlite(err))?;
        let keep = i64::try_from(self.retention.max_kills).unwrap_or(i64::MAX);
        let by_count = self
            .conn
            .execute(
                "DELETE FROM kills WHERE seq NOT IN \
                 (SELECT seq FROM kills ORDER BY seq DESC LIMIT ?1)",
                params![keep],
            )
            .map_err(|err| self.sqlite(err))?;
        Ok(by_age + by_count)
    }

    /// The kills `filter` selects, newest first.
    pub fn query(&self, filter: &KillFilter) -> Result<Vec<Kill>, StoreError> {
        let mut sql = String::from("SELECT kill FROM kills WHERE 1 = 1");
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        for (column, value) in [
            ("namespace", &filter.namespace),
            ("pod", &filter.pod),
            ("container", &filter.container),
            ("cgroup", &filter.cgroup),
        ] {
            if let Some(value) = value {
                values.push(value.clone().into());
                sql.push_str(&format!(" AND {column} = ?{}", values.len()));
            }
        }
        if let Some(since) = filter.since_unix_ns {
            values.push(i64::try_from(since).unwrap_or(i64::MAX).into());
            sql.push_str(&format!(" AND unix_ns >= ?{}", values.len()));
        }
        if let Some(until) = filter.until_unix_ns {
            values.push(i64::try_from(until).unwrap_or(i64::MAX).into());
            sql.push_str(&format!(" AND unix_ns <= ?{}", values.len()));
        }
        values.push(i64::try_from(filter.limit).unwrap_or(i64::MAX).into());
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ?{}", values.len()));
        let mut statement = self.conn.prepare(&sql).map_err(|err| self.sqlite(err))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), |row| {
                row.get::<_, String>(0)
            })
            .map_err(|err| self.sqlite(err))?;
        let mut kills = Vec::new();
        for json in rows {
            let json = json.map_err(|err| self.sqlite(err))?;
            match serde_json::from_str(&json) {
                Ok(kill) => kills.push(kill),
                Err(err) => log::warn!("kill store: a stored kill does not decode: {err}"),
            }
        }
        Ok(kills)
    }

    /// The kill numbered `seq`.
    pub fn get(&self, seq: u64) -> Result<Option<Kill>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT kill FROM kills WHERE seq = ?1",
                params![i64::try_from(seq).unwrap_or(i64::MAX)],
                |row| row.get(0),
            )
            .optional()
            .map_err(|err| self.sqlite(err))?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }
}

impl KillStore {
    /// Kills the kernel counted that the agent did not see, per cgroup path: for each cgroup
    /// of `now`, its counter minus the one last saved ([`Self::save_kernel_view`]) minus the
    /// kills stored for it between the two readings. `None` when no view was ever saved (so
    /// nothing to compare with); a view of another boot counts from zero.
    pub fn unobserved(
        &self,
        boot_id: &str,
        now: &KernelKillCounts,
    ) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        let sqlite = |err| self.sqlite(err);
        let mut statement = self
            .conn
            .prepare("SELECT boot_id, cgroup, oom_kill, read_boot_ns FROM kernel_oom_kills")
            .map_err(sqlite)?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .map_err(sqlite)?;
        let mut view = std::collections::HashMap::new();
        let (mut seen_any, mut same_boot, mut taken_ns) = (false, false, 0u64);
        for row in rows {
            let (boot, cgroup, count, read_ns) = row.map_err(sqlite)?;
            seen_any = true;
            if boot != boot_id {
                continue;
            }
            same_boot = true;
            let (count, read_ns) = (count.max(0) as u64, read_ns.max(0) as u64);
            match cgroup.is_empty() {
                // The marker row: when the view was taken.
                true => taken_ns = read_ns,
                false => {
                    view.insert(cgroup, (count, read_ns));
                }
            }
        }
        if !seen_any {
            return Ok(None);
        }
        let mut counted = self
            .conn
            .prepare(
                "SELECT COUNT(*) FROM kills WHERE boot_id = ?1 AND cgroup = ?2 \
                 AND boot_ns > ?3 AND boot_ns <= ?4 \
                 AND COALESCE(json_extract(kill, '$.killed'), 1) != 0",
            )
            .map_err(sqlite)?;
        let mut unobserved = Vec::new();
        for (cgroup, count) in now {
            // A cgroup the view does not hold was made after it was taken (or in another boot).
            let (before, since_ns) = match same_boot {
                true => view.get(cgroup).copied().unwrap_or((0, taken_ns)),
                false => (0, 0),
            };
            let observed: i64 = counted
                .query_row(
                    params![
                        boot_id,
                        cgroup,
                        i64::try_from(since_ns).unwrap_or(i64::MAX),
                        i64::try_from(count.read_boot_ns).unwrap_or(i64::MAX)
                    ],
                    |row| row.get(0),
                )
                .map_err(sqlite)?;
            // A counter below the view's: the cgroup was removed and made again since.
            let before = if count.oom_kill >= before { before } else { 0 };
            let missed = count
                .oom_kill
                .saturating_sub(before)
                .saturating_sub(observed.max(0) as u64);
            if missed > 0 {
                unobserved.push((cgroup.clone(), missed));
            }
        }
        unobserved.sort();
        Ok(Some(unobserved))
    }

    /// Replaces the kept view of the kernel's counters with `now`, read in the boot `boot_id`.
    pub fn save_kernel_view(
        &mut self,
        boot_id: &str,
        now: &KernelKillCounts,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let taken_ns = now.values().map(|c| c.read_boot_ns).min().unwrap_or(0);
        let transaction = self
            .conn
            .transaction()
            .map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
        let result = (|| {
            transaction.execute("DELETE FROM kernel_oom_kills", [])?;
            let mut insert = transaction.prepare(
                "INSERT INTO kernel_oom_kills (boot_id, cgroup, oom_kill, read_boot_ns) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            // The marker row, so that an empty view is told from none.
            insert.execute(params![
                boot_id,
                "",
                0,
                i64::try_from(taken_ns).unwrap_or(i64::MAX)
            ])?;
            for (cgroup, count) in now {
                insert.execute(params![
                    boot_id,
                    cgroup,
                    i64::try_from(count.oom_kill).unwrap_or(i64::MAX),
                    i64::try_from(count.read_boot_ns).unwrap_or(i64::MAX)
                ])?;
            }
            drop(insert);
            transaction.commit()
        })();
        result.map_err(|source| StoreError::Sqlite { path, source })
    }
}

fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS kills (
             seq        INTEGER PRIMARY KEY,
             unix_ns    INTEGER NOT NULL,
             boot_id    TEXT NOT NULL,
             boot_ns    INTEGER NOT NULL,
             victim_tid INTEGER NOT NULL,
             cgroup     TEXT NOT NULL,
             namespace  TEXT NOT NULL,
             pod        TEXT NOT NULL,
             container  TEXT NOT NULL,
             kill       TEXT NOT NULL,
             UNIQUE (boot_id, boot_ns, victim_tid)
         );
         CREATE INDEX IF NOT EXISTS kills_by_time ON kills (unix_ns);
         CREATE INDEX IF NOT EXISTS kills_by_pod ON kills (namespace, pod, container);
         CREATE INDEX IF NOT EXISTS kills_by_cgroup ON kills (cgroup);
         PRAGMA user_version = 1;
         COMMIT;",
    )
}

/// Version 2: the task key of a kill (its start time beside the thread) and the kernel's kill
/// counters as last seen.
fn migrate_to_2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN;
         ALTER TABLE kills ADD COLUMN victim_start_ns INTEGER NOT NULL DEFAULT 0;
         CREATE UNIQUE INDEX IF NOT EXISTS kills_by_task
             ON kills (boot_id, victim_tid, victim_start_ns) WHERE victim_start_ns != 0;
         CREATE TABLE IF NOT EXISTS kernel_oom_kills (
             boot_id      TEXT NOT NULL,
             cgroup       TEXT NOT NULL PRIMARY KEY,
             oom_kill     INTEGER NOT NULL,
             read_boot_ns INTEGER NOT NULL
         );
         PRAGMA user_version = 2;
         COMMIT;",
    )
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
