//! The Kubernetes identity of a memory cgroup: what the kubelet's cgroup path says (pod uid,
//! QoS class, driver, level, runtime) and the names the node gives it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The pod's QoS class, spelled as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The container runtime, when the cgroup name says it. With the cgroupfs driver containerd
/// and Docker name the cgroup by the bare id, hence `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::Crio => "crio",
            Self::Docker => "docker",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kubelet's `--cgroup-driver`, which decides the path's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

/// How deep in the pod the cgroup sits. The pod's own cgroup matters on its own: its limit
/// (the sum of the containers' limits) can be the one a kill hit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case")]
pub enum CgroupLevel {
    /// The pod's cgroup itself.
    Pod,
    /// A container's cgroup, or a sub-cgroup the container created inside it.
    Container {
        container_id: String,
        runtime: Runtime,
    },
    /// CRI-O's per-container monitor (`crio-conmon-<id>`), which runs in the pod's memory
    /// budget but is not the container: `container_id` is the container it watches.
    Monitor {
        container_id: String,
        runtime: Runtime,
    },
}

/// What a kubelet-made cgroup path says about its pod and container.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CgroupIdentity {
    /// With dashes, as the API server shows it, whatever the driver.
    pub pod_uid: String,
    pub qos: QosClass,
    pub driver: CgroupDriver,
    #[serde(flatten)]
    pub level: CgroupLevel,
}

impl CgroupIdentity {
    /// The container (or, for a monitor, the watched container), 64 hex digits.
    pub fn container_id(&self) -> Option<&str> {
        match &self.level {
            CgroupLevel::Pod => None,
            CgroupLevel::Container { container_id, .. }
            | CgroupLevel::Monitor { container_id, .. } => Some(container_id),
        }
    }

    pub fn runtime(&self) -> Option<Runtime> {
        match &self.level {
            CgroupLevel::Pod => None,
            CgroupLevel::Container { runtime, .. } | CgroupLevel::Monitor { runtime, .. } => {
                Some(*runtime)
            }
        }
    }
}

impl CgroupLevel {
    pub fn kind(&self) -> LevelKind {
        match self {
            Self::Pod => LevelKind::Pod,
            Self::Container { .. } => LevelKind::Container,
            Self::Monitor { .. } => LevelKind::Monitor,
        }
    }
}

/// [`CgroupLevel`] without its data, as `/kills` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LevelKind {
    Pod,
    Container,
    Monitor,
}

/// Kubernetes names of a cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    /// `None` for the pod's own cgroup, CRI-O's monitor, and containers without a log (the
    /// sandbox, or one killed before the kubelet linked its log).
    pub container: Option<String>,
}

/// The Kubernetes side of a kill, as served in `/kills` under `kubernetes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesKill {
    pub pod_uid: String,
    pub qos_class: QosClass,
    pub driver: CgroupDriver,
    /// `pod` when the victim's cgroup is the pod's own, `container` or `monitor` otherwise.
    pub level: LevelKind,
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// Names of the cgroup that hit its limit, when it is a pod's or a container's (the pod's
    /// limit can be the one hit).
    pub oom_pod: Option<String>,
    pub oom_container: Option<String>,
    /// The cgroup that hit its limit is the pod's own rather than a container's.
    pub pod_limit_hit: bool,
}

/// The workload a cgroup belongs to, as labels and `/kills` keys name it; empty strings
/// outside Kubernetes (or before the node named the pod).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkloadNames {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl From<PodNames> for WorkloadNames {
    fn from(names: PodNames) -> Self {
        Self {
            namespace: names.namespace,
            pod: names.pod,
            container: names.container.unwrap_or_default(),
        }
    }
}

/// The labels of a cgroup's series on `/metrics`: its path and its workload's names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupLabels {
    pub cgroup: String,
    pub names: WorkloadNames,
}
