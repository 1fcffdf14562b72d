//! The part of a Kubernetes manifest a kubelet turns into containers: a DaemonSet's or
//! Deployment's pod template (containers, their args, resources and security context, host
//! namespaces, volumes and mounts), read from the YAML the user applies, so that the test
//! kubelet runs exactly what `deploy/` asks for.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum PodSpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path} has no {kind} named {name}")]
    Missing {
        path: String,
        kind: String,
        name: String,
    },
    #[error("{what}: {value:?} is not a Kubernetes quantity this reader knows")]
    Quantity { what: String, value: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<WorkloadSpec>,
}

#[derive(Debug, Deserialize)]
struct WorkloadSpec {
    template: PodTemplate,
}

#[derive(Debug, Deserialize)]
struct PodTemplate {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: PodSpec,
}

/// A pod to run: its template's metadata and spec, and the workload's namespace.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    /// The owning workload's name; the kubelet's pod name adds a suffix to it.
    pub workload: String,
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostIPC")]
    pub host_ipc: bool,
    #[serde(default)]
    pub share_process_namespace: bool,
    #[serde(default)]
    pub priority_class_name: Option<String>,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
}

/// An environment variable with a literal value (`valueFrom` is not read).
#[derive(Clone, Debug, Deserialize)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    #[serde(default)]
    pub host_path: Option<HostPathVolume>,
    #[serde(default)]
    pub empty_dir: Option<EmptyDirVolume>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HostPathVolume {
    pub path: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EmptyDirVolume {
    #[serde(default)]
    pub medium: Option<String>,
}

/// The pod template of the `kind` (DaemonSet, Deployment, ...) named `name` in the manifest
/// file at `path`.
pub fn read(path: &Path, kind: &str, name: &str) -> Result<Pod, PodSpecError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PodSpecError::Read {
        path: shown.clone(),
        source,
    })?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|source| PodSpecError::Parse {
                path: shown.clone(),
                source,
            })?;
        if value.get("kind").and_then(serde_yaml::Value::as_str) != Some(kind) {
            continue;
        }
        let manifest: Manifest =
            serde_yaml::from_value(value).map_err(|source| PodSpecError::Parse {
                path: shown.clone(),
                source,
            })?;
        if manifest.kind != kind || manifest.metadata.name != name {
            continue;
        }
        let Some(spec) = manifest.spec else { continue };
        return Ok(Pod {
            namespace: manifest
                .metadata
                .namespace
                .unwrap_or_else(|| "default".into()),
            workload: manifest.metadata.name,
            metadata: spec.template.metadata,
            spec: spec.template.spec,
        });
    }
    Err(PodSpecError::Missing {
        path: shown,
        kind: kind.into(),
        name: name.into(),
    })
}

/// A quantity's text (YAML may give a number), and the error that it is not one.
fn quantity(what: &str, value: &serde_yaml::Value) -> (String, impl Fn() -> PodSpecError) {
    let text = match value {
        serde_yaml::Value::Number(number) => number.to_string(),
        serde_yaml::Value::String(text) => text.clone(),
        other => format!("{other:?}"),
    };
    let (what, value) = (what.to_owned(), text.clone());
    let bad = move || PodSpecError::Quantity {
        what: what.clone(),
        value: value.clone(),
    };
    (text, bad)
}

/// A memory quantity (`128Mi`, `1G`, `1048576`) in bytes.
pub fn bytes(what: &str, value: &serde_yaml::Value) -> Result<u64, PodSpecError> {
    let (text, bad) = quantity(what, value);
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let scale: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    number.checked_mul(scale).ok_or_else(bad)
}

/// A CPU quantity (`50m`, `1`, `0.5`) in thousandths of a CPU.
pub fn millicpus(what: &str, value: &serde_yaml::Value) -> Result<u64, PodSpecError> {
    let (text, bad) = quantity(what, value);
    if let Some(milli) = text.strip_suffix('m') {
        return milli.parse().map_err(|_| bad());
    }
    let cpus: f64 = text.parse().map_err(|_| bad())?;
    if !(0.0..=1e6).contains(&cpus) {
        return Err(bad());
    }
    // Whole thousandths: the kubelet rounds up too.
    Ok((cpus * 1000.0).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_the_api_server_reads_them() {
        let text = |s: &str| serde_yaml::Value::String(s.into());
        assert_eq!(bytes("m", &text("128Mi")).unwrap(), 128 << 20);
        assert_eq!(bytes("m", &text("1G")).unwrap(), 1_000_000_000);
        assert_eq!(bytes("m", &serde_yaml::Value::from(4096)).unwrap(), 4096);
        assert!(bytes("m", &text("12Qi")).is_err());
        assert!(bytes("m", &text("99999999999Ti")).is_err());
        assert_eq!(millicpus("c", &text("50m")).unwrap(), 50);
        assert_eq!(millicpus("c", &text("1.5")).unwrap(), 1500);
        assert!(millicpus("c", &text("fast")).is_err());
    }

    #[test]
    fn the_daemonset_template_is_read_whole() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
        let pod = read(&path, "DaemonSet", "leak").unwrap();
        assert_eq!(pod.namespace, "leak-system");
        assert!(pod.spec.host_pid);
        let agent = &pod.spec.containers[0];
        assert_eq!(agent.args[0], "trace");
        assert!(agent.security_context.privileged);
        assert!(!agent.volume_mounts.is_empty());
        for mount in &agent.volume_mounts {
            assert!(
                pod.spec
                    .volumes
                    .iter()
                    .any(|volume| volume.name == mount.name),
                "{} has no volume",
                mount.name
            );
        }
        assert!(read(&path, "DaemonSet", "nope").is_err());
    }
}
