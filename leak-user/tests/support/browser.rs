//! Debian's headless Chromium, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on fd 3, replies on fd 4, each a JSON message ended by
//! a NUL byte), so a page can be loaded with scripts disabled, its DOM read and a screenshot
//! taken, the way a person with JavaScript off would see it.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use leak_user::experiment::harness::{Process, TempDir};
use serde_json::{json, Value};

/// One browser; closed (and its process killed) on drop.
pub struct Browser {
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    _process: Process,
    _profile: TempDir,
}

/// A loaded page as the browser built it.
pub struct Page {
    /// `document.documentElement.outerHTML`, as the DOM is after load.
    pub dom: String,
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    let result = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(result, 0, "pipe: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

const TIMEOUT: Duration = Duration::from_secs(60);

impl Browser {
    pub fn start() -> Browser {
        let profile = TempDir::new("leak-e2e-chromium").unwrap_or_else(|err| panic!("{err}"));
        let (commands_read, commands_write) = pipe();
        let (replies_read, replies_write) = pipe();
        let mut command = Command::new("chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only dup2, which is async-signal-safe; the descriptors
        // are this process's own pipe ends.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(commands_read, 3) < 0 || libc::dup2(replies_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting chromium: {err}"));
        // SAFETY: the child has its own copies; these ends are the parent's alone from here.
        unsafe {
            libc::close(commands_read);
            libc::close(replies_write);
        }
        // SAFETY: freshly created descriptors owned by nothing else.
        let to_browser = unsafe { File::from_raw_fd(commands_write) };
        // SAFETY: as above.
        let from_browser = unsafe { File::from_raw_fd(replies_read) };
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_browser);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        message.pop();
                        if let Ok(value) = serde_json::from_slice::<Value>(&message) {
                            if sender.send(value).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Browser {
            to_browser,
            from_browser: receiver,
            next_id: 0,
            _process: Process::from(child),
            _profile: profile,
        }
    }

    /// Sends a command and waits for its result (events met on the way are dropped).
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("JSON");
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|err| panic!("writing to chromium: {err}"));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|err| panic!("chromium did not answer {method}: {err}"));
            if reply["id"] == json!(id) {
                assert!(
                    reply.get("error").is_none(),
                    "chromium {method}: {}",
                    reply["error"]
                );
                return reply["result"].clone();
            }
        }
    }

    /// Waits for `event` in `session`.
    fn event(&mut self, session: &str, event: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|err| panic!("no {event} from chromium: {err}"));
            if message["method"] == json!(event) && message["sessionId"] == json!(session) {
                return;
            }
        }
    }

    /// Loads `url` in a new tab (scripts on or off), reads its DOM, and saves a screenshot to
    /// `screenshot` (PNG).
    pub fn load(&mut self, url: &str, javascript: bool, screenshot: &Path) -> Page {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let session_id = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        let session = Some(session_id.as_str());
        self.call(
            session,
            "Emulation.setScriptExecutionDisabled",
            json!({ "value": !javascript }),
        );
        self.call(
            session,
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        self.call(session, "Page.enable", json!({}));
        self.call(session, "Page.navigate", json!({ "url": url }));
        self.event(&session_id, "Page.loadEventFired");
        let document = self.call(session, "DOM.getDocument", json!({ "depth": 0 }));
        let root = document["root"]["nodeId"].clone();
        let html = self.call(session, "DOM.getOuterHTML", json!({ "nodeId": root }));
        let dom = html["outerHTML"].as_str().expect("outerHTML").to_owned();
        let shot = self.call(
            session,
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(screenshot, png).expect("writing the screenshot");
        self.call(None, "Target.closeTarget", json!({ "targetId": target_id }));
        Page { dom }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let message = b"{\"id\":0,\"method\":\"Browser.close\"}\0";
        let _ = self.to_browser.write_all(message);
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let Some(v) = value(c) else { continue };
        buffer = (buffer << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}
