//! The most recent kills, bounded, newest last.

use std::collections::VecDeque;

use crate::model::kill::Kill;

#[derive(Debug)]
pub struct RecentKills {
    kills: VecDeque<Kill>,
    max: usize,
}

impl RecentKills {
    pub fn new(max: usize) -> Self {
        Self {
            kills: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// Keeps `kill`, dropping the oldest beyond the bound.
    pub fn push(&mut self, kill: Kill) {
        while self.kills.len() >= self.max {
            self.kills.pop_front();
        }
        self.kills.push_back(kill);
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Kill> {
        self.kills.iter().rev()
    }
}
