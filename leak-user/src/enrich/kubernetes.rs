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
//! appear (a cluster running inside a pod) the innermost one names the pod. The prefix also
//! tells the node: one run as a container keeps its log directories in that container's root
//! filesystem ([`super::node`]).
//!
//! A sandbox (pause) container's cgroup looks like any other container's; the path cannot tell
//! it apart. It has no log, so [`K8sNames::lookup`] finds its pod but no container name.
//!
//! Where the log directories do not name a container (not mounted, rotated away, a runtime
//! that writes none), the runtime is asked through its CRI socket ([`CriNames`]), once per id.

use std::{
    collections::HashMap,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::cri::CriNames;
use crate::model::{
    kill::Kill,
    kubernetes::{
        CgroupDriver, CgroupIdentity, CgroupLevel, KubernetesKill, PodNames, QosClass, Runtime,
    },
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

/// Reads the pod and container out of a memory cgroup path; `None` for cgroups that are not a
/// pod's or inside one (system services, the QoS-level `kubepods` cgroups themselves).
pub fn parse_cgroup_path(path: &str) -> Option<CgroupIdentity> {
    locate(path).map(|(_, _, identity)| identity)
}

/// Where the pod's `kubepods` cgroup sits: the path above it (`/docker/<id>`; empty when it is
/// at the hierarchy's root) and its own name; `None` where [`parse_cgroup_path`] finds no pod.
pub fn kubepods_parent(path: &str) -> Option<(String, &str)> {
    let (components, start, _) = locate(path)?;
    let prefix = match start {
        0 => String::new(),
        _ => format!("/{}", components[..start].join("/")),
    };
    Some((prefix, components[start]))
}

/// The path's components, where the pod's `kubepods` component is, and the pod.
fn locate(path: &str) -> Option<(Vec<&str>, usize, CgroupIdentity)> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // Innermost first: a kind cluster inside a pod has the outer pod's components above it,
    // and the kill belongs to the inner one.
    let (start, identity) = (0..components.len())
        .rev()
        .find_map(|start| Some((start, parse_from_kubepods(&components[start..])?)))?;
    Some((components, start, identity))
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

/// How often a failed lookup may rescan the log directories.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How often the runtime may be asked about the same id it could not name.
const CRI_RETRY_INTERVAL: Duration = Duration::from_secs(10);

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
    /// `None` while there is no file system to read (a node container that is gone).
    rootfs: Option<PathBuf>,
    pods: HashMap<String, Learned<PodName>>,
    containers: HashMap<String, Learned<ContainerName>>,
    generation: u64,
    last_refresh: Option<Instant>,
    max_entries: usize,
    cri: Option<CriNames>,
    /// Ids the runtime could not name, and when it was last asked.
    cri_unnamed: HashMap<String, Instant>,
    /// Why the last rescan failed, already warned about.
    refresh_failing: Option<String>,
}

impl K8sNames {
    /// Scans once; a directory that cannot be read is retried on later misses (call
    /// [`K8sNames::refresh`] to see why it failed).
    pub fn new(rootfs: PathBuf) -> Self {
        let mut names = Self::unrooted();
        names.rootfs = Some(rootfs);
        if let Err(err) = names.refresh() {
            log::debug!("{err}");
        }
        names
    }

    /// Names with nothing to read yet ([`K8sNames::set_rootfs`] gives the root); not scanned.
    pub fn unrooted() -> Self {
        Self {
            rootfs: None,
            pods: HashMap::new(),
            containers: HashMap::new(),
            generation: 0,
            last_refresh: None,
            max_entries: MAX_ENTRIES,
            cri: None,
            cri_unnamed: HashMap::new(),
            refresh_failing: None,
        }
    }

    /// Where the next refreshes read; what was learned is kept.
    pub fn set_rootfs(&mut self, rootfs: Option<PathBuf>) {
        self.rootfs = rootfs;
    }

    /// Asks `cri` for the names the log directories do not give.
    pub fn with_cri(mut self, cri: CriNames) -> Self {
        self.cri = Some(cri);
        self
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
        if complete(identity, &cached) {
            return cached;
        }
        if self.refresh_due() {
            // A tree that breaks while the agent runs (unmounted, unreadable) is worth one
            // warning, not one per kill.
            match self.refresh() {
                Ok(()) => self.refresh_failing = None,
                Err(err) => {
                    let text = err.to_string();
                    if self.refresh_failing.as_deref() != Some(text.as_str()) {
                        log::warn!("{text}; kills stay unnamed until it can be read");
                        self.refresh_failing = Some(text);
                    }
                }
            }
        }
        let found = self.cached(identity);
        if found
            .as_ref()
            .is_some_and(|names| names.container.is_some())
        {
            return found;
        }
        self.ask_runtime(identity);
        self.cached(identity).or(found)
    }

    /// Whether the names of `identity` are known, all of them; no lookup of it would rescan.
    pub fn knows(&self, identity: &CgroupIdentity) -> bool {
        complete(identity, &self.cached(identity))
    }

    /// Whether a lookup that misses would rescan now (at most once a second).
    pub fn refresh_due(&self) -> bool {
        self.last_refresh
            .is_none_or(|last| last.elapsed() >= REFRESH_INTERVAL)
    }

    /// Lets the next lookup that misses rescan at once.
    #[cfg(test)]
    pub(super) fn expire_refresh(&mut self) {
        self.last_refresh = None;
    }

    /// Learns the names of the identity's container (or sandbox) from the runtime. The
    /// container's own id is what the runtime knows; a pod-level cgroup has none.
    fn ask_runtime(&mut self, identity: &CgroupIdentity) {
        let (Some(cri), CgroupLevel::Container { container_id, .. }) =
            (self.cri.as_mut(), &identity.level)
        else {
            return;
        };
        if self
            .cri_unnamed
            .get(container_id)
            .is_some_and(|asked| asked.elapsed() < CRI_RETRY_INTERVAL)
        {
            return;
        }
        let Some(names) = cri.lookup(container_id) else {
            if self.cri_unnamed.len() >= self.max_entries {
                self.cri_unnamed.clear();
            }
            self.cri_unnamed
                .insert(container_id.clone(), Instant::now());
            return;
        };
        self.cri_unnamed.remove(container_id);
        let pod = PodName {
            namespace: names.namespace.clone(),
            pod: names.pod.clone(),
        };
        // The cgroup path's uid, not the runtime's: they agree for pods the kubelet made, and
        // the path is what later lookups key on.
        self.learn_pod(identity.pod_uid.clone(), pod);
        match names.container {
            Some(container) => {
                self.containers.insert(
                    container_id.clone(),
                    Learned {
                        value: ContainerName {
                            namespace: names.namespace,
                            pod: names.pod,
                            container,
                        },
                        last_seen: self.generation,
                    },
                );
            }
            // A sandbox: its pod is named, and it is not asked about again.
            None => {
                self.cri_unnamed
                    .insert(container_id.clone(), Instant::now());
            }
        }
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
        let Some(dir) = self.rootfs.as_ref().map(|root| root.join("var/log/pods")) else {
            return Ok(());
        };
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
        let Some(dir) = self
            .rootfs
            .as_ref()
            .map(|root| root.join("var/log/containers"))
        else {
            return Ok(());
        };
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

/// Whether `found` names all that `identity` can be named: a container-level cgroup its
/// container too.
pub fn complete(identity: &CgroupIdentity, found: &Option<PodNames>) -> bool {
    match (&identity.level, found) {
        (CgroupLevel::Container { .. }, Some(names)) => names.container.is_some(),
        (_, found) => found.is_some(),
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

/// Fills a kill's Kubernetes names from its cgroup paths, each named by `names` (given the
/// path and what it says); kills outside Kubernetes keep empty names.
pub fn attribute(
    kill: &mut Kill,
    mut names: impl FnMut(&str, &CgroupIdentity) -> Option<PodNames>,
) {
    let Some(identity) = parse_cgroup_path(&kill.cgroup) else {
        return;
    };
    let found = names(&kill.cgroup, &identity);
    let oom_cgroup = kill.oom_cgroup.as_deref();
    let oom_identity = oom_cgroup.and_then(parse_cgroup_path);
    let oom_names = oom_cgroup
        .zip(oom_identity.as_ref())
        .and_then(|(path, oom)| names(path, oom));
    if let Some(found) = found {
        kill.names = found.into();
    }
    kill.kubernetes = Some(KubernetesKill {
        pod_uid: identity.pod_uid.clone(),
        qos_class: identity.qos,
        driver: identity.driver,
        level: identity.level.kind(),
        container_id: identity.container_id().map(str::to_owned),
        runtime: identity.runtime(),
        oom_pod: oom_names.as_ref().map(|n| n.pod.clone()),
        oom_container: oom_names.as_ref().and_then(|n| n.container.clone()),
        pod_limit_hit: oom_identity.is_some_and(|oom| oom.level == CgroupLevel::Pod),
    });
}

#[cfg(test)]
#[path = "kubernetes_tests.rs"]
mod tests;
