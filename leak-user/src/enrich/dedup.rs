//! One report per dying process.

use std::collections::HashMap;

use crate::model::kill::Kill;

/// How long after a process's first report further reports of it are taken as the same death.
const SAME_DEATH_NS: u64 = 30_000_000_000;

/// Keeps one report per dying process. The kernel marks victims per task: a group kill
/// (`memory.oom.group`) walks every thread of every member, and the chosen victim is met again
/// on that walk, but a process dies once.
#[derive(Debug, Default)]
pub struct VictimDedup {
    /// Process id to the `boot_ns` of its first report.
    seen: HashMap<u32, u64>,
}

impl VictimDedup {
    /// Whether this kill is the first report of its process (and remembers it).
    pub fn first_report(&mut self, kill: &Kill) -> bool {
        self.seen
            .retain(|_, first| kill.boot_ns.saturating_sub(*first) < SAME_DEATH_NS);
        match self.seen.get(&kill.victim_pid) {
            Some(_) => false,
            None => {
                self.seen.insert(kill.victim_pid, kill.boot_ns);
                true
            }
        }
    }
}
