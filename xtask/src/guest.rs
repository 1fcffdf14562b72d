//! What differs between the VMs' architectures: the QEMU machine that boots a kernel, its
//! console, and what the initramfs carries besides the kernel's modules. For this machine's
//! architecture that is the release build, its shared libraries, and the host's busybox and
//! Prometheus; for another (arm64 on an amd64 host) the static musl builds of `leak` and the
//! tests, and Debian's busybox-static, prometheus and libc6 of that architecture, unpacked
//! (never installed).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, output, say},
    debs,
    musl::{self, Arch},
};

/// The end-to-end test targets the VMs run.
const TEST_TARGETS: &[&str] = &["oom_e2e", "k8s_e2e", "pin_e2e", "storm_e2e"];

/// Debian's `prometheus` package's commands the tests run, at their paths in the package.
const PROMETHEUS_TOOLS: &[&str] = &["/usr/bin/prometheus", "/usr/bin/promtool"];

/// The files of the initramfs that are not the kernel's.
pub struct Guest {
    pub arch: Arch,
    pub busybox: PathBuf,
    pub leak: PathBuf,
    /// The end-to-end test executables by target name (`oom_e2e`, `k8s_e2e`).
    pub tests: Vec<(String, PathBuf)>,
    /// Prometheus's commands and the shared libraries of every dynamic executable: the path in
    /// the guest, and the file here.
    pub files: Vec<(String, PathBuf)>,
}

/// The QEMU command for `arch`'s guests and the Debian package that has it.
pub fn qemu(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::Amd64 => ("qemu-system-x86_64", "qemu-system-x86"),
        Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
    }
}

/// The emulated machine, without KVM (TCG). On arm64, QEMU's `virt` board and its most
/// capable CPU, with QEMU's own pointer-authentication cipher (`pauth-impdef`) in place of the
/// architected QARMA, which the kernel runs at every function entry and return: with QARMA
/// arm64 6.1's `auto` cell took four times as long (401 s, not 102 s).
pub fn machine(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Amd64 => &["-accel", "tcg", "-cpu", "max"],
        Arch::Arm64 => &["-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"],
    }
}

/// The serial console the kernel writes to.
pub fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "ttyS0",
        Arch::Arm64 => "ttyAMA0",
    }
}

/// Builds (release) and gathers everything the initramfs of `arch` carries, after installing
/// what is missing.
pub fn prepare(arch: Arch) -> Result<Guest> {
    bootstrap::ebpf_toolchain()?;
    let (qemu, package) = qemu(arch);
    bootstrap::debian_packages(&[(qemu, package), ("mkfs.ext4", "e2fsprogs")])?;
    match Arch::host() == Some(arch) {
        true => native(arch),
        false => cross(arch),
    }
}

/// This machine's release build, with its shared libraries, and the host's tools.
fn native(arch: Arch) -> Result<Guest> {
    bootstrap::debian_packages(&[
        ("busybox", "busybox-static"),
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
    ])?;
    say("building leak and the end-to-end tests (release) for the VMs");
    crate::run::cargo_build_leak(None, Vec::new())?;
    let leak = bootstrap::workspace_root().join("target/release/leak");
    let tests = build_tests(None, Vec::new())?;
    let mut libraries = shared_libraries(&leak)?;
    for (_, path) in &tests {
        libraries.extend(shared_libraries(path)?);
    }
    // Debian's Prometheus server and promtool (installed above), at their host paths, so the
    // scrape test and the /metrics lint run for real in every VM.
    let mut files = Vec::new();
    for tool in PROMETHEUS_TOOLS {
        let name = tool.rsplit('/').next().unwrap_or(tool);
        let path = which(name)?;
        libraries.extend(shared_libraries(&path)?);
        files.push((path.to_string_lossy().into_owned(), path));
    }
    libraries.sort();
    libraries.dedup();
    files.extend(
        libraries
            .into_iter()
            .map(|library| (library.to_string_lossy().into_owned(), library)),
    );
    Ok(Guest {
        arch,
        busybox: which("busybox")?,
        leak,
        tests,
        files,
    })
}

/// Static musl builds for `arch`, and Debian's tools of that architecture.
fn cross(arch: Arch) -> Result<Guest> {
    let leak = musl::build_leak(arch)?;
    say(format!(
        "building the end-to-end tests (release, static) for {} ({})",
        arch.name(),
        arch.target()
    ));
    let tests = build_tests(Some(arch.target()), musl::cargo_env(arch)?)?;
    for (name, path) in &tests {
        let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        musl::check_static(&elf, arch).with_context(|| format!("the {name} test executable"))?;
    }
    let busybox = debs::resolve(&debs::unpacked(arch, "busybox-static")?, "/bin/busybox")?;
    let elf = std::fs::read(&busybox)?;
    musl::check_static(&elf, arch).context("Debian's busybox-static")?;
    // Debian builds Prometheus with cgo: it loads glibc, the package's libc6.
    let roots = [
        debs::unpacked(arch, "prometheus")?,
        debs::unpacked(arch, "libc6")?,
    ];
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for tool in PROMETHEUS_TOOLS {
        for file in debs::program_closure(arch, &roots, tool)? {
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    Ok(Guest {
        arch,
        busybox,
        leak,
        tests,
        files,
    })
}

/// `cargo test --release --no-run` of the end-to-end targets for `target` (this machine's when
/// `None`), with `env` added: the executables by target name.
fn build_tests(
    target: Option<&str>,
    env: Vec<(String, std::ffi::OsString)>,
) -> Result<Vec<(String, PathBuf)>> {
    let messages = output(
        Command::new(env!("CARGO"))
            .args(["test", "--release", "-p", "leak-user", "--no-run"])
            .args(TEST_TARGETS.iter().flat_map(|target| ["--test", target]))
            .args(
                target
                    .map(|target| ["--target", target])
                    .into_iter()
                    .flatten(),
            )
            .args(["--message-format", "json"])
            .envs(env)
            .current_dir(bootstrap::workspace_root())
            .env("PATH", bootstrap::path_with_cargo_bin()),
    )?;
    let artifacts: Vec<serde_json::Value> = messages
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|m: &serde_json::Value| m["reason"] == "compiler-artifact")
        .collect();
    let mut tests = Vec::new();
    for target in TEST_TARGETS {
        let executable = artifacts
            .iter()
            .filter(|m| m["target"]["name"] == *target)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo did not report the {target} test executable"))?;
        tests.push(((*target).to_owned(), executable));
    }
    Ok(tests)
}

/// The shared libraries a dynamic executable of this machine loads, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let result = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot start ldd")?;
    let text = String::from_utf8_lossy(&result.stdout);
    if !result.status.success() {
        if text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(command: &str) -> Result<PathBuf> {
    let path = output(Command::new("sh").args(["-c", &format!("command -v {command}")]))?;
    Ok(PathBuf::from(path.trim()))
}
