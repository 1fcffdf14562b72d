//! The `leak` agent: loads the kernel programs, decodes OOM-kill snapshots, names their cgroups
//! and serves them as Prometheus metrics and JSON.

pub mod bench;
pub mod cgroup;
pub mod demo;
pub mod events;
pub mod history;
pub mod http;
pub mod k8s;
pub mod kmsg;
pub mod lab;
pub mod layout;
pub mod metrics;
pub mod poll;
pub mod probes;
pub mod trace;
pub mod workload;
