//! A kubelet-like node built on this machine: real memory cgroups named as the kubelet names
//! them (cgroupfs and systemd drivers), a matching /var/log/pods and /var/log/containers tree
//! under a temporary --rootfs, leaking processes in container cgroups (in their own pid
//! namespace, as in a container) and real OOM kills; then the names on /kills, /metrics and in
//! a real Prometheus server.

mod support;

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

const LIMIT: u64 = 64 << 20;
const FAST: &str = "--interval 1ms --chunk 1MiB --listen off";

/// The pod and container names a kubelet would have logged.
struct PodSpec {
    namespace: &'static str,
    pod: &'static str,
    uid: &'static str,
    container: &'static str,
    container_id: String,
}

impl PodSpec {
    fn new(
        namespace: &'static str,
        pod: &'static str,
        uid: &'static str,
        container: &'static str,
    ) -> Self {
        // A container id is 64 hex digits; derive one from the names so each pod differs.
        let seed: u64 = format!("{namespace}{pod}{container}")
            .bytes()
            .fold(1469598103934665603, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(1099511628211)
            });
        let container_id = format!("{seed:016x}").repeat(4);
        Self {
            namespace,
            pod,
            uid,
            container,
            container_id,
        }
    }
}

/// A temporary node root with the kubelet's log trees; removed on drop.
struct Rootfs(PathBuf);

impl Rootfs {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("var/log/containers")).expect("mkdir rootfs");
        Rootfs(root)
    }

    /// Writes `/var/log/pods/<ns>_<pod>_<uid>/<container>/0.log` and its
    /// `/var/log/containers/<pod>_<ns>_<container>-<id>.log` symlink.
    fn add(&self, spec: &PodSpec) {
        let pod_dir = format!("{}_{}_{}", spec.namespace, spec.pod, spec.uid);
        let container_dir = self
            .0
            .join("var/log/pods")
            .join(&pod_dir)
            .join(spec.container);
        fs::create_dir_all(&container_dir).expect("mkdir pod log dir");
        fs::write(container_dir.join("0.log"), "").expect("log file");
        let link = self.0.join("var/log/containers").join(format!(
            "{}_{}_{}-{}.log",
            spec.pod, spec.namespace, spec.container, spec.container_id
        ));
        let target = format!("/var/log/pods/{pod_dir}/{}/0.log", spec.container);
        std::os::unix::fs::symlink(target, link).expect("symlink container log");
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `unshare --pid --fork`: the command is pid 1 of a new pid namespace, like a container's
/// main process.
fn in_pid_namespace(cgroup: &Cgroup, script: &str) -> Process {
    let mut command = Command::new("unshare");
    // `-p -f` is spelled alike by util-linux and busybox (the VMs).
    command.args(["-p", "-f", "sh", "-c", script]);
    spawn_command_in(cgroup, command)
}

fn names_of(kill: &Value) -> (String, String, String) {
    let text = |key: &str| kill[key].as_str().unwrap_or_default().to_owned();
    (text("namespace"), text("pod"), text("container"))
}

fn expect_names(kill: &Value, spec: &PodSpec) {
    assert_eq!(
        names_of(kill),
        (
            spec.namespace.into(),
            spec.pod.into(),
            spec.container.into()
        ),
        "{kill:#}"
    );
    assert_eq!(kill["kubernetes"]["pod_uid"].as_str(), Some(spec.uid));
    assert_eq!(
        kill["kubernetes"]["container_id"].as_str(),
        Some(spec.container_id.as_str())
    );
}

/// cgroupfs driver, Burstable pod, the container's own limit hit, the container's main process
/// killed: the case kube-state-metrics reports as OOMKilled.
#[test]
fn cgroupfs_container_limit_main_process() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = PodSpec::new(
        "shop",
        "cart-7d9f8b-x2x4z",
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        "cart-api",
    );
    let rootfs = Rootfs::new("leak-e2e-rootfs-cgroupfs");
    rootfs.add(&spec);
    let node = Cgroup::create(&hierarchy, "leak-e2e-node-cgroupfs");
    let kubepods = node.child("kubepods");
    let burstable = kubepods.child("burstable");
    let pod = burstable.child(&format!("pod{}", spec.uid));
    let container = pod.child(&spec.container_id);
    container.set_limit(LIMIT);

    let mut agent = Agent::start(&["--rootfs", &rootfs.path().to_string_lossy()]);
    let mut victim = in_pid_namespace(&container, &format!("exec {} workload {FAST}", leak_bin()));
    victim
        .wait_timeout(Duration::from_secs(120))
        .expect("not OOM-killed");
    let kill = agent.wait_for_kill_in(&container.relative);
    expect_names(&kill, &spec);
    assert_eq!(
        kill["oom_cgroup"].as_str(),
        Some(container.relative.as_str())
    );
    assert_eq!(kill["kubernetes"]["qos_class"].as_str(), Some("Burstable"));
    assert_eq!(kill["kubernetes"]["driver"].as_str(), Some("cgroupfs"));
    assert_eq!(kill["kubernetes"]["level"].as_str(), Some("container"));
    assert_eq!(kill["kubernetes"]["pod_limit_hit"], Value::Bool(false));
    assert_eq!(kill["main_process"], Value::Bool(true), "{kill:#}");
    assert_eq!(kill["victim_ns_pid"].as_u64(), Some(1));

    let (_, metrics) = agent.get("/metrics");
    let counter = format!(
        "leak_oom_kills_total{{cgroup=\"{0}\",constraint=\"memcg\",container=\"cart-api\",\
         main_process=\"true\",namespace=\"shop\",oom_cgroup=\"{0}\",pod=\"{1}\"}} 1",
        container.relative, spec.pod
    );
    assert!(
        metrics.contains(&counter),
        "missing `{counter}` in\n{metrics}"
    );
    promtool_check(&metrics);
    assert!(agent.stop().success());
}

/// systemd driver, the pod's limit hit (the container has none of its own), and the victim a
/// child of the container's main process: the container survives, kube-state-metrics never
/// sees this kill, leak reports it and says it was not the main process.
#[test]
fn systemd_pod_limit_child_process() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = PodSpec::new(
        "batch",
        "report-builder-28f7c",
        "9a8b7c6d-5e4f-4321-8abc-0123456789ab",
        "builder",
    );
    let rootfs = Rootfs::new("leak-e2e-rootfs-systemd");
    rootfs.add(&spec);
    let node = Cgroup::create(&hierarchy, "leak-e2e-node-systemd");
    let kubepods = node.child("kubepods.slice");
    let burstable = kubepods.child("kubepods-burstable.slice");
    let pod = burstable.child(&format!(
        "kubepods-burstable-pod{}.slice",
        spec.uid.replace('-', "_")
    ));
    pod.set_limit(LIMIT);
    let container = pod.child(&format!("cri-containerd-{}.scope", spec.container_id));

    let mut agent = Agent::start(&["--rootfs", &rootfs.path().to_string_lossy()]);
    // The shell is the container's main process (pid 1); the leaking child dies, the shell
    // lives on.
    let mut main = in_pid_namespace(
        &container,
        &format!("{} workload {FAST}; echo survived; sleep 60", leak_bin()),
    );
    let kill = agent.wait_for_kill_in(&container.relative);
    expect_names(&kill, &spec);
    assert_eq!(kill["oom_cgroup"].as_str(), Some(pod.relative.as_str()));
    assert_eq!(kill["kubernetes"]["driver"].as_str(), Some("systemd"));
    assert_eq!(kill["kubernetes"]["runtime"].as_str(), Some("containerd"));
    assert_eq!(
        kill["kubernetes"]["pod_limit_hit"],
        Value::Bool(true),
        "{kill:#}"
    );
    assert_eq!(kill["kubernetes"]["oom_pod"].as_str(), Some(spec.pod));
    assert_eq!(kill["main_process"], Value::Bool(false), "{kill:#}");
    assert_ne!(kill["victim_ns_pid"].as_u64(), Some(1));
    assert!(
        main.child.try_wait().expect("poll main process").is_none(),
        "the container's main process should survive the kill of its child"
    );
    assert!(agent.stop().success());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's Prometheus server, on loopback, scraping the agent every second.
struct Prometheus {
    _process: Process,
    addr: std::net::SocketAddr,
    _dir: Rootfs,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Option<Prometheus> {
        let dir = Rootfs::new("leak-e2e-prometheus");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: leak\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        let port = free_port();
        if std::env::var_os("LEAK_TEST_NO_PROMETHEUS").is_some() {
            eprintln!(
                "SKIP: no Prometheus server here (LEAK_TEST_NO_PROMETHEUS); the host suite runs it"
            );
            return None;
        }
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "prometheus is missing ({err}); `cargo xtask test` installs Debian's prometheus"
                );
                eprintln!("SKIP: prometheus server not installed: {err}");
                return None;
            }
        };
        let server = Prometheus {
            _process: Process { child },
            addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(server.addr).is_ok()
                && http_get(server.addr, "/-/ready").0 == 200
            {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus did not become ready");
    }

    /// The result vector of an instant query.
    fn query(&self, promql: &str) -> Vec<Value> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(status, 200, "{body}");
        let json: Value = serde_json::from_str(&body).expect("prometheus JSON");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `promql` returns at least one series.
    fn wait_for(&self, promql: &str) -> Vec<Value> {
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

#[test]
fn prometheus_scrapes_the_kill_with_its_labels() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = PodSpec::new(
        "web",
        "frontend-6c9d",
        "11112222-3333-4444-5555-666677778888",
        "nginx",
    );
    let rootfs = Rootfs::new("leak-e2e-rootfs-prometheus");
    rootfs.add(&spec);
    let node = Cgroup::create(&hierarchy, "leak-e2e-node-prometheus");
    let kubepods = node.child("kubepods");
    // A Guaranteed pod sits directly under kubepods.
    let pod = kubepods.child(&format!("pod{}", spec.uid));
    let container = pod.child(&spec.container_id);
    container.set_limit(LIMIT);

    let mut agent = Agent::start(&["--rootfs", &rootfs.path().to_string_lossy()]);
    let Some(prometheus) = Prometheus::start(agent.addr) else {
        return;
    };
    prometheus.wait_for("up{job=\"leak\"} == 1");

    let mut victim = in_pid_namespace(&container, &format!("exec {} workload {FAST}", leak_bin()));
    victim
        .wait_timeout(Duration::from_secs(120))
        .expect("not OOM-killed");
    let kill = agent.wait_for_kill_in(&container.relative);
    assert_eq!(kill["kubernetes"]["qos_class"].as_str(), Some("Guaranteed"));

    let selector = "{namespace=\"web\",pod=\"frontend-6c9d\",container=\"nginx\"}";
    let kills = prometheus.wait_for(&format!("leak_oom_kills_total{selector}"));
    assert_eq!(kills[0]["metric"]["constraint"].as_str(), Some("memcg"));
    assert_eq!(kills[0]["metric"]["main_process"].as_str(), Some("true"));
    assert_eq!(kills[0]["value"][1].as_str(), Some("1"));
    let working_set = prometheus.wait_for(&format!("leak_oom_kill_working_set_bytes{selector}"));
    assert_eq!(
        working_set[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok()),
        kill["working_set_bytes"].as_u64(),
        "Prometheus and /kills disagree on the working set at death"
    );
    drop(prometheus);
    assert!(agent.stop().success());
}
