//! What the container tests (cri_e2e, node_e2e) share: the image archives `cargo xtask test`
//! builds, the host's bpffs made ready for the DaemonSet's `Bidirectional` mount (and put back
//! afterwards), and the wait for an agent pod to answer.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use leak_user::experiment::harness::{self, current_test, skip, SkipKind};

/// The pods' sandbox image and the shell: busybox, `leak`, a long sleep as its command.
pub const NODE_IMAGE: &str = "docker.io/library/leak-node-tools:latest";
/// Variables naming the archives: the agent's image (deploy/Dockerfile's) and the node tools.
pub const AGENT_IMAGE_ENV: &str = "LEAK_TEST_IMAGE";
pub const NODE_IMAGE_ENV: &str = "LEAK_TEST_NODE_IMAGE";

/// The image archives `variables` name, or a skip (hiding the feature: CI fails it).
pub fn images(variables: &[&str]) -> Option<Vec<PathBuf>> {
    let mut found = Vec::new();
    for variable in variables {
        match std::env::var_os(variable).map(PathBuf::from) {
            Some(image) if image.is_file() => found.push(image),
            _ => {
                skip(
                    &current_test(),
                    &format!(
                        "${variable} names no image archive: run through `cargo xtask test`, \
                         which builds it (or `cargo xtask image --node-tools`)"
                    ),
                    SkipKind::HidesFeature,
                );
                return None;
            }
        }
    }
    Some(found)
}

/// The host's bpffs as the DaemonSet's `Bidirectional` mount needs it: mounted at
/// /sys/fs/bpf (as systemd mounts it) and shared (as systemd makes every mount). What was
/// changed is put back on drop, after the pins an agent pod left are removed where the host
/// had none before.
pub struct HostBpffs {
    mounted: bool,
    made_shared: bool,
    pins_before: bool,
}

const BPFFS: &str = "/sys/fs/bpf";

impl HostBpffs {
    pub fn prepare() -> Self {
        let mounted = mount_point(Path::new(BPFFS)).is_none();
        if mounted {
            run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]));
        }
        let made_shared = mount_point(Path::new(BPFFS)) != Some(true);
        if made_shared {
            run(Command::new("mount").args(["--make-shared", BPFFS]));
        }
        Self {
            mounted,
            made_shared,
            pins_before: Path::new(leak_user::kernel::pin::DEFAULT_PIN_DIR).exists(),
        }
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        if !self.pins_before {
            let _ = Command::new(super::leak_bin()).arg("unpin").output();
        }
        if self.made_shared {
            let _ = Command::new("mount")
                .args(["--make-private", BPFFS])
                .status();
        }
        if self.mounted {
            let _ = Command::new("umount").arg(BPFFS).status();
        }
    }
}

/// Whether `point` is a mount point, and if so whether the mount in view there is shared.
fn mount_point(point: &Path) -> Option<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .rev()
        .map(|line| line.split(' ').collect::<Vec<&str>>())
        .find(|fields| fields.get(4).map(Path::new) == Some(point))
        .map(|fields| {
            fields
                .iter()
                .skip(6)
                .take_while(|f| **f != "-")
                .any(|f| f.starts_with("shared:"))
        })
}

pub fn run(command: &mut Command) {
    let status = command.status().expect("run a command");
    assert!(status.success(), "{command:?}: {status}");
}

/// Waits until the agent at `addr` answers `/healthz`, or fails with its log.
pub fn wait_for_healthz(addr: SocketAddr, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !harness::http_get(addr, "/healthz").is_ok_and(|r| r.status == 200) {
        assert!(
            Instant::now() < deadline,
            "the agent pod never answered /healthz on {addr}; its log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
