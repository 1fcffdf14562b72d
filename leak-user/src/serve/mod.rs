//! What the agent serves: the Prometheus registry and the HTTP endpoints.

pub mod http;
pub mod metrics;
