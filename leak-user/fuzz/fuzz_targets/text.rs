//! Text the agent parses: cgroup paths (Kubernetes attribution), kernel log lines,
//! mountinfo, tracepoint format files.
#![no_main]

use leak_user::{
    enrich::{cgroupfs::MemoryHierarchy, kubernetes as k8s},
    kernel::{kmsg, layout},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = k8s::parse_cgroup_path(&text);
    let _ = k8s::kubepods_parent(&text);
    let _ = kmsg::parse_reports(text.lines());
    let _ = MemoryHierarchy::from_mountinfo(&text, |_| Some("memory".into()));
    let _ = layout::tracepoint_field_offset(&text, "pid");
});
