//! What `leak demo`, `leak bench` and the end-to-end tests share: a memory cgroup made for the
//! occasion, processes started inside it, the tracer as a child process with its log kept,
//! plain HTTP to it, temporary files, and the report of a check that could not run. Everything
//! is torn down on drop, so a failing run still cleans up.

use std::{
    ffi::CString,
    fmt, fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
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

/// Whether a skipped check could only run elsewhere, or hides a feature that should have been
/// tested here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipKind {
    /// The check belongs to another machine (a test VM, a cgroup v2 host); it runs there.
    Legitimate,
    /// Something this machine should have (root, a tool, a file) is missing: under `CI=true`
    /// this fails instead.
    HidesFeature,
}

impl fmt::Display for SkipKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legitimate => "legitimate",
            Self::HidesFeature => "hides-feature",
        })
    }
}

/// The file `cargo xtask test` reads skips from: one `<test>\t<kind>\t<reason>` line each.
pub const SKIP_LOG_ENV: &str = "LEAK_TEST_SKIP_LOG";

/// The running test's name as libtest gives it (the name of the thread it runs the test on),
/// which is how the skip log must name it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned()
}

/// Reports that `test` skips a check, so that it is counted as skipped, never as passed: a
/// `LEAK-SKIP` line on stderr and a line in `$LEAK_TEST_SKIP_LOG`. Under `CI=true` a skip that
/// hides a feature panics instead. The caller returns right after.
pub fn skip(test: &str, reason: &str, kind: SkipKind) {
    let log = std::env::var_os(SKIP_LOG_ENV).map(PathBuf::from);
    let ci = std::env::var("CI").is_ok_and(|ci| ci == "true");
    // Straight to the file descriptor: libtest captures `eprintln!`, and a skip must show.
    let mut stderr = std::io::stderr();
    if let Err(failure) = record_skip(&mut stderr, test, reason, kind, log.as_deref(), ci) {
        panic!("{failure}");
    }
}

/// [`skip`] with its environment spelled out (`out` gets the `LEAK-SKIP` line); the error is
/// why the test must fail instead.
fn record_skip(
    out: &mut dyn Write,
    test: &str,
    reason: &str,
    kind: SkipKind,
    log: Option<&Path>,
    ci: bool,
) -> Result<(), String> {
    // One line per skip: tabs and newlines would break the log's format.
    let reason = reason.replace(['\t', '\n', '\r'], " ");
    let _ = writeln!(out, "LEAK-SKIP {test}: {reason}");
    if let Some(log) = log {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            // One write with O_APPEND, so that concurrent tests do not interleave lines.
            .and_then(|mut file| file.write_all(format!("{test}\t{kind}\t{reason}\n").as_bytes()))
            // An unrecorded skip would be counted as a pass.
            .map_err(|err| format!("{test}: cannot record the skip in {}: {err}", log.display()))?;
    }
    if kind == SkipKind::HidesFeature && ci {
        return Err(format!(
            "{test}: {reason} (under CI=true this may not be skipped)"
        ));
    }
    Ok(())
}

/// Where a test reports the figures it measured: `cargo xtask test` prints them after the run.
pub const FIGURES_ENV: &str = "LEAK_TEST_FIGURES";

/// Prints a figure a test measured and appends it to `$LEAK_TEST_FIGURES`, so that a passing
/// run still shows what it saw (libtest hides a passing test's output).
pub fn report_figure(test: &str, figure: &str) {
    eprintln!("LEAK-FIGURE {test}: {figure}");
    if let Some(path) = std::env::var_os(FIGURES_ENV) {
        let appended = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| {
                use std::io::Write as _;
                writeln!(file, "{test}: {figure}")
            });
        if let Err(err) = appended {
            eprintln!(
                "warning: cannot append to {}: {err}",
                path.to_string_lossy()
            );
        }
    }
}

/// A memory cgroup made for the occasion; on drop its processes are killed and it is removed.
/// Declare a child after its parent, so that it is dropped, and removed, first.
#[derive(Debug)]
pub struct Cgroup {
    pub hierarchy: MemoryHierarchy,
    /// Path relative to the hierarchy's root, starting with `/`, as `/kills` names cgroups.
    pub relative: String,
}

impl Cgroup {
    /// `/<name>-<pid>` under the hierarchy's root, without a limit.
    pub fn create(hierarchy: &MemoryHierarchy, name: &str) -> Result<Self, LabError> {
        Self::create_at(hierarchy, &format!("/{name}-{}", std::process::id()))
    }

    /// `/<name>-<pid>` under the hierarchy's root, with a memory limit.
    pub fn with_limit(
        hierarchy: &MemoryHierarchy,
        name: &str,
        limit: u64,
    ) -> Result<Self, LabError> {
        let cgroup = Self::create(hierarchy, name)?;
        cgroup.set_limit(limit)?;
        Ok(cgroup)
    }

    /// The cgroup at exactly `relative` (its parent must exist).
    pub fn create_at(hierarchy: &MemoryHierarchy, relative: &str) -> Result<Self, LabError> {
        let cgroup = Self {
            hierarchy: hierarchy.clone(),
            relative: format!("/{}", relative.trim_start_matches('/')),
        };
        // An empty leftover of an interrupted run with the same name.
        let _ = fs::remove_dir(cgroup.path());
        fs::create_dir(cgroup.path())
            .map_err(io(format!("creating cgroup {}", cgroup.path().display())))?;
        Ok(cgroup)
    }

    /// A child cgroup, the memory controller enabled for it on v2.
    pub fn child(&self, name: &str) -> Result<Self, LabError> {
        if self.hierarchy.version == Version::V2 {
            self.write("cgroup.subtree_control", "+memory")?;
        }
        Self::create_at(&self.hierarchy, &format!("{}/{name}", self.relative))
    }

    pub fn path(&self) -> PathBuf {
        self.hierarchy
            .root
            .join(self.relative.trim_start_matches('/'))
    }

    pub fn write(&self, file: &str, value: &str) -> Result<(), LabError> {
        fs::write(self.path().join(file), value)
            .map_err(io(format!("writing {value} to {}/{file}", self.relative)))
    }

    pub fn set_limit(&self, bytes: u64) -> Result<(), LabError> {
        self.write(self.hierarchy.limit_file(), &bytes.to_string())?;
        if self.hierarchy.version == Version::V2 {
            // Swap would let a workload outlive its limit.
            let _ = fs::write(self.path().join("memory.swap.max"), "0");
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let path = self.path();
        for _ in 0..100 {
            let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&path).is_ok() || !path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", path.display());
    }
}

/// A file removed on drop.
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A fresh directory under the system's temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `<tmp>/<name>-<pid>`, emptied if it was there.
    pub fn new(name: &str) -> Result<Self, LabError> {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, `None` if it still runs after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io("waiting for a process"))? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the OOM killer to end this process: an error unless it died of SIGKILL
    /// within `timeout`.
    pub fn wait_for_oom_kill(&mut self, timeout: Duration) -> Result<(), LabError> {
        let pid = self.pid();
        match self.wait_timeout(timeout)? {
            Some(status) if status.signal() == Some(libc::SIGKILL) => Ok(()),
            Some(status) => Err(LabError::Run(format!(
                "pid {pid} ended with {status}, not an OOM kill (SIGKILL)"
            ))),
            None => Err(LabError::Run(format!(
                "pid {pid} was not killed within {} s; raise the timeout or lower the limit",
                timeout.as_secs()
            ))),
        }
    }
}

impl From<Child> for Process {
    fn from(child: Child) -> Self {
        Self { child }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cgroup.procs` of the cgroup, ready for a child process to write to.
fn procs_file(cgroup: &Cgroup) -> Result<CString, LabError> {
    CString::new(
        cgroup
            .path()
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| LabError::Run("cgroup path contains NUL".into()))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. Only
/// async-signal-safe calls (open, write, close): it runs between fork and exec.
fn enter(procs: &CString) -> std::io::Result<()> {
    // SAFETY: `procs` is a NUL-terminated path; the buffer written is one valid byte.
    unsafe {
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
    }
    Ok(())
}

/// Starts `command` inside the cgroup, moved there before it execs so that everything it
/// allocates is charged to it.
pub fn spawn_in(cgroup: &Cgroup, mut command: Command) -> Result<Process, LabError> {
    let procs = procs_file(cgroup)?;
    // SAFETY: the closure only makes async-signal-safe calls (see `enter`).
    unsafe {
        command.pre_exec(move || enter(&procs));
    }
    command
        .spawn()
        .map(Process::from)
        .map_err(io(format!("starting {command:?}")))
}

/// Starts `command` inside the cgroup as pid 1 of a new pid namespace, as a container's main
/// process is. The process returned is a relay outside the namespace (and the cgroup) that
/// ends as pid 1 does: killed by the same signal, or exiting with its status; so
/// [`Process::wait_for_oom_kill`] on it tells how pid 1 died.
pub fn spawn_as_init_in(cgroup: &Cgroup, mut command: Command) -> Result<Process, LabError> {
    let procs = procs_file(cgroup)?;
    // SAFETY: between fork and exec (and in the relay, which never returns) only
    // async-signal-safe calls: unshare, fork, open, write, close, close_range, waitpid,
    // getpid, kill, _exit.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let init = libc::fork();
            if init < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if init == 0 {
                // Pid 1 of the new namespace: into the cgroup, then on to exec.
                return enter(&procs);
            }
            // The relay never execs: it closes what it inherited, the pipe on which the
            // parent waits to learn that exec succeeded among them, and waits for pid 1.
            if libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) != 0 {
                for fd in 3..1024 {
                    libc::close(fd);
                }
            }
            let mut status = 0;
            while libc::waitpid(init, &mut status, 0) < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    libc::_exit(127);
                }
            }
            if libc::WIFSIGNALED(status) {
                let signal = libc::WTERMSIG(status);
                libc::kill(libc::getpid(), signal);
                libc::_exit(128 + signal);
            }
            libc::_exit(libc::WEXITSTATUS(status))
        });
    }
    command
        .spawn()
        .map(Process::from)
        .map_err(io(format!("starting {command:?} in a new pid namespace")))
}

/// Runs `leak workload ARGS` inside the cgroup until the OOM killer ends it; its pid.
pub fn leak_until_killed(
    exe: &Path,
    cgroup: &Cgroup,
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
    let mut workload = spawn_in(cgroup, command)?;
    workload.wait_for_oom_kill(timeout)?;
    Ok(workload.pid())
}

/// An HTTP response: its status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// A minimal HTTP/1.0 GET over a real socket.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Response, LabError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(io(format!("connecting to {addr}")))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(io(format!("GET {path}")))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(io(format!("reading the response to GET {path}")))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LabError::Run(format!("GET {path}: not an HTTP response: {response}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok(Response { status, body })
}

/// The tracer's `/kills` (newest first), typed; `query` is appended to the path (`?limit=8`).
pub fn kills(addr: SocketAddr, query: &str) -> Result<Vec<Kill>, LabError> {
    let response = http_get(addr, &format!("/kills{query}"))?;
    if response.status != 200 {
        return Err(LabError::Run(format!(
            "/kills{query} answered {}: {}",
            response.status, response.body
        )));
    }
    serde_json::from_str(&response.body).map_err(|err| {
        LabError::Run(format!(
            "/kills is not a list of kills: {err}: {}",
            response.body
        ))
    })
}

/// `leak trace` as a child process, its log kept; SIGTERM on drop.
pub struct Tracer {
    process: Option<Process>,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Tracer {
    /// Starts `EXE trace --listen 127.0.0.1:0 ARGS` and waits for its address. Its log is kept
    /// ([`Tracer::log`]); the lines that contain one of `echo` are also printed.
    pub fn start(
        exe: &Path,
        args: &[&str],
        echo: &'static [&'static str],
    ) -> Result<Self, LabError> {
        // In memory only and nothing pinned unless the caller names a store or a pin directory
        // (runs must not share history or probes; this pin directory does not exist).
        let unpinned = format!("/sys/fs/bpf/leak-unpinned-{}", std::process::id());
        let store = ["--state-dir", ""];
        let store = &store[..if args.contains(&"--state-dir") { 0 } else { 2 }];
        let pins = ["--no-pin", "--pin-dir", &unpinned];
        let pins = &pins[..if args.contains(&"--pin-dir") { 0 } else { 3 }];
        let mut child = Command::new(exe)
            .args(["trace", "--listen", "127.0.0.1:0"])
            .args(store)
            .args(pins)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {} trace", exe.display())))?;
        let stderr = child.stderr.take();
        let process = Process::from(child);
        let stderr = stderr.ok_or_else(|| LabError::Tracer("no stderr".into()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let listening = ["listening on http://", "listening on https://"];
                if let Some(rest) = listening.iter().find_map(|at| line.split(at).nth(1)) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_owned());
                }
                if echo.iter().any(|pattern| line.contains(pattern)) {
                    println!("  tracer: {}", line.split("] ").nth(1).unwrap_or(&line));
                }
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let mut tracer = Self {
            process: Some(process),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        // The sender is dropped when the tracer closes stderr: it exited.
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(LabError::Tracer(tracer.log()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(LabError::Tracer(format!(
                    "no address within 60 s:\n{}",
                    tracer.log()
                )))
            }
        };
        tracer.addr = addr
            .parse()
            .map_err(|_| LabError::Tracer(format!("bad address {addr}")))?;
        Ok(tracer)
    }

    /// The tracer's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Everything the tracer logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Result<Response, LabError> {
        http_get(self.addr, path)
    }

    pub fn kills(&self) -> Result<Vec<Kill>, LabError> {
        kills(self.addr, "")
    }

    /// The OOM hook's attach mode, as `/healthz` reports it.
    pub fn attach_mode(&self) -> Result<String, LabError> {
        let health = self.get("/healthz")?;
        health
            .body
            .split("attach_mode=")
            .nth(1)
            .map(|mode| mode.trim().to_owned())
            .filter(|_| health.status == 200)
            .ok_or_else(|| {
                LabError::Run(format!(
                    "/healthz answered {} without an attach mode: {}",
                    health.status, health.body
                ))
            })
    }

    /// Waits for a kill that `matches` to appear on `/kills`; `what` names it in the error,
    /// which carries the tracer's log.
    pub fn wait_for_kill(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Kill) -> bool,
    ) -> Result<Kill, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(kill) = self.kills()?.into_iter().find(|kill| matches(kill)) {
                return Ok(kill);
            }
            if Instant::now() > deadline {
                return Err(LabError::Run(format!(
                    "the tracer reported no kill of {what} within {} s; its log:\n{}",
                    timeout.as_secs(),
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, LabError> {
        self.end(libc::SIGTERM)
    }

    /// Sends `signal` (SIGKILL: as a crash would end it, nothing cleaned up); the exit status.
    pub fn end(&mut self, signal: i32) -> Result<ExitStatus, LabError> {
        let stopped = || LabError::Run("the tracer was already stopped".into());
        let mut process = self.process.take().ok_or_else(stopped)?;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(process.pid() as i32, signal) };
        let ended = process.wait_timeout(Duration::from_secs(20))?;
        ended.ok_or_else(|| LabError::Run(format!("signal {signal} ignored:\n{}", self.log())))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // SIGTERM detaches the probes cleanly; the process's own drop kills it otherwise.
        let _ = self.end(libc::SIGTERM);
    }
}

#[cfg(test)]
#[path = "harness_tests.rs"]
mod tests;
