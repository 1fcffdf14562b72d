//! The deployed form, run for real: the agent's image run by containerd and runc from
//! `deploy/daemonset.yaml`, the experiment's pods from `deploy/workload.yaml`, driven through
//! the CRI as the kubelet drives them (`leak_user::experiment::kubelet`), and real OOM kills
//! in the pods' containers. The runtime's own word (CRI's ContainerStatus) and the kernel's
//! counters are the ground truth the agent's `/kills` and `/metrics` are held to.
//!
//! Needs the images `cargo xtask test` builds: `$LEAK_TEST_IMAGE` (deploy/Dockerfile's, as an
//! OCI archive) and `$LEAK_TEST_NODE_IMAGE` (busybox, the pods' sandbox and a shell).

mod support;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use leak_user::{
    enrich::cri::proto::{ContainerState, ContainerStatus},
    enrich::{cgroupfs::MemoryHierarchy, cri::Cri},
    experiment::{
        containerd::Containerd,
        harness,
        kubelet::Kubelet,
        pod_spec::{self, Container, EnvVar, Pod, PodSpec, Resources},
    },
    model::kill::Kill,
};
use support::{
    node::{images, wait_for_healthz, HostBpffs, AGENT_IMAGE_ENV, NODE_IMAGE, NODE_IMAGE_ENV},
    *,
};

/// The kubelet's `--cgroup-root` for this node, so its `kubepods` never meets a real one.
fn cgroup_root() -> String {
    format!("/leak-e2e-node-{}", std::process::id())
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn agent_pod() -> Pod {
    pod_spec::read(&deploy("daemonset.yaml"), "DaemonSet", "leak").expect("the DaemonSet")
}

fn workload_pod(name: &str) -> Pod {
    pod_spec::read(&deploy("workload.yaml"), "Deployment", name).expect("the Deployment")
}

/// A pod whose container is a shell that runs a leaking child, then sleeps on.
fn shell_pod() -> Pod {
    let limit = serde_yaml::Value::String("64Mi".into());
    Pod {
        namespace: "leak-e2e".into(),
        workload: "leak-shell".into(),
        metadata: Default::default(),
        spec: PodSpec {
            containers: vec![Container {
                name: "shell".into(),
                image: NODE_IMAGE.into(),
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "/usr/local/bin/leak workload --chunk 1MiB --interval 10ms --listen off; \
                     echo child ended $?; exec sleep 2147483647"
                        .into(),
                ],
                resources: Resources {
                    requests: [("memory".to_owned(), limit.clone())].into(),
                    limits: [("memory".to_owned(), limit)].into(),
                },
                ..Default::default()
            }],
            ..Default::default()
        },
    }
}

/// A node: containerd, the kubelet stand-in, and the host state it changed, undone on drop in
/// the right order (pods, then containerd, then the host).
struct Node {
    runtime: tokio::runtime::Runtime,
    kubelet: Option<Kubelet>,
    containerd: Option<Containerd>,
    dir: PathBuf,
    /// Dropped after the pods: the host's bpffs put back as it was.
    host_bpffs: Option<HostBpffs>,
}

impl Node {
    fn start(hierarchy: MemoryHierarchy, name: &str) -> Option<Self> {
        let [image, node_image] = images(&[AGENT_IMAGE_ENV, NODE_IMAGE_ENV])?
            .try_into()
            .expect("two images");
        let dir = disk_dir().join(format!("{name}-{}", std::process::id()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let containerd = Containerd::start(&dir.join("containerd"), NODE_IMAGE)
            .unwrap_or_else(|err| panic!("{err}"));
        containerd
            .import(&image)
            .unwrap_or_else(|err| panic!("{err}"));
        containerd
            .import(&node_image)
            .unwrap_or_else(|err| panic!("{err}"));
        let cri = runtime
            .block_on(Cri::connect(containerd.socket(), Duration::from_secs(30)))
            .unwrap_or_else(|err| panic!("{err}"));
        let kubelet = Kubelet::new(cri, dir.join("root"), hierarchy.clone(), &cgroup_root())
            .unwrap_or_else(|err| panic!("{err}"));
        Some(Self {
            runtime,
            kubelet: Some(kubelet),
            containerd: Some(containerd),
            dir,
            host_bpffs: Some(HostBpffs::prepare()),
        })
    }

    fn kubelet(&mut self) -> &mut Kubelet {
        self.kubelet.as_mut().expect("the kubelet")
    }

    fn run_pod(&mut self, pod: Pod) -> usize {
        let kubelet = self.kubelet.as_mut().expect("the kubelet");
        self.runtime
            .block_on(kubelet.run_pod(pod))
            .unwrap_or_else(|err| panic!("{err}\n{}", self.containerd_log()))
    }

    fn start_container(&mut self, pod: usize, container: &str) -> String {
        let kubelet = self.kubelet.as_mut().expect("the kubelet");
        self.runtime
            .block_on(kubelet.start_container(pod, container))
            .unwrap_or_else(|err| panic!("{err}\n{}", self.containerd_log()))
    }

    /// Waits for the container to exit (the leaking ones take ~16 s to fill 128 MiB).
    fn wait_exited(&mut self, id: &str) -> ContainerStatus {
        let kubelet = self.kubelet.as_mut().expect("the kubelet");
        self.runtime
            .block_on(kubelet.wait_exited(id, Duration::from_secs(120)))
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn status(&mut self, id: &str) -> ContainerStatus {
        let kubelet = self.kubelet.as_mut().expect("the kubelet");
        self.runtime
            .block_on(kubelet.status(id))
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn containerd_log(&self) -> String {
        self.containerd
            .as_ref()
            .map(|c| c.log())
            .unwrap_or_default()
    }

    /// The agent pod's address on the node's bridge.
    fn agent_addr(&self, pod: usize) -> SocketAddr {
        let ip = self.kubelet.as_ref().expect("kubelet").pods()[pod]
            .ip
            .clone()
            .expect("the agent pod has an address");
        format!("{ip}:9750").parse().expect("an address")
    }

    /// The container's log (what it printed), as the kubelet keeps it.
    fn log(&self, pod: usize, container: &str, attempt: usize) -> String {
        let kubelet = self.kubelet.as_ref().expect("kubelet");
        let pod = &kubelet.pods()[pod];
        let dir = kubelet
            .host_path("/var/log/pods")
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid));
        fs::read_to_string(dir.join(container).join(format!("{attempt}.log"))).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            self.runtime.block_on(kubelet.remove_all());
        }
        drop(self.containerd.take());
        drop(self.host_bpffs.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the agent answers `/healthz`, or fails with its log.
fn wait_for_agent(node: &Node, pod: usize, addr: SocketAddr) {
    wait_for_healthz(addr, || node.log(pod, "leak", 0));
}

/// The agent's kill of container `id`, waited for.
fn kill_of(addr: SocketAddr, id: &str, node: &Node, agent: usize) -> Kill {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kills = harness::kills(addr, "").unwrap_or_default();
        if let Some(kill) = kills.into_iter().find(|kill| {
            kill.kubernetes
                .as_ref()
                .and_then(|k| k.container_id.as_deref())
                == Some(id)
        }) {
            return kill;
        }
        assert!(
            Instant::now() < deadline,
            "the agent reported no kill in container {id}; its log:\n{}",
            node.log(agent, "leak", 0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `leak_oom_kills_total` summed over the series of one pod's container.
fn kills_counted(metrics: &str, pod: &str, container: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("leak_oom_kills_total{"))
        .filter(|line| {
            let has = |label: &str, value: &str| {
                [",", "{"]
                    .iter()
                    .any(|before| line.contains(&format!("{before}{label}=\"{value}\"")))
            };
            has("pod", pod) && has("container", container)
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn expect_named(kill: &Kill, namespace: &str, pod: &str, container: &str) {
    assert_eq!(
        (
            kill.names.namespace.as_str(),
            kill.names.pod.as_str(),
            kill.names.container.as_str()
        ),
        (namespace, pod, container),
        "{kill:#?}"
    );
}

/// The DaemonSet's agent in its container names both experiment pods' kills, their restarts'
/// too, and a child killed in a container that keeps running.
#[test]
fn the_daemonset_reports_the_workloads_kills() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut node) = Node::start(hierarchy, "leak-e2e-cri") else {
        return;
    };
    let agent = node.run_pod(agent_pod());
    let addr = node.agent_addr(agent);
    wait_for_agent(&node, agent, addr);

    let anon = node.run_pod(workload_pod("leak-anon"));
    let file = node.run_pod(workload_pod("leak-file"));
    let mut first_ids = Vec::new();
    for (pod, container) in [(anon, "leak-anon"), (file, "leak-file")] {
        let id = node.kubelet().pods()[pod]
            .container_id(container)
            .expect("started")
            .to_owned();
        let status = node.wait_exited(&id);
        assert_eq!(status.reason, "OOMKilled", "{status:#?}");
        assert_eq!(status.exit_code, 137, "{status:#?}");
        first_ids.push((pod, container, id));
    }
    for (pod, container, id) in &first_ids {
        let kill = kill_of(addr, id, &node, agent);
        let running = &node.kubelet().pods()[*pod];
        expect_named(&kill, "leak-demo", &running.name, container);
        assert_eq!(kill.main_process, Some(true), "{kill:#?}");
        assert_eq!(kill.victim_comm.as_deref(), Some("leak"), "{kill:#?}");
        let kubernetes = kill.kubernetes.as_ref().expect("kubernetes");
        assert_eq!(kubernetes.pod_uid, running.uid);
        assert_eq!(kill.limit_bytes, Some(128 << 20), "{kill:#?}");
        assert!(
            kill.cgroup.starts_with(&running.cgroup),
            "{} is not under the pod's cgroup {}",
            kill.cgroup,
            running.cgroup
        );
    }
    // The page-cache pod: usage reached the limit while page cache filled part of it, and the
    // kill came only when the working set got there.
    let file_kill = kill_of(addr, &first_ids[1].2, &node, agent);
    let story = file_kill.story.as_ref().expect("a story");
    let usage_ms = story
        .usage_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("usage never at the limit: {file_kill:#?}"));
    let working_set_ms = story
        .working_set_at_limit_ms_before_kill
        .unwrap_or_else(|| panic!("working set never at the limit: {file_kill:#?}"));
    assert!(usage_ms > working_set_ms, "{story:#?}");
    assert!(story.peak_page_cache_bytes.unwrap_or(0) > 0, "{story:#?}");

    // The kubelet restarts each: the next attempt's kill carries the same names.
    for (pod, container, first) in &first_ids {
        let next = node.start_container(*pod, container);
        assert_ne!(&next, first);
        let status = node.wait_exited(&next);
        assert_eq!(status.reason, "OOMKilled", "{status:#?}");
        let kill = kill_of(addr, &next, &node, agent);
        let name = node.kubelet().pods()[*pod].name.clone();
        expect_named(&kill, "leak-demo", &name, container);
        assert_eq!(kill.main_process, Some(true), "{kill:#?}");
    }

    // A shell whose child leaks: the child is killed, the container keeps running, and the
    // runtime reports nothing; the agent reports the kill, not of the main process.
    let shell = node.run_pod(shell_pod());
    let shell_id = node.kubelet().pods()[shell]
        .container_id("shell")
        .expect("started")
        .to_owned();
    let kill = kill_of(addr, &shell_id, &node, agent);
    let shell_name = node.kubelet().pods()[shell].name.clone();
    expect_named(&kill, "leak-e2e", &shell_name, "shell");
    assert_eq!(kill.main_process, Some(false), "{kill:#?}");
    assert_eq!(kill.victim_comm.as_deref(), Some("leak"), "{kill:#?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log(shell, "shell", 0).contains("child ended 137") {
        assert!(
            Instant::now() < deadline,
            "the shell never saw its child killed: {}",
            node.log(shell, "shell", 0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The container never terminated, so the kubelet reports no OOMKilled: it reads a
    // container's reason only once it has exited. (containerd 1.6 does set `reason:
    // OOMKilled` on the running container when any of its processes is OOM-killed; a kubelet
    // never shows it, and neither does kube-state-metrics, which reads the pod's status.)
    let status = node.status(&shell_id);
    assert_eq!(status.state(), ContainerState::Running, "{status:#?}");
    assert_eq!(
        (status.exit_code, status.finished_at),
        (0, 0),
        "{status:#?}"
    );

    let metrics = harness::http_get(addr, "/metrics").expect("/metrics").body;
    for (pod, container, _) in &first_ids {
        let name = &node.kubelet().pods()[*pod].name;
        assert_eq!(
            kills_counted(&metrics, name, container),
            2.0,
            "kills of {name}/{container}:\n{metrics}"
        );
    }
}

/// The DaemonSet's pod without one of its mounts: the agent stops at once, naming the mount,
/// for every mount the DaemonSet has (deploy/daemonset.yaml keeps only those it needs).
#[test]
fn the_agent_names_each_mount_the_daemonset_would_miss() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut node) = Node::start(hierarchy, "leak-e2e-cri-mounts") else {
        return;
    };
    let whole = agent_pod();
    let mounts = whole.spec.containers[0].volume_mounts.clone();
    assert!(mounts.len() >= 4, "{mounts:?}");
    let mut runs = Vec::new();
    for mount in &mounts {
        let mut pod = agent_pod();
        pod.workload = format!("leak-without-{}", mount.name);
        pod.spec.containers[0]
            .volume_mounts
            .retain(|m| m.name != mount.name);
        pod.spec.containers[0].env.push(EnvVar {
            name: "RUST_LOG".into(),
            value: "info,leak_user::agent=debug".into(),
        });
        let index = node.run_pod(pod);
        let id = node.kubelet().pods()[index]
            .container_id("leak")
            .expect("started")
            .to_owned();
        runs.push((mount.clone(), index, id));
    }
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    for (mount, index, id) in runs {
        let status = node.wait_exited(&id);
        let log = node.log(index, "leak", 0);
        // It stopped before loading anything: no probe of its was ever attached.
        if status.exit_code == 0
            || !log.contains("misses the node's files it needs")
            || !log.contains(&mount.mount_path)
            || log.contains("attach mode")
        {
            failures.push(format!(
                "without the {} volume the agent exited {} without naming {} first:\n{log}",
                mount.name, status.exit_code, mount.mount_path
            ));
        }
        figures.push(format!("{} exit {}", mount.name, status.exit_code));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    harness::report_figure(
        &current_test(),
        &format!(
            "the agent without each DaemonSet mount: {}",
            figures.join(", ")
        ),
    );
}

/// With the log directories gone, the agent names a container through the runtime's CRI
/// socket; a socket that is not there is a warning, and the kill is served unnamed.
#[test]
fn the_runtime_names_containers_the_logs_do_not() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut node) = Node::start(hierarchy, "leak-e2e-cri-names") else {
        return;
    };
    let empty = TempDir::new("leak-e2e-cri-empty-rootfs").unwrap_or_else(|err| panic!("{err}"));
    let socket = node
        .containerd
        .as_ref()
        .expect("containerd")
        .socket()
        .to_string_lossy()
        .into_owned();
    let rootfs = empty.path().to_string_lossy().into_owned();
    let named = Agent::start(&["--rootfs", &rootfs, "--cri-socket", &socket]);
    let refused = Agent::start(&[
        "--rootfs",
        &rootfs,
        "--cri-socket",
        "/nonexistent/leak-e2e/cri.sock",
    ]);
    let pod = node.run_pod(workload_pod("leak-anon"));
    let id = node.kubelet().pods()[pod]
        .container_id("leak-anon")
        .expect("started")
        .to_owned();
    let status = node.wait_exited(&id);
    assert_eq!(status.reason, "OOMKilled", "{status:#?}");
    let is_ours = |kill: &Kill| {
        kill.kubernetes
            .as_ref()
            .and_then(|k| k.container_id.as_deref())
            == Some(id.as_str())
    };
    let kill = named
        .0
        .wait_for_kill("the container's kill", Duration::from_secs(30), is_ours)
        .unwrap_or_else(|err| panic!("{err}\n{}", named.log()));
    let pod_name = node.kubelet().pods()[pod].name.clone();
    expect_named(&kill, "leak-demo", &pod_name, "leak-anon");
    assert!(
        named
            .log()
            .contains("naming containers the log directories do not through containerd"),
        "{}",
        named.log()
    );
    let unnamed = refused
        .0
        .wait_for_kill("the container's kill", Duration::from_secs(30), is_ours)
        .unwrap_or_else(|err| panic!("{err}\n{}", refused.log()));
    expect_named(&unnamed, "", "", "");
    assert_eq!(
        unnamed.kubernetes.as_ref().map(|k| k.pod_uid.as_str()),
        Some(node.kubelet().pods()[pod].uid.as_str()),
        "the cgroup path still gives the pod's uid"
    );
    assert!(
        refused.log().contains("/nonexistent/leak-e2e/cri.sock"),
        "{}",
        refused.log()
    );
}
