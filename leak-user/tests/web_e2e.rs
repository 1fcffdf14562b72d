//! The endpoint locked down and under abuse, for real: the agent with a web configuration file
//! (TLS from certificates openssl makes, basic auth with a bcrypt hash `leak hash-password`
//! makes, client certificates), checked with curl and scraped by Debian's Prometheus; and the
//! plain endpoint answering a scrape while a client holds hundreds of idle connections.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use leak_user::experiment::harness::http_get;
use support::{prometheus::Prometheus, *};

const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse battery staple";

/// Whether openssl and curl run (the test's own tools); a skip that hides the feature otherwise.
fn have_tools() -> bool {
    let openssl = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !openssl {
        skip_test(
            "openssl cannot be run; `cargo xtask test` installs it from Debian",
            SkipKind::HidesFeature,
        );
        return false;
    }
    have_tool("curl") && have_tool("prometheus")
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"])
        .args(["-subj", "/CN=leak test CA"]));
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for name in ["server", "client"] {
        run(Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ])
            .args(["-subj", &format!("/CN=leak test {name}")]));
        run(Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", &format!("{name}.csr")])
            .args(["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"])
            .args(["-out", &format!("{name}.crt"), "-days", "2"])
            .args(["-extfile", &format!("{name}.ext")]));
    }
}

/// The bcrypt hash of `password`, from the agent's own `hash-password`.
fn hash(password: &str) -> String {
    let mut child = Command::new(leak_bin())
        .args(["hash-password", "--cost", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("leak hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let output = child.wait_with_output().expect("leak hash-password");
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned();
    assert!(hash.starts_with("$2"), "not a bcrypt hash: {hash}");
    hash
}

fn agent_with(config: &Path, extra: &[&str]) -> Tracer {
    let mut args = vec!["--web-config-file", config.to_str().expect("UTF-8 path")];
    args.extend_from_slice(extra);
    Tracer::start(Path::new(&leak_bin()), &args, &[]).unwrap_or_else(|err| panic!("{err}"))
}

/// curl's status code for `url` (0 when no HTTP exchange happened, as curl says `000`).
fn curl(dir: &Path, url: &str, args: &[&str]) -> u16 {
    let output = Command::new("curl")
        .current_dir(dir)
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn tls_and_basic_auth_with_a_real_prometheus() {
    if privileged().is_none() || !have_tools() {
        return;
    }
    let dir = TempDir::new("leak-e2e-web").unwrap_or_else(|err| panic!("{err}"));
    certificates(dir.path());
    let config = dir.path().join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             basic_auth_users:\n  {USER}: '{}'\n",
            hash(PASSWORD)
        ),
    )
    .expect("web config");
    let agent = agent_with(&config, &[]);
    let url = format!("https://{}/metrics", agent.addr);
    let ca = ["--cacert", "ca.crt"];
    let credentials = format!("{USER}:{PASSWORD}");
    let wrong = format!("{USER}:not the password");
    assert_eq!(curl(dir.path(), &url, &ca), 401, "no credentials");
    assert_eq!(
        curl(dir.path(), &url, &[&ca[..], &["-u", &wrong]].concat()),
        401
    );
    assert_eq!(
        curl(dir.path(), &url, &[&ca[..], &["-u", &credentials]].concat()),
        200
    );
    // Every endpoint is behind the same door.
    for path in ["/kills", "/healthz", "/"] {
        let url = format!("https://{}{path}", agent.addr);
        assert_eq!(curl(dir.path(), &url, &ca), 401, "{path}");
    }
    // Plain HTTP on the TLS port gets no HTTP answer, nor does a client that does not trust
    // the certificate.
    assert_eq!(
        curl(dir.path(), &format!("http://{}/metrics", agent.addr), &[]),
        0
    );
    assert_eq!(curl(dir.path(), &url, &["-u", &credentials]), 0);

    // Prometheus scrapes over TLS with basic auth; a job with the wrong password is down.
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n\
             \x20   basic_auth:\n      username: {USER}\n      password: '{password}'\n\
             \x20   static_configs:\n      - targets: ['{target}']\n",
            ca = dir.path().join("ca.crt").display(),
            target = agent.addr,
        )
    };
    let jobs = job("leak", PASSWORD) + &job("intruder", "guess");
    let prometheus = Prometheus::start_with_scrape_configs(&jobs);
    let up = prometheus.wait_for("up{job=\"leak\"} == 1");
    assert_eq!(up.len(), 1, "{up:?}");
    let build = prometheus.wait_for("leak_build_info{job=\"leak\"}");
    assert_eq!(build.len(), 1, "{build:?}");
    let down = prometheus.wait_for("up{job=\"intruder\"} == 0");
    assert_eq!(down.len(), 1, "{down:?}");
}

#[test]
fn client_certificates_when_required() {
    if privileged().is_none() || !have_tools() {
        return;
    }
    let dir = TempDir::new("leak-e2e-mtls").unwrap_or_else(|err| panic!("{err}"));
    certificates(dir.path());
    let config = dir.path().join("web.yml");
    std::fs::write(
        &config,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
         \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
         \x20 min_version: TLS13\n",
    )
    .expect("web config");
    let agent = agent_with(&config, &[]);
    let url = format!("https://{}/healthz", agent.addr);
    assert_eq!(
        curl(dir.path(), &url, &["--cacert", "ca.crt"]),
        0,
        "no client cert"
    );
    // A certificate the CA did not sign is refused too.
    run(Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-keyout",
            "stranger.key",
            "-out",
            "stranger.crt",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=stranger"]));
    let stranger = [
        "--cacert",
        "ca.crt",
        "--cert",
        "stranger.crt",
        "--key",
        "stranger.key",
    ];
    assert_eq!(
        curl(dir.path(), &url, &stranger),
        0,
        "a certificate of another CA"
    );
    let client = [
        "--cacert",
        "ca.crt",
        "--cert",
        "client.crt",
        "--key",
        "client.key",
    ];
    assert_eq!(curl(dir.path(), &url, &client), 200);
    // TLS 1.2 is below min_version.
    let old = [&client[..], &["--tls-max", "1.2"]].concat();
    assert_eq!(curl(dir.path(), &url, &old), 0, "TLS 1.2");
}

#[test]
fn a_bad_web_config_stops_the_agent_with_a_clear_error() {
    if privileged().is_none() {
        return;
    }
    let dir = TempDir::new("leak-e2e-badweb").unwrap_or_else(|err| panic!("{err}"));
    let cases: [(&str, &str); 3] = [
        ("basic_auth_users:\n  alice: hunter2\n", "not a bcrypt hash"),
        (
            "tls_server_config:\n  cert_file: nowhere.crt\n  key_file: nowhere.key\n",
            "nowhere.crt",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n",
            "a",
        ),
    ];
    for (text, expected) in cases {
        let config: PathBuf = dir.path().join("web.yml");
        std::fs::write(&config, text).expect("web config");
        let output = Command::new(leak_bin())
            .args(["trace", "--listen", "127.0.0.1:0", "--web-config-file"])
            .arg(&config)
            .output()
            .expect("leak trace");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text:?} started the agent");
        assert!(
            stderr.contains("web config") && stderr.contains(expected),
            "{text:?}: {stderr}"
        );
        assert!(
            !stderr.contains("attached"),
            "{text:?} loaded programs first: {stderr}"
        );
    }
}

#[test]
fn idle_and_half_sent_connections_cannot_keep_a_scrape_out() {
    if privileged().is_none() {
        return;
    }
    let agent = Tracer::start(
        Path::new(&leak_bin()),
        &["--web-max-connections", "64"],
        &[],
    )
    .unwrap_or_else(|err| panic!("{err}"));
    // Four times the cap: silent connections, and ones that never finish their headers.
    let mut held = Vec::new();
    for i in 0..256 {
        let mut stream = TcpStream::connect(agent.addr).expect("connect");
        if i % 2 == 1 {
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: leak\r\nX-Slow: ");
        }
        held.push(stream);
    }
    for path in ["/healthz", "/metrics"] {
        let response = http_get(agent.addr, path).unwrap_or_else(|err| panic!("{path}: {err}"));
        assert_eq!(response.status, 200, "{path}: {}", response.body);
    }
    // The server closed the oldest idle ones to make room: at most the cap are still open.
    std::thread::sleep(Duration::from_millis(500));
    let mut open = 0;
    for stream in &mut held {
        let _ = stream.set_read_timeout(Some(Duration::from_millis(5)));
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte);
        if matches!(read, Err(ref err) if err.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    assert!(
        open <= 64,
        "{open} connections still open, above the cap of 64"
    );
    // Headers bigger than the server buffers are refused, and the server goes on.
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: leak\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "oversized headers: {answer:?}"
    );
    let response = http_get(agent.addr, "/healthz").unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(response.status, 200);
}
