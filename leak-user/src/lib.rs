//! The `leak` agent. A kill goes through these stages, each a module that depends only on the
//! ones before it:
//!
//! - [`kernel`]: where a kill is born: the layout table from BTF, the kernel programs and the
//!   attach table that hooks them, the host's capabilities, the kernel's own report.
//! - [`decode`]: ring-buffer bytes to typed records.
//! - [`model`]: plain data every stage shares: [`model::kill::Kill`], timelines, Kubernetes
//!   identity, memory arithmetic.
//! - [`enrich`]: a record becomes a `Kill`: cgroup paths, procfs, Kubernetes names, dedup.
//! - [`store`]: what is kept: per-cgroup history, recent kills.
//! - [`serve`]: HTTP and the Prometheus registry.
//! - [`agent`]: the loop that wires them together.
//! - [`experiment`]: `leak workload`, `leak demo`, `leak bench` and the harness they share
//!   with the end-to-end tests.

pub mod agent;
pub mod cli;
pub mod decode;
pub mod enrich;
pub mod experiment;
pub mod kernel;
pub mod model;
pub mod serve;
pub mod store;
pub mod sys;

#[cfg(test)]
mod architecture_tests;
