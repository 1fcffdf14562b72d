//! A kubelet-like node built on this machine: real memory cgroups named as the kubelet names
//! them (cgroupfs and systemd drivers), a matching /var/log/pods and /var/log/containers tree
//! under a temporary --rootfs, leaking processes in container cgroups (in their own pid
//! namespace, as in a container) and real OOM kills; then the names on /kills, /metrics and in
//! a real Prometheus server.

mod support;

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use leak_user::model::{
    kill::Kill,
    kubernetes::{CgroupDriver, LevelKind, QosClass, Runtime},
};
use support::{prometheus::Prometheus, *};

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
struct Rootfs(TempDir);

impl Rootfs {
    fn new(name: &str) -> Self {
        let root = TempDir::new(name).unwrap_or_else(|err| panic!("{err}"));
        fs::create_dir_all(root.path().join("var/log/containers")).expect("mkdir rootfs");
        Rootfs(root)
    }

    /// Writes `/var/log/pods/<ns>_<pod>_<uid>/<container>/0.log` and its
    /// `/var/log/containers/<pod>_<ns>_<container>-<id>.log` symlink.
    fn add(&self, spec: &PodSpec) {
        let pod_dir = format!("{}_{}_{}", spec.namespace, spec.pod, spec.uid);
        let container_dir = self
            .path()
            .join("var/log/pods")
            .join(&pod_dir)
            .join(spec.container);
        fs::create_dir_all(&container_dir).expect("mkdir pod log dir");
        fs::write(container_dir.join("0.log"), "").expect("log file");
        let link = self.path().join("var/log/containers").join(format!(
            "{}_{}_{}-{}.log",
            spec.pod, spec.namespace, spec.container, spec.container_id
        ));
        let target = format!("/var/log/pods/{pod_dir}/{}/0.log", spec.container);
        std::os::unix::fs::symlink(target, link).expect("symlink container log");
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn arg(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }
}

/// `sh -c SCRIPT` as pid 1 of a new pid namespace, like a container's main process; the
/// process returned ends as that pid 1 does.
fn in_pid_namespace(cgroup: &Cgroup, script: &str) -> Process {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    spawn_command_as_init_in(cgroup, command)
}

fn expect_names(kill: &Kill, spec: &PodSpec) {
    assert_eq!(
        (
            kill.names.namespace.as_str(),
            kill.names.pod.as_str(),
            kill.names.container.as_str()
        ),
        (spec.namespace, spec.pod, spec.container),
        "{kill:#?}"
    );
    let kubernetes = kubernetes(kill);
    assert_eq!(kubernetes.pod_uid, spec.uid);
    assert_eq!(
        kubernetes.container_id.as_deref(),
        Some(spec.container_id.as_str())
    );
}

fn kubernetes(kill: &Kill) -> &leak_user::model::kubernetes::KubernetesKill {
    kill.kubernetes
        .as_ref()
        .unwrap_or_else(|| panic!("no Kubernetes identity: {kill:#?}"))
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
    let node = cgroup(&hierarchy, "leak-e2e-node-cgroupfs");
    let kubepods = child(&node, "kubepods");
    let burstable = child(&kubepods, "burstable");
    let pod = child(&burstable, &format!("pod{}", spec.uid));
    let container = child(&pod, &spec.container_id);
    container
        .set_limit(LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));

    let mut agent = Agent::start(&["--rootfs", &rootfs.arg()]);
    let mut victim = in_pid_namespace(&container, &format!("exec {} workload {FAST}", leak_bin()));
    wait_for_oom_kill(&mut victim, Duration::from_secs(120));
    let kill = agent.wait_for_kill_in(&container.relative);
    expect_names(&kill, &spec);
    assert_eq!(
        kill.oom_cgroup.as_deref(),
        Some(container.relative.as_str())
    );
    let kubernetes = kubernetes(&kill);
    assert_eq!(kubernetes.qos_class, QosClass::Burstable);
    assert_eq!(kubernetes.driver, CgroupDriver::Cgroupfs);
    assert_eq!(kubernetes.level, LevelKind::Container);
    assert!(!kubernetes.pod_limit_hit, "{kill:#?}");
    assert_eq!(kill.main_process, Some(true), "{kill:#?}");
    assert_eq!(kill.victim_ns_pid, Some(1));

    let metrics = agent.page("/metrics");
    let counter = format!(
        "leak_oom_kills_total{{cause=\"{2}\",cgroup=\"{0}\",constraint=\"memcg\",\
         container=\"cart-api\",main_process=\"true\",namespace=\"shop\",oom_cgroup=\"{0}\",\
         pod=\"{1}\"}}",
        container.relative,
        spec.pod,
        cause_label(&kill)
    );
    assert_eq!(
        sample(&metrics, &counter),
        Some(1.0),
        "missing `{counter} 1` in\n{metrics}"
    );
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
    let node = cgroup(&hierarchy, "leak-e2e-node-systemd");
    let kubepods = child(&node, "kubepods.slice");
    let burstable = child(&kubepods, "kubepods-burstable.slice");
    let pod = child(
        &burstable,
        &format!("kubepods-burstable-pod{}.slice", spec.uid.replace('-', "_")),
    );
    pod.set_limit(LIMIT).unwrap_or_else(|err| panic!("{err}"));
    let container = child(&pod, &format!("cri-containerd-{}.scope", spec.container_id));

    let mut agent = Agent::start(&["--rootfs", &rootfs.arg()]);
    // The shell is the container's main process (pid 1); the leaking child dies, the shell
    // records how, and lives on.
    let status_file = rootfs.path().join("child-status");
    let mut main = in_pid_namespace(
        &container,
        &format!(
            "{} workload {FAST}; echo $? > {}; sleep 60",
            leak_bin(),
            status_file.display()
        ),
    );
    let kill = agent.wait_for_kill_in(&container.relative);
    // The shell reports a child killed by signal N as 128 + N.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match fs::read_to_string(&status_file) {
            Ok(status) if status.ends_with('\n') => break status.trim().to_owned(),
            _ if Instant::now() > deadline => panic!("the shell never reported its child's end"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(
        status,
        (128 + libc::SIGKILL).to_string(),
        "the leaking child did not die of SIGKILL"
    );
    expect_names(&kill, &spec);
    assert_eq!(kill.oom_cgroup.as_deref(), Some(pod.relative.as_str()));
    let kubernetes = kubernetes(&kill);
    assert_eq!(kubernetes.driver, CgroupDriver::Systemd);
    assert_eq!(kubernetes.runtime, Some(Runtime::Containerd));
    assert!(kubernetes.pod_limit_hit, "{kill:#?}");
    assert_eq!(kubernetes.oom_pod.as_deref(), Some(spec.pod));
    assert_eq!(kill.main_process, Some(false), "{kill:#?}");
    assert_ne!(kill.victim_ns_pid, Some(1));
    assert!(
        main.child.try_wait().expect("poll main process").is_none(),
        "the container's main process should survive the kill of its child"
    );
    assert!(agent.stop().success());
}

#[test]
fn prometheus_scrapes_the_kill_with_its_labels() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if !have_tool("prometheus") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = PodSpec::new(
        "web",
        "frontend-6c9d",
        "11112222-3333-4444-5555-666677778888",
        "nginx",
    );
    let rootfs = Rootfs::new("leak-e2e-rootfs-prometheus");
    rootfs.add(&spec);
    let node = cgroup(&hierarchy, "leak-e2e-node-prometheus");
    let kubepods = child(&node, "kubepods");
    // A Guaranteed pod sits directly under kubepods.
    let pod = child(&kubepods, &format!("pod{}", spec.uid));
    let container = child(&pod, &spec.container_id);
    container
        .set_limit(LIMIT)
        .unwrap_or_else(|err| panic!("{err}"));

    let mut agent = Agent::start(&["--rootfs", &rootfs.arg()]);
    let prometheus = Prometheus::start(agent.addr());
    prometheus.wait_for("up{job=\"leak\"} == 1");

    let mut victim = in_pid_namespace(&container, &format!("exec {} workload {FAST}", leak_bin()));
    wait_for_oom_kill(&mut victim, Duration::from_secs(120));
    let kill = agent.wait_for_kill_in(&container.relative);
    assert_eq!(kubernetes(&kill).qos_class, QosClass::Guaranteed);

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
        Some(kill.working_set_bytes),
        "Prometheus and /kills disagree on the working set at death"
    );
    drop(prometheus);
    assert!(agent.stop().success());
}
