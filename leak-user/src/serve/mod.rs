//! What the agent serves: the Prometheus registry, the HTTP endpoints, and the pages people
//! look at (HTML with server-rendered SVG charts).

pub mod agent_metrics;
pub mod chart;
pub mod html;
pub mod http;
pub mod metrics;
pub mod server;
pub mod webconfig;
