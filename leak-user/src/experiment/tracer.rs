//! `leak trace` as a child process of the demo, the bench and the end-to-end tests.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::harness::{http_get, io, kills, LabError, Process, Response};
use crate::model::kill::Kill;

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
            .env("RUST_LOG", "info,leak_user::kernel::attach=debug") // load times
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
                // Also the OOM hook's load time, on every start: is a kernel verifying slowly?
                if echo
                    .iter()
                    .chain(&["mark_victim: loaded"])
                    .any(|p| line.contains(p))
                {
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
