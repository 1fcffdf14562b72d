//! Kubernetes attribution without the API server: which pod and container a memory cgroup
//! belongs to, read from the cgroup path the kubelet chose, then named from the kubelet's log
//! directories on the node (`/var/log/pods`, `/var/log/containers`).
//!
//! The agent must name kills on nodes where it has no credentials, and after the pod is gone,
//! so everything here comes from the node's filesystem and is remembered once learned.
//!
//! Cgroup path shapes understood (relative to the memory hierarchy's root, v1 or v2):
//!
//! ```text
//! cgroupfs driver   [prefix]/kubepods[/burstable|/besteffort]/pod<uid>[/<container>]
//! systemd driver    [prefix]/<S>.slice[/<S>-<qos>.slice]/<S>[-<qos>]-pod<uid_>.slice[/<container>]
//!                   where <S> is `kubepods`, or `<root>-kubepods` under a kubelet --cgroup-root
//!                   (kind: `kubelet.slice/kubelet-kubepods.slice/...`)
//! <container>       [cri-containerd-|crio-|docker-|crio-conmon-]<64 hex>[.scope], then any
//!                   sub-cgroups the container made itself
//! ```
//!
//! `[prefix]` is anything above (`/docker/<id>` for minikube, `/system.slice/docker-<id>.scope`
//! for kind, `/kubelet` for a kubelet `--cgroup-root`). Where several `kubepods` components
//! appear (a cluster running inside a pod) the innermost one names the pod.
//!
//! A sandbox (pause) container's cgroup looks like any other container's; the path cannot tell
//! it apart. It has no log, so [`K8sNames::lookup`] finds its pod but no container name.

use std::{
    collections::HashMap,
    fmt, fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "cannot read {path}: {source}; mount the node's /var/log/pods and /var/log/containers \
         read-only under the --rootfs directory (deploy/daemonset.yaml shows how)"
    )]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pod's QoS class, spelled as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

/// How deep in the pod the cgroup sits. The pod's own cgroup matters on its own: its limit
/// (the sum of the containers' limits) can be the one a kill hit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
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

/// Reads the pod and container out of a memory cgroup path; `None` for cgroups that are not a
/// pod's or inside one (system services, the QoS-level `kubepods` cgroups themselves).
pub fn parse_cgroup_path(path: &str) -> Option<CgroupIdentity> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // Innermost first: a kind cluster inside a pod has the outer pod's components above it,
    // and the kill belongs to the inner one.
    (0..components.len())
        .rev()
        .find_map(|start| parse_from_kubepods(&components[start..]))
}

/// Parses `components` if the first one is the kubelet's top-level `kubepods` cgroup.
fn parse_from_kubepods(components: &[&str]) -> Option<CgroupIdentity> {
    let (&top, below) = components.split_first()?;
    if top == "kubepods" {
        return parse_cgroupfs(below);
    }
    let stem = top.strip_suffix(".slice")?;
    if stem == "kubepods" || stem.ends_with("-kubepods") {
        return parse_systemd(stem, below);
    }
    None
}

fn parse_cgroupfs(below_kubepods: &[&str]) -> Option<CgroupIdentity> {
    let (qos, below_qos) = match below_kubepods.split_first()? {
        (&"burstable", rest) => (QosClass::Burstable, rest),
        (&"besteffort", rest) => (QosClass::BestEffort, rest),
        // Guaranteed pods have no QoS level of their own.
        _ => (QosClass::Guaranteed, below_kubepods),
    };
    let (pod, below_pod) = below_qos.split_first()?;
    let pod_uid = pod.strip_prefix("pod").filter(|uid| is_pod_uid(uid))?;
    Some(CgroupIdentity {
        pod_uid: pod_uid.to_owned(),
        qos,
        driver: CgroupDriver::Cgroupfs,
        level: parse_level(below_pod)?,
    })
}

/// `stem` is the top slice's name without `.slice`; systemd spells each child slice as its
/// parent's name, a dash and its own.
fn parse_systemd(stem: &str, below_kubepods: &[&str]) -> Option<CgroupIdentity> {
    let first = below_kubepods.first().and_then(|c| child_slice(c, stem))?;
    let (qos, pod_slice, below_pod) = match first {
        "burstable" | "besteffort" => {
            let qos = if first == "burstable" {
                QosClass::Burstable
            } else {
                QosClass::BestEffort
            };
            let pod = below_kubepods.get(1)?;
            let pod_slice = child_slice(pod, stem)?
                .strip_prefix(first)?
                .strip_prefix('-')?;
            (qos, pod_slice, below_kubepods.get(2..)?)
        }
        _ => (QosClass::Guaranteed, first, below_kubepods.get(1..)?),
    };
    // A dash separates the slice hierarchy in a unit name, so the kubelet writes the uid's
    // dashes as underscores.
    let pod_uid = pod_slice.strip_prefix("pod")?.replace('_', "-");
    if !is_pod_uid(&pod_uid) {
        return None;
    }
    Some(CgroupIdentity {
        pod_uid,
        qos,
        driver: CgroupDriver::Systemd,
        level: parse_level(below_pod)?,
    })
}

/// `<parent_stem>-<name>.slice` -> `<name>`.
fn child_slice<'a>(component: &'a str, parent_stem: &str) -> Option<&'a str> {
    component
        .strip_suffix(".slice")?
        .strip_prefix(parent_stem)?
        .strip_prefix('-')
}

/// The level from what lies below the pod's cgroup. Sub-cgroups below the container (crun's
/// `container`, a containerised systemd's own tree) still belong to that container.
fn parse_level(below_pod: &[&str]) -> Option<CgroupLevel> {
    let Some(component) = below_pod.first() else {
        return Some(CgroupLevel::Pod);
    };
    let name = component.strip_suffix(".scope").unwrap_or(component);
    // `crio-conmon-` before `crio-`, which it starts with.
    let prefixes = [
        ("crio-conmon-", Runtime::Crio, true),
        ("cri-containerd-", Runtime::Containerd, false),
        ("crio-", Runtime::Crio, false),
        ("docker-", Runtime::Docker, false),
    ];
    let (container_id, runtime, monitor) = prefixes
        .iter()
        .find_map(|&(prefix, runtime, monitor)| {
            name.strip_prefix(prefix).map(|id| (id, runtime, monitor))
        })
        .unwrap_or((name, Runtime::Unknown, false));
    if !is_container_id(container_id) {
        return None;
    }
    let container_id = container_id.to_owned();
    Some(if monitor {
        CgroupLevel::Monitor {
            container_id,
            runtime,
        }
    } else {
        CgroupLevel::Container {
            container_id,
            runtime,
        }
    })
}

/// Every CRI runtime names containers by 256-bit ids in hex.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// UUIDs for API pods, 32 hex digits (an md5) for static pods, whatever a static pod's manifest
/// sets otherwise; the check only keeps other directories from passing for pods.
fn is_pod_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Kubernetes names of a cgroup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    /// `None` for the pod's own cgroup, CRI-O's monitor, and containers without a log (the
    /// sandbox, or one killed before the kubelet linked its log).
    pub container: Option<String>,
}

/// How often a failed lookup may rescan the log directories.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Pods and containers remembered, each. A node runs at most a few hundred pods (the kubelet's
/// `maxPods` defaults to 110), so this keeps thousands of finished ones nameable for a few MB;
/// beyond it the least recently seen tenth is forgotten at once, so the sort runs rarely.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug)]
struct Learned<T> {
    value: T,
    /// The refresh that last saw it on disk.
    last_seen: u64,
}

#[derive(Debug)]
struct PodName {
    namespace: String,
    pod: String,
}

#[derive(Debug)]
struct ContainerName {
    namespace: String,
    pod: String,
    container: String,
}

/// Pod uid and container id to names, from the kubelet's log directories under `rootfs`.
/// Entries outlive their files, so a kill is named after its container was removed.
#[derive(Debug)]
pub struct K8sNames {
    rootfs: PathBuf,
    pods: HashMap<String, Learned<PodName>>,
    containers: HashMap<String, Learned<ContainerName>>,
    generation: u64,
    last_refresh: Option<Instant>,
    max_entries: usize,
}

impl K8sNames {
    /// Scans once; a directory that cannot be read is retried on later misses (call
    /// [`K8sNames::refresh`] to see why it failed).
    pub fn new(rootfs: PathBuf) -> Self {
        let mut names = Self {
            rootfs,
            pods: HashMap::new(),
            containers: HashMap::new(),
            generation: 0,
            last_refresh: None,
            max_entries: MAX_ENTRIES,
        };
        if let Err(err) = names.refresh() {
            log::debug!("{err}");
        }
        names
    }

    /// Rescans `/var/log/pods` and `/var/log/containers` under the rootfs. A missing directory
    /// is not an error (not a Kubernetes node); any other failure to list one is, after the
    /// other has been scanned.
    pub fn refresh(&mut self) -> Result<(), K8sError> {
        self.last_refresh = Some(Instant::now());
        self.generation += 1;
        let pods = self.scan_pod_log_dirs();
        let containers = self.scan_container_log_links();
        self.evict_least_recently_seen();
        pods.and(containers)
    }

    /// Names the cgroup. On a miss, or a container not yet known, rescans (at most once a
    /// second) and tries again. A container-level identity whose pod is known but whose id has
    /// no log gives the pod with `container: None`: most likely the sandbox.
    pub fn lookup(&mut self, identity: &CgroupIdentity) -> Option<PodNames> {
        let cached = self.cached(identity);
        let complete = match (&identity.level, &cached) {
            (CgroupLevel::Container { .. }, Some(names)) => names.container.is_some(),
            (_, found) => found.is_some(),
        };
        let may_refresh = self
            .last_refresh
            .is_none_or(|last| last.elapsed() >= REFRESH_INTERVAL);
        if complete || !may_refresh {
            return cached;
        }
        if let Err(err) = self.refresh() {
            log::debug!("{err}");
        }
        self.cached(identity)
    }

    fn cached(&self, identity: &CgroupIdentity) -> Option<PodNames> {
        if let CgroupLevel::Container { container_id, .. } = &identity.level {
            if let Some(known) = self.containers.get(container_id) {
                let known = &known.value;
                return Some(PodNames {
                    namespace: known.namespace.clone(),
                    pod: known.pod.clone(),
                    container: Some(known.container.clone()),
                });
            }
        }
        let known = &self.pods.get(&identity.pod_uid)?.value;
        Some(PodNames {
            namespace: known.namespace.clone(),
            pod: known.pod.clone(),
            container: None,
        })
    }

    /// `/var/log/pods/<namespace>_<pod>_<uid>/`: one directory per pod the kubelet has run.
    fn scan_pod_log_dirs(&mut self) -> Result<(), K8sError> {
        let dir = self.rootfs.join("var/log/pods");
        for name in list_dir(&dir)? {
            if let Some((uid, pod)) = parse_pod_log_dir(&name) {
                self.learn_pod(uid, pod);
            }
        }
        Ok(())
    }

    /// `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`, symlinks into
    /// `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log`: the only place on the node
    /// that ties a container id to a name. The target also gives the pod's uid when
    /// `/var/log/pods` itself is not mounted; it need not exist, only the link is read.
    fn scan_container_log_links(&mut self) -> Result<(), K8sError> {
        let dir = self.rootfs.join("var/log/containers");
        for name in list_dir(&dir)? {
            let Some((id, container)) = parse_container_log_name(&name) else {
                continue;
            };
            let pod_from_target = fs::read_link(dir.join(&name)).ok().and_then(|target| {
                let pod_dir = target.parent()?.parent()?.file_name()?.to_str()?;
                parse_pod_log_dir(pod_dir)
            });
            if let Some((uid, pod)) = pod_from_target {
                self.learn_pod(uid, pod);
            }
            self.containers.insert(
                id,
                Learned {
                    value: container,
                    last_seen: self.generation,
                },
            );
        }
        Ok(())
    }

    fn learn_pod(&mut self, uid: String, pod: PodName) {
        self.pods.insert(
            uid,
            Learned {
                value: pod,
                last_seen: self.generation,
            },
        );
    }

    fn evict_least_recently_seen(&mut self) {
        evict_least_recently_seen(&mut self.pods, self.max_entries);
        evict_least_recently_seen(&mut self.containers, self.max_entries);
    }
}

fn evict_least_recently_seen<T>(map: &mut HashMap<String, Learned<T>>, max_entries: usize) {
    if map.len() <= max_entries {
        return;
    }
    let keep = max_entries - max_entries / 10;
    let mut by_age: Vec<(u64, String)> = map
        .iter()
        .map(|(key, learned)| (learned.last_seen, key.clone()))
        .collect();
    by_age.sort_unstable();
    let excess = map.len() - keep;
    for (_, key) in by_age.into_iter().take(excess) {
        map.remove(&key);
    }
}

/// File names in `dir`; none if it does not exist.
fn list_dir(dir: &Path) -> Result<Vec<String>, K8sError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(K8sError::ReadDir {
                path: dir.to_owned(),
                source,
            })
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect())
}

/// `<namespace>_<pod>_<uid>` -> (uid, names). Namespace and pod names are DNS names without
/// `_`, so the first two underscores are the separators and the uid is the rest.
fn parse_pod_log_dir(name: &str) -> Option<(String, PodName)> {
    let mut parts = name.splitn(3, '_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if namespace.is_empty() || pod.is_empty() || !is_pod_uid(uid) {
        return None;
    }
    Some((
        uid.to_owned(),
        PodName {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        },
    ))
}

/// `<pod>_<namespace>_<container>-<id>.log` -> (id, names). Container names may hold dashes,
/// so the id is cut from the end.
fn parse_container_log_name(name: &str) -> Option<(String, ContainerName)> {
    let stem = name.strip_suffix(".log")?;
    let id_start = stem.len().checked_sub(64)?;
    let id = stem.get(id_start..)?;
    let names = stem.get(..id_start)?.strip_suffix('-')?;
    if !is_container_id(id) {
        return None;
    }
    let mut parts = names.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    if pod.is_empty() || namespace.is_empty() || container.is_empty() || container.contains('_') {
        return None;
    }
    Some((
        id.to_owned(),
        ContainerName {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: container.to_owned(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const UID_SYSTEMD: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";
    const ID: &str = "3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829";
    const OTHER_ID: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn container(runtime: Runtime) -> CgroupLevel {
        CgroupLevel::Container {
            container_id: ID.into(),
            runtime,
        }
    }

    fn identity(qos: QosClass, driver: CgroupDriver, level: CgroupLevel) -> CgroupIdentity {
        CgroupIdentity {
            pod_uid: UID.into(),
            qos,
            driver,
            level,
        }
    }

    fn parse(path: &str) -> CgroupIdentity {
        parse_cgroup_path(path).unwrap_or_else(|| panic!("{path} should parse"))
    }

    #[test]
    fn cgroupfs_burstable_and_besteffort_containers_and_pods() {
        use CgroupDriver::Cgroupfs;
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            identity(QosClass::Burstable, Cgroupfs, container(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
            identity(QosClass::BestEffort, Cgroupfs, container(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}")),
            identity(QosClass::Burstable, Cgroupfs, CgroupLevel::Pod)
        );
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{UID}/")),
            identity(QosClass::BestEffort, Cgroupfs, CgroupLevel::Pod)
        );
    }

    #[test]
    fn cgroupfs_guaranteed_sits_under_kubepods() {
        use CgroupDriver::Cgroupfs;
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/{ID}")),
            identity(QosClass::Guaranteed, Cgroupfs, container(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}")),
            identity(QosClass::Guaranteed, Cgroupfs, CgroupLevel::Pod)
        );
    }

    #[test]
    fn cgroupfs_below_any_prefix() {
        for prefix in [
            "/kubelet",
            "/docker/1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a",
            "/system.slice/docker-1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a.scope",
            "/system.slice/containerd.service",
        ] {
            assert_eq!(
                parse(&format!("{prefix}/kubepods/burstable/pod{UID}/{ID}")),
                identity(
                    QosClass::Burstable,
                    CgroupDriver::Cgroupfs,
                    container(Runtime::Unknown)
                ),
                "{prefix}"
            );
        }
    }

    #[test]
    fn cgroupfs_crio_names_its_runtime_and_monitor() {
        let found = parse(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}"));
        assert_eq!(found.level, container(Runtime::Crio));
        let monitor = parse(&format!("/kubepods/besteffort/pod{UID}/crio-conmon-{ID}"));
        assert_eq!(
            monitor.level,
            CgroupLevel::Monitor {
                container_id: ID.into(),
                runtime: Runtime::Crio
            }
        );
        assert_eq!(monitor.container_id(), Some(ID));
        assert_eq!(monitor.runtime(), Some(Runtime::Crio));
    }

    #[test]
    fn systemd_each_runtime_and_qos() {
        use CgroupDriver::Systemd;
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
                ),
                QosClass::Burstable,
                Runtime::Containerd,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
                ),
                QosClass::BestEffort,
                Runtime::Crio,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"),
                QosClass::Guaranteed,
                Runtime::Docker,
            ),
        ];
        for (path, qos, runtime) in cases {
            let found = parse(&path);
            assert_eq!(found, identity(qos, Systemd, container(runtime)), "{path}");
            assert_eq!(found.pod_uid, UID, "underscores back to dashes");
        }
    }

    #[test]
    fn systemd_pod_level_and_monitor() {
        use CgroupDriver::Systemd;
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
            )),
            identity(QosClass::Burstable, Systemd, CgroupLevel::Pod)
        );
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/")),
            identity(QosClass::Guaranteed, Systemd, CgroupLevel::Pod)
        );
        let monitor = parse(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope"
        ));
        assert!(matches!(monitor.level, CgroupLevel::Monitor { .. }));
    }

    #[test]
    fn systemd_under_a_kubelet_cgroup_root_inside_kind() {
        let path = format!(
            "/system.slice/docker-{OTHER_ID}.scope/kubelet.slice/kubelet-kubepods.slice/\
             kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_SYSTEMD}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse(&path),
            identity(
                QosClass::Burstable,
                CgroupDriver::Systemd,
                container(Runtime::Containerd)
            )
        );
    }

    #[test]
    fn sub_cgroups_of_a_container_belong_to_it() {
        let found = parse(&format!(
            "/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-{ID}.scope/container"
        ));
        assert_eq!(found.level, container(Runtime::Crio));
        let found = parse(&format!("/kubepods/pod{UID}/{ID}/init.scope"));
        assert_eq!(found.container_id(), Some(ID));
    }

    #[test]
    fn innermost_pod_wins_when_clusters_nest() {
        let inner_uid = "11111111-2222-3333-4444-555555555555";
        let found = parse(&format!(
            "/kubepods/burstable/pod{UID}/{OTHER_ID}/kubelet/kubepods/besteffort/pod{inner_uid}/{ID}"
        ));
        assert_eq!(found.pod_uid, inner_uid);
        assert_eq!(found.qos, QosClass::BestEffort);
        assert_eq!(found.container_id(), Some(ID));
    }

    #[test]
    fn static_pod_uids_are_plain_hex() {
        let uid = "6d4e8c3c0e8b7f1a3f9a2b1c0d9e8f7a";
        let found = parse(&format!("/kubepods/burstable/pod{uid}/{ID}"));
        assert_eq!(found.pod_uid, uid);
    }

    #[test]
    fn rejects_paths_that_are_not_a_pod() {
        for path in [
            "/".to_owned(),
            String::new(),
            "/system.slice/sshd.service".to_owned(),
            "/user.slice/user-1000.slice/session-2.scope".to_owned(),
            "/kubepods".to_owned(),
            "/kubepods/burstable".to_owned(),
            "/kubepods.slice".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            format!("/kubepods/burstable/pod{UID}/not-a-container"),
            format!("/kubepods/burstable/pod{UID}/{}", &ID[..63]),
            format!("/kubepods/burstable/pod{UID}/{}g", &ID[..63]),
            format!("/kubepods/burstable/pod{UID}/containerd-{ID}"),
            "/kubepods/burstable/pod".to_owned(),
            format!("/kubepods/guaranteed/pod{UID}"),
            format!("/kubepods/burstable/pod{UID}.weird/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"
            ),
            format!("/mykubepods.slice/mykubepods-pod{UID_SYSTEMD}.slice"),
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/session-1.scope"),
            format!("/kubepods.slice/other-pod{UID_SYSTEMD}.slice"),
        ] {
            assert_eq!(parse_cgroup_path(&path), None, "{path:?}");
        }
    }

    #[test]
    fn serializes_level_flat() {
        let found = parse(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
        let json = serde_json::to_value(&found).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({
                "pod_uid": UID,
                "qos": "Burstable",
                "driver": "cgroupfs",
                "level": "container",
                "container_id": ID,
                "runtime": "crio",
            })
        );
        assert_eq!(QosClass::BestEffort.to_string(), "BestEffort");
        assert_eq!(Runtime::Containerd.to_string(), "containerd");
    }

    /// A throwaway rootfs under the temp dir, removed on drop even when the test fails.
    struct Rootfs(PathBuf);

    impl Rootfs {
        fn new(test: &str) -> Self {
            let path = std::env::temp_dir().join(format!("leak-k8s-{test}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(path.join("var/log/pods")).expect("mkdir pods");
            fs::create_dir_all(path.join("var/log/containers")).expect("mkdir containers");
            Self(path)
        }

        fn pod_dir(&self, namespace: &str, pod: &str, uid: &str, containers: &[&str]) {
            let dir = self
                .0
                .join("var/log/pods")
                .join(format!("{namespace}_{pod}_{uid}"));
            for container in containers {
                fs::create_dir_all(dir.join(container)).expect("mkdir container log dir");
            }
            fs::create_dir_all(&dir).expect("mkdir pod log dir");
        }

        fn container_link(&self, namespace: &str, pod: &str, uid: &str, container: &str, id: &str) {
            let link = self.container_link_path(namespace, pod, container, id);
            let target = format!("/var/log/pods/{namespace}_{pod}_{uid}/{container}/0.log");
            std::os::unix::fs::symlink(target, link).expect("symlink");
        }

        fn container_link_path(
            &self,
            namespace: &str,
            pod: &str,
            container: &str,
            id: &str,
        ) -> PathBuf {
            self.0
                .join("var/log/containers")
                .join(format!("{pod}_{namespace}_{container}-{id}.log"))
        }

        fn names(&self) -> K8sNames {
            K8sNames::new(self.0.clone())
        }
    }

    impl Drop for Rootfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn pod_names(namespace: &str, pod: &str, container: Option<&str>) -> Option<PodNames> {
        Some(PodNames {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.map(Into::into),
        })
    }

    fn pod_level() -> CgroupIdentity {
        identity(
            QosClass::Burstable,
            CgroupDriver::Cgroupfs,
            CgroupLevel::Pod,
        )
    }

    fn container_level(id: &str) -> CgroupIdentity {
        identity(
            QosClass::Burstable,
            CgroupDriver::Cgroupfs,
            CgroupLevel::Container {
                container_id: id.into(),
                runtime: Runtime::Unknown,
            },
        )
    }

    #[test]
    fn names_pods_and_containers_with_dashes() {
        let rootfs = Rootfs::new("both-layouts");
        rootfs.pod_dir(
            "leak-demo",
            "leak-file-7d9c8b-x2x4z",
            UID,
            &["leak-file", "side-car"],
        );
        rootfs.container_link("leak-demo", "leak-file-7d9c8b-x2x4z", UID, "side-car", ID);
        let mut names = rootfs.names();
        assert_eq!(
            names.lookup(&pod_level()),
            pod_names("leak-demo", "leak-file-7d9c8b-x2x4z", None)
        );
        assert_eq!(
            names.lookup(&container_level(ID)),
            pod_names("leak-demo", "leak-file-7d9c8b-x2x4z", Some("side-car"))
        );
    }

    #[test]
    fn container_without_log_names_its_pod_only() {
        let rootfs = Rootfs::new("sandbox");
        rootfs.pod_dir("default", "web", UID, &["nginx"]);
        rootfs.container_link("default", "web", UID, "nginx", ID);
        let mut names = rootfs.names();
        assert_eq!(
            names.lookup(&container_level(OTHER_ID)),
            pod_names("default", "web", None),
            "the pause container has no log"
        );
        let monitor = identity(
            QosClass::Burstable,
            CgroupDriver::Systemd,
            CgroupLevel::Monitor {
                container_id: ID.into(),
                runtime: Runtime::Crio,
            },
        );
        assert_eq!(names.lookup(&monitor), pod_names("default", "web", None));
    }

    #[test]
    fn vanished_container_still_resolves() {
        let rootfs = Rootfs::new("vanished");
        rootfs.pod_dir("default", "web", UID, &["nginx"]);
        rootfs.container_link("default", "web", UID, "nginx", ID);
        let mut names = rootfs.names();
        fs::remove_dir_all(rootfs.0.join("var/log/pods")).expect("rm pods");
        fs::remove_file(rootfs.container_link_path("default", "web", "nginx", ID))
            .expect("rm link");
        names.refresh().expect("refresh");
        assert_eq!(
            names.lookup(&container_level(ID)),
            pod_names("default", "web", Some("nginx"))
        );
        assert_eq!(
            names.lookup(&pod_level()),
            pod_names("default", "web", None)
        );
    }

    #[test]
    fn pod_learned_from_link_target_alone() {
        let rootfs = Rootfs::new("link-target");
        rootfs.container_link(
            "kube-system",
            "coredns-5d78c9869d-abcde",
            UID,
            "coredns",
            ID,
        );
        let mut names = rootfs.names();
        assert_eq!(
            names.lookup(&pod_level()),
            pod_names("kube-system", "coredns-5d78c9869d-abcde", None)
        );
    }

    #[test]
    fn malformed_entries_are_ignored() {
        let rootfs = Rootfs::new("malformed");
        let pods = rootfs.0.join("var/log/pods");
        for bad in [
            "no-underscores",
            "ns_pod",
            "_pod_uid",
            "ns__uid",
            "ns_pod_",
            "ns_pod_bad.uid",
        ] {
            fs::create_dir_all(pods.join(bad)).expect("mkdir bad pod dir");
        }
        fs::write(pods.join("stray-file"), b"").expect("stray file");
        let containers = rootfs.0.join("var/log/containers");
        for bad in [
            format!("pod_ns_c-{ID}"),
            format!("pod_ns_c-{ID}.txt"),
            format!("pod_ns_c{ID}.log"),
            format!("pod_ns_c-{}.log", &ID[1..]),
            format!("pod_ns_c-{}z.log", &ID[1..]),
            format!("pod_ns-{ID}.log"),
            format!("_ns_c-{ID}.log"),
            format!("pod__c-{ID}.log"),
            format!("pod_ns_-{ID}.log"),
            format!("pod_ns_c_d-{ID}.log"),
            format!("-{ID}.log"),
            "short.log".to_owned(),
        ] {
            fs::write(containers.join(bad), b"").expect("bad container log");
        }
        rootfs.pod_dir("good", "pod", UID, &["c"]);
        rootfs.container_link("good", "pod", UID, "c", OTHER_ID);
        let names = rootfs.names();
        assert_eq!(names.pods.len(), 1, "{:?}", names.pods);
        assert_eq!(names.containers.len(), 1, "{:?}", names.containers);
        assert!(names.containers.contains_key(OTHER_ID));
        assert!(parse_pod_log_dir("ns_pod_uid_with_underscore").is_none());
    }

    #[test]
    fn misses_rescan_at_most_once_a_second() {
        let rootfs = Rootfs::new("rate-limit");
        let mut names = rootfs.names();
        assert_eq!(names.lookup(&pod_level()), None);
        rootfs.pod_dir("default", "late", UID, &["app"]);
        assert_eq!(
            names.lookup(&pod_level()),
            None,
            "scanned less than a second ago"
        );
        names.last_refresh = Instant::now().checked_sub(REFRESH_INTERVAL);
        assert_eq!(
            names.lookup(&pod_level()),
            pod_names("default", "late", None)
        );
        rootfs.container_link("default", "late", UID, "app", ID);
        names.last_refresh = None;
        assert_eq!(
            names.lookup(&container_level(ID)),
            pod_names("default", "late", Some("app")),
            "a known pod with an unknown container still rescans"
        );
    }

    #[test]
    fn evicts_least_recently_seen_beyond_the_cap() {
        let rootfs = Rootfs::new("evict");
        let mut names = rootfs.names();
        names.max_entries = 10;
        for n in 0..10 {
            rootfs.pod_dir("ns", &format!("old-{n}"), &format!("old-{n}"), &[]);
        }
        names.refresh().expect("refresh");
        assert_eq!(names.pods.len(), 10);
        fs::remove_dir_all(rootfs.0.join("var/log/pods")).expect("rm pods");
        rootfs.pod_dir("ns", "new", "new", &[]);
        names.refresh().expect("refresh");
        assert_eq!(names.pods.len(), 9, "down to the cap less a tenth");
        assert!(
            names.pods.contains_key("new"),
            "the one still on disk stays"
        );
    }

    #[test]
    fn missing_directories_are_not_an_error_but_unreadable_ones_are() {
        let rootfs = Rootfs::new("errors");
        fs::remove_dir_all(rootfs.0.join("var/log")).expect("rm log");
        let mut names = rootfs.names();
        names.refresh().expect("not a Kubernetes node");
        assert_eq!(names.lookup(&pod_level()), None);
        fs::create_dir_all(rootfs.0.join("var/log")).expect("mkdir log");
        fs::write(rootfs.0.join("var/log/pods"), b"").expect("file instead of dir");
        let err = names.refresh().expect_err("a file is not a directory");
        assert!(err.to_string().contains("--rootfs"), "{err}");
    }
}

/// The Kubernetes side of a kill, as served in `/kills`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attribution {
    pub pod_uid: String,
    pub qos_class: QosClass,
    pub driver: CgroupDriver,
    /// `pod` when the victim's cgroup is the pod's own, `container` or `monitor` otherwise.
    pub level: &'static str,
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// Names of the cgroup that hit its limit, when it is a pod's or a container's (the pod's
    /// limit can be the one hit).
    pub oom_pod: Option<String>,
    pub oom_container: Option<String>,
    /// The cgroup that hit its limit is the pod's own rather than a container's.
    pub pod_limit_hit: bool,
}

/// Fills a kill's Kubernetes names from its cgroup paths; kills outside Kubernetes keep empty
/// names.
pub fn attribute(kill: &mut crate::events::Kill, names: &mut K8sNames) {
    let Some(identity) = parse_cgroup_path(&kill.cgroup) else {
        return;
    };
    let found = names.lookup(&identity);
    let oom_identity = kill.oom_cgroup.as_deref().and_then(parse_cgroup_path);
    let oom_names = oom_identity.as_ref().and_then(|oom| names.lookup(oom));
    if let Some(found) = &found {
        kill.namespace = found.namespace.clone();
        kill.pod = found.pod.clone();
        kill.container = found.container.clone().unwrap_or_default();
    }
    kill.kubernetes = Some(Attribution {
        pod_uid: identity.pod_uid.clone(),
        qos_class: identity.qos,
        driver: identity.driver,
        level: match identity.level {
            CgroupLevel::Pod => "pod",
            CgroupLevel::Container { .. } => "container",
            CgroupLevel::Monitor { .. } => "monitor",
        },
        container_id: identity.container_id().map(str::to_owned),
        runtime: identity.runtime(),
        oom_pod: oom_names.as_ref().map(|n| n.pod.clone()),
        oom_container: oom_names.as_ref().and_then(|n| n.container.clone()),
        pod_limit_hit: oom_identity.is_some_and(|oom| oom.level == CgroupLevel::Pod),
    });
}
