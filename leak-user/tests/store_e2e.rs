//! History that outlives the agent, for real: kills go into the SQLite store under
//! `--state-dir`, a new agent serves them (numbered on, filterable), and a store that is
//! read-only, full or corrupt leaves the agent serving from memory with a metric that says so.

mod support;

use std::{path::Path, process::Command, time::Duration};

use leak_user::{enrich::cgroupfs::MemoryHierarchy, model::kill::Kill};
use support::*;

const LIMIT: u64 = 32 << 20;
const FAST_ANON: &[&str] = &["--interval", "1ms", "--chunk", "1MiB", "--listen", "off"];

/// One OOM kill in a fresh cgroup named `name`, seen by `agent`.
fn kill_one(hierarchy: &MemoryHierarchy, agent: &Agent, name: &str) -> Kill {
    let cgroup = Cgroup::with_limit(hierarchy, name, LIMIT).unwrap_or_else(|err| panic!("{err}"));
    let mut leaker = spawn_in(&cgroup, FAST_ANON);
    wait_for_oom_kill(&mut leaker, Duration::from_secs(120));
    agent.wait_for_kill(leaker.pid())
}

fn kills_at(agent: &Agent, query: &str) -> Vec<Kill> {
    let body = agent.page(&format!("/kills{query}"));
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("/kills{query}: {err}: {body}"))
}

fn metric(agent: &Agent, name: &str) -> f64 {
    sample(&agent.page("/metrics"), name).unwrap_or_else(|| panic!("no {name} on /metrics"))
}

#[test]
fn kills_outlive_the_agent() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let state = TempDir::new("leak-e2e-state").unwrap_or_else(|err| panic!("{err}"));
    let dir = state.path().to_str().expect("UTF-8").to_owned();
    let args = ["--state-dir", dir.as_str()];

    let mut first = Agent::start(&args);
    assert_eq!(metric(&first, "leak_store_up"), 1.0);
    let before = kill_one(&hierarchy, &first, "leak-e2e-store-a");
    assert!(first.stop().success());

    // A new agent serves the kill it never saw, whole, under its number.
    let mut second = Agent::start(&args);
    let kept = kills_at(&second, "");
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(kept[0], before, "the snapshot came back changed");
    let (status, body) = second.get(&format!("/kills/{}", before.seq));
    assert_eq!(status, 200, "{body}");
    assert!(
        second.page("/").contains(&before.cgroup),
        "the kills page lists it"
    );

    // The next kill is numbered after it, and the filters select.
    let after = kill_one(&hierarchy, &second, "leak-e2e-store-b");
    assert_eq!(after.seq, before.seq + 1);
    let seqs =
        |query: &str| -> Vec<u64> { kills_at(&second, query).iter().map(|k| k.seq).collect() };
    assert_eq!(seqs(""), [after.seq, before.seq]);
    assert_eq!(seqs("?limit=1"), [after.seq]);
    assert_eq!(seqs(&format!("?cgroup={}", before.cgroup)), [before.seq]);
    let between = before.timestamp_unix_ns + 1;
    assert_eq!(
        seqs(&format!(
            "?since={}.{:09}",
            between / 1_000_000_000,
            between % 1_000_000_000
        )),
        [after.seq]
    );
    let until = before.timestamp_unix_ns;
    let until = format!("{}.{:09}", until / 1_000_000_000, until % 1_000_000_000);
    assert_eq!(seqs(&format!("?until={until}")), [before.seq]);
    assert_eq!(seqs("?namespace=kube-system"), Vec::<u64>::new());
    for (query, parameter) in [
        ("?limit=lots", "limit"),
        ("?since=yesterday", "since"),
        ("?pod=a&pod=b", "pod"),
        ("?colour=red", "colour"),
    ] {
        let (status, body) = second.get(&format!("/kills{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(&format!("`{parameter}`")), "{query}: {body}");
    }
    assert!(second.stop().success());

    // Both are in the database file, in WAL mode, under the schema version.
    let sqlite = |sql: &str| -> String {
        let conn = rusqlite::Connection::open(state.path().join("kills.db")).expect("open");
        conn.query_row(sql, [], |row| row.get::<_, rusqlite::types::Value>(0))
            .map(|value| format!("{value:?}"))
            .expect(sql)
    };
    assert_eq!(sqlite("SELECT COUNT(*) FROM kills"), "Integer(2)");
    assert_eq!(sqlite("PRAGMA journal_mode"), "Text(\"wal\")");
    assert_eq!(sqlite("PRAGMA user_version"), "Integer(2)");
}

/// A tmpfs of `size` mounted for the test (read-only with `ro`), unmounted on drop.
struct Mount(TempDir);

impl Mount {
    fn tmpfs(name: &str, options: &str) -> Self {
        let dir = TempDir::new(name).unwrap_or_else(|err| panic!("{err}"));
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs -o {options}");
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn an_unusable_store_leaves_the_agent_serving() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    // Read-only: the store cannot be created.
    let read_only = Mount::tmpfs("leak-e2e-state-ro", "ro,size=1m");
    let path = read_only.path().to_str().expect("UTF-8").to_owned();
    let mut agent = Agent::start(&["--state-dir", &path]);
    assert_eq!(metric(&agent, "leak_store_up"), 0.0);
    assert!(
        agent.log().contains("kept in memory only"),
        "{}",
        agent.log()
    );
    let kill = kill_one(&hierarchy, &agent, "leak-e2e-store-ro");
    assert_eq!(agent.kills().first().map(|k| k.seq), Some(kill.seq));
    assert!(agent.stop().success());

    // Corrupt: refused, left as it was, the agent serving from memory.
    let corrupt = TempDir::new("leak-e2e-state-bad").unwrap_or_else(|err| panic!("{err}"));
    let file = corrupt.path().join("kills.db");
    std::fs::write(&file, vec![0x5a; 8192]).expect("garbage");
    let path = corrupt.path().to_str().expect("UTF-8").to_owned();
    let mut agent = Agent::start(&["--state-dir", &path]);
    assert_eq!(metric(&agent, "leak_store_up"), 0.0);
    assert!(agent.log().contains("kills.db"), "{}", agent.log());
    kill_one(&hierarchy, &agent, "leak-e2e-store-bad");
    assert!(agent.stop().success());
    assert_eq!(std::fs::read(&file).expect("kept"), vec![0x5a; 8192]);

    // Full: the store opens, then the disk fills; the kill is served, the failure counted.
    let small = Mount::tmpfs("leak-e2e-state-full", "size=2m");
    let path = small.path().to_str().expect("UTF-8").to_owned();
    let mut agent = Agent::start(&["--state-dir", &path]);
    assert_eq!(metric(&agent, "leak_store_up"), 1.0);
    let filler = small.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .expect("dd");
    let kill = kill_one(&hierarchy, &agent, "leak-e2e-store-full");
    assert_eq!(agent.kills().first().map(|k| k.seq), Some(kill.seq));
    assert!(metric(&agent, "leak_store_write_failures_total") >= 1.0);
    assert_eq!(metric(&agent, "leak_store_up"), 0.0);
    assert!(agent.stop().success());
}
