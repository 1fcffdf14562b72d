//! Finding, installing or building what the build and the tests need, saying what is done.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The toolchain that builds the kernel programs (`-Z build-std=core`).
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release built against the nightly's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors that bpf-linker 0.13 can be built against.
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];

/// The cargo-fuzz release that builds and runs leak-user/fuzz's targets.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the test suite uses: `promtool` (lint of /metrics) and the `prometheus`
/// server (a real scrape, on the host and inside every test VM), and the tools that take
/// Debian kernel packages apart.
pub const TEST_PACKAGES: [(&str, &str); 14] = [
    ("prometheus", "prometheus"),
    // The container stage: the runtime a node runs, its network plugins, and the busybox the
    // pods' sandbox image is made of.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/bin/busybox", "busybox-static"),
    ("ip", "iproute2"),
    ("promtool", "prometheus"),
    // The web configuration's TLS and basic auth, tested with certificates made on the spot.
    ("openssl", "openssl"),
    ("curl", "curl"),
    // The pages are tested in a real browser, headless, over the DevTools pipe.
    ("chromium", "chromium"),
    ("dpkg-deb", "dpkg"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

pub fn say(message: impl AsRef<str>) {
    eprintln!("xtask: {}", message.as_ref());
}

/// Runs a command, failing with its command line when it does not succeed.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
pub fn output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// `PATH` with cargo's bin folder first, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_home().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where xtask keeps what it downloads and builds (kernels, BTF, the LLVM link folder).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LEAK_XTASK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("xtask"))
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Everything `cargo xtask test` needs, for `cargo xtask bootstrap` and the test's first stage.
pub fn all() -> Result<()> {
    ebpf_toolchain()?;
    lint_tools()?;
    cargo_fuzz()?;
    debian_packages(&TEST_PACKAGES)
}

/// The nightly toolchain with rust-src, and bpf-linker built against the nightly's LLVM.
pub fn ebpf_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the kernel programs (https://rustup.rs)")?;
    if !toolchains.lines().any(|line| line.starts_with(NIGHTLY)) {
        say("installing the nightly toolchain (the kernel programs need -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    rustup_components(
        Some(NIGHTLY),
        &["rust-src"],
        "the kernel programs build core from source",
    )?;
    bpf_linker()
}

/// Adds the components of `toolchain` (`None`: the one running xtask) that are missing.
fn rustup_components(toolchain: Option<&str>, wanted: &[&str], why: &str) -> Result<()> {
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    if let Some(toolchain) = toolchain {
        list.args(["--toolchain", toolchain]);
    }
    let installed = output(&mut list)?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|component| {
            // Lines read `rust-src` or `clippy-x86_64-unknown-linux-gnu` (component-host).
            !installed
                .lines()
                .any(|line| line == *component || line.starts_with(&format!("{component}-")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let name = toolchain.unwrap_or("active");
    say(format!(
        "adding {} to the {name} toolchain ({why})",
        missing.join(", ")
    ));
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    if let Some(toolchain) = toolchain {
        add.args(["--toolchain", toolchain]);
    }
    run(&mut add)
}

/// Adds the targets of the toolchain running xtask (its standard library, prebuilt) that are
/// missing.
pub fn rustup_targets(wanted: &[&str], why: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("rustup is needed to add the standard library of other targets")?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|target| !installed.lines().any(|line| line.trim() == *target))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(format!(
        "adding the rustup targets {} ({why})",
        missing.join(", ")
    ));
    run(Command::new("rustup")
        .args(["target", "add"])
        .args(&missing))
}

/// rustfmt and clippy for the lint stage: on the toolchain running xtask for the workspace,
/// and on nightly for the kernel programs (their clippy run needs `-Z build-std`).
pub fn lint_tools() -> Result<()> {
    ebpf_toolchain()?;
    rustup_components(
        None,
        &["rustfmt", "clippy"],
        "the lint stage checks formatting and lints",
    )?;
    rustup_components(
        Some(NIGHTLY),
        &["rustfmt", "clippy"],
        "the lint stage runs clippy on the kernel programs",
    )
}

/// cargo-fuzz, pinned, which builds the fuzz targets with libFuzzer and AddressSanitizer.
pub fn cargo_fuzz() -> Result<()> {
    let binary = cargo_home().join("bin").join("cargo-fuzz");
    if let Ok(version) = output(Command::new(&binary).arg("--version")) {
        if version.contains(CARGO_FUZZ_VERSION) {
            return Ok(());
        }
        say(format!(
            "replacing {} with cargo-fuzz {CARGO_FUZZ_VERSION}",
            version.trim()
        ));
    }
    say(format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (`cargo install cargo-fuzz --locked`): it \
         builds leak-user/fuzz's targets with libFuzzer and AddressSanitizer; this takes a few \
         minutes"
    ));
    run(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))
    .context("installing cargo-fuzz failed; see the cargo output above")
}

fn bpf_linker() -> Result<()> {
    let linker = cargo_home().join("bin").join("bpf-linker");
    if linker.exists() {
        match output(Command::new(&linker).arg("--version")) {
            Ok(version) if version.contains(BPF_LINKER_VERSION) => return Ok(()),
            Ok(version) => say(format!(
                "replacing {} with bpf-linker {BPF_LINKER_VERSION}",
                version.trim()
            )),
            // Built against a nightly LLVM that has since been updated away.
            Err(err) => say(format!("bpf-linker does not run ({err}); rebuilding it")),
        }
    }
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let version = output(Command::new("rustc").arg(format!("+{NIGHTLY}")).arg("-vV"))?;
    let llvm_major: u32 = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .context("cannot tell the nightly toolchain's LLVM version from `rustc -vV`")?;
    if !BPF_LINKER_LLVM.contains(&llvm_major) {
        bail!(
            "the nightly toolchain uses LLVM {llvm_major}, but bpf-linker {BPF_LINKER_VERSION} \
             builds only against LLVM {BPF_LINKER_LLVM:?}; install a matching nightly with \
             `rustup toolchain install nightly-YYYY-MM-DD` and set it as `nightly`"
        );
    }
    let libllvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .with_context(|| {
            format!(
                "no libLLVM in {}: is the nightly toolchain complete?",
                lib.display()
            )
        })?;
    let prefix = cache_dir().join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib").join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    say(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} ({}); \
         this takes a minute or two",
        libllvm.display()
    ));
    run(Command::new("cargo")
        .arg(format!("+{NIGHTLY}"))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        ))
    .context("building bpf-linker failed; see the cargo output above")?;
    Ok(())
}

/// Installs the Debian packages whose commands are missing.
pub fn debian_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(command, _)| {
            output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_err()
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them with `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    say(format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
