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
/// The suite's modes: `auto` must choose fentry on every suite kernel (the tests check what
/// it chose), so its cell is the fentry cell and fentry is not run twice.
pub const SUITE_MODES: &str = "auto,kprobe,tp_btf,tracepoint";
/// `oom_e2e` tests whose subject does not depend on the attach mode (the demo, the HTTP
/// server, the unprivileged refusal): run in a kernel's first cell only.
const ONCE_PER_KERNEL: &[&str] = &[
    "demo_tells_the_story",
    "http_rejects_bad_requests_and_keeps_serving",
    "refuses_to_run_unprivileged_with_a_clear_error",
];
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
    /// Also run the restart and storm tests (pinned probes, 1,000-kill storms), in mode auto.
    #[arg(long)]
    restart: bool,
    /// Only run tests whose name contains one of these (each given to every test binary).
    #[arg(last = true)]
    filter: Vec<String>,
}

pub struct Settings {
    /// Also run the Kubernetes-layout tests (once, in mode auto).
    pub k8s: bool,
    /// Also run `leak bench` and report its JSON.
    pub bench: bool,
    /// The kernels (series, as given) that also run the restart and storm tests, in mode auto.
    pub restart_on: Vec<String>,
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
        restart_on: match options.restart {
            true => options.kernels.clone(),
            false => Vec::new(),
        },
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
    kernel_filter(&settings.filter)?;
    bootstrap::ebpf_toolchain()?;
    bootstrap::debian_packages(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
    ])?;
    let binaries = build_binaries()?;
    let mut outcomes = Vec::new();
    for series in series {
        let kernel = kernels::fetch(series)?;
        let started = Instant::now();
        let restart = settings.restart_on.contains(series);
        let result = boot(&kernel, &binaries, settings, restart);
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

/// Debian's `prometheus` package's commands the tests run, copied into the initramfs.
const PROMETHEUS_TOOLS: &[&str] = &["prometheus", "promtool"];

/// The end-to-end test targets the VMs run.
const TEST_TARGETS: &[&str] = &["oom_e2e", "k8s_e2e", "pin_e2e", "storm_e2e"];

/// The agent and the end-to-end test binary, release builds.
fn build_binaries() -> Result<Binaries> {
    let root = bootstrap::workspace_root();
    say("building leak and the end-to-end tests (release) for the VMs");
    crate::run::cargo_build_leak(None, Vec::new())?;
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

/// The VM's init. It reports on the console, one line each, for vm.rs to read:
/// `LEAK-EXPECT <binary> <cell> <n>` before a test binary runs (`n`: the tests that binary
/// lists for the filters, less the ignored ones), `LEAK-SKIP-LOG <line>` for every line the
/// tests appended to the skip log, `LEAK-VM-RESULT <cell> pass|fail` after it, and
/// `LEAK-VM-DONE` at the end. The filters come comma-separated in `leak.filter=` (checked in
/// [`kernel_filter`]: no space, comma or shell metacharacter), so splitting them unquoted is
/// safe.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
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
# Prometheus listens and scrapes on loopback.
ip link set lo up || echo "LEAK-VM cannot bring lo up"
mkdir -p /disk
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
mount -t ext4 /dev/vda /disk || echo "LEAK-VM cannot mount the virtio disk"
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^leak\.$1=//p"; }
modes=$(arg modes | tr ',' ' ')
filters=$(arg filter | tr ',' ' ')
export LEAK_TEST_SKIP_LOG=/tmp/leak-skips
echo "LEAK-VM kernel $(uname -r), modes: $modes, filters: ${filters:-none}"
# run_tests BINARY CELL [VAR=VALUE...]: one matrix cell.
run_tests() {
  binary=/tests/$1
  cell=$2
  shift 2
  listed=$("$binary" --list $filters 2>/dev/null | grep -c ': test$')
  ignored=$("$binary" --list --ignored $filters 2>/dev/null | grep -c ': test$')
  echo "LEAK-EXPECT ${binary##*/} $cell $((listed - ignored))"
  rm -f "$LEAK_TEST_SKIP_LOG"
  env "$@" RUST_BACKTRACE=1 "$binary" --test-threads=1 --nocapture $filters
  status=$?
  [ -f "$LEAK_TEST_SKIP_LOG" ] && sed 's/^/LEAK-SKIP-LOG /' "$LEAK_TEST_SKIP_LOG"
  if [ $status -eq 0 ]; then echo "LEAK-VM-RESULT $cell pass"; else echo "LEAK-VM-RESULT $cell fail"; fi
}
# The tests that do not depend on the attach mode run in the first cell only.
all_filters=$filters
for mode in $modes; do
  run_tests oom_e2e "$mode" CI=true LEAK_BIN=/bin/leak LEAK_TEST_DISK_DIR=/disk \
    LEAK_TEST_GLOBAL_OOM=1 LEAK_TEST_ATTACH="$mode" LEAK_TEST_EXPECT_AUTO="$(arg expect_auto)"
  filters="$all_filters ONCE_PER_KERNEL_SKIPS"
done
filters=$all_filters
if [ "$(arg k8s)" = 1 ]; then
  run_tests k8s_e2e k8s CI=true LEAK_BIN=/bin/leak
fi
if [ "$(arg restart)" = 1 ]; then
  run_tests pin_e2e restart CI=true LEAK_BIN=/bin/leak
  run_tests storm_e2e storm CI=true LEAK_BIN=/bin/leak
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
    let skips: Vec<String> = ONCE_PER_KERNEL
        .iter()
        .map(|test| format!("--skip {test}"))
        .collect();
    let init = INIT.replace("ONCE_PER_KERNEL_SKIPS", &skips.join(" "));
    archive.file("/init", 0o755, init.as_bytes());
    archive.file("/bin/leak", 0o755, &fs::read(&binaries.leak)?);
    let mut libraries: Vec<PathBuf> = shared_libraries(&binaries.leak)?;
    for (name, path) in &binaries.tests {
        archive.file(&format!("/tests/{name}"), 0o755, &fs::read(path)?);
        libraries.extend(shared_libraries(path)?);
    }
    // Debian's Prometheus server and promtool (installed above), at their host paths, so the
    // scrape test and the /metrics lint run for real in every VM.
    for tool in PROMETHEUS_TOOLS {
        let path = which(tool)?;
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(&path.to_string_lossy(), 0o755, &bytes);
        libraries.extend(shared_libraries(&path)?);
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
fn boot(
    kernel: &Kernel,
    binaries: &Binaries,
    settings: &Settings,
    restart: bool,
) -> Result<Vec<Outcome>> {
    let work = bootstrap::cache_dir().join("vm").join(&kernel.release);
    fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    initramfs(kernel, binaries, &initrd)?;
    let disk = work.join("disk.img");
    let _ = fs::remove_file(&disk);
    fs::File::create(&disk)?.set_len(512 << 20)?;
    bootstrap::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk))?;

    // A soft lockup panics (ends the run at once instead of at the time limit), and the panic
    // replays the whole kernel log, so the hung CPUs' stacks (below loglevel 4) reach the console.
    let mut append = format!(
        "console=ttyS0 panic=-1 oops=panic softlockup_panic=1 panic_print=0x20 loglevel=4 \
         leak.modes={} leak.expect_auto={} leak.k8s={} leak.bench={} leak.restart={}",
        settings.modes,
        settings.expect_auto,
        u8::from(settings.k8s),
        u8::from(settings.bench),
        u8::from(restart)
    );
    if let Some(filter) = kernel_filter(&settings.filter)? {
        append.push_str(&format!(" leak.filter={filter}"));
    }
    // x86's COMMAND_LINE_SIZE; a longer line would be cut silently.
    if append.len() >= 2048 {
        bail!(
            "the kernel command line would be {} bytes (at most 2047): fewer filters",
            append.len()
        );
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
    let mut deadline = Instant::now() + settings.timeout;
    let mut console = Console::new(&kernel.release);
    let mut failure = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            if failure.is_none() {
                failure = Some(format!("timed out after {} s", settings.timeout.as_secs()));
            }
            break;
        }
        let line = match rx.recv_timeout(remaining.min(Duration::from_secs(5))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        println!("[{short}] {line}");
        if failure.is_some() {
            continue;
        }
        if line.contains("Kernel panic") {
            failure = Some(format!("kernel panic: {line}"));
            // The panic replays the kernel log (panic_print), with the stacks below the
            // console's level, before the VM powers off: read it, for at most 60 s more.
            deadline = deadline.min(Instant::now() + Duration::from_secs(60));
            continue;
        }
        console.line(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let done = console.done;
    let mut outcomes = console.finish();
    if let Some(failure) = failure {
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
    let expected = settings.modes.split(',').filter(|m| !m.is_empty()).count()
        + usize::from(settings.k8s)
        + 2 * usize::from(restart);
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

/// The filters as one `leak.filter=` value: comma-joined, each made only of characters that
/// survive the kernel command line and the init script's unquoted word splitting (test names
/// are Rust paths; `-` lets a libtest flag such as `--exact` through).
pub fn kernel_filter(filters: &[String]) -> Result<Option<String>> {
    for filter in filters {
        if filter.is_empty()
            || !filter
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'))
        {
            bail!(
                "filter `{filter}` cannot be passed to the VMs: use only letters, digits and \
                 `_:.-`"
            );
        }
    }
    Ok((!filters.is_empty()).then(|| filters.join(",")))
}

/// One test binary's run in the VM, between its `LEAK-EXPECT` and `LEAK-VM-RESULT` lines.
struct CellRun {
    binary: String,
    mode: String,
    expected: u64,
    /// Each `test result:` line: passed, failed.
    results: Vec<(u64, u64)>,
    skips: Vec<String>,
}

/// Reads the init script's console lines into matrix cells.
struct Console {
    kernel: String,
    cell: Option<CellRun>,
    outcomes: Vec<Outcome>,
    bench: Option<serde_json::Value>,
    /// `LEAK-SKIP` lines outside any cell.
    stray_skips: Vec<String>,
    done: bool,
}

impl Console {
    fn new(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_owned(),
            cell: None,
            outcomes: Vec::new(),
            bench: None,
            stray_skips: Vec::new(),
            done: false,
        }
    }

    /// Markers are searched anywhere in the line: kernel messages can be printed in front.
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.split("LEAK-EXPECT ").nth(1) {
            let mut parts = rest.split_whitespace();
            if let (Some(binary), Some(mode), Some(expected)) =
                (parts.next(), parts.next(), parts.next())
            {
                self.cell = Some(CellRun {
                    binary: binary.to_owned(),
                    mode: mode.to_owned(),
                    // Unparsable: zero, which fails the cell.
                    expected: expected.parse().unwrap_or(0),
                    results: Vec::new(),
                    skips: Vec::new(),
                });
            }
        }
        if let Some(rest) = line.split("test result: ").nth(1) {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.split_whitespace().last()?.parse().ok())
                    .unwrap_or(0)
            };
            if let Some(cell) = &mut self.cell {
                cell.results.push((count(" passed"), count(" failed")));
            }
        }
        // In a VM no skip is legitimate: the VMs exist to run what a host cannot.
        if line.contains("LEAK-SKIP") {
            match &mut self.cell {
                Some(cell) => cell.skips.push(line.trim().to_owned()),
                None => self.stray_skips.push(line.trim().to_owned()),
            }
        }
        if let Some(json) = line.split("LEAK-VM-BENCH ").nth(1) {
            self.bench = serde_json::from_str(json).ok();
        }
        if let Some(rest) = line.split("LEAK-VM-RESULT ").nth(1) {
            let mut parts = rest.split_whitespace();
            if let (Some(mode), Some(status)) = (parts.next(), parts.next()) {
                let cell = self.cell.take().filter(|cell| cell.mode == mode);
                let (passed, detail) = if mode == "bench" {
                    (status == "pass", String::new())
                } else {
                    judge(cell.as_ref(), status == "pass")
                };
                self.outcomes.push(Outcome {
                    kernel: self.kernel.clone(),
                    mode: mode.to_owned(),
                    passed,
                    detail,
                    bench: (mode == "bench").then(|| self.bench.take()).flatten(),
                });
            }
        }
        if line.contains("LEAK-VM-DONE") {
            self.done = true;
        }
    }

    fn finish(mut self) -> Vec<Outcome> {
        if !self.stray_skips.is_empty() {
            self.outcomes.push(Outcome {
                kernel: self.kernel.clone(),
                mode: "vm".into(),
                passed: false,
                detail: format!("a skip in a VM: {}", self.stray_skips.join(" | ")),
                bench: None,
            });
        }
        self.outcomes
    }
}

/// Whether a test cell passed, and why not: the binary must have succeeded, run exactly the
/// tests it listed (at least one) and skipped none.
fn judge(cell: Option<&CellRun>, status_pass: bool) -> (bool, String) {
    let Some(cell) = cell else {
        return (
            false,
            "no LEAK-EXPECT line before the result: how many tests ran is unknown".into(),
        );
    };
    let mut problems = Vec::new();
    if !status_pass {
        problems.push(format!("{} failed", cell.binary));
    }
    if cell.expected == 0 {
        problems.push(format!(
            "{} --list names no test for these filters",
            cell.binary
        ));
    }
    match cell.results.as_slice() {
        [] => problems.push(format!("no `test result:` line from {}", cell.binary)),
        [(passed, failed)] => {
            if *passed != cell.expected {
                problems.push(format!(
                    "{} listed {} tests, libtest reported {passed} passed ({failed} failed)",
                    cell.binary, cell.expected
                ));
            }
        }
        results => problems.push(format!(
            "{} printed {} `test result:` lines",
            cell.binary,
            results.len()
        )),
    }
    if !cell.skips.is_empty() {
        problems.push(format!(
            "{} skip(s), and no skip is legitimate in a VM: {}",
            cell.skips.len(),
            cell.skips.join(" | ")
        ));
    }
    (problems.is_empty(), problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &[&str]) -> Vec<Outcome> {
        let mut console = Console::new("6.1.0-40-cloud-amd64");
        for line in lines {
            console.line(line);
        }
        console.finish()
    }

    #[test]
    fn a_cell_passes_when_it_ran_what_it_listed() {
        let outcomes = read(&[
            "LEAK-EXPECT oom_e2e fentry 3",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out",
            "LEAK-VM-RESULT fentry pass",
        ]);
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].passed, "{}", outcomes[0].detail);
    }

    #[test]
    fn a_cell_fails_on_a_count_mismatch_no_tests_or_a_skip() {
        let outcomes = read(&[
            "LEAK-EXPECT oom_e2e fentry 3",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "LEAK-VM-RESULT fentry pass",
            "LEAK-EXPECT oom_e2e kprobe 0",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 12 filtered out",
            "LEAK-VM-RESULT kprobe pass",
            "LEAK-EXPECT k8s_e2e k8s 2",
            "LEAK-SKIP prometheus_scrapes: no prometheus",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "LEAK-SKIP-LOG prometheus_scrapes\thides-feature\tno prometheus",
            "LEAK-VM-RESULT k8s pass",
            "LEAK-VM-RESULT tp_btf pass",
        ]);
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes.iter().all(|o| !o.passed));
        assert!(outcomes[0].detail.contains("listed 3 tests"));
        assert!(outcomes[1].detail.contains("names no test"));
        assert!(outcomes[2].detail.contains("2 skip(s)"));
        assert!(outcomes[3].detail.contains("no LEAK-EXPECT"));
    }

    #[test]
    fn a_skip_outside_a_cell_fails_the_vm() {
        let outcomes = read(&["LEAK-SKIP something: reason", "LEAK-VM-DONE"]);
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].mode, "vm");
        assert!(!outcomes[0].passed);
    }

    #[test]
    fn filters_reach_the_kernel_command_line_whole() {
        let filters = vec!["group_kill".to_owned(), "enrich::tests::".to_owned()];
        assert_eq!(
            kernel_filter(&filters).unwrap().as_deref(),
            Some("group_kill,enrich::tests::")
        );
        assert_eq!(kernel_filter(&[]).unwrap(), None);
        assert!(kernel_filter(&["a b".to_owned()]).is_err());
        assert!(kernel_filter(&["a,b".to_owned()]).is_err());
        assert!(kernel_filter(&["$(reboot)".to_owned()]).is_err());
    }
}
