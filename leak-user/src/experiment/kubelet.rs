//! A kubelet stand-in for the container tests: runs a manifest's pod template through the CRI
//! the way the kubelet does on a node with the cgroupfs driver. The pod's cgroup under
//! `<cgroup root>/kubepods[/<qos>]/pod<uid>` with the pod's memory limit, the runtime's
//! sandbox with the pod's host namespaces, each container with its args, resources, security
//! context and volume mounts, its log at `/var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log`
//! and the `/var/log/containers` link, the kubelet's labels, and restarts as the next attempt.
//!
//! The node keeps its own `/var`: every hostPath outside `/sys`, `/proc` and `/dev` is taken
//! under the node's root directory, so the host's own logs and state are never touched.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    harness::{io, LabError},
    pod_spec::{self, Pod},
};
use crate::enrich::{
    cgroupfs::{MemoryHierarchy, Version},
    cri::{
        proto::{
            ContainerConfig, ContainerMetadata, ContainerRequest, ContainerState, ContainerStatus,
            ContainerStatusResponse, CreateContainerRequest, CreateContainerResponse, Empty,
            ImageSpec, KeyValue, LinuxContainerConfig, LinuxContainerResources,
            LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
            Mount, MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig,
            PodSandboxMetadata, PodSandboxRequest, PodSandboxStatusResponse, RunPodSandboxRequest,
            RunPodSandboxResponse, StopContainerRequest,
        },
        Cri, CriError,
    },
};

impl From<CriError> for LabError {
    fn from(err: CriError) -> Self {
        LabError::Run(err.to_string())
    }
}

impl From<pod_spec::PodSpecError> for LabError {
    fn from(err: pod_spec::PodSpecError) -> Self {
        LabError::Run(err.to_string())
    }
}

/// A pod the stand-in runs.
#[derive(Debug)]
pub struct RunningPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub sandbox_id: String,
    /// The pod's address on the node's bridge (`None` with the host's network).
    pub ip: Option<String>,
    /// Relative to the memory hierarchy's root, as `/kills` names cgroups.
    pub cgroup: String,
    /// Container name to its ids, one per attempt, oldest first.
    pub containers: HashMap<String, Vec<String>>,
    template: Pod,
    config: PodSandboxConfig,
}

impl RunningPod {
    /// The id of the container's latest attempt.
    pub fn container_id(&self, name: &str) -> Option<&str> {
        self.containers.get(name)?.last().map(String::as_str)
    }
}

pub struct Kubelet {
    pub cri: Cri,
    node_root: PathBuf,
    memory: MemoryHierarchy,
    /// The kubelet's `--cgroup-root`: the pods' cgroups live under `<it>/kubepods`.
    cgroup_root: String,
    pods: Vec<RunningPod>,
}

impl Kubelet {
    /// A kubelet for the node whose own files are under `node_root`; it makes its log
    /// directories there, as the kubelet does when it starts.
    pub fn new(
        cri: Cri,
        node_root: PathBuf,
        memory: MemoryHierarchy,
        cgroup_root: &str,
    ) -> Result<Self, LabError> {
        let kubelet = Self {
            cri,
            node_root,
            memory,
            cgroup_root: format!("/{}", cgroup_root.trim_matches('/')),
            pods: Vec::new(),
        };
        for dir in ["/var/log/pods", "/var/log/containers"] {
            let path = kubelet.host_path(dir);
            fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        }
        Ok(kubelet)
    }

    /// Where a hostPath is on this node: kernel file systems are the host's, the rest under
    /// the node's root.
    pub fn host_path(&self, path: &str) -> PathBuf {
        let kernel = ["/sys", "/proc", "/dev"]
            .iter()
            .any(|top| path == *top || path.starts_with(&format!("{top}/")));
        match kernel {
            true => PathBuf::from(path),
            false => self.node_root.join(path.trim_start_matches('/')),
        }
    }

    pub fn pods(&self) -> &[RunningPod] {
        &self.pods
    }

    /// Runs the pod (sandbox, then every container, attempt 0) and returns its index.
    pub async fn run_pod(&mut self, template: Pod) -> Result<usize, LabError> {
        let uid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map_err(io("reading a random uuid"))?
            .trim()
            .to_owned();
        let name = format!("{}-{}", template.workload, &uid[..5]);
        let qos = qos_class(&template.spec)?;
        let cgroup = match qos {
            "guaranteed" => format!("{}/kubepods/pod{uid}", self.cgroup_root),
            qos => format!("{}/kubepods/{qos}/pod{uid}", self.cgroup_root),
        };
        self.make_pod_cgroup(&cgroup, pod_memory_limit(&template.spec)?)?;
        let log_directory = self
            .host_path("/var/log/pods")
            .join(format!("{}_{name}_{uid}", template.namespace));
        fs::create_dir_all(&log_directory).map_err(io("creating the pod's log directory"))?;
        let mut labels: HashMap<String, String> = template
            .metadata
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(kubelet_labels(&template.namespace, &name, &uid));
        let privileged = template
            .spec
            .containers
            .iter()
            .any(|c| c.security_context.privileged);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: template.namespace.clone(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels,
            annotations: template
                .metadata
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(&template.spec)),
                    readonly_rootfs: false,
                    privileged,
                }),
                resources: None,
            }),
        };
        let sandbox: RunPodSandboxResponse = self
            .cri
            .call(
                "RunPodSandbox",
                RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                },
            )
            .await?;
        let status: PodSandboxStatusResponse = self
            .cri
            .call(
                "PodSandboxStatus",
                PodSandboxRequest {
                    pod_sandbox_id: sandbox.pod_sandbox_id.clone(),
                },
            )
            .await?;
        let ip = status
            .status
            .and_then(|status| status.network)
            .map(|network| network.ip)
            .filter(|ip| !ip.is_empty());
        self.pods.push(RunningPod {
            name,
            namespace: template.namespace.clone(),
            uid,
            sandbox_id: sandbox.pod_sandbox_id,
            ip,
            cgroup,
            containers: HashMap::new(),
            template,
            config,
        });
        let index = self.pods.len() - 1;
        let names: Vec<String> = self.pods[index]
            .template
            .spec
            .containers
            .iter()
            .map(|c| c.name.clone())
            .collect();
        for container in names {
            self.start_container(index, &container).await?;
        }
        Ok(index)
    }

    /// Creates and starts the container's next attempt (the first if it never ran), as the
    /// kubelet does after a container exits: the previous one stays, exited, for its status.
    pub async fn start_container(&mut self, pod: usize, name: &str) -> Result<String, LabError> {
        let running = &self.pods[pod];
        let spec = running
            .template
            .spec
            .containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| LabError::Run(format!("the pod has no container {name}")))?
            .clone();
        let attempt = running.containers.get(name).map_or(0, Vec::len) as u32;
        let log_path = format!("{name}/{attempt}.log");
        let config = self.container_config(&self.pods[pod], &spec, attempt, &log_path)?;
        let created: CreateContainerResponse = self
            .cri
            .call(
                "CreateContainer",
                CreateContainerRequest {
                    pod_sandbox_id: self.pods[pod].sandbox_id.clone(),
                    config: Some(config),
                    sandbox_config: Some(self.pods[pod].config.clone()),
                },
            )
            .await?;
        let id = created.container_id;
        let running = &self.pods[pod];
        let link = self.host_path("/var/log/containers").join(format!(
            "{}_{}_{name}-{id}.log",
            running.name, running.namespace
        ));
        fs::create_dir_all(link.parent().unwrap_or(Path::new("/")))
            .map_err(io("creating /var/log/containers"))?;
        let target = Path::new(&running.config.log_directory).join(&log_path);
        std::os::unix::fs::symlink(&target, &link)
            .map_err(io(format!("linking {}", link.display())))?;
        self.pods[pod]
            .containers
            .entry(name.to_owned())
            .or_default()
            .push(id.clone());
        let _: Empty = self
            .cri
            .call(
                "StartContainer",
                ContainerRequest {
                    container_id: id.clone(),
                },
            )
            .await?;
        Ok(id)
    }

    pub async fn status(&mut self, id: &str) -> Result<ContainerStatus, LabError> {
        let response: ContainerStatusResponse = self
            .cri
            .call(
                "ContainerStatus",
                ContainerRequest {
                    container_id: id.to_owned(),
                },
            )
            .await?;
        response
            .status
            .ok_or_else(|| LabError::Run(format!("no status for container {id}")))
    }

    /// Waits for the container to exit and returns its last status.
    pub async fn wait_exited(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<ContainerStatus, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(id).await?;
            if status.state() == ContainerState::Exited {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(LabError::Run(format!(
                    "container {id} still {:?} after {timeout:?}",
                    status.state()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops and removes every pod, its cgroups and logs.
    pub async fn remove_all(&mut self) {
        while let Some(pod) = self.pods.pop() {
            for id in pod.containers.values().flatten() {
                let _: Result<Empty, _> = self
                    .cri
                    .call(
                        "StopContainer",
                        StopContainerRequest {
                            container_id: id.clone(),
                            timeout: 0,
                        },
                    )
                    .await;
            }
            for method in ["StopPodSandbox", "RemovePodSandbox"] {
                let answer: Result<Empty, _> = self
                    .cri
                    .call(
                        method,
                        PodSandboxRequest {
                            pod_sandbox_id: pod.sandbox_id.clone(),
                        },
                    )
                    .await;
                if let Err(err) = answer {
                    eprintln!("warning: {err}");
                }
            }
            self.remove_cgroup_dirs(&pod.cgroup);
        }
        for level in ["kubepods/burstable", "kubepods/besteffort", "kubepods", ""] {
            let relative = format!("{}/{level}", self.cgroup_root);
            self.remove_cgroup_dirs(relative.trim_end_matches('/'));
        }
    }

    fn container_config(
        &self,
        pod: &RunningPod,
        spec: &pod_spec::Container,
        attempt: u32,
        log_path: &str,
    ) -> Result<ContainerConfig, LabError> {
        let mut labels = kubelet_labels(&pod.namespace, &pod.name, &pod.uid);
        labels.insert("io.kubernetes.container.name".into(), spec.name.clone());
        let mut mounts = Vec::new();
        for mount in &spec.volume_mounts {
            mounts.push(self.mount(pod, mount)?);
        }
        let memory_limit = match spec.resources.limits.get("memory") {
            Some(value) => pod_spec::bytes(&format!("{} memory limit", spec.name), value)?,
            None => 0,
        };
        let cpu_request = match spec.resources.requests.get("cpu") {
            Some(value) => pod_spec::millicpus(&format!("{} cpu request", spec.name), value)?,
            None => 0,
        };
        Ok(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.name.clone(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: spec.image.clone(),
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            envs: std::iter::once(KeyValue {
                key: "HOSTNAME".into(),
                value: pod.name.clone(),
            })
            .chain(spec.env.iter().map(|var| KeyValue {
                key: var.name.clone(),
                value: var.value.clone(),
            }))
            .collect(),
            mounts,
            labels,
            annotations: HashMap::from([(
                "io.kubernetes.container.restartCount".into(),
                attempt.to_string(),
            )]),
            log_path: log_path.to_owned(),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    // The kubelet's shares: 1024 per CPU requested, at least 2.
                    cpu_shares: i64::try_from((cpu_request * 1024 / 1000).max(2)).unwrap_or(2),
                    memory_limit_in_bytes: i64::try_from(memory_limit).unwrap_or(i64::MAX),
                    oom_score_adj: oom_score_adj(&pod.template.spec, spec)?,
                    memory_swap_limit_in_bytes: 0,
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    privileged: spec.security_context.privileged,
                    namespace_options: Some(namespaces(&pod.template.spec)),
                    readonly_rootfs: spec.security_context.read_only_root_filesystem,
                }),
            }),
        })
    }

    /// A volume mount as the kubelet hands it to the runtime: hostPath volumes checked against
    /// their `type` as the kubelet checks them, emptyDir volumes a directory of the pod's on
    /// the node's disk.
    fn mount(&self, pod: &RunningPod, mount: &pod_spec::VolumeMount) -> Result<Mount, LabError> {
        let volume = pod
            .template
            .spec
            .volumes
            .iter()
            .find(|volume| volume.name == mount.name)
            .ok_or_else(|| LabError::Run(format!("no volume named {}", mount.name)))?;
        let host_path = match (&volume.host_path, &volume.empty_dir) {
            (Some(host), _) => {
                let path = self.host_path(&host.path);
                match host.kind.as_deref() {
                    Some("DirectoryOrCreate") => fs::create_dir_all(&path)
                        .map_err(io(format!("creating hostPath {}", path.display())))?,
                    Some("Directory") if !path.is_dir() => {
                        return Err(LabError::Run(format!(
                            "hostPath type check failed: {} is not a directory",
                            path.display()
                        )))
                    }
                    _ => {}
                }
                path
            }
            (None, Some(empty)) if empty.medium.as_deref().unwrap_or("").is_empty() => {
                let path = self.host_path(&format!(
                    "/var/lib/kubelet/pods/{}/volumes/kubernetes.io~empty-dir/{}",
                    pod.uid, volume.name
                ));
                fs::create_dir_all(&path).map_err(io("creating an emptyDir"))?;
                path
            }
            _ => {
                return Err(LabError::Run(format!(
                    "volume {}: only hostPath and disk emptyDir volumes are supported here",
                    volume.name
                )))
            }
        };
        let propagation = match mount.mount_propagation.as_deref() {
            None | Some("None") => MountPropagation::Private,
            Some("HostToContainer") => MountPropagation::HostToContainer,
            Some("Bidirectional") => MountPropagation::Bidirectional,
            Some(other) => return Err(LabError::Run(format!("unknown mountPropagation {other}"))),
        };
        Ok(Mount {
            container_path: mount.mount_path.clone(),
            host_path: host_path.to_string_lossy().into_owned(),
            readonly: mount.read_only,
            propagation: propagation as i32,
        })
    }

    /// The pod's cgroup with the pod's memory limit, made before the sandbox as the kubelet
    /// does (runc makes the containers' below it).
    fn make_pod_cgroup(&self, relative: &str, limit: Option<u64>) -> Result<(), LabError> {
        let path = self.memory.root.join(relative.trim_start_matches('/'));
        if self.memory.version == Version::V2 {
            // Each level down to the pod's must hand the memory controller on.
            let mut level = self.memory.root.clone();
            for component in Path::new(relative.trim_start_matches('/')).components() {
                let _ = fs::write(level.join("cgroup.subtree_control"), "+memory");
                level = level.join(component);
                let _ = fs::create_dir(&level);
            }
        }
        fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        if let Some(limit) = limit {
            fs::write(path.join(self.memory.limit_file()), limit.to_string())
                .map_err(io(format!("limiting {}", path.display())))?;
        }
        Ok(())
    }

    /// Removes a cgroup directory from every hierarchy it was made in (runc makes the
    /// containers' in each v1 controller).
    fn remove_cgroup_dirs(&self, relative: &str) {
        let relative = relative.trim_start_matches('/');
        let roots: Vec<PathBuf> = match self.memory.version {
            Version::V2 => vec![self.memory.root.clone()],
            Version::V1 => {
                let mount = self
                    .memory
                    .root
                    .parent()
                    .unwrap_or(Path::new("/sys/fs/cgroup"));
                fs::read_dir(mount)
                    .map(|entries| entries.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default()
            }
        };
        for root in roots {
            remove_tree(&root.join(relative));
        }
    }
}

/// Removes a cgroup and its children, deepest first (cgroup directories go with rmdir).
fn remove_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}

fn kubelet_labels(namespace: &str, pod: &str, uid: &str) -> HashMap<String, String> {
    HashMap::from([
        ("io.kubernetes.pod.name".into(), pod.to_owned()),
        ("io.kubernetes.pod.namespace".into(), namespace.to_owned()),
        ("io.kubernetes.pod.uid".into(), uid.to_owned()),
    ])
}

/// The kubelet's namespaces: the node's where the pod asks for them; else the network and
/// IPC namespaces are the pod's, and each container has a pid namespace of its own unless the
/// pod shares one (`shareProcessNamespace`, where the sandbox's pause is pid 1).
fn namespaces(spec: &pod_spec::PodSpec) -> NamespaceOption {
    let pod_or_node = |host: bool| match host {
        true => NamespaceMode::Node as i32,
        false => NamespaceMode::Pod as i32,
    };
    let pid = match (spec.host_pid, spec.share_process_namespace) {
        (true, _) => NamespaceMode::Node,
        (false, true) => NamespaceMode::Pod,
        (false, false) => NamespaceMode::Container,
    };
    NamespaceOption {
        network: pod_or_node(spec.host_network),
        pid: pid as i32,
        ipc: pod_or_node(spec.host_ipc),
    }
}

/// The kubelet's QoS class: guaranteed when every container's requests equal its limits for
/// both CPU and memory, best-effort when nothing is requested or limited, else burstable.
fn qos_class(spec: &pod_spec::PodSpec) -> Result<&'static str, LabError> {
    let mut any = false;
    let mut guaranteed = true;
    for container in &spec.containers {
        let resources = &container.resources;
        any |= !resources.requests.is_empty() || !resources.limits.is_empty();
        for resource in ["cpu", "memory"] {
            let limit = resources.limits.get(resource);
            // A request left out defaults to the limit.
            let request = resources.requests.get(resource).or(limit);
            guaranteed &= limit.is_some() && request == limit;
        }
    }
    Ok(match (any, guaranteed) {
        (false, _) => "besteffort",
        (true, true) => "guaranteed",
        (true, false) => "burstable",
    })
}

/// The pod cgroup's memory limit: the sum of its containers', if every one has one.
fn pod_memory_limit(spec: &pod_spec::PodSpec) -> Result<Option<u64>, LabError> {
    let mut total = 0u64;
    for container in &spec.containers {
        let Some(limit) = container.resources.limits.get("memory") else {
            return Ok(None);
        };
        total = total.saturating_add(pod_spec::bytes(&container.name, limit)?);
    }
    Ok(Some(total))
}

/// The kubelet's oom_score_adj: -997 for node-critical pods and guaranteed ones, 1000 for
/// best-effort, and for burstable ones less the larger the memory request is against the
/// node's memory.
fn oom_score_adj(
    pod: &pod_spec::PodSpec,
    container: &pod_spec::Container,
) -> Result<i64, LabError> {
    let critical = matches!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical" | "system-cluster-critical")
    );
    if critical || qos_class(pod)? == "guaranteed" {
        return Ok(-997);
    }
    if qos_class(pod)? == "besteffort" {
        return Ok(1000);
    }
    let request = match container.resources.requests.get("memory") {
        Some(value) => pod_spec::bytes(&container.name, value)?,
        None => 0,
    };
    let capacity = crate::sys::mem_total_bytes().unwrap_or(u64::MAX).max(1);
    let adj =
        1000 - i64::try_from(1000u128 * u128::from(request) / u128::from(capacity)).unwrap_or(1000);
    Ok(adj.clamp(3, 999))
}
