//! The node's files an agent in a container needs mounted in (deploy/daemonset.yaml mounts
//! them), checked when `--rootfs` says the agent's own root is not the node's, before anything
//! is loaded, so that a pod missing one stops at once with
//! every missing mount named, instead of running half blind (kills without names, pins and a
//! store that end with the pod, cgroup paths that resolve to nothing).
//!
//! What a privileged container has of its own is not checked: the kernel's sysfs (with
//! `/sys/kernel/btf`), and tracefs, which the agent mounts where a classic tracepoint needs it.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::enrich::cgroupfs::MemoryHierarchy;

/// The checks' inputs, from the agent's options.
pub struct Needs<'a> {
    pub hierarchy: Option<&'a MemoryHierarchy>,
    pub rootfs: &'a Path,
    pub cri_socket: Option<&'a Path>,
    pub state_dir: Option<&'a Path>,
    /// The pin directory, when this agent pins.
    pub pin_dir: Option<&'a Path>,
}

/// Every missing mount, each with what to do; empty when all is there.
pub fn missing(needs: &Needs<'_>) -> Vec<String> {
    let mut missing = Vec::new();
    match needs.hierarchy {
        None => missing.push(
            "no memory cgroup hierarchy is mounted: mount the node's /sys/fs/cgroup at \
             /sys/fs/cgroup (deploy/daemonset.yaml's `cgroup` volume)"
                .to_owned(),
        ),
        // The root of a cgroup hierarchy is inode 1 of its kernfs; the runtime's own mount
        // shows only the container's cgroup, whose paths are not the kernel's.
        Some(hierarchy) if !is_hierarchy_root(&hierarchy.root) => missing.push(format!(
            "{} is the container's own part of the cgroup tree, not the node's whole \
                 tree: mount the node's /sys/fs/cgroup at /sys/fs/cgroup (deploy/\
                 daemonset.yaml's `cgroup` volume)",
            hierarchy.root.display()
        )),
        Some(_) => {}
    }
    if needs.cri_socket.is_none() {
        for (dir, volume) in [
            ("var/log/pods", "pod-logs"),
            ("var/log/containers", "container-logs"),
        ] {
            let path = needs.rootfs.join(dir);
            if !path.is_dir() {
                missing.push(format!(
                    "{} is not a directory, and no CRI socket is given: pods cannot be named; \
                     mount the node's /{dir} read-only at {} (deploy/daemonset.yaml's `{volume}` \
                     volume), or give --cri-socket",
                    path.display(),
                    path.display()
                ));
            }
        }
    }
    if let Some(dir) = needs.state_dir {
        if on_root_filesystem(dir) {
            missing.push(format!(
                "the kill store {} would be in the container's own file system and end with \
                 it: mount a hostPath there (deploy/daemonset.yaml's `state` volume), or pass \
                 --state-dir '' to keep kills in memory only",
                dir.display()
            ));
        }
    }
    if let Some(dir) = needs.pin_dir {
        if !pins_reach_the_node(dir) {
            missing.push(format!(
                "{} is neither on a bpffs nor on a mount shared with the node: pins in a bpffs \
                 of the container's own would end with it; mount the node's /sys/fs/bpf at \
                 /sys/fs/bpf with mountPropagation: Bidirectional (deploy/daemonset.yaml's \
                 `bpffs` volume), or pass --no-pin",
                dir.display()
            ));
        }
    }
    missing
}

/// Whether `dir` is the root of its cgroup hierarchy: kernfs numbers a hierarchy's root inode
/// 1, and a mount of the container's own part shows its cgroup's directory instead; and the
/// mount's root (mountinfo's fourth field) is `/`, as a bind of a sub-cgroup's is not.
fn is_hierarchy_root(dir: &Path) -> bool {
    let inode = fs::metadata(dir).map(|m| m.ino());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // The last mount at `dir` is the one in view.
    let mount_root = mountinfo
        .lines()
        .rev()
        .filter(|line| line.split(' ').nth(4).map(Path::new) == Some(dir))
        .find_map(|line| line.split(' ').nth(3))
        .map(str::to_owned);
    log::debug!(
        "{}: inode {inode:?}, mount root {mount_root:?}",
        dir.display()
    );
    inode.is_ok_and(|ino| ino == 1) && mount_root.is_none_or(|root| root == "/")
}

/// The nearest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

/// Whether `path` (or where it would be made) is on the same file system as `/`.
fn on_root_filesystem(path: &Path) -> bool {
    match (fs::metadata(existing_ancestor(path)), fs::metadata("/")) {
        (Ok(dir), Ok(root)) => dir.dev() == root.dev(),
        _ => false,
    }
}

/// Whether pins made at `path` reach the node: it is on a bpffs, or on a mount shared with
/// the node (a hostPath with Bidirectional propagation, where the agent mounts a bpffs that
/// the node sees too).
fn pins_reach_the_node(path: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = existing_ancestor(path);
    // The mount holding `dir`: the last listed of the longest mount point above it.
    let holding = mountinfo
        .lines()
        .filter_map(MountLine::parse)
        .filter(|mount| dir.starts_with(&mount.point))
        .fold(None::<MountLine>, |best, mount| match &best {
            Some(b) if b.point.components().count() > mount.point.components().count() => best,
            _ => Some(mount),
        });
    holding.is_some_and(|mount| mount.fs_type == "bpf" || mount.shared)
}

struct MountLine {
    point: PathBuf,
    fs_type: String,
    shared: bool,
}

impl MountLine {
    /// `id parent dev root point options [optional...] - fstype source superoptions`
    fn parse(line: &str) -> Option<Self> {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        Some(Self {
            point: PathBuf::from(fields.get(4)?.replace("\\040", " ")),
            fs_type: after.split(' ').next()?.to_owned(),
            shared: fields.iter().skip(6).any(|f| f.starts_with("shared:")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_without_the_nodes_mounts_is_told_each() {
        let rootfs = std::env::temp_dir().join(format!("leak-node-check-{}", std::process::id()));
        let _ = fs::create_dir_all(&rootfs);
        let missing = missing(&Needs {
            hierarchy: None,
            rootfs: &rootfs,
            cri_socket: None,
            state_dir: Some(Path::new("/nonexistent-leak-state")),
            pin_dir: Some(Path::new("/nonexistent-leak-pins/leak")),
        });
        let _ = fs::remove_dir_all(&rootfs);
        let text = missing.join("\n");
        for needle in [
            "/sys/fs/cgroup",
            "var/log/pods",
            "var/log/containers",
            "/nonexistent-leak-state",
        ] {
            assert!(text.contains(needle), "{needle} not named:\n{text}");
        }
        // Where `/` is a shared mount (systemd makes it so) pins would reach the node.
        let pins_reach = pins_reach_the_node(Path::new("/nonexistent-leak-pins/leak"));
        assert_eq!(text.contains("--no-pin"), !pins_reach, "{text}");
    }

    #[test]
    fn mountinfo_lines_give_point_type_and_sharing() {
        let bpffs = MountLine::parse(
            "43 23 0:39 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw,mode=700",
        )
        .expect("parses");
        assert_eq!(bpffs.point, Path::new("/sys/fs/bpf"));
        assert_eq!(bpffs.fs_type, "bpf");
        assert!(bpffs.shared);
        let private =
            MountLine::parse("27 1 254:0 / /my\\040dir rw - ext4 /dev/vda rw").expect("parses");
        assert_eq!(private.point, Path::new("/my dir"));
        assert!(!private.shared);
        assert!(MountLine::parse("garbage").is_none());
    }

    #[test]
    fn a_cri_socket_stands_in_for_the_log_directories() {
        let missing = missing(&Needs {
            hierarchy: None,
            rootfs: Path::new("/nonexistent-leak-rootfs"),
            cri_socket: Some(Path::new("/run/containerd/containerd.sock")),
            state_dir: None,
            pin_dir: None,
        });
        assert_eq!(missing.len(), 1, "{missing:?}");
    }
}
