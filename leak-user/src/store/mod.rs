//! What the agent keeps: the recent history of each watched cgroup, and the recent kills.

pub mod disk;
pub mod filter;
pub mod history;
pub mod kills;

pub use history::History;
pub use kills::RecentKills;
