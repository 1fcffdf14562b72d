//! `cargo xtask image [--arch amd64|arm64|all]...`: the agent's image, built offline from
//! deploy/Dockerfile around the static binary with Debian's buildah, one archive per
//! architecture: target/image/leak-<arch>.oci.tar.
//!
//! Each archive is an OCI image layout (what `buildah push oci-archive:` writes, which
//! `podman load`, `ctr images import` and `minikube image load` take) with Docker's
//! `manifest.json` beside it naming the same blobs, as `docker save` of Docker 25 and later
//! writes: `docker load` of older versions reads only that file.

use std::{
    fmt, fs,
    ops::Deref,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    bootstrap::{self, output, say, workspace_root},
    musl::{self, Arch},
};

/// The image deploy/daemonset.yaml and deploy/workload.yaml run.
pub const IMAGE: &str = "leak:latest";
/// `IMAGE` as the kubelet, containerd and Docker resolve it: the name in the OCI index.
const IMAGE_REFERENCE: &str = "docker.io/library/leak:latest";
/// Where deploy/Dockerfile puts the binary: its ENTRYPOINT.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/leak";
/// The image's CMD: the DaemonSet's args replace it, starting with the same subcommand.
const DEFAULT_COMMAND: &str = "trace";
/// buildah's blob-info cache: a root buildah writes it whatever `--root` says.
const BUILDAH_SYSTEM_CACHE: &str = "/var/lib/containers";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Architecture to build for; repeat it, or say `all` (default: this machine's).
    #[arg(long = "arch", value_enum)]
    archs: Vec<ArchOption>,
    /// Also build the container tests' node tools image (amd64) and print the environment
    /// that runs those tests by hand (`cargo test --release --test cri_e2e`).
    #[arg(long)]
    node_tools: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ArchOption {
    Amd64,
    Arm64,
    All,
}

impl Options {
    fn archs(&self) -> Result<Vec<Arch>> {
        let mut archs = Vec::new();
        for option in &self.archs {
            let chosen: &[Arch] = match option {
                ArchOption::Amd64 => &[Arch::Amd64],
                ArchOption::Arm64 => &[Arch::Arm64],
                ArchOption::All => &Arch::ALL,
            };
            for arch in chosen {
                if !archs.contains(arch) {
                    archs.push(*arch);
                }
            }
        }
        if archs.is_empty() {
            archs.push(Arch::host().with_context(|| {
                format!(
                    "this machine ({}) is neither amd64 nor arm64: say which image to build with \
                     --arch",
                    std::env::consts::ARCH
                )
            })?);
        }
        Ok(archs)
    }
}

pub fn run(options: Options) -> Result<()> {
    for arch in options.archs()? {
        let image = build(arch)?;
        println!("{image}");
        if options.node_tools && arch == Arch::Amd64 {
            let tools = build_node_tools(&image.binary)?;
            println!(
                "export LEAK_TEST_IMAGE={} LEAK_TEST_NODE_IMAGE={}",
                image.archive.display(),
                tools.display()
            );
        }
    }
    Ok(())
}

/// An image archive, as read back from it.
pub struct Image {
    pub arch: Arch,
    pub archive: PathBuf,
    /// The static binary the image holds.
    pub binary: PathBuf,
    archive_bytes: u64,
    reference: String,
    platform: String,
    entrypoint: Value,
    cmd: Value,
    binary_bytes: u64,
    linking: &'static str,
    version: String,
    runner: Option<String>,
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({:.1} MiB): {}, {}, entrypoint {}, cmd {}",
            self.archive.display(),
            musl::mebibytes(self.archive_bytes),
            self.reference,
            self.platform,
            self.entrypoint,
            self.cmd
        )?;
        write!(
            f,
            "  {BINARY_IN_IMAGE}: {} {} ELF, {:.1} MiB, no loader, no shared library; `leak \
             --version`{}: {}",
            self.linking,
            self.arch.target(),
            musl::mebibytes(self.binary_bytes),
            self.runner
                .as_ref()
                .map(|runner| format!(" under {runner}"))
                .unwrap_or_default(),
            self.version
        )
    }
}

/// Builds `arch`'s static binary, then its image, and returns the archive as read back.
pub fn build(arch: Arch) -> Result<Image> {
    if !bootstrap::is_root() {
        bail!(
            "cargo xtask image runs buildah rootful, its storage under target/image: run it as \
             root"
        );
    }
    bootstrap::debian_packages(&[("buildah", "buildah")])?;
    let binary = musl::build_leak(arch)?;
    let images = workspace_root().join("target/image");
    // The layout deploy/Dockerfile copies from: target/image/$TARGETARCH/leak.
    let staged = images.join(arch.name()).join("leak");
    fs::create_dir_all(images.join(arch.name()))?;
    fs::copy(&binary, &staged)
        .with_context(|| format!("copying {} to {}", binary.display(), staged.display()))?;
    let archive = images.join(format!("leak-{}.oci.tar", arch.name()));
    let started = Instant::now();
    buildah(arch, &archive)?;
    add_docker_manifest(&archive)?;
    say(format!(
        "built the {} image in {:.1?}",
        arch.name(),
        started.elapsed()
    ));
    inspect(arch, &archive)
}

/// The pods' sandbox image of the container tests, and their shell: busybox (the static one
/// Debian packages), its applets linked in /bin, `leak` at the same place as in the agent's
/// image, and a long sleep as the command, standing in for the pause image a registry would
/// give. Built like the agent's; written to target/image/leak-node-tools-amd64.oci.tar.
pub const NODE_TOOLS_IMAGE: &str = "docker.io/library/leak-node-tools:latest";

pub fn build_node_tools(leak: &Path) -> Result<PathBuf> {
    bootstrap::debian_packages(&[("buildah", "buildah"), ("busybox", "busybox-static")])?;
    let busybox = PathBuf::from("/bin/busybox");
    let linking = musl::check_static(
        &fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?,
        Arch::Amd64,
    )
    .with_context(|| {
        format!(
            "{} is not a static amd64 binary: install Debian's busybox-static",
            busybox.display()
        )
    })?;
    let images = workspace_root().join("target/image");
    let context = Scratch::new(images.join("node-tools-context"))?;
    fs::create_dir_all(context.join("bin"))?;
    fs::copy(&busybox, context.join("bin/busybox"))?;
    fs::copy(leak, context.join("leak"))?;
    fs::write(
        context.join("Containerfile"),
        format!(
            "FROM scratch\n\
             COPY bin/busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             COPY leak {BINARY_IN_IMAGE}\n\
             CMD [\"/bin/sleep\", \"2147483647\"]\n"
        ),
    )?;
    let archive = images.join("leak-node-tools-amd64.oci.tar");
    let storage = BuildahStorage::new(Arch::Amd64)?;
    say(format!(
        "building {NODE_TOOLS_IMAGE} (busybox, {linking}, and leak) with buildah"
    ));
    bootstrap::run(
        storage
            .command()
            .args(["bud", "--quiet", "--platform", "linux/amd64", "--tag"])
            .arg(NODE_TOOLS_IMAGE)
            .arg(&*context),
    )?;
    if archive.exists() {
        fs::remove_file(&archive)?;
    }
    bootstrap::run(
        storage
            .command()
            .args(["push", "--quiet", NODE_TOOLS_IMAGE])
            .arg(format!(
                "oci-archive:{}:{NODE_TOOLS_IMAGE}",
                archive.display()
            )),
    )?;
    Ok(archive)
}

/// A directory of its own, emptied when made and removed when dropped, on an error too.
struct Scratch(PathBuf);

impl Scratch {
    fn new(path: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// buildah's storage for one build, under target/image, and the system-wide blob-info cache
/// that root's buildah writes: removed afterwards, the cache only if the build made it.
struct BuildahStorage {
    storage: Scratch,
    made_system_cache: bool,
}

impl BuildahStorage {
    fn new(arch: Arch) -> Result<Self> {
        let made_system_cache = !Path::new(BUILDAH_SYSTEM_CACHE).exists();
        let storage = Scratch::new(
            workspace_root()
                .join("target/image")
                .join(format!("buildah-{}", arch.name())),
        )?;
        fs::create_dir_all(storage.join("tmp"))?;
        Ok(Self {
            storage,
            made_system_cache,
        })
    }

    /// `buildah` on this storage. The `vfs` driver copies layers instead of mounting them:
    /// it needs neither overlayfs nor fuse-overlayfs, so it works inside containers too, and
    /// the image's single layer is small.
    fn command(&self) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(self.storage.join("root"))
            .arg("--runroot")
            .arg(self.storage.join("run"))
            .args(["--storage-driver", "vfs"])
            // Where buildah stages blobs while it writes the archive (else /var/tmp).
            .env("TMPDIR", self.storage.join("tmp"));
        command
    }
}

impl Drop for BuildahStorage {
    fn drop(&mut self) {
        if self.made_system_cache {
            let _ = fs::remove_dir_all(BUILDAH_SYSTEM_CACHE);
        }
    }
}

/// Builds deploy/Dockerfile for `arch` with the workspace as its context (its .dockerignore
/// sends only target/image/*/leak) and writes the image as an OCI archive.
fn buildah(arch: Arch, archive: &Path) -> Result<()> {
    let root = workspace_root();
    let storage = BuildahStorage::new(arch)?;
    say(format!(
        "building the {} image {IMAGE} with buildah (storage: {}, removed afterwards)",
        arch.name(),
        storage.storage.display()
    ));
    // `--platform` rather than `--arch`: buildah 1.28 sets TARGETARCH from the former only.
    bootstrap::run(
        storage
            .command()
            .arg("bud")
            .args(["--platform", &format!("linux/{}", arch.name())])
            .arg("--file")
            .arg(root.join("deploy/Dockerfile"))
            .args(["--tag", IMAGE])
            .arg(&root),
    )?;
    if archive.exists() {
        fs::remove_file(archive).with_context(|| format!("removing {}", archive.display()))?;
    }
    bootstrap::run(
        storage
            .command()
            .args(["push", "--quiet", IMAGE])
            .arg(format!(
                "oci-archive:{}:{IMAGE_REFERENCE}",
                archive.display()
            )),
    )
}

/// `sha256:<hex>` to the blob's path in an OCI layout, refusing anything else (a digest is
/// also a path here).
fn blob_path(digest: &Value) -> Result<String> {
    let hex = digest
        .as_str()
        .and_then(|digest| digest.strip_prefix("sha256:"))
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("{digest} is not a sha256 digest"))?;
    Ok(format!("blobs/sha256/{hex}"))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// One image of an unpacked OCI layout.
struct Layout {
    index: Value,
    config_path: String,
    config: Value,
    layer_paths: Vec<String>,
}

impl Layout {
    fn read(dir: &Path) -> Result<Self> {
        let index = read_json(&dir.join("index.json"))?;
        let manifests = index["manifests"]
            .as_array()
            .context("index.json has no manifests")?;
        ensure!(
            manifests.len() == 1,
            "index.json lists {} images, not one",
            manifests.len()
        );
        let manifest = read_json(&dir.join(blob_path(&manifests[0]["digest"])?))?;
        let config_path = blob_path(&manifest["config"]["digest"])?;
        let config = read_json(&dir.join(&config_path))?;
        let layer_paths = manifest["layers"]
            .as_array()
            .context("the manifest has no layers")?
            .iter()
            .map(|layer| blob_path(&layer["digest"]))
            .collect::<Result<_>>()?;
        Ok(Self {
            index,
            config_path,
            config,
            layer_paths,
        })
    }

    /// Docker's `manifest.json` for the same blobs.
    fn docker_manifest(&self) -> Value {
        json!([{
            "Config": self.config_path,
            "RepoTags": [IMAGE],
            "Layers": self.layer_paths,
        }])
    }
}

fn unpack(archive: &Path, dir: &Path) -> Result<()> {
    bootstrap::run(
        Command::new("tar")
            .arg("--extract")
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(dir),
    )
}

fn add_docker_manifest(archive: &Path) -> Result<()> {
    let dir = Scratch::new(archive.with_extension("unpacked"))?;
    unpack(archive, &dir)?;
    let layout = Layout::read(&dir)?;
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&layout.docker_manifest())?,
    )?;
    bootstrap::run(
        Command::new("tar")
            .arg("--append")
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(&*dir)
            .arg("manifest.json"),
    )
}

/// Reads the archive back and checks it: one image, named `IMAGE`, for linux/`arch`, starting
/// `leak trace`, whose single layer holds a static `arch` binary that runs (here, or under
/// QEMU's user-mode emulator).
fn inspect(arch: Arch, archive: &Path) -> Result<Image> {
    let dir = Scratch::new(archive.with_extension("inspected"))?;
    unpack(archive, &dir)?;
    let layout = Layout::read(&dir)?;
    let reference = layout.index["manifests"][0]["annotations"]
        ["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        reference == IMAGE_REFERENCE,
        "the index names the image {reference:?}, not {IMAGE_REFERENCE}"
    );
    let docker_manifest = read_json(&dir.join("manifest.json"))?;
    ensure!(
        docker_manifest == layout.docker_manifest(),
        "manifest.json ({docker_manifest}) does not name the OCI manifest's blobs"
    );
    let platform = format!(
        "{}/{}",
        layout.config["os"].as_str().unwrap_or_default(),
        layout.config["architecture"].as_str().unwrap_or_default()
    );
    ensure!(
        platform == format!("linux/{}", arch.name()),
        "the image is for {platform}, not linux/{}",
        arch.name()
    );
    let entrypoint = layout.config["config"]["Entrypoint"].clone();
    let cmd = layout.config["config"]["Cmd"].clone();
    ensure!(
        entrypoint == json!([BINARY_IN_IMAGE]) && cmd == json!([DEFAULT_COMMAND]),
        "the image runs {entrypoint} {cmd}, not [\"{BINARY_IN_IMAGE}\"] [\"{DEFAULT_COMMAND}\"]"
    );
    let [layer] = layout.layer_paths.as_slice() else {
        bail!(
            "the image has {} layers, not the binary's one",
            layout.layer_paths.len()
        );
    };
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    let in_layer = BINARY_IN_IMAGE.trim_start_matches('/');
    // GNU tar recognises the layer's compression (gzip) by itself.
    bootstrap::run(
        Command::new("tar")
            .arg("--extract")
            .arg("--file")
            .arg(dir.join(layer))
            .arg("--directory")
            .arg(&rootfs)
            .arg(in_layer),
    )?;
    let binary = rootfs.join(in_layer);
    let elf = fs::read(&binary)?;
    let linking = musl::check_static(&elf, arch).context("the image's binary")?;
    let runner = arch.runner();
    let mut version = match &runner {
        Some(qemu) => {
            bootstrap::debian_packages(&[(qemu, "qemu-user")])?;
            let mut command = Command::new(qemu);
            command.arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    let version = output(version.arg("--version"))
        .context("the image's binary does not start")?
        .trim()
        .to_owned();
    Ok(Image {
        arch,
        archive: archive.to_path_buf(),
        binary: workspace_root()
            .join("target/image")
            .join(arch.name())
            .join("leak"),
        archive_bytes: fs::metadata(archive)?.len(),
        reference,
        platform,
        entrypoint,
        cmd,
        binary_bytes: elf.len() as u64,
        linking,
        version,
        runner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_become_blob_paths_and_nothing_else_does() {
        let hex = "ab".repeat(32);
        assert_eq!(
            blob_path(&json!(format!("sha256:{hex}"))).ok(),
            Some(format!("blobs/sha256/{hex}"))
        );
        for bad in [
            json!("sha256:../../etc/passwd"),
            json!(format!("sha512:{hex}")),
            json!(format!("sha256:{hex}00")),
            json!(null),
        ] {
            assert!(blob_path(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arch_options_add_up_without_repeats() {
        let options = Options {
            archs: vec![ArchOption::Arm64, ArchOption::All, ArchOption::Amd64],
            node_tools: false,
        };
        assert_eq!(options.archs().ok(), Some(vec![Arch::Arm64, Arch::Amd64]));
        let default = Options {
            archs: Vec::new(),
            node_tools: false,
        };
        assert_eq!(default.archs().ok(), Arch::host().map(|arch| vec![arch]));
    }

    #[test]
    fn docker_manifest_names_the_oci_blobs() {
        let layout = Layout {
            index: json!({}),
            config_path: "blobs/sha256/c".into(),
            config: json!({}),
            layer_paths: vec!["blobs/sha256/l".into()],
        };
        assert_eq!(
            layout.docker_manifest(),
            json!([{
                "Config": "blobs/sha256/c",
                "RepoTags": ["leak:latest"],
                "Layers": ["blobs/sha256/l"],
            }])
        );
    }
}
