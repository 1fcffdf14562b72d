//! The store on a real SQLite file in a temporary directory.

use std::path::PathBuf;

use super::*;
use crate::{
    decode::event::fixtures::{event, level, record, PAGE, UNLIMITED},
    enrich::{
        cgroupfs::CgroupPaths,
        kill::{assemble, KillContext},
    },
};

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leak-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const RETENTION: Retention = Retention {
    max_kills: 100,
    max_age: Duration::from_secs(86_400),
};

/// Kill number `seq` at `unix_s`, in cgroup `/c<seq % 3>`, of pod `p<seq % 2>`.
fn kill(seq: u64, unix_s: u64) -> Kill {
    let event = event(&[
        level(seq * 10, &format!("c{}", seq % 3), 1024, 1024, 0),
        level(1, "", 5000, UNLIMITED, 0),
    ]);
    let context = KillContext {
        page_size: PAGE,
        realtime_offset_ns: 0,
        attach_mode: "tp_btf",
        seq,
        freshness: Default::default(),
        kill_witness: true,
        same_oom_cgroup_id: None,
        cgroup_v2: Some(true),
    };
    let mut kill = assemble(&record(&event), &context, &mut CgroupPaths::new(None));
    kill.boot_ns = seq;
    kill.victim_start_ns = Some(1_000 + seq);
    kill.timestamp_unix_ns = u128::from(unix_s) * 1_000_000_000;
    kill.names.namespace = "default".into();
    kill.names.pod = format!("p{}", seq % 2);
    kill.names.container = "app".into();
    kill
}

fn all() -> KillFilter {
    KillFilter {
        limit: 1000,
        ..KillFilter::default()
    }
}

#[test]
fn kills_survive_reopening_once_each() {
    let dir = dir("reopen");
    {
        let mut store = KillStore::open(&dir, RETENTION).expect("open");
        assert_eq!(store.last_seq().expect("seq"), 0);
        for seq in 1..=5 {
            assert!(store
                .insert(&kill(seq, 1000 + seq), "boot-a")
                .expect("insert"));
        }
        // The same kill again (a replay after a restart) is stored once.
        assert!(!store.insert(&kill(3, 1003), "boot-a").expect("insert"));
    }
    let store = KillStore::open(&dir, RETENTION).expect("reopen");
    assert_eq!(store.last_seq().expect("seq"), 5);
    let kills = store.query(&all()).expect("query");
    let seqs: Vec<u64> = kills.iter().map(|k| k.seq).collect();
    assert_eq!(seqs, [5, 4, 3, 2, 1], "newest first");
    assert_eq!(kills[0], kill(5, 1005), "the whole snapshot comes back");
    assert_eq!(store.get(2).expect("get").map(|k| k.seq), Some(2));
    assert_eq!(store.get(99).expect("get"), None);
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filters_select_in_the_database() {
    let dir = dir("filters");
    let mut store = KillStore::open(&dir, RETENTION).expect("open");
    for seq in 1..=12 {
        store
            .insert(&kill(seq, 1000 + seq), "boot")
            .expect("insert");
    }
    let seqs = |filter: KillFilter| -> Vec<u64> {
        store
            .query(&filter)
            .expect("query")
            .iter()
            .map(|k| k.seq)
            .collect()
    };
    let pod = KillFilter {
        pod: Some("p1".into()),
        ..all()
    };
    assert_eq!(seqs(pod), [11, 9, 7, 5, 3, 1]);
    let cgroup = KillFilter {
        cgroup: Some("/c0".into()),
        ..all()
    };
    assert_eq!(seqs(cgroup), [12, 9, 6, 3]);
    let window = KillFilter {
        since_unix_ns: Some(1004 * 1_000_000_000),
        until_unix_ns: Some(1006 * 1_000_000_000),
        ..all()
    };
    assert_eq!(seqs(window), [6, 5, 4]);
    let limited = KillFilter {
        namespace: Some("default".into()),
        limit: 2,
        ..all()
    };
    assert_eq!(seqs(limited), [12, 11]);
    let nothing = KillFilter {
        container: Some("'; DROP TABLE kills; --".into()),
        ..all()
    };
    assert!(seqs(nothing).is_empty());
    assert_eq!(store.last_seq().expect("still there"), 12);
    // The in-memory selection agrees with the database's.
    let filter = KillFilter {
        pod: Some("p0".into()),
        since_unix_ns: Some(1005 * 1_000_000_000),
        ..all()
    };
    let in_memory: Vec<u64> = (1..=12)
        .rev()
        .map(|seq| kill(seq, 1000 + seq))
        .filter(|k| filter.matches(k))
        .map(|k| k.seq)
        .collect();
    assert_eq!(seqs(filter), in_memory);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_by_count_and_age() {
    let dir = dir("retention");
    let retention = Retention {
        max_kills: 3,
        max_age: Duration::from_secs(100),
    };
    let mut store = KillStore::open(&dir, retention).expect("open");
    for seq in 1..=6 {
        store
            .insert(&kill(seq, 1000 + seq * 20), "boot")
            .expect("insert");
    }
    // Now 1130: kills at 1040 and before are over 100 s old; of the rest, the newest 3 stay.
    assert_eq!(store.prune(1130 * 1_000_000_000).expect("prune"), 3);
    let seqs: Vec<u64> = store
        .query(&all())
        .expect("query")
        .iter()
        .map(|k| k.seq)
        .collect();
    assert_eq!(seqs, [6, 5, 4]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_or_newer_store_is_refused_and_left_alone() {
    let dir = dir("refuse");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(FILE_NAME);
    std::fs::write(&file, vec![0x5a; 8192]).expect("garbage");
    let err = KillStore::open(&dir, RETENTION).err().expect("refused");
    assert!(err.to_string().contains(FILE_NAME), "{err}");
    assert_eq!(std::fs::read(&file).expect("kept"), vec![0x5a; 8192]);

    std::fs::remove_file(&file).expect("remove");
    {
        let store = KillStore::open(&dir, RETENTION).expect("open");
        store
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump");
    }
    let err = KillStore::open(&dir, RETENTION).err().expect("refused");
    assert!(matches!(err, StoreError::Newer { found, .. } if found == SCHEMA_VERSION + 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_task_from_two_sets_of_programs_is_stored_once() {
    let dir = dir("task-key");
    let mut store = KillStore::open(
        &dir,
        Retention {
            max_kills: 100,
            max_age: Duration::from_secs(86_400),
        },
    )
    .expect("open");
    let first = kill(1, 1000);
    // The same mark reported by another agent's programs: its own timestamp and number.
    let mut again = first.clone();
    again.seq = 2;
    again.boot_ns += 5_000;
    assert!(store.insert(&first, "boot-a").expect("insert"));
    assert!(
        !store.insert(&again, "boot-a").expect("insert"),
        "stored twice"
    );
    // Another boot, or a task never read in the kernel, is another kill.
    assert!(store.insert(&again, "boot-b").expect("insert"));
    let mut unread = kill(3, 1000);
    unread.victim_start_ns = None;
    assert!(store.insert(&unread, "boot-a").expect("insert"));
    let _ = std::fs::remove_dir_all(&dir);
}
