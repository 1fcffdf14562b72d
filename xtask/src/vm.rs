//! `cargo xtask vm`: the end-to-end tests inside Debian's real kernels under QEMU, once per
//! attach mode, on cgroup v2, with a virtio disk for the page-cache scenario.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, output, say},
    cpio::Archive,
    kernels::{self, Kernel},
};

/// Every attach mode; `auto` must choose fentry on kernels that allow it.
pub const ALL_MODES: &str = "auto,fentry,kprobe,tp_btf,tracepoint";
/// Modules the VM needs from the kernel's own package: the virtio disk.
const MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Debian cloud kernel series to boot (5.10, 6.1, 6.12 ...); repeat for several.
    #[arg(long = "kernel", required = true)]
    kernels: Vec<String>,
    /// Attach modes to test, comma-separated.
    #[arg(long, default_value = ALL_MODES)]
    modes: String,
    /// The mode `auto` must pick on these kernels.
    #[arg(long, default_value = "fentry")]
    expect_auto: String,
    /// Hard limit for one kernel's boot and tests, in seconds.
    #[arg(long, default_value_t = 1500)]
    timeout: u64,
    /// Skip the Kubernetes-layout tests.
    #[arg(long)]
    no_k8s: bool,
    /// Only run tests whose name contains this.
    #[arg(last = true)]
    filter: Vec<String>,
}

pub struct Settings {
    /// Also run the Kubernetes-layout tests (once, in mode auto).
    pub k8s: bool,
    /// Also run `leak bench` and report its JSON.
    pub bench: bool,
    pub modes: String,
    pub expect_auto: String,
    pub timeout: Duration,
    pub filter: Vec<String>,
}

/// One line of the final matrix.
pub struct Outcome {
    pub kernel: String,
    pub mode: String,
    pub passed: bool,
    pub detail: String,
    /// `leak bench`'s JSON, for the bench line.
    pub bench: Option<serde_json::Value>,
}

pub fn run(options: Options) -> Result<()> {
    let settings = Settings {
        k8s: !options.no_k8s,
        bench: false,
        modes: options.modes,
        expect_auto: options.expect_auto,
        timeout: Duration::from_secs(options.timeout),
        filter: options.filter,
    };
    let outcomes = run_kernels(&options.kernels, &settings)?;
    report(&outcomes)
}

/// Prints the matrix and fails if any cell failed.
pub fn report(outcomes: &[Outcome]) -> Result<()> {
    say("VM results:");
    for outcome in outcomes {
        eprintln!(
            "  {:<26} {:<11} {}{}",
            outcome.kernel,
            outcome.mode,
            if outcome.passed { "PASS" } else { "FAIL" },
            if outcome.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", outcome.detail)
            }
        );
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    if failed > 0 {
        bail!("{failed} VM runs failed");
    }
    Ok(())
}

pub fn run_kernels(series: &[String], settings: &Settings) -> Result<Vec<Outcome>> {
    bootstrap::ebpf_toolchain()?;
    bootstrap::debian_packages(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
    ])?;
    let binaries = build_binaries()?;
    let mut outcomes = Vec::new();
    for series in series {
        let kernel = kernels::fetch(series)?;
        let started = Instant::now();
        let result = boot(&kernel, &binaries, settings);
        say(format!(
            "{}: {:.1} s in the VM",
            kernel.release,
            started.elapsed().as_secs_f64()
        ));
        match result {
            Ok(mut results) => outcomes.append(&mut results),
            Err(err) => outcomes.push(Outcome {
                kernel: kernel.release.clone(),
                mode: "boot".into(),
                passed: false,
                detail: format!("{err:#}"),
                bench: None,
            }),
        }
    }
    Ok(outcomes)
}

struct Binaries {
    leak: PathBuf,
    /// The end-to-end test executables by target name (`oom_e2e`, `k8s_e2e`).
    tests: Vec<(String, PathBuf)>,
}

/// The end-to-end test targets the VMs run.
const TEST_TARGETS: &[&str] = &["oom_e2e", "k8s_e2e"];

/// The agent and the end-to-end test binary, release builds.
fn build_binaries() -> Result<Binaries> {
    let root = bootstrap::workspace_root();
    say("building leak and the end-to-end tests (release) for the VMs");
    bootstrap::run(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "leak-user", "--bin", "leak"])
            .current_dir(&root)
            .env("PATH", bootstrap::path_with_cargo_bin()),
    )?;
    let messages = output(
        Command::new(env!("CARGO"))
            .args(["test", "--release", "-p", "leak-user", "--no-run"])
            .args(TEST_TARGETS.iter().flat_map(|target| ["--test", target]))
            .args(["--message-format", "json"])
            .current_dir(&root)
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
    Ok(Binaries {
        leak: root.join("target/release/leak"),
        tests,
    })
}

/// The shared libraries a dynamic executable loads, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
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

/// Module files to load, dependencies first. The package has no `modules.dep` (depmod runs at
/// install time), so dependencies come from each module's own `.modinfo` `depends=`.
fn module_load_order(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    // Trixie and later merged /lib into /usr.
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| kernel.root.join(dir).join(&kernel.release))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("{} ships no modules directory", kernel.release))?;
    let mut index = BTreeMap::new();
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains(".ko") {
                index.insert(module_name(&path.to_string_lossy()), path);
            }
        }
    }
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        // Not a module file: built into the kernel.
        let Some(path) = index.get(name) else {
            return Ok(());
        };
        let bytes = module_bytes(path)?;
        let modinfo = kernels::elf_section(&bytes, ".modinfo")
            .with_context(|| format!("{} has no .modinfo", path.display()))?;
        let depends = modinfo
            .split(|&b| b == 0)
            .filter_map(|entry| entry.strip_prefix(b"depends="))
            .flat_map(|list| {
                String::from_utf8_lossy(list)
                    .split(',')
                    .map(|d| d.replace('-', "_"))
                    .collect::<Vec<_>>()
            })
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>();
        for dependency in depends {
            visit(&dependency, index, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for module in MODULES {
        visit(module, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module's bytes, decompressed when the package ships it compressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool: Option<&[&str]> = if name.ends_with(".xz") {
        Some(&["xz", "-dc"])
    } else if name.ends_with(".zst") {
        Some(&["zstd", "-dcq"])
    } else if name.ends_with(".gz") {
        Some(&["gzip", "-dc"])
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(tool) => {
            let result = Command::new(tool[0]).args(&tool[1..]).arg(path).output()?;
            if !result.status.success() {
                bail!("cannot decompress {name}");
            }
            Ok(result.stdout)
        }
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
for module in $(cat /modules); do insmod "$module" || echo "LEAK-VM insmod $module failed"; done
ip link set lo up
mkdir -p /disk
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
mount -t ext4 /dev/vda /disk || echo "LEAK-VM cannot mount the virtio disk"
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^leak\.$1=//p"; }
modes=$(arg modes | tr ',' ' ')
filter=$(arg filter)
echo "LEAK-VM kernel $(uname -r), modes: $modes"
for mode in $modes; do
  CI=true LEAK_BIN=/bin/leak LEAK_TEST_DISK_DIR=/disk LEAK_TEST_NO_PROMETHEUS=1 \
    LEAK_TEST_GLOBAL_OOM=1 LEAK_TEST_ATTACH=$mode LEAK_TEST_EXPECT_AUTO=$(arg expect_auto) RUST_BACKTRACE=1 \
    /tests/oom_e2e --test-threads=1 --nocapture $filter
  if [ $? -eq 0 ]; then echo "LEAK-VM-RESULT $mode pass"; else echo "LEAK-VM-RESULT $mode fail"; fi
done
if [ "$(arg k8s)" = 1 ]; then
  CI=true LEAK_BIN=/bin/leak LEAK_TEST_NO_PROMETHEUS=1 RUST_BACKTRACE=1 \
    /tests/k8s_e2e --test-threads=1 --nocapture $filter
  if [ $? -eq 0 ]; then echo "LEAK-VM-RESULT k8s pass"; else echo "LEAK-VM-RESULT k8s fail"; fi
fi
if [ "$(arg bench)" = 1 ]; then
  /bin/leak bench --rounds 3 --duration 1s --kills 20 --file-dir /disk --json /tmp/bench.json
  if [ $? -eq 0 ]; then
    echo "LEAK-VM-BENCH $(tr -d '\n' < /tmp/bench.json)"
    echo "LEAK-VM-RESULT bench pass"
  else
    echo "LEAK-VM-RESULT bench fail"
  fi
fi
echo "LEAK-VM-DONE"
sync
poweroff -f
"#;

fn initramfs(kernel: &Kernel, binaries: &Binaries, path: &Path) -> Result<()> {
    let mut archive = Archive::new();
    for dir in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "disk",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules",
    ] {
        archive.dir(dir);
    }
    archive.char_device("/dev/console", 5, 1);
    archive.char_device("/dev/null", 1, 3);
    archive.file("/bin/busybox", 0o755, &fs::read(which("busybox")?)?);
    archive.file("/init", 0o755, INIT.as_bytes());
    archive.file("/bin/leak", 0o755, &fs::read(&binaries.leak)?);
    let mut libraries: Vec<PathBuf> = shared_libraries(&binaries.leak)?;
    for (name, path) in &binaries.tests {
        archive.file(&format!("/tests/{name}"), 0o755, &fs::read(path)?);
        libraries.extend(shared_libraries(path)?);
    }
    libraries.sort();
    libraries.dedup();
    for library in libraries {
        let bytes = fs::read(&library).with_context(|| format!("reading {}", library.display()))?;
        archive.file(&library.to_string_lossy(), 0o755, &bytes);
    }
    let mut load = String::new();
    for (index, module) in module_load_order(kernel)?.iter().enumerate() {
        let target = format!(
            "/lib/modules/{index:02}-{}.ko",
            module_name(&module.to_string_lossy())
        );
        archive.file(&target, 0o644, &module_bytes(module)?);
        load.push_str(&target);
        load.push('\n');
    }
    archive.file("/modules", 0o644, load.as_bytes());
    fs::write(path, archive.finish())?;
    Ok(())
}

fn which(command: &str) -> Result<PathBuf> {
    let path = output(Command::new("sh").args(["-c", &format!("command -v {command}")]))?;
    Ok(PathBuf::from(path.trim()))
}

/// Boots one kernel, streams its console with the kernel's name as prefix, and collects one
/// result per attach mode.
fn boot(kernel: &Kernel, binaries: &Binaries, settings: &Settings) -> Result<Vec<Outcome>> {
    let work = bootstrap::cache_dir().join("vm").join(&kernel.release);
    fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    initramfs(kernel, binaries, &initrd)?;
    let disk = work.join("disk.img");
    let _ = fs::remove_file(&disk);
    fs::File::create(&disk)?.set_len(512 << 20)?;
    bootstrap::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk))?;

    let mut append = format!(
        "console=ttyS0 panic=-1 oops=panic loglevel=4 leak.modes={} leak.expect_auto={} \
         leak.k8s={} leak.bench={}",
        settings.modes,
        settings.expect_auto,
        u8::from(settings.k8s),
        u8::from(settings.bench)
    );
    if let Some(filter) = settings.filter.first() {
        append.push_str(&format!(" leak.filter={filter}"));
    }
    say(format!("booting {} under QEMU (TCG)", kernel.release));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let _ = tx.send(String::from_utf8_lossy(&line).trim_end().to_owned());
                line.clear();
            }
        });
    }
    drop(tx);

    let short = kernel
        .release
        .split("-cloud")
        .next()
        .unwrap_or(&kernel.release)
        .to_owned();
    let deadline = Instant::now() + settings.timeout;
    let mut outcomes = Vec::new();
    let mut failure = None;
    let mut done = false;
    let mut bench = None;
    // The scenarios a host cannot run (group kill on cgroup v1, global OOM on a shared machine)
    // are what the VMs are for: one skipping here is a failure, not a pass.
    const VM_ONLY_SKIPS: &[&str] = &["SKIP group kill", "SKIP global OOM"];
    let mut vm_only_skip = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            failure = Some(format!("timed out after {} s", settings.timeout.as_secs()));
            break;
        }
        let line = match rx.recv_timeout(remaining.min(Duration::from_secs(5))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        println!("[{short}] {line}");
        if line.contains("Kernel panic") {
            failure = Some(format!("kernel panic: {line}"));
            break;
        }
        if VM_ONLY_SKIPS.iter().any(|skip| line.contains(skip)) {
            vm_only_skip = Some(format!("a VM-only scenario skipped: {line}"));
        }
        if let Some(json) = line.split("LEAK-VM-BENCH ").nth(1) {
            bench = serde_json::from_str(json).ok();
        }
        if let Some(rest) = line.split("LEAK-VM-RESULT ").nth(1) {
            let mut parts = rest.split_whitespace();
            if let (Some(mode), Some(status)) = (parts.next(), parts.next()) {
                outcomes.push(Outcome {
                    kernel: kernel.release.clone(),
                    mode: mode.to_owned(),
                    passed: status == "pass",
                    detail: String::new(),
                    bench: (mode == "bench").then(|| bench.take()).flatten(),
                });
            }
        }
        if line.contains("LEAK-VM-DONE") {
            done = true;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(failure) = failure.or(vm_only_skip) {
        outcomes.push(Outcome {
            kernel: kernel.release.clone(),
            mode: "vm".into(),
            passed: false,
            detail: failure,
            bench: None,
        });
    } else if !done {
        outcomes.push(Outcome {
            kernel: kernel.release.clone(),
            mode: "vm".into(),
            passed: false,
            detail: "the VM stopped before finishing its tests".into(),
            bench: None,
        });
    }
    let expected =
        settings.modes.split(',').filter(|m| !m.is_empty()).count() + usize::from(settings.k8s);
    let reported = outcomes.iter().filter(|o| o.mode != "vm").count();
    if reported < expected && done {
        outcomes.push(Outcome {
            kernel: kernel.release.clone(),
            mode: "vm".into(),
            passed: false,
            detail: format!("{reported} of {expected} modes reported"),
            bench: None,
        });
    }
    Ok(outcomes)
}
