//! `leak demo`: the original experiment, end to end, on this machine. A memory cgroup with a
//! limit, the tracer running, `leak workload` first leaking anonymous memory, then also
//! writing a file with fsync; for each run, from the kill's own timeline: when usage reached
//! the limit, when the working set did, the page cache before and at death.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::cgroup::{CgroupError, MemoryHierarchy, Version};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub limit_bytes: u64,
    pub interval: Duration,
    pub chunk_bytes: u64,
    /// Where the page-cache run writes its file (a disk filesystem, not tmpfs).
    pub file_dir: PathBuf,
    /// Give up on a run after this long.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("leak demo needs root: it creates a memory cgroup and loads BPF programs")]
    NotRoot,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the tracer did not start: {0}")]
    Tracer(String),
    #[error("{0}")]
    Run(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// A memory cgroup for the demo, removed on drop.
struct DemoCgroup {
    path: PathBuf,
}

impl DemoCgroup {
    fn create(hierarchy: &MemoryHierarchy, name: &str, limit: u64) -> Result<Self, DemoError> {
        let path = hierarchy
            .root
            .join(format!("leak-demo-{}-{name}", std::process::id()));
        fs::create_dir(&path).map_err(io(format!("creating {}", path.display())))?;
        let cgroup = Self { path };
        fs::write(cgroup.path.join(hierarchy.limit_file()), limit.to_string())
            .map_err(io("setting the memory limit"))?;
        if hierarchy.version == Version::V2 {
            let _ = fs::write(cgroup.path.join("memory.swap.max"), "0");
        }
        Ok(cgroup)
    }
}

impl Drop for DemoCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process, killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String, DemoError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(io(format!("connecting to the tracer at {addr}")))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io("HTTP request"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(io("HTTP response"))?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned())
}

fn start_tracer(exe: &Path) -> Result<(Guard, SocketAddr), DemoError> {
    let mut child = Command::new(exe)
        .args(["trace", "--listen", "127.0.0.1:0", "--history", "120s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting leak trace"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| DemoError::Tracer("no stderr".into()))?;
    let guard = Guard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(Ok(rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()));
            }
            if line.contains("charge path (") || line.contains("OOM hook attach mode:") {
                println!("  tracer: {}", line.split("] ").nth(1).unwrap_or(&line));
            }
            log.push_str(&line);
            log.push('\n');
        }
        let _ = tx.send(Err(log));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(addr)) => addr
            .parse()
            .map(|addr| (guard, addr))
            .map_err(|_| DemoError::Tracer(format!("bad address {addr}"))),
        Ok(Err(log)) => Err(DemoError::Tracer(log)),
        Err(_) => Err(DemoError::Tracer("no answer within 60 s".into())),
    }
}

/// Runs `leak workload ARGS` inside the cgroup until the OOM killer ends it.
fn leak_until_killed(
    exe: &Path,
    cgroup: &DemoCgroup,
    args: &[String],
    timeout: Duration,
) -> Result<u32, DemoError> {
    let procs = CString::new(
        cgroup
            .path
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| DemoError::Run("cgroup path contains NUL".into()))?;
    let mut command = Command::new(exe);
    command
        .arg("workload")
        .args(args)
        .args(["--listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: open, write, close.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself, on both cgroup versions.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Guard(command.spawn().map_err(io("starting leak workload"))?);
    let pid = child.0.id();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().map_err(io("waiting for the workload"))? {
            return if status.signal() == Some(libc::SIGKILL) {
                Ok(pid)
            } else {
                Err(DemoError::Run(format!(
                    "the workload ended with {status}, not an OOM kill"
                )))
            };
        }
        if Instant::now() > deadline {
            return Err(DemoError::Run(format!(
                "not killed within {} s; raise --timeout or lower --limit",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "never (in the window)".into(),
        |ms| format!("{:.2} s before the kill", ms as f64 / 1000.0),
    )
}

/// Prints one run's account; returns (usage at limit, working set at limit) in ms before death.
fn tell(kill: &Value) -> (Option<u64>, Option<u64>) {
    let story = &kill["story"];
    let usage_ms = story["usage_at_limit_ms_before_kill"].as_u64();
    let working_set_ms = story["working_set_at_limit_ms_before_kill"].as_u64();
    let timeline = kill["timeline"].as_array().cloned().unwrap_or_default();
    let peak_cache = timeline
        .iter()
        .filter_map(|p| p["page_cache_bytes"].as_u64())
        .max()
        .unwrap_or(0);
    let level = kill["cgroups"]
        .as_array()
        .and_then(|levels| levels.iter().find(|c| c["hit_limit"] == Value::Bool(true)))
        .cloned()
        .unwrap_or(Value::Null);
    let at_death_cache = level["inactive_file_bytes"].as_u64().unwrap_or(0)
        + level["active_file_bytes"].as_u64().unwrap_or(0);
    let field = |key: &str| kill[key].as_u64().unwrap_or(0);
    println!("  usage reached the limit:        {}", seconds(usage_ms));
    println!(
        "  working set reached the limit:  {}",
        seconds(working_set_ms)
    );
    println!(
        "  page cache: peak {} in the timeline, {} at death",
        mib(peak_cache),
        mib(at_death_cache)
    );
    println!(
        "  kill: pid {} ({}) in {}; usage {}, limit {}, working set {}, inactive_file {} \
         ({} timeline points, {} limit hits)",
        field("victim_pid"),
        kill["victim_comm"].as_str().unwrap_or("?"),
        kill["cgroup"].as_str().unwrap_or("?"),
        mib(field("usage_bytes")),
        mib(field("limit_bytes")),
        mib(field("working_set_bytes")),
        mib(field("inactive_file_bytes")),
        timeline.len(),
        story["limit_hits"].as_u64().unwrap_or(0),
    );
    (usage_ms, working_set_ms)
}

fn find_kill(addr: SocketAddr, pid: u32) -> Result<Value, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let kills: Value = serde_json::from_str(&http_get(addr, "/kills")?)
            .map_err(|err| DemoError::Run(format!("/kills is not JSON: {err}")))?;
        if let Some(kill) = kills.as_array().and_then(|all| {
            all.iter()
                .find(|k| k["victim_pid"].as_u64() == Some(u64::from(pid)))
        }) {
            return Ok(kill.clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(DemoError::Run(format!(
        "the tracer reported no kill of pid {pid}"
    )))
}

pub fn run(options: &DemoOptions) -> Result<(), DemoError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    let exe = std::env::current_exe().map_err(io("finding the leak binary"))?;
    let hierarchy = MemoryHierarchy::discover()?;
    println!(
        "leak demo: a {} memory limit on cgroup {:?} at {}; {} KiB leaked every {:?}",
        mib(options.limit_bytes),
        hierarchy.version,
        hierarchy.root.display(),
        options.chunk_bytes / 1024,
        options.interval
    );
    let (_tracer, addr) = start_tracer(&exe)?;
    let file = options
        .file_dir
        .join(format!("leak-demo-{}.dat", std::process::id()));
    struct RemoveFile<'a>(&'a Path);
    impl Drop for RemoveFile<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_file(self.0);
        }
    }
    let _remove = RemoveFile(&file);
    let base = vec![
        "--interval".to_owned(),
        format!("{}us", options.interval.as_micros()),
        "--chunk".to_owned(),
        options.chunk_bytes.to_string(),
    ];

    println!("\n== run 1: anonymous memory only");
    let cgroup = DemoCgroup::create(&hierarchy, "anon", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &base, options.timeout)?;
    let (anon_usage, anon_ws) = tell(&find_kill(addr, pid)?);
    println!(
        "  => usage and working set rose together: for an anonymous leak \
         container_memory_usage_bytes and container_memory_working_set_bytes track 1:1."
    );

    println!(
        "\n== run 2: anonymous memory + page cache (--file {}, fsync)",
        file.display()
    );
    let mut args = base.clone();
    args.extend(["--file".to_owned(), file.to_string_lossy().into_owned()]);
    let cgroup = DemoCgroup::create(&hierarchy, "file", options.limit_bytes)?;
    let pid = leak_until_killed(&exe, &cgroup, &args, options.timeout)?;
    let (file_usage, file_ws) = tell(&find_kill(addr, pid)?);
    match (file_usage, file_ws) {
        (Some(usage), Some(working_set)) if usage > working_set => println!(
            "  => usage sat at the limit for {:.2} s while the kernel reclaimed page cache; the \
             OOM killer struck only when the working set reached the limit: it follows \
             container_memory_working_set_bytes, not container_memory_usage_bytes.",
            (usage - working_set) as f64 / 1000.0
        ),
        _ => println!(
            "  => the working set reached the limit {} after usage did",
            seconds(file_ws)
        ),
    }
    let _ = (anon_usage, anon_ws);
    println!("\nleak demo: done");
    Ok(())
}
