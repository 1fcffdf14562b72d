use super::*;

const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const UID_SYSTEMD: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";
const ID: &str = "3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829";
const OTHER_ID: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

fn container(runtime: Runtime) -> CgroupLevel {
    CgroupLevel::Container {
        container_id: ID.into(),
        runtime,
    }
}

fn identity(qos: QosClass, driver: CgroupDriver, level: CgroupLevel) -> CgroupIdentity {
    CgroupIdentity {
        pod_uid: UID.into(),
        qos,
        driver,
        level,
    }
}

fn parse(path: &str) -> CgroupIdentity {
    parse_cgroup_path(path).unwrap_or_else(|| panic!("{path} should parse"))
}

#[test]
fn cgroupfs_burstable_and_besteffort_containers_and_pods() {
    use CgroupDriver::Cgroupfs;
    assert_eq!(
        parse(&format!("/kubepods/burstable/pod{UID}/{ID}")),
        identity(QosClass::Burstable, Cgroupfs, container(Runtime::Unknown))
    );
    assert_eq!(
        parse(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
        identity(QosClass::BestEffort, Cgroupfs, container(Runtime::Unknown))
    );
    assert_eq!(
        parse(&format!("/kubepods/burstable/pod{UID}")),
        identity(QosClass::Burstable, Cgroupfs, CgroupLevel::Pod)
    );
    assert_eq!(
        parse(&format!("/kubepods/besteffort/pod{UID}/")),
        identity(QosClass::BestEffort, Cgroupfs, CgroupLevel::Pod)
    );
}

#[test]
fn cgroupfs_guaranteed_sits_under_kubepods() {
    use CgroupDriver::Cgroupfs;
    assert_eq!(
        parse(&format!("/kubepods/pod{UID}/{ID}")),
        identity(QosClass::Guaranteed, Cgroupfs, container(Runtime::Unknown))
    );
    assert_eq!(
        parse(&format!("/kubepods/pod{UID}")),
        identity(QosClass::Guaranteed, Cgroupfs, CgroupLevel::Pod)
    );
}

#[test]
fn cgroupfs_below_any_prefix() {
    for prefix in [
        "/kubelet",
        "/docker/1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a",
        "/system.slice/docker-1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a.scope",
        "/system.slice/containerd.service",
    ] {
        assert_eq!(
            parse(&format!("{prefix}/kubepods/burstable/pod{UID}/{ID}")),
            identity(
                QosClass::Burstable,
                CgroupDriver::Cgroupfs,
                container(Runtime::Unknown)
            ),
            "{prefix}"
        );
    }
}

#[test]
fn cgroupfs_crio_names_its_runtime_and_monitor() {
    let found = parse(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}"));
    assert_eq!(found.level, container(Runtime::Crio));
    let monitor = parse(&format!("/kubepods/besteffort/pod{UID}/crio-conmon-{ID}"));
    assert_eq!(
        monitor.level,
        CgroupLevel::Monitor {
            container_id: ID.into(),
            runtime: Runtime::Crio
        }
    );
    assert_eq!(monitor.container_id(), Some(ID));
    assert_eq!(monitor.runtime(), Some(Runtime::Crio));
}

#[test]
fn systemd_each_runtime_and_qos() {
    use CgroupDriver::Systemd;
    let cases = [
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
            QosClass::Burstable,
            Runtime::Containerd,
        ),
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
            ),
            QosClass::BestEffort,
            Runtime::Crio,
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"),
            QosClass::Guaranteed,
            Runtime::Docker,
        ),
    ];
    for (path, qos, runtime) in cases {
        let found = parse(&path);
        assert_eq!(found, identity(qos, Systemd, container(runtime)), "{path}");
        assert_eq!(found.pod_uid, UID, "underscores back to dashes");
    }
}

#[test]
fn systemd_pod_level_and_monitor() {
    use CgroupDriver::Systemd;
    assert_eq!(
        parse(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        )),
        identity(QosClass::Burstable, Systemd, CgroupLevel::Pod)
    );
    assert_eq!(
        parse(&format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/")),
        identity(QosClass::Guaranteed, Systemd, CgroupLevel::Pod)
    );
    let monitor = parse(&format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope"
    ));
    assert!(matches!(monitor.level, CgroupLevel::Monitor { .. }));
}

#[test]
fn systemd_under_a_kubelet_cgroup_root_inside_kind() {
    let path = format!(
        "/system.slice/docker-{OTHER_ID}.scope/kubelet.slice/kubelet-kubepods.slice/\
         kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_SYSTEMD}.slice/\
         cri-containerd-{ID}.scope"
    );
    assert_eq!(
        parse(&path),
        identity(
            QosClass::Burstable,
            CgroupDriver::Systemd,
            container(Runtime::Containerd)
        )
    );
}

#[test]
fn sub_cgroups_of_a_container_belong_to_it() {
    let found = parse(&format!(
        "/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-{ID}.scope/container"
    ));
    assert_eq!(found.level, container(Runtime::Crio));
    let found = parse(&format!("/kubepods/pod{UID}/{ID}/init.scope"));
    assert_eq!(found.container_id(), Some(ID));
}

#[test]
fn innermost_pod_wins_when_clusters_nest() {
    let inner_uid = "11111111-2222-3333-4444-555555555555";
    let found = parse(&format!(
        "/kubepods/burstable/pod{UID}/{OTHER_ID}/kubelet/kubepods/besteffort/pod{inner_uid}/{ID}"
    ));
    assert_eq!(found.pod_uid, inner_uid);
    assert_eq!(found.qos, QosClass::BestEffort);
    assert_eq!(found.container_id(), Some(ID));
}

#[test]
fn kubepods_parent_is_the_path_above_the_pods_kubepods() {
    let node = "1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a";
    let kind = format!("/system.slice/docker-{node}.scope/kubelet.slice");
    let nested = format!("/kubepods/burstable/pod{UID}/{OTHER_ID}/kubelet");
    for (path, prefix, kubepods) in [
        (format!("/kubepods/burstable/pod{UID}/{ID}"), "", "kubepods"),
        (
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice"),
            "",
            "kubepods.slice",
        ),
        (
            format!("/docker/{node}/kubepods/pod{UID}/{ID}/init.scope"),
            &*format!("/docker/{node}"),
            "kubepods",
        ),
        (
            format!(
                "{kind}/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
                 kubelet-kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
            &*kind,
            "kubelet-kubepods.slice",
        ),
        (
            format!("{nested}/kubepods/besteffort/pod{UID}/{ID}"),
            &*nested,
            "kubepods",
        ),
    ] {
        assert_eq!(
            kubepods_parent(&path),
            Some((prefix.to_owned(), kubepods)),
            "{path}"
        );
    }
    assert_eq!(kubepods_parent("/docker/kubepods/burstable"), None);
    assert_eq!(kubepods_parent("/system.slice/sshd.service"), None);
}

#[test]
fn static_pod_uids_are_plain_hex() {
    let uid = "6d4e8c3c0e8b7f1a3f9a2b1c0d9e8f7a";
    let found = parse(&format!("/kubepods/burstable/pod{uid}/{ID}"));
    assert_eq!(found.pod_uid, uid);
}

#[test]
fn rejects_paths_that_are_not_a_pod() {
    for path in [
        "/".to_owned(),
        String::new(),
        "/system.slice/sshd.service".to_owned(),
        "/user.slice/user-1000.slice/session-2.scope".to_owned(),
        "/kubepods".to_owned(),
        "/kubepods/burstable".to_owned(),
        "/kubepods.slice".to_owned(),
        "/kubepods.slice/kubepods-burstable.slice".to_owned(),
        format!("/kubepods/burstable/pod{UID}/not-a-container"),
        format!("/kubepods/burstable/pod{UID}/{}", &ID[..63]),
        format!("/kubepods/burstable/pod{UID}/{}g", &ID[..63]),
        format!("/kubepods/burstable/pod{UID}/containerd-{ID}"),
        "/kubepods/burstable/pod".to_owned(),
        format!("/kubepods/guaranteed/pod{UID}"),
        format!("/kubepods/burstable/pod{UID}.weird/{ID}"),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"
        ),
        format!("/mykubepods.slice/mykubepods-pod{UID_SYSTEMD}.slice"),
        format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.scope"),
        format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/session-1.scope"),
        format!("/kubepods.slice/other-pod{UID_SYSTEMD}.slice"),
    ] {
        assert_eq!(parse_cgroup_path(&path), None, "{path:?}");
    }
}

#[test]
fn serializes_level_flat() {
    let found = parse(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
    let json = serde_json::to_value(&found).unwrap_or_default();
    assert_eq!(
        json,
        serde_json::json!({
            "pod_uid": UID,
            "qos": "Burstable",
            "driver": "cgroupfs",
            "level": "container",
            "container_id": ID,
            "runtime": "crio",
        })
    );
    assert_eq!(QosClass::BestEffort.to_string(), "BestEffort");
    assert_eq!(Runtime::Containerd.to_string(), "containerd");
}

/// A throwaway rootfs under the temp dir, removed on drop even when the test fails.
struct Rootfs(PathBuf);

impl Rootfs {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("leak-k8s-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("var/log/pods")).expect("mkdir pods");
        fs::create_dir_all(path.join("var/log/containers")).expect("mkdir containers");
        Self(path)
    }

    fn pod_dir(&self, namespace: &str, pod: &str, uid: &str, containers: &[&str]) {
        let dir = self
            .0
            .join("var/log/pods")
            .join(format!("{namespace}_{pod}_{uid}"));
        for container in containers {
            fs::create_dir_all(dir.join(container)).expect("mkdir container log dir");
        }
        fs::create_dir_all(&dir).expect("mkdir pod log dir");
    }

    fn container_link(&self, namespace: &str, pod: &str, uid: &str, container: &str, id: &str) {
        let link = self.container_link_path(namespace, pod, container, id);
        let target = format!("/var/log/pods/{namespace}_{pod}_{uid}/{container}/0.log");
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }

    fn container_link_path(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        id: &str,
    ) -> PathBuf {
        self.0
            .join("var/log/containers")
            .join(format!("{pod}_{namespace}_{container}-{id}.log"))
    }

    fn names(&self) -> K8sNames {
        K8sNames::new(self.0.clone())
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn pod_names(namespace: &str, pod: &str, container: Option<&str>) -> Option<PodNames> {
    Some(PodNames {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.map(Into::into),
    })
}

fn pod_level() -> CgroupIdentity {
    identity(
        QosClass::Burstable,
        CgroupDriver::Cgroupfs,
        CgroupLevel::Pod,
    )
}

fn container_level(id: &str) -> CgroupIdentity {
    identity(
        QosClass::Burstable,
        CgroupDriver::Cgroupfs,
        CgroupLevel::Container {
            container_id: id.into(),
            runtime: Runtime::Unknown,
        },
    )
}

#[test]
fn names_pods_and_containers_with_dashes() {
    let rootfs = Rootfs::new("both-layouts");
    rootfs.pod_dir(
        "leak-demo",
        "leak-file-7d9c8b-x2x4z",
        UID,
        &["leak-file", "side-car"],
    );
    rootfs.container_link("leak-demo", "leak-file-7d9c8b-x2x4z", UID, "side-car", ID);
    let mut names = rootfs.names();
    assert_eq!(
        names.lookup(&pod_level()),
        pod_names("leak-demo", "leak-file-7d9c8b-x2x4z", None)
    );
    assert_eq!(
        names.lookup(&container_level(ID)),
        pod_names("leak-demo", "leak-file-7d9c8b-x2x4z", Some("side-car"))
    );
}

#[test]
fn container_without_log_names_its_pod_only() {
    let rootfs = Rootfs::new("sandbox");
    rootfs.pod_dir("default", "web", UID, &["nginx"]);
    rootfs.container_link("default", "web", UID, "nginx", ID);
    let mut names = rootfs.names();
    assert_eq!(
        names.lookup(&container_level(OTHER_ID)),
        pod_names("default", "web", None),
        "the pause container has no log"
    );
    let monitor = identity(
        QosClass::Burstable,
        CgroupDriver::Systemd,
        CgroupLevel::Monitor {
            container_id: ID.into(),
            runtime: Runtime::Crio,
        },
    );
    assert_eq!(names.lookup(&monitor), pod_names("default", "web", None));
}

#[test]
fn vanished_container_still_resolves() {
    let rootfs = Rootfs::new("vanished");
    rootfs.pod_dir("default", "web", UID, &["nginx"]);
    rootfs.container_link("default", "web", UID, "nginx", ID);
    let mut names = rootfs.names();
    fs::remove_dir_all(rootfs.0.join("var/log/pods")).expect("rm pods");
    fs::remove_file(rootfs.container_link_path("default", "web", "nginx", ID)).expect("rm link");
    names.refresh().expect("refresh");
    assert_eq!(
        names.lookup(&container_level(ID)),
        pod_names("default", "web", Some("nginx"))
    );
    assert_eq!(
        names.lookup(&pod_level()),
        pod_names("default", "web", None)
    );
}

#[test]
fn pod_learned_from_link_target_alone() {
    let rootfs = Rootfs::new("link-target");
    rootfs.container_link(
        "kube-system",
        "coredns-5d78c9869d-abcde",
        UID,
        "coredns",
        ID,
    );
    let mut names = rootfs.names();
    assert_eq!(
        names.lookup(&pod_level()),
        pod_names("kube-system", "coredns-5d78c9869d-abcde", None)
    );
}

#[test]
fn malformed_entries_are_ignored() {
    let rootfs = Rootfs::new("malformed");
    let pods = rootfs.0.join("var/log/pods");
    for bad in [
        "no-underscores",
        "ns_pod",
        "_pod_uid",
        "ns__uid",
        "ns_pod_",
        "ns_pod_bad.uid",
    ] {
        fs::create_dir_all(pods.join(bad)).expect("mkdir bad pod dir");
    }
    fs::write(pods.join("stray-file"), b"").expect("stray file");
    let containers = rootfs.0.join("var/log/containers");
    for bad in [
        format!("pod_ns_c-{ID}"),
        format!("pod_ns_c-{ID}.txt"),
        format!("pod_ns_c{ID}.log"),
        format!("pod_ns_c-{}.log", &ID[1..]),
        format!("pod_ns_c-{}z.log", &ID[1..]),
        format!("pod_ns-{ID}.log"),
        format!("_ns_c-{ID}.log"),
        format!("pod__c-{ID}.log"),
        format!("pod_ns_-{ID}.log"),
        format!("pod_ns_c_d-{ID}.log"),
        format!("-{ID}.log"),
        "short.log".to_owned(),
    ] {
        fs::write(containers.join(bad), b"").expect("bad container log");
    }
    rootfs.pod_dir("good", "pod", UID, &["c"]);
    rootfs.container_link("good", "pod", UID, "c", OTHER_ID);
    let names = rootfs.names();
    assert_eq!(names.pods.len(), 1, "{:?}", names.pods);
    assert_eq!(names.containers.len(), 1, "{:?}", names.containers);
    assert!(names.containers.contains_key(OTHER_ID));
    assert!(parse_pod_log_dir("ns_pod_uid_with_underscore").is_none());
}

#[test]
fn misses_rescan_at_most_once_a_second() {
    let rootfs = Rootfs::new("rate-limit");
    let mut names = rootfs.names();
    assert_eq!(names.lookup(&pod_level()), None);
    rootfs.pod_dir("default", "late", UID, &["app"]);
    assert_eq!(
        names.lookup(&pod_level()),
        None,
        "scanned less than a second ago"
    );
    names.last_refresh = Instant::now().checked_sub(REFRESH_INTERVAL);
    assert_eq!(
        names.lookup(&pod_level()),
        pod_names("default", "late", None)
    );
    rootfs.container_link("default", "late", UID, "app", ID);
    names.last_refresh = None;
    assert_eq!(
        names.lookup(&container_level(ID)),
        pod_names("default", "late", Some("app")),
        "a known pod with an unknown container still rescans"
    );
}

#[test]
fn evicts_least_recently_seen_beyond_the_cap() {
    let rootfs = Rootfs::new("evict");
    let mut names = rootfs.names();
    names.max_entries = 10;
    for n in 0..10 {
        rootfs.pod_dir("ns", &format!("old-{n}"), &format!("old-{n}"), &[]);
    }
    names.refresh().expect("refresh");
    assert_eq!(names.pods.len(), 10);
    fs::remove_dir_all(rootfs.0.join("var/log/pods")).expect("rm pods");
    rootfs.pod_dir("ns", "new", "new", &[]);
    names.refresh().expect("refresh");
    assert_eq!(names.pods.len(), 9, "down to the cap less a tenth");
    assert!(
        names.pods.contains_key("new"),
        "the one still on disk stays"
    );
}

#[test]
fn missing_directories_are_not_an_error_but_unreadable_ones_are() {
    let rootfs = Rootfs::new("errors");
    fs::remove_dir_all(rootfs.0.join("var/log")).expect("rm log");
    let mut names = rootfs.names();
    names.refresh().expect("not a Kubernetes node");
    assert_eq!(names.lookup(&pod_level()), None);
    fs::create_dir_all(rootfs.0.join("var/log")).expect("mkdir log");
    fs::write(rootfs.0.join("var/log/pods"), b"").expect("file instead of dir");
    let err = names.refresh().expect_err("a file is not a directory");
    assert!(err.to_string().contains("--rootfs"), "{err}");
}
