//! The kernel's own OOM report, read from `/dev/kmsg`: the ground truth the end-to-end tests
//! compare snapshots against, and a parser anyone can point at `dmesg` output.

use std::{
    collections::HashMap,
    fs::File,
    io::{ErrorKind, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
};

/// What the kernel printed about one OOM kill.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomReport {
    /// `memory: usage NkB, limit NkB, failcnt N` of the cgroup that hit its limit.
    pub usage_kb: Option<u64>,
    pub limit_kb: Option<u64>,
    pub failcnt: Option<u64>,
    /// `memory+swap: usage NkB, limit NkB, failcnt N` (cgroup v1 with swap accounting).
    pub memsw_usage_kb: Option<u64>,
    pub memsw_limit_kb: Option<u64>,
    pub memsw_failcnt: Option<u64>,
    /// The cgroup of the `Memory cgroup stats for PATH:` block.
    pub stats_cgroup: Option<String>,
    /// That block, in bytes (`anon`, `file`, `inactive_file`, ...).
    pub stats: HashMap<String, u64>,
    /// From the `oom-kill:` summary line.
    pub constraint: Option<String>,
    pub oom_memcg: Option<String>,
    pub task_memcg: Option<String>,
    pub task: Option<String>,
    pub pid: Option<u32>,
    /// Pids of the `Killed process` lines (more than one for a group kill).
    pub killed: Vec<u32>,
    /// `anon-rss` of each killed pid, in kB, as that line gives it.
    pub anon_rss_kb: HashMap<u32, u64>,
}

/// The three numbers of a `page_counter` line of the report: `NkB, limit NkB, failcnt N`.
fn counter_line(rest: &str) -> Option<[u64; 3]> {
    let numbers: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers[..] {
        [usage, limit, failcnt, ..] => Some([usage, limit, failcnt]),
        _ => None,
    }
}

/// Splits the kernel log into OOM reports. A report starts at `invoked oom-killer` and
/// collects what follows until the next one.
pub fn parse_reports<'a>(messages: impl IntoIterator<Item = &'a str>) -> Vec<OomReport> {
    let mut reports = Vec::new();
    let mut current: Option<OomReport> = None;
    let mut in_stats = false;
    for message in messages {
        let message = message.trim_end();
        if message.contains("invoked oom-killer:") {
            if let Some(report) = current.take() {
                reports.push(report);
            }
            current = Some(OomReport::default());
            in_stats = false;
            continue;
        }
        let Some(report) = current.as_mut() else {
            continue;
        };
        if let Some(rest) = message.strip_prefix("memory: usage ") {
            if let Some([usage, limit, failcnt]) = counter_line(rest) {
                report.usage_kb = Some(usage);
                report.limit_kb = Some(limit);
                report.failcnt = Some(failcnt);
            }
            in_stats = false;
        } else if let Some(rest) = message.strip_prefix("memory+swap: usage ") {
            if let Some([usage, limit, failcnt]) = counter_line(rest) {
                report.memsw_usage_kb = Some(usage);
                report.memsw_limit_kb = Some(limit);
                report.memsw_failcnt = Some(failcnt);
            }
            in_stats = false;
        } else if let Some(rest) = message.strip_prefix("Memory cgroup stats for ") {
            report.stats_cgroup = Some(rest.trim_end_matches(':').to_owned());
            in_stats = true;
        } else if let Some(rest) = message.strip_prefix("oom-kill:") {
            in_stats = false;
            for pair in rest.split(',') {
                if let Some((key, value)) = pair.split_once('=') {
                    let value = value.to_owned();
                    match key {
                        "constraint" => report.constraint = Some(value),
                        "oom_memcg" => report.oom_memcg = Some(value),
                        "task_memcg" => report.task_memcg = Some(value),
                        "task" => report.task = Some(value),
                        "pid" => report.pid = value.parse().ok(),
                        _ => {}
                    }
                }
            }
        } else if let Some(index) = message.find("Killed process ") {
            in_stats = false;
            let rest = &message[index + "Killed process ".len()..];
            if let Some(pid) = rest.split_whitespace().next().and_then(|p| p.parse().ok()) {
                report.killed.push(pid);
                let anon_rss = rest
                    .split(", ")
                    .find_map(|field| field.strip_prefix("anon-rss:"))
                    .and_then(|kb| kb.strip_suffix("kB")?.parse().ok());
                if let Some(kb) = anon_rss {
                    report.anon_rss_kb.insert(pid, kb);
                }
            }
        } else if in_stats {
            let mut parts = message.split_whitespace();
            match (
                parts.next(),
                parts.next().and_then(|v| v.parse().ok()),
                parts.next(),
            ) {
                (Some(key), Some(value), None) => {
                    report.stats.insert(key.to_owned(), value);
                }
                _ => in_stats = false,
            }
        }
    }
    reports.extend(current);
    reports
}

/// A reader of `/dev/kmsg` that starts at the end, so it sees only what comes after it.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    pub fn open_at_end() -> std::io::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self { file })
    }

    /// Every message logged since the last call (text only, without the record prefix).
    pub fn read_new(&mut self) -> std::io::Result<Vec<String>> {
        let mut messages = Vec::new();
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match self.file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buffer[..n]);
                    // "prio,seq,usec,flags;text\n" then optional " KEY=value" lines; a
                    // multi-line message (memory.stat in one printk) has its newlines
                    // escaped as \x0a.
                    if let Some((_, text)) = record.split_once(';') {
                        if let Some(line) = text.lines().next() {
                            messages.extend(unescape(line).lines().map(str::to_owned));
                        }
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                // The ring overwrote records we had not read yet: carry on from the oldest.
                Err(err) if err.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(messages)
    }
}

/// Undoes /dev/kmsg's `\xNN` escaping of unprintable bytes.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let hex = bytes
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_multi_line_records() {
        assert_eq!(unescape("anon 1\\x0afile 2"), "anon 1\nfile 2");
        assert_eq!(unescape("plain \\x"), "plain \\x");
    }

    #[test]
    fn parses_a_memcg_oom_report() {
        let log = "\
leak invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0
CPU: 1 PID: 4242 Comm: leak Not tainted 6.18.44
memory: usage 65536kB, limit 65536kB, failcnt 92
memory+swap: usage 65536kB, limit 9007199254740988kB, failcnt 0
kmem: usage 412kB, limit 9007199254740988kB, failcnt 0
Memory cgroup stats for /leak-e2e:
anon 66641920
file 0
inactive_anon 66629632
active_anon 0
inactive_file 4096
active_file 0
unevictable 0
Tasks state (memory values in pages):
[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name
oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/leak-e2e,task_memcg=/leak-e2e/child,task=leak,pid=4242,uid=0
Memory cgroup out of memory: Killed process 4242 (leak) total-vm:80000kB, anon-rss:65000kB, file-rss:100kB, shmem-rss:0kB, UID:0 pgtables:200kB oom_score_adj:0
";
        let reports = parse_reports(log.lines());
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.usage_kb, Some(65536));
        assert_eq!(
            (
                report.memsw_usage_kb,
                report.memsw_limit_kb,
                report.memsw_failcnt
            ),
            (Some(65536), Some(9007199254740988), Some(0))
        );
        assert_eq!(report.limit_kb, Some(65536));
        assert_eq!(report.failcnt, Some(92));
        assert_eq!(report.stats_cgroup.as_deref(), Some("/leak-e2e"));
        assert_eq!(report.stats.get("inactive_file"), Some(&4096));
        assert_eq!(report.stats.get("anon"), Some(&66641920));
        assert_eq!(report.constraint.as_deref(), Some("CONSTRAINT_MEMCG"));
        assert_eq!(report.oom_memcg.as_deref(), Some("/leak-e2e"));
        assert_eq!(report.task_memcg.as_deref(), Some("/leak-e2e/child"));
        assert_eq!(report.pid, Some(4242));
        assert_eq!(report.killed, vec![4242]);
        assert_eq!(report.anon_rss_kb.get(&4242), Some(&65000));
    }

    #[test]
    fn parses_a_global_oom_report() {
        let log = "\
leak invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=1000
Mem-Info:
active_anon:1 inactive_anon:470000 isolated_anon:0
Node 0 DMA free:0kB boost:0kB min:40kB low:52kB high:64kB
Tasks state (memory values in pages):
oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/leak-e2e-global,task=leak,pid=311,uid=0
Out of memory: Killed process 311 (leak) total-vm:1931000kB, anon-rss:1880000kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:3800kB oom_score_adj:1000
";
        let reports = parse_reports(log.lines());
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.constraint.as_deref(), Some("CONSTRAINT_NONE"));
        assert_eq!(report.oom_memcg, None);
        assert_eq!(report.usage_kb, None, "no cgroup hit a limit");
        assert_eq!(report.task_memcg.as_deref(), Some("/leak-e2e-global"));
        assert_eq!(report.killed, vec![311]);
        assert_eq!(report.anon_rss_kb.get(&311), Some(&1880000));
    }

    #[test]
    fn splits_consecutive_reports_and_ignores_noise() {
        let log = "unrelated\na invoked oom-killer: x\noom-kill:pid=1\nb invoked oom-killer: y\noom-kill:pid=2\n";
        let reports = parse_reports(log.lines());
        assert_eq!(
            reports.iter().map(|r| r.pid).collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
    }
}
