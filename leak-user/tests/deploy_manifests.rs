//! The manifests under deploy/ give the agent what it needs on a node and nothing more:
//! privileges, arguments its own parser accepts, the host mounts its code reads, health probes
//! on its real endpoints, bounded resources; and the experiment's workloads have the original
//! 128 MiB request and limit.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use leak_user::cli::{Cli, Command, TraceArgs};
use serde::Deserialize as _;
use serde_yaml::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// A host path the agent reads, and where: the pod must mount it, read-only, at the path the
/// agent looks (under `--rootfs` for the kubelet's logs), or not at all.
struct HostPath {
    host: &'static str,
    read_by: &'static str,
    under_rootfs: bool,
    /// The agent cannot work without it (the others are fallbacks).
    required: bool,
    /// The agent writes it (mounted read-write); everything else is mounted read-only.
    writable: bool,
    /// The mount's `mountPropagation`, where it needs one.
    propagation: Option<&'static str>,
}

/// Every host path the agent reads (or writes) that a privileged container lacks. `/proc` is
/// the host's through `hostPID` (enrich/procfs.rs reads victims' entries), not a mount; the
/// kernel's sysfs (with /sys/kernel/btf) is every privileged container's own; tracefs the agent
/// mounts itself (kernel/mod.rs); the kernel's log (/dev/kmsg) is read by the tests only.
const HOST_PATHS: &[HostPath] = &[
    HostPath {
        host: "/var/lib/leak",
        read_by: "store/disk.rs (the kill store, kills.db, at --state-dir)",
        under_rootfs: false,
        required: true,
        writable: true,
        propagation: None,
    },
    HostPath {
        host: "/sys/fs/bpf",
        read_by: "kernel/pin.rs (the pinned probes and ring buffers, at --pin-dir)",
        under_rootfs: false,
        required: true,
        writable: true,
        // A bpffs the agent mounts where the host has none must be the host's, or the pins
        // end with the pod.
        propagation: Some("Bidirectional"),
    },
    HostPath {
        host: "/sys/fs/cgroup",
        read_by: "enrich/cgroupfs.rs and enrich/poll.rs (cgroup paths, limits, memory.stat)",
        under_rootfs: false,
        required: true,
        writable: false,
        propagation: None,
    },
    HostPath {
        host: "/var/log/pods",
        read_by: "enrich/kubernetes.rs (pod names), under --rootfs",
        under_rootfs: true,
        required: true,
        writable: false,
        propagation: None,
    },
    HostPath {
        host: "/var/log/containers",
        read_by: "enrich/kubernetes.rs (container names), under --rootfs",
        under_rootfs: true,
        required: true,
        writable: false,
        propagation: None,
    },
];

/// The container's `args`, parsed by the agent's own command line.
fn trace_args(container: &Value) -> TraceArgs {
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("every arg is a string"))
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("leak").chain(args.iter().copied()))
        .unwrap_or_else(|err| panic!("the agent rejects {args:?}: {err}"));
    match cli.into_command() {
        Command::Trace(trace) => trace,
        other => panic!("{args:?} does not run the tracer: {other:?}"),
    }
}

#[test]
fn daemonset_has_privileges_mounts_probes_and_resources() {
    let docs = documents("daemonset.yaml");
    let daemonsets = kind(&docs, "DaemonSet");
    assert_eq!(daemonsets.len(), 1);
    let pod = &daemonsets[0]["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"].as_bool(),
        Some(true),
        "victims are host pids, read in the host's /proc"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["privileged"].as_bool(),
        Some(true)
    );
    assert!(
        container["env"].as_sequence().is_none_or(|env| env
            .iter()
            .all(|var| !text(&var["name"]).starts_with("LEAK_"))),
        "settings belong in args, where this test parses them"
    );

    let trace = trace_args(container);
    let port = container["ports"][0]["containerPort"]
        .as_u64()
        .expect("port");
    assert_eq!(
        u64::from(trace.listen.port()),
        port,
        "--listen vs containerPort"
    );
    assert!(
        trace.listen.ip().is_unspecified(),
        "--listen {} is unreachable for the kubelet's probes and Prometheus",
        trace.listen
    );
    assert_eq!(trace.rootfs, PathBuf::from("/host"), "--rootfs");

    // Every mount is a hostPath volume of the same name that the agent reads, read-only, at
    // the path it reads it from.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let mut mounted = Vec::new();
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for {:?}", mount["name"]));
        let host = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("volume {:?} is not a hostPath", volume["name"]));
        let known = HOST_PATHS
            .iter()
            .find(|known| known.host == host)
            .unwrap_or_else(|| {
                panic!(
                    "hostPath {host} is mounted but the agent never reads it; the agent reads only {:?}",
                    HOST_PATHS.iter().map(|p| p.host).collect::<Vec<_>>()
                )
            });
        let expected_at = if known.under_rootfs {
            trace.rootfs.join(host.trim_start_matches('/'))
        } else {
            PathBuf::from(host)
        };
        assert_eq!(
            PathBuf::from(text(&mount["mountPath"])),
            expected_at,
            "{host} ({}) is mounted where the agent does not look",
            known.read_by
        );
        assert_eq!(
            mount["readOnly"].as_bool().unwrap_or(false),
            !known.writable,
            "{host} must be {}",
            if known.writable {
                "writable"
            } else {
                "read-only"
            }
        );
        assert_eq!(
            mount["mountPropagation"].as_str(),
            known.propagation,
            "{host}: mountPropagation"
        );
        match host {
            "/sys/fs/bpf" => {
                assert!(!trace.no_pin, "the DaemonSet pins its probes");
                assert!(
                    trace.pin_dir.starts_with(host),
                    "--pin-dir {} is outside the host's bpffs",
                    trace.pin_dir.display()
                );
            }
            _ if known.writable => {
                assert_eq!(trace.state_dir, PathBuf::from(host), "--state-dir")
            }
            _ => {}
        }
        mounted.push(host);
    }
    // The btf flag's default points into the kernel's sysfs, which the container has.
    assert!(
        trace.btf.starts_with("/sys/kernel/btf"),
        "--btf {}",
        trace.btf.display()
    );
    for needed in HOST_PATHS.iter().filter(|p| p.required) {
        assert!(
            mounted.contains(&needed.host),
            "{} is not mounted; {} reads it",
            needed.host,
            needed.read_by
        );
    }
    for volume in volumes {
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            assert!(
                mounted.contains(&host),
                "hostPath volume {host} is declared but not mounted"
            );
        }
    }

    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            text(&container[probe]["httpGet"]["path"]),
            "/healthz",
            "{probe}"
        );
        let probe_port = &container[probe]["httpGet"]["port"];
        assert!(
            probe_port.as_u64() == Some(port) || probe_port == &container["ports"][0]["name"],
            "{probe} targets another port"
        );
    }
    let resources = &container["resources"];
    assert!(resources["requests"]["cpu"].as_str().is_some());
    assert!(resources["requests"]["memory"].as_str().is_some());
    assert!(
        resources["limits"]["memory"].as_str().is_some(),
        "a bounded agent"
    );
}

#[test]
fn service_and_servicemonitor_reach_the_agent() {
    let daemonset = documents("daemonset.yaml");
    let labels = &kind(&daemonset, "DaemonSet")[0]["spec"]["template"]["metadata"]["labels"];
    let services = documents("service.yaml");
    let service = kind(&services, "Service")[0];
    for (key, value) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&labels[key], value, "the Service does not select the agent");
    }
    let port_name = text(&service["spec"]["ports"][0]["name"]);
    let monitors = documents("servicemonitor.yaml");
    let monitor = kind(&monitors, "ServiceMonitor")[0];
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(text(&endpoint["port"]), port_name);
    assert_eq!(text(&endpoint["path"]), "/metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("labels")
    {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "the ServiceMonitor misses the Service"
        );
    }
}

#[test]
fn the_experiment_runs_both_workloads_under_128mi() {
    let docs = documents("workload.yaml");
    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 2);
    let mut with_file = 0;
    for deployment in deployments {
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(text(&container["resources"]["requests"]["memory"]), "128Mi");
        assert_eq!(text(&container["resources"]["limits"]["memory"]), "128Mi");
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(|arg| arg.as_str().expect("every arg is a string"))
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("leak").chain(args.iter().copied()))
            .unwrap_or_else(|err| panic!("leak rejects {args:?}: {err}"));
        let Command::Workload(workload) = cli.into_command() else {
            panic!("{args:?} does not run the workload");
        };
        let port = container["ports"][0]["containerPort"].as_u64();
        assert_eq!(
            workload.listen.0.map(|addr| u64::from(addr.port())),
            port,
            "the workload's own /metrics on its containerPort"
        );
        if let Some(file) = &workload.file {
            with_file += 1;
            // The file must be on a disk-backed volume: tmpfs pages are shmem, not page cache.
            let mount = container["volumeMounts"]
                .as_sequence()
                .expect("a volume for --file")
                .iter()
                .find(|m| file.starts_with(text(&m["mountPath"])))
                .expect("--file on a mounted volume");
            let volume = pod["volumes"]
                .as_sequence()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == mount["name"])
                .expect("volume");
            assert_ne!(text(&volume["emptyDir"]["medium"]), "Memory");
        }
    }
    assert_eq!(with_file, 1, "one anonymous and one --file workload");
}

/// deploy/Dockerfile's instructions, each as (keyword, arguments): comments dropped, continued
/// lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => pending.push_str(continued),
            None => {
                pending.push_str(line);
                let (keyword, arguments) = pending.split_once(' ').unwrap_or((&pending, ""));
                instructions.push((keyword.to_uppercase(), arguments.trim().to_owned()));
                pending.clear();
            }
        }
    }
    instructions
}

/// The image packages the static binary on an empty base, starts it the way the manifests'
/// args expect, exposes their ports, and is never pulled from a registry by the kubelet (it is
/// built and loaded on the node: `cargo xtask image`, README's Deploying).
#[test]
fn the_image_runs_what_the_manifests_ask() {
    let instructions = dockerfile();
    let all = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, arguments)| arguments.as_str())
            .collect()
    };
    assert_eq!(
        all("FROM"),
        ["scratch"],
        "an empty base: nothing from a registry, no C library (the binary is static)"
    );
    let entrypoint: Vec<String> = match all("ENTRYPOINT").as_slice() {
        [json] => serde_json::from_str(json).expect("ENTRYPOINT in exec form (a JSON array)"),
        other => panic!("one ENTRYPOINT, not {other:?}"),
    };
    let [binary] = entrypoint.as_slice() else {
        panic!("ENTRYPOINT runs the binary alone, the manifests' args follow: {entrypoint:?}");
    };
    let copies = all("COPY");
    let [copy] = copies.as_slice() else {
        panic!("one COPY, the binary: {copies:?}");
    };
    let (source, destination) = copy.rsplit_once(' ').expect("COPY SOURCE DESTINATION");
    assert_eq!(
        destination, binary,
        "the ENTRYPOINT is the binary copied in"
    );
    // Each architecture's binary, as `cargo xtask image` leaves it, is copied and is sent in
    // the build context.
    let dockerignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.dockerignore"))
            .expect(".dockerignore");
    for arch in ["amd64", "arm64"] {
        let staged = source.replace("${TARGETARCH:-amd64}", arch);
        assert_eq!(staged, format!("target/image/{arch}/leak"), "COPY {source}");
        assert!(
            dockerignore
                .lines()
                .any(|line| line.strip_prefix('!') == Some(staged.as_str())),
            ".dockerignore must let {staged} into the build context, on a `!` line of its own"
        );
    }
    let cmd: Vec<String> = match all("CMD").as_slice() {
        [json] => serde_json::from_str(json).expect("CMD in exec form"),
        other => panic!("one CMD, not {other:?}"),
    };
    assert!(
        matches!(
            Cli::try_parse_from(std::iter::once("leak").chain(cmd.iter().map(String::as_str)))
                .map(Cli::into_command),
            Ok(Command::Trace(_))
        ),
        "the image alone runs the tracer: CMD {cmd:?}"
    );
    let exposed: Vec<u64> = all("EXPOSE")
        .iter()
        .flat_map(|ports| ports.split_whitespace())
        .map(|port| port.parse().expect("EXPOSE PORT"))
        .collect();
    for (file, kind_name) in [
        ("daemonset.yaml", "DaemonSet"),
        ("workload.yaml", "Deployment"),
    ] {
        let docs = documents(file);
        for workload in kind(&docs, kind_name) {
            for container in workload["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .expect("containers")
            {
                assert_eq!(text(&container["image"]), "leak:latest", "{file}");
                // `latest` defaults to Always, which would pull a local image from a registry.
                assert!(
                    ["IfNotPresent", "Never"].contains(&text(&container["imagePullPolicy"])),
                    "{file}: the image is loaded on the node, never pulled"
                );
                for port in container["ports"].as_sequence().into_iter().flatten() {
                    let port = port["containerPort"].as_u64().expect("containerPort");
                    assert!(exposed.contains(&port), "{file}: the image exposes {port}");
                }
            }
        }
    }
}

/// Whether Debian's `promtool` can run; otherwise the test is reported skipped (it hides the
/// rules' checks, so under CI=true that fails) and must return.
fn have_promtool() -> bool {
    match std::process::Command::new("promtool")
        .arg("--version")
        .output()
    {
        Ok(_) => true,
        Err(err) => {
            leak_user::experiment::harness::skip(
                &leak_user::experiment::harness::current_test(),
                &format!("promtool cannot be run ({err}); `cargo xtask test` installs it"),
                leak_user::experiment::harness::SkipKind::HidesFeature,
            );
            false
        }
    }
}

/// Runs `promtool ARGS` in deploy/prometheus; it must succeed.
fn promtool(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let output = std::process::Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|err| panic!("promtool {args:?}: {err}"));
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The alert rules: promtool accepts them and their unit tests pass, and the PrometheusRule
/// carries exactly the plain rules file's groups.
#[test]
fn alert_rules_pass_promtool_and_both_forms_agree() {
    if !have_promtool() {
        return;
    }
    promtool(&["check", "rules", "leak-rules.yaml"]);
    promtool(&["test", "rules", "leak-rules.test.yaml"]);
    let plain = documents("prometheus/leak-rules.yaml");
    let operator = documents("prometheus-rules.yaml");
    let rule = kind(&operator, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    assert_eq!(text(&rule[0]["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(rule[0]["spec"]["groups"], plain[0]["groups"]);
    let alerts: Vec<&str> = plain[0]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .map(|r| text(&r["alert"]))
        .collect();
    assert_eq!(
        alerts,
        [
            "LeakWorkingSetNearLimit",
            "LeakOOMKill",
            "LeakNonMainProcessOOMKill",
            "LeakEventsLost",
            "LeakAgentDown"
        ]
    );
}

/// The dashboard is Grafana JSON whose every panel queries Prometheus.
#[test]
fn the_dashboard_is_importable_json() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/leak-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert!(
                target["expr"].as_str().is_some_and(|e| e.contains("leak_")),
                "{}",
                panel["title"]
            );
        }
    }
}
