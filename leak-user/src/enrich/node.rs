//! A Kubernetes node run as a container (minikube's docker driver, kind): the pods' cgroups
//! sit under the node container's cgroup, and the kubelet's log directories are in the node
//! container's root filesystem. An agent outside it (on the host, or in a hostPID pod of the
//! host) reads them through `/proc/<pid>/root` of a process of that container.
//!
//! The path above a pod's `kubepods` cgroup (its prefix, [`kubepods_parent`]) tells the node.
//! An empty prefix is the agent's own node, named from `--rootfs`. Otherwise the node is found
//! by its processes: the nearest cgroup, from the prefix upwards, whose subtree holds a live
//! process outside the `kubepods` subtree (kind's node keeps its processes in sub-cgroups such
//! as `init.scope`, and the `kubelet.slice` above its `kubelet-kubepods.slice` may have none).
//! Reaching the hierarchy's root without one, or finding one in the agent's own mount
//! namespace, means a kubelet `--cgroup-root` on the agent's own node: `--rootfs` again.
//! Otherwise the first of those processes whose root holds `var/log/pods` gives the node's root.
//!
//! Each node keeps its own names ([`K8sNames`]), so what was learned while it ran still names
//! kills after it is gone. Its process is checked (alive, and the same start time: pids are
//! reused) only when a lookup misses and may rescan, at most once a second, and replaced from
//! the node's cgroup when it ended. Pod uids and container ids are unique, so another node's
//! tree can never give wrong names, only none. Whatever fails is a warning, once per node, and
//! the kill is served without names; what a node's names miss is also asked of `--rootfs`'s.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use super::kubernetes::{complete, kubepods_parent, K8sNames};
use crate::model::kubernetes::{CgroupIdentity, PodNames};

/// Nodes (prefixes) remembered; the pods of any beyond are named from `--rootfs` alone.
const MAX_NODES: usize = 256;
/// Cgroups read when looking for a node's processes, and how far below the level looked at.
const MAX_SEARCHED_CGROUPS: usize = 512;
const MAX_SEARCH_DEPTH: usize = 8;
/// Processes tried for a root filesystem that holds the log directories.
const MAX_CANDIDATES: usize = 64;

/// Pod names per node: `--rootfs`'s for the agent's own node, each node container's from its
/// root filesystem.
#[derive(Debug)]
pub struct NodeNames {
    host: K8sNames,
    nodes: HashMap<String, Node>,
    /// Where prefixes are looked up; without a memory hierarchy every pod is the host's.
    memory_root: Option<PathBuf>,
    proc_root: PathBuf,
    warned_full: bool,
}

#[derive(Debug)]
enum Node {
    /// A prefix on the agent's own node: a kubelet `--cgroup-root`.
    Own,
    Container(Box<ContainerNode>),
}

#[derive(Debug)]
struct ContainerNode {
    root: NodeRoot,
    names: K8sNames,
}

impl NodeNames {
    /// `host` names the agent's own node (from `--rootfs`, and its runtime); `memory_root` is
    /// the memory hierarchy's root directory, `proc_root` procfs (`/proc`).
    pub fn new(host: K8sNames, memory_root: Option<PathBuf>, proc_root: PathBuf) -> Self {
        Self {
            host,
            nodes: HashMap::new(),
            memory_root,
            proc_root,
            warned_full: false,
        }
    }

    /// Names the pod of the cgroup at `path` (which reads as `identity`): from its node's log
    /// directories, and what those miss from `--rootfs`'s and the runtime's.
    pub fn lookup(&mut self, path: &str, identity: &CgroupIdentity) -> Option<PodNames> {
        let from_node = self.node(path).and_then(|node| node.lookup(identity));
        if complete(identity, &from_node) {
            return from_node;
        }
        let from_host = self.host.lookup(identity);
        if complete(identity, &from_host) {
            return from_host;
        }
        from_node.or(from_host)
    }

    /// The node container the cgroup at `path` belongs to; `None` for the agent's own node.
    fn node(&mut self, path: &str) -> Option<&mut ContainerNode> {
        let (prefix, kubepods) = kubepods_parent(path)?;
        let memory_root = self.memory_root.as_deref().filter(|_| !prefix.is_empty())?;
        if !self.nodes.contains_key(&prefix) {
            if self.nodes.len() >= MAX_NODES {
                if !self.warned_full {
                    log::warn!(
                        "pods under more than {MAX_NODES} cgroup prefixes: those of {prefix} and \
                         any new one are named from --rootfs alone"
                    );
                    self.warned_full = true;
                }
                return None;
            }
            let node = match NodeRoot::locate(memory_root, &self.proc_root, &prefix, kubepods) {
                Some(root) => Node::Container(Box::new(ContainerNode {
                    root,
                    names: K8sNames::unrooted(),
                })),
                None => {
                    log::debug!("pods under cgroup {prefix}: on this node, named from --rootfs");
                    Node::Own
                }
            };
            self.nodes.insert(prefix.clone(), node);
        }
        match self.nodes.get_mut(&prefix)? {
            Node::Own => None,
            Node::Container(node) => Some(node),
        }
    }
}

impl ContainerNode {
    fn lookup(&mut self, identity: &CgroupIdentity) -> Option<PodNames> {
        // The root is checked only when the lookup may rescan: a hit costs no system call.
        if !self.names.knows(identity) && self.names.refresh_due() {
            self.names.set_rootfs(self.root.current());
        }
        self.names.lookup(identity)
    }
}

/// How one node container's root filesystem is reached from its cgroups.
#[derive(Debug)]
struct NodeRoot {
    memory_root: PathBuf,
    proc_root: PathBuf,
    /// The path above the pods' `kubepods` cgroup, relative to the memory hierarchy's root.
    prefix: String,
    /// The `kubepods` cgroup's directory: the processes below it are the pods', not the node's.
    kubepods: PathBuf,
    /// The cgroup whose subtree holds the node's own processes, once found.
    level: Option<String>,
    process: Option<NodeProcess>,
    /// Whether a failure to reach the root was reported since it was last reached.
    warned: bool,
}

impl NodeRoot {
    /// The node container of the pods under `<prefix>/<kubepods>`; `None` when the prefix is
    /// on the agent's own node.
    fn locate(memory_root: &Path, proc_root: &Path, prefix: &str, kubepods: &str) -> Option<Self> {
        let mut root = Self {
            memory_root: memory_root.to_owned(),
            proc_root: proc_root.to_owned(),
            prefix: prefix.to_owned(),
            kubepods: cgroup_dir(memory_root, prefix).join(kubepods),
            level: None,
            process: None,
            warned: false,
        };
        // Gone already (a kill drained late): there is nothing to tell, nor to read.
        if !cgroup_dir(memory_root, prefix).is_dir() {
            return Some(root);
        }
        let (level, pids) = root.find_level()?;
        let mount_namespace =
            |pid: &str| std::fs::read_link(proc_root.join(pid).join("ns/mnt")).ok();
        let own = mount_namespace("self");
        let on_own_node = own.is_some()
            && pids
                .iter()
                .any(|pid| mount_namespace(&pid.to_string()) == own);
        if on_own_node {
            return None;
        }
        root.level = Some(level);
        Some(root)
    }

    /// The node's root filesystem as reached now; `None` when no process of the node that
    /// holds the log directories is left.
    fn current(&mut self) -> Option<PathBuf> {
        if let Some(process) = self.process {
            if NodeProcess::read(&self.proc_root, process.pid) == Some(process) {
                return Some(self.root_of(process.pid));
            }
            self.process = None;
        }
        let pids = match &self.level {
            Some(level) => self.processes_below(level),
            None => match self.find_level() {
                Some((level, pids)) => {
                    self.level = Some(level);
                    pids
                }
                None => Vec::new(),
            },
        };
        if pids.is_empty() {
            self.warn(format_args!(
                "no process of the node container is left: kills of its pods are named from \
                 what was learned while it ran"
            ));
            return None;
        }
        // The most telling failure: one that is not a mere absence.
        let mut failure: Option<(PathBuf, std::io::Error)> = None;
        for &pid in pids.iter().take(MAX_CANDIDATES) {
            let root = self.root_of(pid);
            let logs = root.join("var/log/pods");
            match std::fs::metadata(&logs) {
                Ok(metadata) if metadata.is_dir() => {
                    let Some(process) = NodeProcess::read(&self.proc_root, pid) else {
                        continue;
                    };
                    log::info!(
                        "pods under cgroup {}: named from the node container's root \
                         filesystem, {}",
                        self.prefix,
                        root.display()
                    );
                    self.process = Some(process);
                    self.warned = false;
                    return Some(root);
                }
                Ok(_) => failure = failure.or(Some((logs, ErrorKind::NotADirectory.into()))),
                Err(err) if failure.is_none() || err.kind() != ErrorKind::NotFound => {
                    failure = Some((logs, err));
                }
                Err(_) => {}
            }
        }
        let hint = match failure.as_ref().map(|(_, err)| err.kind()) {
            Some(ErrorKind::PermissionDenied) => {
                "; reading another process's root filesystem takes root with CAP_SYS_PTRACE, \
                 and an agent in a container the host's pid namespace (hostPID)"
            }
            _ => "",
        };
        let failure = failure.map_or_else(
            || "its processes ended".to_owned(),
            |(path, err)| format!("{}: {err}", path.display()),
        );
        self.warn(format_args!(
            "no process of the node container has /var/log/pods in its root filesystem \
             ({failure}): its pods stay unnamed until one has{hint}"
        ));
        None
    }

    /// The nearest cgroup from the prefix upwards, the hierarchy's root left out, with a
    /// process outside the `kubepods` subtree, and its processes; none above a prefix that is
    /// gone, whose node cannot be told.
    fn find_level(&self) -> Option<(String, Vec<u32>)> {
        if !cgroup_dir(&self.memory_root, &self.prefix).is_dir() {
            return None;
        }
        let mut level = self.prefix.as_str();
        while !level.is_empty() {
            let pids = self.processes_below(level);
            if !pids.is_empty() {
                return Some((level.to_owned(), pids));
            }
            level = level.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
        None
    }

    /// The processes of the cgroup `level` and its descendants but the `kubepods` subtree,
    /// nearest first (breadth first), within bounds.
    fn processes_below(&self, level: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        let mut queue = VecDeque::from([(cgroup_dir(&self.memory_root, level), 0)]);
        let mut searched = 0;
        while let Some((dir, depth)) = queue.pop_front() {
            searched += 1;
            if searched > MAX_SEARCHED_CGROUPS || pids.len() >= MAX_CANDIDATES {
                break;
            }
            // Pids outside the reader's pid namespace read as 0.
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(
                procs
                    .lines()
                    .filter_map(|pid| pid.trim().parse::<u32>().ok()),
            );
            pids.retain(|&pid| pid != 0);
            if depth >= MAX_SEARCH_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && path != self.kubepods {
                    queue.push_back((path, depth + 1));
                }
            }
        }
        pids
    }

    fn root_of(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("root")
    }

    fn warn(&mut self, why: fmt::Arguments<'_>) {
        if !self.warned {
            log::warn!("pods under cgroup {}: {why}", self.prefix);
            self.warned = true;
        }
    }
}

/// A process of a node container: its start time tells it from a later one with its pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeProcess {
    pid: u32,
    start_time: u64,
}

impl NodeProcess {
    /// The process `pid` is now; `None` once it is gone or a zombie (whose root is unreadable).
    fn read(proc_root: &Path, pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
        // After the command name, which may hold anything, ")" included.
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
        if matches!(fields.next()?, "Z" | "X" | "x") {
            return None;
        }
        // `starttime` is stat's 22nd field, the 19th after the state.
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(Self { pid, start_time })
    }
}

fn cgroup_dir(memory_root: &Path, relative: &str) -> PathBuf {
    memory_root.join(relative.trim_start_matches('/'))
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
