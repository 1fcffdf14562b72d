//! Plain data: what a kill is, what a cgroup looked like, a timeline and its story, the
//! Kubernetes identity of a cgroup, and the memory arithmetic they share. Nothing here reads
//! the kernel, the filesystem or the clock, and nothing here imports another module of the
//! agent: every other stage depends on the model, never the reverse.

pub mod kill;
pub mod kubernetes;
pub mod memory;
pub mod time;
pub mod timeline;
