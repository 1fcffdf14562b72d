//! `cargo xtask vm`: the end-to-end tests inside Debian's real kernels under QEMU, once per
//! attach mode, on cgroup v2, with a virtio disk for the page-cache scenario; amd64 kernels, or
//! arm64 ones on QEMU's `virt` board (see [`guest`](crate::guest)).

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
    bootstrap::{self, say},
    cpio::Archive,
    guest::{self, Guest},
    kernels::{self, Kernel},
    musl::Arch,
};

/// The suite's modes: `auto` must choose fentry on every suite kernel (the tests check what
/// it chose), so its cell is the fentry cell and fentry is not run twice.
pub const SUITE_MODES: &str = "auto,kprobe,tp_btf,tracepoint";
/// What each attach mode needs from the kernel's build, in `auto`'s order, by the options of
/// its configuration (`boot/config-<release>`). This is the VMs' own account, apart from the
/// agent's table: by default a kernel runs the modes its configuration offers, `auto` must
/// choose the first, and the agent must refuse the others. fentry on a kernel function needs
/// the ftrace direct calls its trampoline is called through: x86 since 5.5, arm64 since 6.4
/// (Debian's arm64 6.1 has none, its 6.12 has them).
const MODE_NEEDS: &[(&str, &[&str])] = &[
    (
        "fentry",
        &[
            "CONFIG_BPF_JIT",
            "CONFIG_DEBUG_INFO_BTF",
            "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
        ],
    ),
    ("kprobe", &["CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS"]),
    ("tp_btf", &["CONFIG_DEBUG_INFO_BTF"]),
    (
        "tracepoint",
        &["CONFIG_TRACEPOINTS", "CONFIG_EVENT_TRACING"],
    ),
];
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
    /// The kernels' and the binaries' architecture: amd64, or arm64 (emulated on QEMU's `virt`
    /// board, with static musl builds of leak and the tests).
    #[arg(long, value_enum, default_value_t = Arch::Amd64)]
    arch: Arch,
    /// Attach modes to test, comma-separated [default: auto and every mode the kernel's
    /// configuration offers; the agent must refuse the others].
    #[arg(long)]
    modes: Option<String>,
    /// The mode `auto` must pick on these kernels [default: the first the kernel's
    /// configuration offers, of fentry, kprobe, tp_btf, tracepoint].
    #[arg(long)]
    expect_auto: Option<String>,
    /// Hard limit for one kernel's boot and tests, in seconds (arm64 under TCG takes about as
    /// long as amd64: 6.12 with --restart 837 s).
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
    /// From the end of the one before (or the init's start) to its result, as the console
    /// showed them.
    pub seconds: Option<f64>,
}

/// A kernel's attach modes by its configuration.
#[derive(Debug, PartialEq, Eq)]
struct Offer {
    /// The modes it offers, in `auto`'s order.
    modes: Vec<&'static str>,
    /// The modes it lacks, each with the options it lacks.
    lacks: Vec<(&'static str, Vec<&'static str>)>,
}

impl Offer {
    /// From the text of a kernel's configuration.
    fn from_config(config: &str) -> Self {
        let set: HashSet<&str> = config
            .lines()
            .filter_map(|line| line.strip_suffix("=y"))
            .collect();
        let mut offer = Offer {
            modes: Vec::new(),
            lacks: Vec::new(),
        };
        for (mode, needs) in MODE_NEEDS {
            let missing: Vec<&str> = needs.iter().copied().filter(|o| !set.contains(o)).collect();
            match missing.is_empty() {
                true => offer.modes.push(mode),
                false => offer.lacks.push((mode, missing)),
            }
        }
        offer
    }

    /// Of `kernel`: every mode when its package ships no configuration (7.x's split packages),
    /// which every Debian kernel so far offered; a wrong guess fails the run, it hides nothing.
    fn of(kernel: &Kernel) -> Result<Self> {
        match &kernel.config {
            Some(path) => Ok(Self::from_config(
                &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            )),
            None => {
                say(format!(
                    "{} ships no kernel configuration: expecting every attach mode",
                    kernel.release
                ));
                Ok(Self {
                    modes: MODE_NEEDS.iter().map(|(mode, _)| *mode).collect(),
                    lacks: Vec::new(),
                })
            }
        }
    }
}

pub fn run(options: Options) -> Result<()> {
    kernel_filter(&options.filter)?;
    let arch = options.arch;
    let guest = guest::prepare(arch)?;
    let mut outcomes = Vec::new();
    for series in &options.kernels {
        let kernel = kernels::fetch_arch(arch, series)?;
        let offer = Offer::of(&kernel)?;
        let first = offer.modes.first().copied().unwrap_or("none");
        let settings = Settings {
            k8s: !options.no_k8s,
            bench: false,
            restart_on: match options.restart {
                true => options.kernels.clone(),
                false => Vec::new(),
            },
            modes: options.modes.clone().unwrap_or_else(|| {
                std::iter::once("auto")
                    .chain(offer.modes.iter().copied())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            expect_auto: options.expect_auto.clone().unwrap_or(first.to_owned()),
            timeout: Duration::from_secs(options.timeout),
            filter: options.filter.clone(),
        };
        // Modes chosen by hand are the caller's to judge.
        let refuse = match options.modes {
            Some(_) => Vec::new(),
            None => offer.lacks,
        };
        outcomes.extend(run_kernel(&kernel, &guest, &settings, series, &refuse));
    }
    report(&outcomes)
}

/// Prints the matrix and fails if any cell failed.
pub fn report(outcomes: &[Outcome]) -> Result<()> {
    say("VM results:");
    for outcome in outcomes {
        eprintln!(
            "  {:<26} {:<11} {} {:>7}{}",
            outcome.kernel,
            outcome.mode,
            if outcome.passed { "PASS" } else { "FAIL" },
            outcome
                .seconds
                .map(|s| format!("{s:.0} s"))
                .unwrap_or_default(),
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

/// Boots each amd64 kernel of `series` with the same settings.
pub fn run_kernels(series: &[String], settings: &Settings) -> Result<Vec<Outcome>> {
    kernel_filter(&settings.filter)?;
    let guest = guest::prepare(Arch::Amd64)?;
    let mut outcomes = Vec::new();
    for series in series {
        let kernel = kernels::fetch(series)?;
        outcomes.extend(run_kernel(&kernel, &guest, settings, series, &[]));
    }
    Ok(outcomes)
}

/// Boots `kernel` (of `series`, as given) and runs its cells; `refuse` are the modes the agent
/// must refuse there, with the configuration options the kernel lacks for them.
fn run_kernel(
    kernel: &Kernel,
    guest: &Guest,
    settings: &Settings,
    series: &str,
    refuse: &[(&str, Vec<&str>)],
) -> Vec<Outcome> {
    let started = Instant::now();
    let restart = settings.restart_on.iter().any(|s| s == series);
    let result = boot(kernel, guest, settings, restart, refuse);
    say(format!(
        "{}: {:.1} s in the VM",
        kernel.release,
        started.elapsed().as_secs_f64()
    ));
    result.unwrap_or_else(|err| {
        vec![Outcome {
            kernel: kernel.release.clone(),
            mode: "boot".into(),
            passed: false,
            detail: format!("{err:#}"),
            bench: None,
            seconds: None,
        }]
    })
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
/// `LEAK-VM kernel ...` when it starts, `LEAK-EXPECT <binary> <cell> <n>` before a test binary
/// runs (`n`: the tests that binary lists for the filters, less the ignored ones),
/// `LEAK-SKIP-LOG <line>` for every line the tests appended to the skip log,
/// `LEAK-VM-RESULT <cell> pass|fail` after it (and after each refusal, cell `no-<mode>`), and
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
# A mode the kernel's configuration lacks: the agent must refuse it when it is forced, for the
# OOM hook and for the charge path, exiting with the error that names it (the exit alone could
# be a crash, or the time limit on an agent that attached after all).
for mode in $(arg refuse | tr ',' ' '); do
  result=pass
  for flags in "--attach $mode --charge-attach off" "--charge-attach $mode"; do
    echo "LEAK-VM leak trace $flags: must be refused"
    timeout 120 /bin/leak trace $flags --no-pin --state-dir= --listen 127.0.0.1:9799 > /tmp/refusal 2>&1
    status=$?
    sed 's/^/LEAK-VM   /' /tmp/refusal
    if [ $status -eq 0 ] || ! grep -q "attach mode \`$mode\` is not available on this kernel" /tmp/refusal; then
      echo "LEAK-VM leak trace $flags was not refused (exit status $status)"
      result=fail
    fi
  done
  echo "LEAK-VM-RESULT no-$mode $result"
done
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

fn initramfs(kernel: &Kernel, guest: &Guest, path: &Path) -> Result<()> {
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
    archive.file("/bin/busybox", 0o755, &fs::read(&guest.busybox)?);
    let skips: Vec<String> = ONCE_PER_KERNEL
        .iter()
        .map(|test| format!("--skip {test}"))
        .collect();
    let init = INIT.replace("ONCE_PER_KERNEL_SKIPS", &skips.join(" "));
    archive.file("/init", 0o755, init.as_bytes());
    archive.file("/bin/leak", 0o755, &fs::read(&guest.leak)?);
    for (name, path) in &guest.tests {
        archive.file(&format!("/tests/{name}"), 0o755, &fs::read(path)?);
    }
    for (target, path) in &guest.files {
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(target, 0o755, &bytes);
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

/// Boots one kernel, streams its console with the kernel's name as prefix, and collects one
/// result per attach mode.
fn boot(
    kernel: &Kernel,
    guest: &Guest,
    settings: &Settings,
    restart: bool,
    refuse: &[(&str, Vec<&str>)],
) -> Result<Vec<Outcome>> {
    let work = bootstrap::cache_dir().join("vm").join(&kernel.release);
    fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    initramfs(kernel, guest, &initrd)?;
    let disk = work.join("disk.img");
    let _ = fs::remove_file(&disk);
    fs::File::create(&disk)?.set_len(512 << 20)?;
    bootstrap::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk))?;

    // A soft lockup panics (ends the run at once instead of at the time limit), and the panic
    // replays the whole kernel log, so the hung CPUs' stacks (below loglevel 4) reach the console.
    let mut append = format!(
        "console={} panic=-1 oops=panic softlockup_panic=1 panic_print=0x20 loglevel=4 \
         leak.modes={} leak.expect_auto={} leak.k8s={} leak.bench={} leak.restart={}",
        guest::console(guest.arch),
        settings.modes,
        settings.expect_auto,
        u8::from(settings.k8s),
        u8::from(settings.bench),
        u8::from(restart)
    );
    if let Some(filter) = kernel_filter(&settings.filter)? {
        append.push_str(&format!(" leak.filter={filter}"));
    }
    if !refuse.is_empty() {
        let modes: Vec<&str> = refuse.iter().map(|(mode, _)| *mode).collect();
        append.push_str(&format!(" leak.refuse={}", modes.join(",")));
    }
    // COMMAND_LINE_SIZE of x86 and arm64; a longer line would be cut silently.
    if append.len() >= 2048 {
        bail!(
            "the kernel command line would be {} bytes (at most 2047): fewer filters",
            append.len()
        );
    }
    say(format!("booting {} under QEMU (TCG)", kernel.release));
    let (qemu, _) = guest::qemu(guest.arch);
    let mut child = Command::new(qemu)
        .args(guest::machine(guest.arch))
        .args(["-smp", "2", "-m", "2G"])
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
        .with_context(|| format!("cannot start {qemu}"))?;
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
            seconds: None,
        });
    } else if !done {
        outcomes.push(Outcome {
            kernel: kernel.release.clone(),
            mode: "vm".into(),
            passed: false,
            detail: "the VM stopped before finishing its tests".into(),
            bench: None,
            seconds: None,
        });
    }
    for outcome in &mut outcomes {
        let lacks = refuse
            .iter()
            .find(|(mode, _)| outcome.mode.strip_prefix("no-") == Some(*mode));
        if let Some((mode, options)) = lacks {
            let why = format!(
                "{mode} forced is refused; the kernel lacks {}",
                options.join(", ")
            );
            outcome.detail = match outcome.detail.is_empty() {
                true => why,
                false => format!("{why}; {}", outcome.detail),
            };
        }
    }
    let expected = settings.modes.split(',').filter(|m| !m.is_empty()).count()
        + usize::from(settings.k8s)
        + 2 * usize::from(restart)
        + refuse.len();
    let reported = outcomes.iter().filter(|o| o.mode != "vm").count();
    if reported < expected && done {
        outcomes.push(Outcome {
            kernel: kernel.release.clone(),
            mode: "vm".into(),
            passed: false,
            detail: format!("{reported} of {expected} modes reported"),
            bench: None,
            seconds: None,
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
    /// When the VM started, and when the init started or the last cell ended.
    started: Instant,
    mark: Option<Instant>,
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
            started: Instant::now(),
            mark: None,
        }
    }

    /// Markers are searched anywhere in the line: kernel messages can be printed in front.
    fn line(&mut self, line: &str) {
        if line.contains("LEAK-VM kernel ") && self.mark.is_none() {
            say(format!(
                "{}: the init started {:.1} s after QEMU",
                self.kernel,
                self.started.elapsed().as_secs_f64()
            ));
            self.mark = Some(Instant::now());
        }
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
                // The bench and the refusals run no test binary.
                let (passed, detail) = if mode == "bench" || mode.starts_with("no-") {
                    (status == "pass", String::new())
                } else {
                    judge(cell.as_ref(), status == "pass")
                };
                let now = Instant::now();
                self.outcomes.push(Outcome {
                    kernel: self.kernel.clone(),
                    mode: mode.to_owned(),
                    passed,
                    detail,
                    bench: (mode == "bench").then(|| self.bench.take()).flatten(),
                    seconds: self.mark.map(|mark| (now - mark).as_secs_f64()),
                });
                self.mark = Some(now);
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
                seconds: None,
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
    fn a_refusal_is_judged_by_its_result_alone() {
        let outcomes = read(&[
            "LEAK-VM kernel 6.1.0-57-cloud-arm64, modes: auto kprobe, filters: none",
            "LEAK-VM-RESULT no-fentry pass",
            "LEAK-VM-RESULT no-kprobe fail",
        ]);
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes[0].passed && outcomes[0].detail.is_empty());
        assert!(!outcomes[1].passed);
        assert!(outcomes.iter().all(|o| o.seconds.is_some()));
    }

    #[test]
    fn a_kernel_offers_the_modes_its_configuration_builds() {
        let arm64_6_1 = "CONFIG_BPF_JIT=y\nCONFIG_DEBUG_INFO_BTF=y\nCONFIG_KPROBES=y\n\
                         CONFIG_KPROBE_EVENTS=y\nCONFIG_TRACEPOINTS=y\nCONFIG_EVENT_TRACING=y\n\
                         CONFIG_DYNAMIC_FTRACE_WITH_REGS=y\n\
                         # CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS is not set\n";
        let offer = Offer::from_config(arm64_6_1);
        assert_eq!(offer.modes, ["kprobe", "tp_btf", "tracepoint"]);
        assert_eq!(
            offer.lacks,
            [("fentry", vec!["CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS"])]
        );
        let with_direct_calls = format!("{arm64_6_1}CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y\n");
        let offer = Offer::from_config(&with_direct_calls);
        assert_eq!(offer.modes, ["fentry", "kprobe", "tp_btf", "tracepoint"]);
        assert!(offer.lacks.is_empty());
        // A module (`=m`) is not built in.
        let offer = Offer::from_config(&with_direct_calls.replace("KPROBES=y", "KPROBES=m"));
        assert_eq!(offer.lacks, [("kprobe", vec!["CONFIG_KPROBES"])]);
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
