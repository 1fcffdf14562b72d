//! The prefix -> root resolution on fixture trees: a memory hierarchy, a procfs whose
//! `<pid>/root` are symlinks to node roots, and the agent's own `--rootfs`.

use std::fs;

use super::*;
use crate::enrich::kubernetes::parse_cgroup_path;

const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const OTHER_UID: &str = "9a8b7c6d-5e4f-4321-8abc-0123456789ab";
const ID: &str = "3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829";
const OTHER_ID: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const NODE: &str = "1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a";
const OWN_MOUNT_NAMESPACE: &str = "mnt:[4026531841]";

/// A host under the temp dir: `memory/` (the hierarchy), `proc/`, `rootfs/` (the agent's
/// `--rootfs`) and `roots/<name>/` (node containers' root filesystems); removed on drop.
struct Fixture(PathBuf);

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("leak-node-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["memory", "proc/self/ns", "rootfs"] {
            fs::create_dir_all(dir.join(sub)).expect("mkdir fixture");
        }
        std::os::unix::fs::symlink(OWN_MOUNT_NAMESPACE, dir.join("proc/self/ns/mnt"))
            .expect("own mount namespace");
        Self(dir)
    }

    /// The cgroup at `path` with `pids` in its `cgroup.procs`.
    fn cgroup(&self, path: &str, pids: &[u32]) {
        let dir = self.0.join("memory").join(path.trim_start_matches('/'));
        fs::create_dir_all(&dir).expect("mkdir cgroup");
        let procs: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
        fs::write(dir.join("cgroup.procs"), procs).expect("cgroup.procs");
    }

    fn remove_cgroup(&self, path: &str) {
        fs::remove_dir_all(self.0.join("memory").join(path.trim_start_matches('/')))
            .expect("rm cgroup");
    }

    /// Process `pid`, started at `start_time`, whose root is `root` (a path under the fixture).
    fn process(&self, pid: u32, start_time: u64, root: &str, mount_namespace: &str) {
        let dir = self.0.join("proc").join(pid.to_string());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("ns")).expect("mkdir proc");
        // A command name with a parenthesis and spaces, as any may have.
        let stat = format!(
            "{pid} (node (init) x) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 \
             {start_time} 1000 100\n"
        );
        fs::write(dir.join("stat"), stat).expect("stat");
        std::os::unix::fs::symlink(self.0.join(root), dir.join("root")).expect("root");
        std::os::unix::fs::symlink(mount_namespace, dir.join("ns/mnt")).expect("ns");
    }

    fn end(&self, pid: u32) {
        fs::remove_dir_all(self.0.join("proc").join(pid.to_string())).expect("rm proc");
    }

    /// The kubelet's log tree for one container under `root`: its pod's directory, its log
    /// and the `/var/log/containers` link.
    fn log_tree(&self, root: &str, pod: &str, uid: &str, container: &str, id: &str) {
        let root = self.0.join(root);
        let pod_dir = format!("shop_{pod}_{uid}");
        let container_dir = root.join("var/log/pods").join(&pod_dir).join(container);
        fs::create_dir_all(&container_dir).expect("mkdir pod log dir");
        fs::write(container_dir.join("0.log"), "").expect("log");
        let links = root.join("var/log/containers");
        fs::create_dir_all(&links).expect("mkdir containers");
        let target = format!("/var/log/pods/{pod_dir}/{container}/0.log");
        std::os::unix::fs::symlink(
            target,
            links.join(format!("{pod}_shop_{container}-{id}.log")),
        )
        .expect("link");
    }

    fn names(&self) -> NodeNames {
        NodeNames::new(
            K8sNames::new(self.0.join("rootfs")),
            Some(self.0.join("memory")),
            self.0.join("proc"),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn lookup(names: &mut NodeNames, path: &str) -> Option<PodNames> {
    let identity = parse_cgroup_path(path).unwrap_or_else(|| panic!("{path} is a pod's"));
    names.lookup(path, &identity)
}

fn named(pod: &str, container: &str) -> Option<PodNames> {
    Some(PodNames {
        namespace: "shop".into(),
        pod: pod.into(),
        container: Some(container.into()),
    })
}

fn container_node<'a>(names: &'a mut NodeNames, prefix: &str) -> &'a mut ContainerNode {
    match names.nodes.get_mut(prefix) {
        Some(Node::Container(node)) => node,
        other => panic!("{prefix} is not a node container: {other:?}"),
    }
}

#[test]
fn a_minikube_node_is_named_from_its_container_root() {
    let host = Fixture::new("minikube");
    host.log_tree("roots/minikube", "cart-1", UID, "api", ID);
    host.cgroup(&format!("/docker/{NODE}"), &[100, 101]);
    host.process(100, 5, "roots/minikube", "mnt:[7]");
    host.process(101, 6, "roots/minikube", "mnt:[7]");
    let pod = format!("/docker/{NODE}/kubepods/burstable/pod{UID}/{ID}");
    host.cgroup(&pod, &[300]);
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), named("cart-1", "api"));
    let node = container_node(&mut names, &format!("/docker/{NODE}"));
    assert_eq!(node.root.process.map(|p| p.pid), Some(100));
    assert_eq!(
        node.root.level.as_deref(),
        Some(&*format!("/docker/{NODE}"))
    );
}

#[test]
fn a_kind_node_is_found_above_its_kubelet_slice() {
    let host = Fixture::new("kind");
    host.log_tree("roots/kind", "cart-1", UID, "api", ID);
    let scope = format!("/system.slice/docker-{NODE}.scope");
    host.cgroup("/system.slice/ssh.service", &[50]);
    host.process(50, 1, "rootfs", OWN_MOUNT_NAMESPACE);
    host.cgroup(&scope, &[]);
    host.cgroup(&format!("{scope}/init.scope"), &[200]);
    host.cgroup(&format!("{scope}/system.slice/containerd.service"), &[201]);
    host.process(200, 9, "roots/kind", "mnt:[8]");
    host.process(201, 9, "roots/kind", "mnt:[8]");
    host.cgroup(&format!("{scope}/kubelet.slice"), &[]);
    let pod = format!(
        "{scope}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
         kubelet-kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
        UID.replace('-', "_")
    );
    host.cgroup(&pod, &[300]);
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), named("cart-1", "api"));
    let node = container_node(&mut names, &format!("{scope}/kubelet.slice"));
    assert_eq!(node.root.level.as_deref(), Some(scope.as_str()));
    assert_eq!(node.root.process.map(|p| p.pid), Some(200), "nearest first");
}

#[test]
fn the_pods_processes_never_count_as_the_nodes() {
    let host = Fixture::new("pods-excluded");
    // A pod's container whose own root holds a log tree (a kubelet-in-a-pod, say).
    host.log_tree("roots/pod", "decoy", UID, "decoy", ID);
    let pod = format!("/docker/{NODE}/kubepods/pod{UID}/{ID}");
    host.cgroup(&pod, &[300]);
    host.process(300, 3, "roots/pod", "mnt:[9]");
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), None);
    assert!(
        matches!(names.nodes.get(&format!("/docker/{NODE}")), Some(Node::Own)),
        "no process above the pods up to the root: a --cgroup-root of this node"
    );
}

#[test]
fn a_kubelet_cgroup_root_on_this_node_is_named_from_rootfs() {
    let host = Fixture::new("cgroup-root");
    host.log_tree("rootfs", "cart-1", UID, "api", ID);
    host.log_tree("rootfs", "web-1", OTHER_UID, "nginx", OTHER_ID);
    // No process of its own: --cgroup-root=/kubelet.
    let first = format!("/kubelet/kubepods/burstable/pod{UID}/{ID}");
    host.cgroup(&first, &[]);
    // The kubelet itself in the agent's mount namespace, next to its pods.
    host.cgroup("/kubelet.slice/kubelet.service", &[60]);
    host.process(60, 2, "rootfs", OWN_MOUNT_NAMESPACE);
    let second = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{}.slice/{OTHER_ID}",
        OTHER_UID.replace('-', "_")
    );
    host.cgroup(&second, &[]);
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &first), named("cart-1", "api"));
    assert_eq!(lookup(&mut names, &second), named("web-1", "nginx"));
    for prefix in ["/kubelet", "/kubelet.slice"] {
        assert!(
            matches!(names.nodes.get(prefix), Some(Node::Own)),
            "{prefix}: {:?}",
            names.nodes.get(prefix)
        );
    }
}

#[test]
fn the_node_process_is_replaced_when_it_ends_and_a_vanished_node_keeps_its_names() {
    let host = Fixture::new("replaced");
    host.log_tree("roots/minikube", "cart-1", UID, "api", ID);
    let prefix = format!("/docker/{NODE}");
    host.cgroup(&prefix, &[100]);
    host.process(100, 5, "roots/minikube", "mnt:[7]");
    let first = format!("{prefix}/kubepods/burstable/pod{UID}/{ID}");
    host.cgroup(&first, &[]);
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &first), named("cart-1", "api"));

    // Process 100 ended and its pid went to a process elsewhere; 101 runs the node now.
    host.process(100, 8, "roots/elsewhere", "mnt:[3]");
    fs::create_dir_all(host.0.join("roots/elsewhere")).expect("mkdir");
    host.cgroup(&prefix, &[101]);
    host.process(101, 7, "roots/minikube", "mnt:[7]");
    host.log_tree("roots/minikube", "web-1", OTHER_UID, "nginx", OTHER_ID);
    let second = format!("{prefix}/kubepods/besteffort/pod{OTHER_UID}/{OTHER_ID}");
    host.cgroup(&second, &[]);
    container_node(&mut names, &prefix).names.expire_refresh();
    assert_eq!(lookup(&mut names, &second), named("web-1", "nginx"));
    let node = container_node(&mut names, &prefix);
    assert_eq!(
        node.root.process,
        Some(NodeProcess {
            pid: 101,
            start_time: 7
        })
    );

    // The node container is gone: what it said is kept, and what it never said is not found.
    host.end(101);
    host.remove_cgroup("/docker");
    container_node(&mut names, &prefix).names.expire_refresh();
    assert_eq!(lookup(&mut names, &first), named("cart-1", "api"));
    assert_eq!(lookup(&mut names, &second), named("web-1", "nginx"));
    let unknown = format!("{prefix}/kubepods/pod{UID}/{}", "ab".repeat(32));
    container_node(&mut names, &prefix).names.expire_refresh();
    assert_eq!(
        lookup(&mut names, &unknown),
        Some(PodNames {
            container: None,
            ..named("cart-1", "api").expect("names")
        }),
        "its pod is known, its container never was"
    );
    let node = container_node(&mut names, &prefix);
    assert_eq!(node.root.process, None);
    assert!(node.root.warned);
}

#[test]
fn a_node_without_log_directories_names_its_pods_once_they_appear() {
    let host = Fixture::new("no-tree");
    fs::create_dir_all(host.0.join("roots/bare")).expect("mkdir");
    let prefix = format!("/docker/{NODE}");
    host.cgroup(&prefix, &[100]);
    host.process(100, 5, "roots/bare", "mnt:[7]");
    let pod = format!("{prefix}/kubepods/burstable/pod{UID}/{ID}");
    host.cgroup(&pod, &[]);
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), None);
    let node = container_node(&mut names, &prefix);
    assert!(node.root.warned, "a warning, and the kill served unnamed");
    assert_eq!(node.root.process, None);

    host.log_tree("roots/bare", "cart-1", UID, "api", ID);
    node.names.expire_refresh();
    assert_eq!(lookup(&mut names, &pod), named("cart-1", "api"));
    assert!(!container_node(&mut names, &prefix).root.warned);
}

#[test]
fn a_node_gone_when_first_seen_is_not_looked_for_elsewhere() {
    let host = Fixture::new("gone");
    // Another node next to it, whose tree must not be taken for the vanished one's.
    host.log_tree("roots/other", "decoy", UID, "decoy", ID);
    host.cgroup("/docker/other", &[100]);
    host.process(100, 5, "roots/other", "mnt:[7]");
    let pod = format!("/docker/{NODE}/kubepods/burstable/pod{UID}/{ID}");
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), None);
    let node = container_node(&mut names, &format!("/docker/{NODE}"));
    assert_eq!(
        (node.root.level.as_deref(), node.root.process),
        (None, None)
    );
}

#[test]
fn what_a_node_does_not_name_is_asked_of_rootfs() {
    let host = Fixture::new("fallback");
    // A tree mounted under --rootfs by hand, and a node container without one.
    host.log_tree("rootfs", "cart-1", UID, "api", ID);
    fs::create_dir_all(host.0.join("roots/bare")).expect("mkdir");
    host.cgroup(&format!("/docker/{NODE}"), &[100]);
    host.process(100, 5, "roots/bare", "mnt:[7]");
    let pod = format!("/docker/{NODE}/kubepods/burstable/pod{UID}/{ID}");
    let mut names = host.names();
    assert_eq!(lookup(&mut names, &pod), named("cart-1", "api"));
}

#[test]
fn reads_the_start_time_from_procfs() {
    let host = Fixture::new("stat");
    host.process(100, 123_456, "rootfs", "mnt:[7]");
    assert_eq!(
        NodeProcess::read(&host.0.join("proc"), 100),
        Some(NodeProcess {
            pid: 100,
            start_time: 123_456
        })
    );
    assert_eq!(NodeProcess::read(&host.0.join("proc"), 101), None);
    let zombie = host.0.join("proc/100/stat");
    fs::write(
        &zombie,
        "100 (sh) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0\n",
    )
    .expect("stat");
    assert_eq!(
        NodeProcess::read(&host.0.join("proc"), 100),
        None,
        "a zombie"
    );
    let real = NodeProcess::read(Path::new("/proc"), std::process::id()).expect("this process");
    assert!(real.start_time > 0);
}
