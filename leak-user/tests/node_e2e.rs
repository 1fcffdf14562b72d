//! A Kubernetes node run as a container, as minikube's docker driver runs it, and the agent on
//! the host with no flags. The node container, run by a containerd of the test's own with its
//! cgroup at `<parent>/<id>` (docker's `/docker/<id>`), writes the kubelet's log tree into its
//! own root filesystem; the pods' cgroups are nested under the node container's cgroup
//! (`<node>/kubepods/burstable/pod<uid>/<id>`, limited), and leaking processes in them are
//! OOM-killed. The host has no `/var/log/pods` of those pods, so the names on `/kills` can only
//! come from the node container's root, read through `/proc/<pid>/root`. Then the node
//! container dies: an agent that learned its names while it ran still names kills in it, one
//! started after serves them unnamed; so does an agent facing a node without a log tree. And
//! the DaemonSet's agent, in its container (hostPID), names them the same way.
//!
//! Needs `$LEAK_TEST_NODE_IMAGE` (busybox: the sandboxes and the node's shell), as cri_e2e, and
//! for the DaemonSet `$LEAK_TEST_IMAGE` (deploy/Dockerfile's).

mod support;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use leak_user::{
    enrich::{
        cgroupfs::{MemoryHierarchy, Version},
        cri::{
            proto::{
                ContainerConfig, ContainerMetadata, ContainerRequest, CreateContainerRequest,
                CreateContainerResponse, Empty, ImageSpec, LinuxContainerConfig,
                LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
                NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
                PodSandboxRequest, RunPodSandboxRequest, RunPodSandboxResponse,
            },
            Cri,
        },
    },
    experiment::{
        containerd::Containerd,
        harness::{self, report_figure},
        kubelet::Kubelet,
        pod_spec,
    },
    model::kill::Kill,
};
use support::{
    node::{images, wait_for_healthz, HostBpffs, AGENT_IMAGE_ENV, NODE_IMAGE, NODE_IMAGE_ENV},
    *,
};

const LIMIT: u64 = 32 << 20;
const FAST: &str = "--interval 1ms --chunk 1MiB --listen off";

fn random_hex() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("a random uuid")
        .trim()
        .replace('-', "")
}

/// A pod as the node's kubelet logged it.
struct PodLog {
    pod: String,
    uid: String,
    container: &'static str,
    id: String,
}

const NAMESPACE: &str = "shop";

impl PodLog {
    fn new(workload: &str, container: &'static str) -> Self {
        let uid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("a random uuid")
            .trim()
            .to_owned();
        Self {
            pod: format!("{workload}-{}", &uid[..5]),
            uid,
            container,
            id: format!("{}{}", random_hex(), random_hex()),
        }
    }

    fn pod_dir(&self) -> String {
        format!("{NAMESPACE}_{}_{}", self.pod, self.uid)
    }

    /// The shell that writes its log directory, log and `/var/log/containers` link, as the
    /// kubelet does, inside the node.
    fn shell(&self) -> String {
        let log = format!("/var/log/pods/{}/{}/0.log", self.pod_dir(), self.container);
        format!(
            "mkdir -p /var/log/pods/{dir}/{container} /var/log/containers && : > {log} && \
             ln -s {log} /var/log/containers/{pod}_{NAMESPACE}_{container}-{id}.log",
            dir = self.pod_dir(),
            container = self.container,
            pod = self.pod,
            id = self.id,
        )
    }
}

/// A node container: its cgroup, its main process on the host.
struct NodeContainer {
    cgroup: String,
    pid: u32,
}

/// A containerd of the test's own and the node containers it runs, their cgroups under
/// `/leak-e2e-docker-<pid>`; stopped, removed and cleaned up on drop, also when a test fails.
struct Runtime {
    tokio: tokio::runtime::Runtime,
    cri: Cri,
    /// The kubelet stand-in, for the DaemonSet's pod.
    kubelet: Option<Kubelet>,
    /// The host's bpffs, made ready for the DaemonSet's pod and put back after it.
    host_bpffs: Option<HostBpffs>,
    containerd: Option<Containerd>,
    hierarchy: MemoryHierarchy,
    parent: String,
    dir: PathBuf,
    sandboxes: Vec<String>,
}

impl Runtime {
    /// Containerd with the images of `variables` imported.
    fn start(hierarchy: &MemoryHierarchy, name: &str, variables: &[&str]) -> Option<Self> {
        let images = images(variables)?;
        let dir = disk_dir().join(format!("{name}-{}", std::process::id()));
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let containerd = Containerd::start(&dir.join("containerd"), NODE_IMAGE)
            .unwrap_or_else(|err| panic!("{err}"));
        for image in &images {
            containerd
                .import(image)
                .unwrap_or_else(|err| panic!("{err}"));
        }
        let cri = tokio
            .block_on(Cri::connect(containerd.socket(), Duration::from_secs(30)))
            .unwrap_or_else(|err| panic!("{err}"));
        Some(Self {
            tokio,
            cri,
            kubelet: None,
            host_bpffs: None,
            containerd: Some(containerd),
            hierarchy: hierarchy.clone(),
            parent: format!("/leak-e2e-docker-{}", std::process::id()),
            dir,
            sandboxes: Vec::new(),
        })
    }

    fn call<Request, Response>(&mut self, method: &'static str, request: Request) -> Response
    where
        Request: prost::Message + Send + Sync + 'static,
        Response: prost::Message + Default + Send + Sync + 'static,
    {
        let answer = self.tokio.block_on(self.cri.call(method, request));
        answer.unwrap_or_else(|err| {
            let log = self.containerd.as_ref().map(Containerd::log);
            panic!("{err}\n{}", log.unwrap_or_default())
        })
    }

    /// Runs a node container whose main process runs `script` then sleeps; waits until the
    /// script is done.
    fn run_node(&mut self, name: &str, script: &str) -> NodeContainer {
        let logs = self.dir.join("logs").join(name);
        fs::create_dir_all(&logs).expect("mkdir logs");
        let uid = random_hex();
        // Its own pid and mount namespaces, the host's network (no CNI needed), as docker runs
        // minikube's node.
        let namespaces = NamespaceOption {
            network: NamespaceMode::Node as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
        };
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: "leak-e2e".into(),
                attempt: 0,
            }),
            // The host's network comes with its UTS namespace: no hostname of its own.
            log_directory: logs.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: NamespaceMode::Pod as i32,
                        ..namespaces.clone()
                    }),
                    ..Default::default()
                }),
                resources: None,
            }),
            ..Default::default()
        };
        let sandbox: RunPodSandboxResponse = self.call(
            "RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            },
        );
        self.sandboxes.push(sandbox.pod_sandbox_id.clone());
        let ready = "/leak-e2e-ready";
        let created: CreateContainerResponse = self.call(
            "CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: sandbox.pod_sandbox_id,
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "node".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: NODE_IMAGE.into(),
                    }),
                    command: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        format!("set -e; {script}; touch {ready}; exec sleep 2147483647"),
                    ],
                    log_path: "node.log".into(),
                    linux: Some(LinuxContainerConfig {
                        resources: None,
                        security_context: Some(LinuxContainerSecurityContext {
                            namespace_options: Some(namespaces),
                            ..Default::default()
                        }),
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            },
        );
        let id = created.container_id;
        let _: Empty = self.call(
            "StartContainer",
            ContainerRequest {
                container_id: id.clone(),
            },
        );
        let cgroup = format!("{}/{id}", self.parent);
        let procs = self.cgroup_dir(&cgroup).join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let pid = fs::read_to_string(&procs)
                .ok()
                .and_then(|procs| procs.lines().next()?.trim().parse::<u32>().ok());
            if let Some(pid) = pid {
                if Path::new(&format!("/proc/{pid}/root{ready}")).exists() {
                    break pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the node container did not get ready; its log:\n{}",
                fs::read_to_string(logs.join("node.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if self.hierarchy.version == Version::V2 {
            // No process may sit beside child cgroups that use a controller: the node's own move
            // into a leaf, as kind's entrypoint moves them into /init.scope.
            let init = self.cgroup_dir(&cgroup).join("init.scope");
            fs::create_dir(&init).expect("mkdir init.scope");
            fs::write(init.join("cgroup.procs"), pid.to_string()).expect("move the node");
            fs::write(
                self.cgroup_dir(&cgroup).join("cgroup.subtree_control"),
                "+memory",
            )
            .expect("delegate memory");
        }
        NodeContainer { cgroup, pid }
    }

    /// Runs deploy/daemonset.yaml's pod through the kubelet stand-in (its pods under a cgroup
    /// root of their own) and waits until its agent answers; its address.
    fn run_agent_pod(&mut self) -> SocketAddr {
        let cri = self
            .tokio
            .block_on(Cri::connect(self.cri.path(), Duration::from_secs(30)))
            .unwrap_or_else(|err| panic!("{err}"));
        let cgroup_root = format!("/leak-e2e-k8s-{}", std::process::id());
        let kubelet = Kubelet::new(
            cri,
            self.dir.join("root"),
            self.hierarchy.clone(),
            &cgroup_root,
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let kubelet = self.kubelet.insert(kubelet);
        self.host_bpffs = Some(HostBpffs::prepare());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
        let template =
            pod_spec::read(&manifest, "DaemonSet", "leak").unwrap_or_else(|err| panic!("{err}"));
        let pod = self
            .tokio
            .block_on(kubelet.run_pod(template))
            .unwrap_or_else(|err| panic!("{err}"));
        let running = &kubelet.pods()[pod];
        let ip = running.ip.clone().expect("the agent pod has an address");
        let addr: SocketAddr = format!("{ip}:9750").parse().expect("an address");
        let log = kubelet
            .host_path("/var/log/pods")
            .join(format!(
                "{}_{}_{}",
                running.namespace, running.name, running.uid
            ))
            .join("leak/0.log");
        wait_for_healthz(addr, || fs::read_to_string(&log).unwrap_or_default());
        addr
    }

    fn cgroup_dir(&self, relative: &str) -> PathBuf {
        self.hierarchy.root.join(relative.trim_start_matches('/'))
    }

    /// SIGKILLs the node container's own processes (not its pods', which run in the host's pid
    /// namespace here) and waits until they are gone.
    fn kill_node(&self, node: &NodeContainer) {
        let pids = node_processes(&self.cgroup_dir(&node.cgroup));
        assert!(pids.contains(&node.pid), "{pids:?}");
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; the pids are the node's.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while pids
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            assert!(
                Instant::now() < deadline,
                "the node's processes outlive SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The processes in a cgroup subtree but its `kubepods`.
fn node_processes(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|pid| pid.trim().parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) && entry.file_name() != "kubepods" {
            pids.extend(node_processes(&entry.path()));
        }
    }
    pids
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            self.tokio.block_on(kubelet.remove_all());
        }
        drop(self.host_bpffs.take());
        for sandbox in std::mem::take(&mut self.sandboxes) {
            for method in ["StopPodSandbox", "RemovePodSandbox"] {
                let call = self.cri.call::<_, Empty>(
                    method,
                    PodSandboxRequest {
                        pod_sandbox_id: sandbox.clone(),
                    },
                );
                let answer = self
                    .tokio
                    .block_on(async { tokio::time::timeout(Duration::from_secs(15), call).await });
                if !matches!(answer, Ok(Ok(_))) {
                    eprintln!("warning: {method} {sandbox}: {answer:?}");
                }
            }
        }
        // Whatever containerd left running under the parent is the test's.
        for pid in node_processes(&self.cgroup_dir(&self.parent)) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        drop(self.containerd.take());
        // runc made the containers' cgroups in every hierarchy (each v1 controller's).
        let roots: Vec<PathBuf> = match self.hierarchy.version {
            Version::V2 => vec![self.hierarchy.root.clone()],
            Version::V1 => fs::read_dir(self.hierarchy.root.parent().unwrap_or(Path::new("/")))
                .map(|entries| entries.flatten().map(|e| e.path()).collect())
                .unwrap_or_default(),
        };
        for root in roots {
            remove_tree(&root.join(self.parent.trim_start_matches('/')));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn remove_tree(path: &Path) {
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let _ = fs::remove_dir(path);
}

/// The kubelet's QoS level under a node container's cgroup (`<node>/kubepods/burstable`).
struct Kubepods {
    burstable: Cgroup,
    _kubepods: Cgroup,
}

impl Kubepods {
    fn under(hierarchy: &MemoryHierarchy, node: &NodeContainer) -> Self {
        let kubepods = Cgroup::create_at(hierarchy, &format!("{}/kubepods", node.cgroup))
            .unwrap_or_else(|err| panic!("{err}"));
        Self {
            burstable: child(&kubepods, "burstable"),
            _kubepods: kubepods,
        }
    }

    /// A pod's cgroup and its container's, limited, as the kubelet nests them.
    fn pod(&self, pod: &PodLog) -> PodCgroup {
        let pod_cgroup = child(&self.burstable, &format!("pod{}", pod.uid));
        let container = child(&pod_cgroup, &pod.id);
        container
            .set_limit(LIMIT)
            .unwrap_or_else(|err| panic!("{err}"));
        PodCgroup {
            container,
            _pod: pod_cgroup,
        }
    }
}

/// Dropped container first, then the pod.
struct PodCgroup {
    container: Cgroup,
    _pod: Cgroup,
}

/// A container's main process (pid 1 of its namespace) that leaks once `gate` exists.
fn gated_leaker(cgroup: &Cgroup, gate: &Path) -> Process {
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!(
            "while [ ! -e {} ]; do sleep 0.05; done; exec {} workload {FAST}",
            gate.display(),
            leak_bin()
        ),
    ]);
    spawn_command_as_init_in(cgroup, command)
}

fn open(gate: &Path) {
    fs::write(gate, "").expect("open the gate");
}

fn names(kill: &Kill) -> (&str, &str, &str) {
    (
        kill.names.namespace.as_str(),
        kill.names.pod.as_str(),
        kill.names.container.as_str(),
    )
}

/// The pod's identity from the cgroup path, whether or not it was named.
fn expect_identity(kill: &Kill, pod: &PodLog) {
    let kubernetes = kill
        .kubernetes
        .as_ref()
        .unwrap_or_else(|| panic!("no Kubernetes identity: {kill:#?}"));
    assert_eq!(kubernetes.pod_uid, pod.uid, "{kill:#?}");
    assert_eq!(kubernetes.container_id.as_deref(), Some(pod.id.as_str()));
}

fn expect_named(kill: &Kill, pod: &PodLog) {
    expect_identity(kill, pod);
    assert_eq!(
        names(kill),
        (NAMESPACE, pod.pod.as_str(), pod.container),
        "{kill:#?}"
    );
}

fn expect_unnamed(kill: &Kill, pod: &PodLog) {
    expect_identity(kill, pod);
    assert_eq!(names(kill), ("", "", ""), "{kill:#?}");
}

/// The agent on the host, no flags: a kill in a pod of the node container carries the names
/// the node's own log tree gives; after the node container is gone that agent still names its
/// pods, and one started after it serves them unnamed.
#[test]
fn an_agent_on_the_host_names_the_pods_of_a_node_container() {
    let test = "an_agent_on_the_host_names_the_pods_of_a_node_container";
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut runtime) = Runtime::start(&hierarchy, "leak-e2e-node", &[NODE_IMAGE_ENV]) else {
        return;
    };
    let pods = [
        PodLog::new("cart-7d9f8b", "cart-api"),
        PodLog::new("report-28f7c", "builder"),
        PodLog::new("batch-5c4b", "worker"),
    ];
    let script: Vec<String> = pods.iter().map(PodLog::shell).collect();
    let node = runtime.run_node("minikube", &script.join(" && "));
    for pod in &pods {
        let inside = format!("/proc/{}/root/var/log/pods/{}", node.pid, pod.pod_dir());
        assert!(Path::new(&inside).is_dir(), "{inside}");
        let host = Path::new("/var/log/pods").join(pod.pod_dir());
        assert!(!host.exists(), "{} is on the host", host.display());
    }
    let gates = TempDir::new("leak-e2e-node-gates").unwrap_or_else(|err| panic!("{err}"));
    let kubepods = Kubepods::under(&hierarchy, &node);
    let cgroups: Vec<PodCgroup> = pods.iter().map(|pod| kubepods.pod(pod)).collect();
    let gate = |n: usize| gates.path().join(n.to_string());
    let mut leakers: Vec<Process> = cgroups
        .iter()
        .enumerate()
        .map(|(n, cgroup)| gated_leaker(&cgroup.container, &gate(n)))
        .collect();

    let mut agent = Agent::start(&[]);
    open(&gate(0));
    wait_for_oom_kill(&mut leakers[0], Duration::from_secs(120));
    let named = agent.wait_for_kill_in(&cgroups[0].container.relative);
    expect_named(&named, &pods[0]);
    assert_eq!(named.main_process, Some(true), "{named:#?}");
    assert_eq!(named.limit_bytes, Some(LIMIT), "{named:#?}");
    assert!(
        named
            .cgroup
            .starts_with(&format!("{}/kubepods/", node.cgroup)),
        "{} is not nested under the node container's cgroup {}",
        named.cgroup,
        node.cgroup
    );

    // The node container dies; its pods' cgroups (and their processes, in the host's pid
    // namespace here) stay.
    runtime.kill_node(&node);
    open(&gate(1));
    wait_for_oom_kill(&mut leakers[1], Duration::from_secs(120));
    expect_named(
        &agent.wait_for_kill_in(&cgroups[1].container.relative),
        &pods[1],
    );

    let mut late = Agent::start(&[]);
    open(&gate(2));
    wait_for_oom_kill(&mut leakers[2], Duration::from_secs(120));
    expect_named(
        &agent.wait_for_kill_in(&cgroups[2].container.relative),
        &pods[2],
    );
    expect_unnamed(
        &late.wait_for_kill_in(&cgroups[2].container.relative),
        &pods[2],
    );
    for agent in [&agent, &late] {
        assert_eq!(agent.get("/healthz").0, 200, "{}", agent.log());
    }
    assert!(agent.stop().success(), "{}", agent.log());
    assert!(late.stop().success(), "{}", late.log());
    report_figure(
        test,
        &format!(
            "node container {} (pid {}): kill in {} named {NAMESPACE}/{}/{} from \
             /proc/{}/root; after the node died the agent that ran still named {}/{} and \
             {}/{}, an agent started after served {}/{} unnamed",
            node.cgroup,
            node.pid,
            named.cgroup,
            pods[0].pod,
            pods[0].container,
            node.pid,
            pods[1].pod,
            pods[1].container,
            pods[2].pod,
            pods[2].container,
            pods[2].pod,
            pods[2].container,
        ),
    );
    drop(leakers);
    drop(cgroups);
    drop(kubepods);
}

/// A node container whose root filesystem holds no log tree: its pods' kills are served, with
/// their cgroup identity and no names, and the agent runs on.
#[test]
fn a_node_container_without_a_log_tree_leaves_its_kills_unnamed() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut runtime) = Runtime::start(&hierarchy, "leak-e2e-bare-node", &[NODE_IMAGE_ENV])
    else {
        return;
    };
    let node = runtime.run_node("bare", "true");
    assert!(!Path::new(&format!("/proc/{}/root/var/log/pods", node.pid)).exists());
    let pod = PodLog::new("cart-7d9f8b", "cart-api");
    let kubepods = Kubepods::under(&hierarchy, &node);
    let cgroup = kubepods.pod(&pod);
    let mut agent = Agent::start(&[]);
    let mut victim = spawn_command_as_init_in(&cgroup.container, {
        let mut command = Command::new(leak_bin());
        command.arg("workload").args(FAST.split(' '));
        command
    });
    wait_for_oom_kill(&mut victim, Duration::from_secs(120));
    expect_unnamed(&agent.wait_for_kill_in(&cgroup.container.relative), &pod);
    assert_eq!(agent.get("/healthz").0, 200, "{}", agent.log());
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The DaemonSet's agent, in its container with the host's pid namespace and `--rootfs /host`
/// (the kubelet stand-in's node, which never ran these pods), names a kill in a pod of the node
/// container from that container's root, as the agent on the host does.
#[test]
fn the_daemonsets_agent_names_the_pods_of_a_node_container() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut runtime) = Runtime::start(
        &hierarchy,
        "leak-e2e-daemonset-node",
        &[NODE_IMAGE_ENV, AGENT_IMAGE_ENV],
    ) else {
        return;
    };
    let pod = PodLog::new("cart-7d9f8b", "cart-api");
    let node = runtime.run_node("node", &pod.shell());
    let kubepods = Kubepods::under(&hierarchy, &node);
    let cgroup = kubepods.pod(&pod);
    let addr = runtime.run_agent_pod();
    let mut victim = spawn_command_as_init_in(&cgroup.container, {
        let mut command = Command::new(leak_bin());
        command.arg("workload").args(FAST.split(' '));
        command
    });
    wait_for_oom_kill(&mut victim, Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(30);
    let kill = loop {
        let kills = harness::kills(addr, "").unwrap_or_default();
        if let Some(kill) = kills
            .into_iter()
            .find(|kill| kill.cgroup == cgroup.container.relative)
        {
            break kill;
        }
        assert!(
            Instant::now() < deadline,
            "the agent pod reported no kill in {}",
            cgroup.container.relative
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    expect_named(&kill, &pod);
    drop(victim);
    drop(cgroup);
    drop(kubepods);
}
