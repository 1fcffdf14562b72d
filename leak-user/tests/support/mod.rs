//! Real cgroups, real processes and the real agent for the end-to-end tests. Everything made
//! here is torn down on drop, so a failing test still cleans up.
#![allow(dead_code)]

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use leak_user::enrich::cgroupfs::{MemoryHierarchy, Version};

/// The `leak` binary: cargo's, or `$LEAK_BIN` where the tests run away from the build (VMs).
pub fn leak_bin() -> String {
    std::env::var("LEAK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_leak").to_owned())
}

/// The attach modes to run each scenario with: `$LEAK_TEST_ATTACH` (comma-separated), by
/// default `auto` and the classic `tracepoint` (the two ends of the fallback chain).
pub fn attach_modes() -> Vec<String> {
    std::env::var("LEAK_TEST_ATTACH")
        .unwrap_or_else(|_| "auto,tracepoint".into())
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// OOM tests share the kernel log and its rate limit: run them one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Whether privileged tests can run here; prints why not. In CI, not being able to is fatal.
pub fn privileged() -> Option<MemoryHierarchy> {
    let reason = if unsafe { libc::geteuid() } != 0 {
        "not root".to_owned()
    } else {
        match MemoryHierarchy::discover() {
            Ok(hierarchy) => return Some(hierarchy),
            Err(err) => err.to_string(),
        }
    };
    if std::env::var_os("CI").is_some() {
        panic!("privileged end-to-end test cannot run in CI: {reason}");
    }
    eprintln!("SKIP: {reason}");
    None
}

/// A memory cgroup created for a test; on drop its processes are killed and it is removed.
pub struct Cgroup {
    pub hierarchy: MemoryHierarchy,
    /// Path relative to the hierarchy root, starting with `/`.
    pub relative: String,
}

impl Cgroup {
    pub fn create(hierarchy: &MemoryHierarchy, name: &str) -> Self {
        Self::create_at(hierarchy, &format!("/{name}-{}", std::process::id()))
    }

    /// Creates the cgroup at exactly `relative` (its parent must exist).
    pub fn create_at(hierarchy: &MemoryHierarchy, relative: &str) -> Self {
        let relative = relative.to_owned();
        let cgroup = Self {
            hierarchy: hierarchy.clone(),
            relative,
        };
        let _ = fs::remove_dir(cgroup.path());
        fs::create_dir(cgroup.path())
            .unwrap_or_else(|err| panic!("mkdir {}: {err}", cgroup.relative));
        cgroup
    }

    pub fn path(&self) -> PathBuf {
        self.hierarchy
            .root
            .join(self.relative.trim_start_matches('/'))
    }

    /// Creates a child cgroup (enabling the memory controller for it on v2). Declare it after
    /// its parent so that it is dropped, and removed, first.
    pub fn child(&self, name: &str) -> Cgroup {
        if self.hierarchy.version == Version::V2 {
            self.write("cgroup.subtree_control", "+memory");
        }
        let child = Cgroup {
            hierarchy: self.hierarchy.clone(),
            relative: format!("{}/{name}", self.relative),
        };
        fs::create_dir(child.path()).expect("mkdir child cgroup");
        child
    }

    pub fn write(&self, file: &str, value: &str) {
        fs::write(self.path().join(file), value)
            .unwrap_or_else(|err| panic!("write {value} to {}/{file}: {err}", self.relative));
    }

    pub fn set_limit(&self, bytes: u64) {
        self.write(self.hierarchy.limit_file(), &bytes.to_string());
        if self.hierarchy.version == Version::V2 {
            // Swap would let the workload outlive the limit; none on these machines, but be sure.
            let _ = fs::write(self.path().join("memory.swap.max"), "0");
        }
    }

    fn kill_all(&self) {
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path().join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs.lines().filter_map(|p| p.parse().ok()).collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for _ in 0..50 {
            if fs::remove_dir(self.path()).is_ok() || !self.path().exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.relative);
    }
}

/// A child process killed on drop.
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the OOM killer to end this process, and checks that it died by SIGKILL.
    pub fn wait_for_oom_kill(&mut self, timeout: Duration) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "pid {} was not OOM-killed within {} s",
                self.pid(),
                timeout.as_secs()
            )
        });
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "pid {} ended by {status:?}",
            self.pid()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `leak workload ARGS` inside `cgroup`, moved there before it execs so that every
/// byte it allocates is charged to it.
pub fn spawn_in(cgroup: &Cgroup, args: &[&str]) -> Process {
    let mut command = Command::new(leak_bin());
    command.arg("workload").args(args);
    spawn_command_in(cgroup, command)
}

/// Starts `command` inside `cgroup`, moved there before it execs.
pub fn spawn_command_in(cgroup: &Cgroup, mut command: Command) -> Process {
    let procs = CString::new(
        cgroup
            .path()
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path without NUL");
    command.stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (open, write, close, getpid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut buffer = [0u8; 16];
            let mut pid = libc::getpid() as u32;
            let mut at = buffer.len();
            loop {
                at -= 1;
                buffer[at] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let written = libc::write(fd, buffer[at..].as_ptr().cast(), buffer.len() - at);
            libc::close(fd);
            if written < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Process {
        child: command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {command:?}: {err}")),
    }
}

/// The agent under test; SIGTERM on drop.
pub struct Agent {
    pub process: Option<Process>,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        let mut child = Command::new(leak_bin())
            .args(["trace", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn leak trace");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                }
                sink.lock().expect("log").push_str(&(line + "\n"));
            }
        });
        let process = Process { child };
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => panic!("agent did not start:\n{}", log.lock().expect("log")),
        };
        Agent {
            process: Some(process),
            addr,
            log,
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path)
    }

    pub fn kills(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.get("/kills");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/kills is JSON")
    }

    /// Waits for the kill of `pid` to appear on /kills.
    pub fn wait_for_kill(&self, pid: u32) -> serde_json::Value {
        // A kill shows up within milliseconds; the deadline only bounds a failing run on a
        // busy machine (or under TCG).
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(kill) = self
                .kills()
                .into_iter()
                .find(|k| k["victim_pid"].as_u64() == Some(u64::from(pid)))
            {
                return kill;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no kill of pid {pid} on /kills; agent log:\n{}", self.log());
    }

    /// Waits for a kill whose victim's cgroup is `cgroup` (for victims whose pid the test does
    /// not know, such as a process started through `unshare`).
    pub fn wait_for_kill_in(&self, cgroup: &str) -> serde_json::Value {
        // A kill shows up within milliseconds; the deadline only bounds a failing run on a
        // busy machine (or under TCG).
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(kill) = self
                .kills()
                .into_iter()
                .find(|k| k["cgroup"].as_str() == Some(cgroup))
            {
                return kill;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no kill in {cgroup} on /kills; agent log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// SIGTERM, and the exit status (the agent must shut down cleanly).
    pub fn stop(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("agent running");
        unsafe { libc::kill(process.pid() as i32, libc::SIGTERM) };
        process
            .wait_timeout(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("agent ignored SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            unsafe { libc::kill(process.pid() as i32, libc::SIGTERM) };
            let mut process = process;
            if process.wait_timeout(Duration::from_secs(10)).is_none() {
                drop(process);
            }
        }
    }
}

/// A minimal HTTP/1.0 GET over a real socket.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Removes a file on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A file on a real disk filesystem (not tmpfs), so its pages are page cache.
    pub fn on_disk(name: &str) -> Self {
        let dir = std::env::var_os("LEAK_TEST_DISK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        TempFile(dir.join(format!("{name}-{}", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

pub fn file_size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Lints a Prometheus exposition with the real `promtool check metrics`.
pub fn promtool_check(metrics: &str) {
    if std::env::var_os("LEAK_TEST_NO_PROMETHEUS").is_some() {
        eprintln!("promtool lint not run here (LEAK_TEST_NO_PROMETHEUS); the host suite runs it");
        return;
    }
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is missing ({err}); `cargo xtask test` installs Debian's prometheus"
            );
            eprintln!("SKIP promtool lint: {err}");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
