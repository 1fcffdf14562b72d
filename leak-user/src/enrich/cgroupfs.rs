//! Memory cgroups on the filesystem: where the memory hierarchy is mounted (cgroup v1 or v2)
//! and which path a cgroup id (its directory's inode number) has. Paths are cached, so a cgroup
//! that has vanished keeps its last known path.

use std::{
    collections::HashMap,
    fs,
    ops::ControlFlow,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy with the memory controller is mounted (looked in {0}); mount \
         cgroup2, or the v1 memory controller"
    )]
    NoMemoryHierarchy(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn limit_file(self) -> &'static str {
        match self {
            Self::V1 => "memory.limit_in_bytes",
            Self::V2 => "memory.max",
        }
    }

    pub fn usage_file(self) -> &'static str {
        match self {
            Self::V1 => "memory.usage_in_bytes",
            Self::V2 => "memory.current",
        }
    }
}

/// The mounted hierarchy that carries the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryHierarchy {
    pub root: PathBuf,
    pub version: Version,
}

impl MemoryHierarchy {
    /// Whether the kernel charges cgroup v1's memory+swap counter: on v1 with swap accounting
    /// (the kernel creates the `memory.memsw.*` files only then); never on v2.
    pub fn memsw_accounted(&self) -> bool {
        self.version == Version::V1 && self.root.join("memory.memsw.usage_in_bytes").exists()
    }

    /// Finds the memory hierarchy from `/proc/self/mountinfo`.
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let mountinfo = fs::read_to_string(path).map_err(|source| CgroupError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&mountinfo, |root| {
            fs::read_to_string(root.join("cgroup.controllers")).ok()
        })
        .ok_or_else(|| CgroupError::NoMemoryHierarchy(path.display().to_string()))
    }

    /// Picks the memory hierarchy from mountinfo text; `controllers` reads a v2 mount's
    /// `cgroup.controllers`.
    pub fn from_mountinfo(
        mountinfo: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> Option<Self> {
        let mut v2 = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).map(unescape);
            let mut right = right.split_whitespace();
            let (fstype, super_options) = (right.next(), right.nth(1).unwrap_or(""));
            let Some(mount_point) = mount_point else {
                continue;
            };
            match fstype {
                Some("cgroup") if super_options.split(',').any(|o| o == "memory") => {
                    return Some(Self {
                        root: mount_point.into(),
                        version: Version::V1,
                    });
                }
                Some("cgroup2") if v2.is_none() => {
                    let root = PathBuf::from(&mount_point);
                    if controllers(&root)
                        .is_some_and(|list| list.split_whitespace().any(|c| c == "memory"))
                    {
                        v2 = Some(Self {
                            root,
                            version: Version::V2,
                        });
                    }
                }
                _ => {}
            }
        }
        v2
    }

    /// `memory.max` (v2) or `memory.limit_in_bytes` (v1).
    pub fn limit_file(&self) -> &'static str {
        self.version.limit_file()
    }

    /// `memory.current` (v2) or `memory.usage_in_bytes` (v1).
    pub fn usage_file(&self) -> &'static str {
        self.version.usage_file()
    }
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How often a cache miss may trigger a rescan of the hierarchy.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Directories deeper than this below the root are not walked.
const MAX_WALK_DEPTH: usize = 16;

/// Visits `root` and every cgroup directory below it (depth first, at most
/// [`MAX_WALK_DEPTH`] levels down) with its metadata, until `visit` breaks. Directories that
/// vanish or cannot be read on the way are skipped: cgroups come and go while we walk.
pub fn walk(root: &Path, mut visit: impl FnMut(&Path, &fs::Metadata) -> ControlFlow<()>) {
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(metadata) = fs::metadata(&dir) else {
            continue;
        };
        if visit(&dir, &metadata).is_break() {
            return;
        }
        if depth >= MAX_WALK_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
}

/// Cgroup id (inode number) to path, relative to the hierarchy root (`/` is the root).
#[derive(Debug, Default)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupPaths {
    pub fn new(root: Option<PathBuf>) -> Self {
        let mut paths = Self {
            root,
            ..Self::default()
        };
        paths.scan();
        paths
    }

    /// Walks the hierarchy and records every directory's inode. Known paths are kept even when
    /// their directory is gone.
    pub fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        walk(&root, |dir, metadata| {
            let relative = dir.strip_prefix(&root).map_or_else(
                |_| "/".to_owned(),
                |rel| format!("/{}", rel.to_string_lossy()),
            );
            self.by_id.insert(metadata.ino(), relative);
            ControlFlow::Continue(())
        });
    }

    /// The path of cgroup `id`, rescanning (at most once a second) on a miss.
    pub fn lookup(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.by_id.get(&id) {
            return Some(path.clone());
        }
        if self
            .last_scan
            .is_none_or(|last| last.elapsed() >= RESCAN_INTERVAL)
        {
            self.scan();
        }
        self.by_id.get(&id).cloned()
    }

    /// Records a path learned elsewhere (the kernel's own names).
    pub fn learn(&mut self, id: u64, path: &str) {
        self.by_id.insert(id, path.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:8 - cgroup cgroup rw,cpu
33 25 0:29 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
40 25 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const MOUNTINFO_V2: &str = "\
26 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_v1_memory_controller_over_a_v2_mount_without_it() {
        let found = MemoryHierarchy::from_mountinfo(MOUNTINFO_V1, |_| Some(String::new()))
            .expect("v1 memory");
        assert_eq!(found.root, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(found.version, Version::V1);
        assert_eq!(found.limit_file(), "memory.limit_in_bytes");
    }

    #[test]
    fn finds_v2_when_memory_is_enabled() {
        let found = MemoryHierarchy::from_mountinfo(MOUNTINFO_V2, |_| {
            Some("cpuset cpu io memory pids".into())
        })
        .expect("v2 memory");
        assert_eq!(found.version, Version::V2);
        assert_eq!(found.usage_file(), "memory.current");
        assert!(MemoryHierarchy::from_mountinfo(MOUNTINFO_V2, |_| Some("cpu io".into())).is_none());
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn keeps_vanished_paths_and_scans_real_directories() {
        let dir = std::env::temp_dir().join(format!("leak-cgroup-paths-{}", std::process::id()));
        let child = dir.join("a").join("b");
        fs::create_dir_all(&child).expect("mkdir");
        let ino = fs::metadata(&child).expect("stat").ino();
        let mut paths = CgroupPaths::new(Some(dir.clone()));
        assert_eq!(paths.lookup(ino).as_deref(), Some("/a/b"));
        fs::remove_dir_all(&dir).expect("cleanup");
        paths.scan();
        assert_eq!(
            paths.lookup(ino).as_deref(),
            Some("/a/b"),
            "vanished cgroup keeps its path"
        );
        paths.learn(42, "/learned");
        assert_eq!(paths.lookup(42).as_deref(), Some("/learned"));
    }
}
