//! A containerd of the test's own, as a Kubernetes node runs it: runc under the cgroupfs
//! driver, the CRI plugin with a bridge network (the CNI reference plugins), every file of it
//! (root, state, socket, network namespaces, address leases) under one directory. Stopped and
//! cleaned up on drop, also when a test fails: its containers' shims, mounts, the bridge and
//! the directory.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::harness::{io, LabError};
use crate::enrich::cri::Cri;

/// containerd's namespace for the kubelet's containers: CRI uses no other.
pub const NAMESPACE: &str = "k8s.io";

/// The bridge the pods' network hangs off, and its subnet: private, and unlikely to collide
/// with a host's (not docker's 172.17/16, not minikube's 192.168.49/24 or 10.244/16).
const BRIDGE: &str = "leakcni0";
const SUBNET: &str = "10.213.0.0/24";

/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with everything under `dir` (which must be on a disk file system that
    /// overlayfs can use), `sandbox_image` as the pods' pause image (already imported or
    /// imported before the first pod), and waits until its CRI answers.
    pub fn start(dir: &Path, sandbox_image: &str) -> Result<Self, LabError> {
        for tool in ["containerd", "containerd-shim-runc-v2", "runc", "ctr"] {
            which(tool)?;
        }
        if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
            return Err(LabError::Run(format!(
                "no CNI bridge plugin in {CNI_BIN_DIR}: install Debian's containernetworking-plugins"
            )));
        }
        let _ = fs::remove_dir_all(dir);
        for sub in ["root", "state", "cni", "ipam", "opt"] {
            fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("creating {}", dir.join(sub).display())))?;
        }
        let socket = dir.join("containerd.sock");
        fs::write(dir.join("cni/10-leak.conflist"), cni_config(dir))
            .map_err(io("writing the CNI configuration"))?;
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(dir, &socket, sandbox_image))
            .map_err(io("writing the containerd configuration"))?;
        let log = fs::File::create(dir.join("containerd.log")).map_err(io("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("containerd.log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting containerd"))?;
        let mut containerd = Self {
            dir: dir.to_owned(),
            socket,
            child: Some(child),
        };
        containerd.wait_until_serving()?;
        Ok(containerd)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Imports an image archive (OCI or docker) into the kubelet's namespace, as `minikube
    /// image load` does; its name is the one the archive carries.
    pub fn import(&self, archive: &Path) -> Result<(), LabError> {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE, "images", "import"])
            .arg(archive)
            .output()
            .map_err(io("running ctr images import"))?;
        if !output.status.success() {
            return Err(LabError::Run(format!(
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    fn wait_until_serving(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("a runtime for the CRI client"))?;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(LabError::Run(format!(
                        "containerd exited ({status}):\n{}",
                        self.log()
                    )));
                }
            }
            let answer = runtime.block_on(async {
                let mut cri = Cri::connect(&self.socket, Duration::from_secs(2)).await?;
                cri.version().await
            });
            match answer {
                Ok(_) => return Ok(()),
                Err(err) => last = err.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(LabError::Run(format!(
            "containerd's CRI did not answer within 30 s ({last}):\n{}",
            self.log()
        )))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design (a node restarts containerd without its
        // containers): ours are found by the socket they were given.
        kill_processes_mentioning(&self.socket);
        unmount_under(&self.dir);
        let _ = Command::new("ip")
            .args(["link", "delete", BRIDGE])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str) -> Result<(), LabError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    match found {
        true => Ok(()),
        false => Err(LabError::Run(format!(
            "{tool} is not installed: `cargo xtask test` installs Debian's containerd and runc"
        ))),
    }
}

fn cni_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "leak-test",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": SUBNET }]],
                "dataDir": dir.join("ipam"),
            },
        }],
    })
    .to_string()
}

fn config_toml(dir: &Path, socket: &Path, sandbox_image: &str) -> String {
    // Without CAP_SYS_RESOURCE (root in a container, some CI sandboxes) no process may lower
    // its oom_score_adj, and runc fails to give the sandbox containerd's -998 or a critical
    // pod the kubelet's -997: containerd then raises what is asked to its own, as it does
    // when run rootless.
    let restrict_oom_score_adj = !has_capability(CAP_SYS_RESOURCE);
    let dir = dir.display();
    let socket = socket.display();
    format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{dir}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = {restrict_oom_score_adj}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{dir}/cni"
"#
    )
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process holds `capability` in its effective set.
fn has_capability(capability: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << capability) != 0)
}

/// SIGKILLs every process whose command line mentions `needle`.
fn kill_processes_mentioning(needle: &Path) {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point.to_string_lossy().as_bytes()) {
            // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
