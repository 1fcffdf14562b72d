//! The original experiment, as commands: `leak workload` (the leaking program), `leak demo`
//! (both runs told from the kills' timelines), `leak bench` (what the tracer costs), and the
//! harness they share with the end-to-end tests.

pub mod bench;
pub mod containerd;
pub mod demo;
pub mod figure;
pub mod harness;
pub mod kubelet;
pub mod pod_spec;
pub mod tracer;
pub mod workload;
