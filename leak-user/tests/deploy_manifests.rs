//! The manifests under deploy/ give the agent what it needs on a node: privileges, the host
//! mounts its code reads, health probes on its real endpoints, bounded resources; and the
//! experiment's workloads have the original 128 MiB request and limit.

use std::path::Path;

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

use serde::Deserialize as _;

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
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
        "victims are host pids"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["privileged"].as_bool(),
        Some(true)
    );

    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(text)
        .collect();
    assert_eq!(args.first(), Some(&"trace"));
    let rootfs = args
        .iter()
        .position(|a| *a == "--rootfs")
        .map(|i| args[i + 1])
        .expect("--rootfs");
    let listen = args
        .iter()
        .position(|a| *a == "--listen")
        .map(|i| args[i + 1])
        .expect("--listen");
    let port = container["ports"][0]["containerPort"]
        .as_u64()
        .expect("port");
    assert!(
        listen.ends_with(&format!(":{port}")),
        "{listen} vs containerPort {port}"
    );

    let mounts: Vec<(&str, bool)> = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .map(|m| (text(&m["mountPath"]), m["readOnly"].as_bool() == Some(true)))
        .collect();
    let needed = [
        "/sys/kernel/btf".to_owned(),
        "/sys/fs/cgroup".to_owned(),
        "/sys/kernel/tracing".to_owned(),
        "/sys/kernel/debug".to_owned(),
        "/dev/kmsg".to_owned(),
        format!("{rootfs}/var/log/pods"),
        format!("{rootfs}/var/log/containers"),
    ];
    for path in &needed {
        assert!(
            mounts.iter().any(|(m, read_only)| m == path && *read_only),
            "missing read-only mount {path} in {mounts:?}"
        );
    }
    // Every mount is backed by a hostPath volume of the same name.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for {:?}", mount["name"]));
        assert!(volume["hostPath"]["path"].as_str().is_some());
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
        assert_eq!(text(&container["args"][0]), "workload");
        assert_eq!(text(&container["resources"]["requests"]["memory"]), "128Mi");
        assert_eq!(text(&container["resources"]["limits"]["memory"]), "128Mi");
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(text)
            .collect();
        if let Some(i) = args.iter().position(|a| *a == "--file") {
            with_file += 1;
            // The file must be on a disk-backed volume: tmpfs pages are shmem, not page cache.
            let file = args[i + 1];
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
