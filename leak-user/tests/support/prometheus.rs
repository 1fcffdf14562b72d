//! Debian's Prometheus server for the end-to-end tests: on loopback, scraping the agent every
//! second, evaluating rule files, its data in a temporary directory.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use leak_user::experiment::harness::{http_get, Process, TempDir};
use serde_json::Value;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Percent-encodes a PromQL query for a URL.
pub fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's Prometheus server, on loopback, scraping the agent every second, its data in a
/// temporary directory.
pub struct Prometheus {
    _process: Process,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts it (the caller checked [`have_tool`]`("prometheus")`).
    pub fn start(target: SocketAddr) -> Prometheus {
        Self::start_with_rules(target, &[])
    }

    /// Starts it with these rule files loaded (evaluated every second).
    pub fn start_with_rules(target: SocketAddr, rules: &[&Path]) -> Prometheus {
        let jobs =
            format!("  - job_name: leak\n    static_configs:\n      - targets: ['{target}']\n");
        Self::start_configured(&jobs, rules)
    }

    /// Starts it with these scrape configs (YAML list items, indented by two spaces).
    pub fn start_with_scrape_configs(jobs: &str) -> Prometheus {
        Self::start_configured(jobs, &[])
    }

    fn start_configured(jobs: &str, rules: &[&Path]) -> Prometheus {
        let dir = TempDir::new("leak-e2e-prometheus").unwrap_or_else(|err| panic!("{err}"));
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{rules}]\n\
                 scrape_configs:\n{jobs}",
                rules = rules
                    .iter()
                    .map(|rule| format!("'{}'", rule.display()))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        )
        .expect("prometheus config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("starting prometheus: {err}"));
        let server = Prometheus {
            _process: Process::from(child),
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if http_get(server.addr, "/-/ready").is_ok_and(|ready| ready.status == 200) {
                return server;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus did not become ready on {addr}");
    }

    /// The result vector of an instant query.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let response = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(response.status, 200, "{}", response.body);
        let json: Value = serde_json::from_str(&response.body).expect("prometheus JSON");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `promql` returns at least one series.
    pub fn wait_for(&self, promql: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let result = self.query(promql);
            if !result.is_empty() {
                return result;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("prometheus never returned anything for {promql}");
    }
}
