//! The harness of `leak demo` and `leak bench`: a memory cgroup made for the occasion, the
//! tracer as a child process, workloads started inside the cgroup, and plain HTTP to the
//! tracer. Everything is torn down on drop.

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

use crate::{
    enrich::cgroupfs::{CgroupError, MemoryHierarchy, Version},
    model::kill::Kill,
};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("this needs root: it creates memory cgroups and loads BPF programs")]
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

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

pub fn require_root() -> Result<(), LabError> {
    match crate::sys::is_root() {
        true => Ok(()),
        false => Err(LabError::NotRoot),
    }
}

/// A memory cgroup made for the occasion, removed (its processes killed) on drop.
pub struct LabCgroup {
    pub path: PathBuf,
}

impl LabCgroup {
    pub fn create(hierarchy: &MemoryHierarchy, name: &str, limit: u64) -> Result<Self, LabError> {
        let path = hierarchy
            .root
            .join(format!("leak-{name}-{}", std::process::id()));
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

impl Drop for LabCgroup {
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

/// A file removed on drop.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A child process, killed on drop.
pub struct Guard(pub Child);

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

pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, LabError> {
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

/// The tracer's `/kills` (newest first), typed; `query` is appended to the path (`?limit=8`).
pub fn kills(addr: SocketAddr, query: &str) -> Result<Vec<Kill>, LabError> {
    let body = http_get(addr, &format!("/kills{query}"))?;
    serde_json::from_str(&body)
        .map_err(|err| LabError::Run(format!("/kills is not a list of kills: {err}: {body}")))
}

/// Starts `leak trace --listen 127.0.0.1:0 ARGS` and waits for its address; the tracer's lines
/// that contain one of `echo` are printed.
pub fn start_tracer(
    exe: &Path,
    args: &[&str],
    echo: &'static [&'static str],
) -> Result<(Guard, SocketAddr), LabError> {
    let mut child = Command::new(exe)
        .args(["trace", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting leak trace"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| LabError::Tracer("no stderr".into()))?;
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
            if echo.iter().any(|pattern| line.contains(pattern)) {
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
            .map_err(|_| LabError::Tracer(format!("bad address {addr}"))),
        Ok(Err(log)) => Err(LabError::Tracer(log)),
        Err(_) => Err(LabError::Tracer("no answer within 60 s".into())),
    }
}

/// Starts `command` inside the cgroup (moved there before it execs).
pub fn spawn_in(cgroup: &LabCgroup, mut command: Command) -> Result<Guard, LabError> {
    let procs = CString::new(
        cgroup
            .path
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| LabError::Run("cgroup path contains NUL".into()))?;
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
    command
        .spawn()
        .map(Guard)
        .map_err(io(format!("starting {command:?}")))
}

/// Runs `leak workload ARGS` inside the cgroup until the OOM killer ends it; its pid.
pub fn leak_until_killed(
    exe: &Path,
    cgroup: &LabCgroup,
    args: &[String],
    timeout: Duration,
) -> Result<u32, LabError> {
    let mut command = Command::new(exe);
    command
        .arg("workload")
        .args(args)
        .args(["--listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_in(cgroup, command)?;
    let pid = child.0.id();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().map_err(io("waiting for the workload"))? {
            return if status.signal() == Some(libc::SIGKILL) {
                Ok(pid)
            } else {
                Err(LabError::Run(format!(
                    "the workload ended with {status}, not an OOM kill"
                )))
            };
        }
        if Instant::now() > deadline {
            return Err(LabError::Run(format!(
                "not killed within {} s; raise --timeout or lower --limit",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
