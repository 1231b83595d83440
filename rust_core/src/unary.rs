//! What a process counts of the unary allocations Rust answers whole
//! (`BatchCatalogue.allocate_one`), so that its caller runs no code for most of them: the ids
//! of new assignments, their counts per cascade level, the segment keys seen, and two
//! countdowns, to the next call learning observes and to the next growth report. A call
//! needs its caller only when one of those ends, or at a segment key seen for the first time.

use crate::keyed::{KeyedMap, KeyedSet};

/// The counts; see the module's documentation.
#[derive(Debug)]
pub struct UnaryLane {
    next_seq: u64,
    levels: KeyedMap<(u64, usize), u64>,
    keys: KeyedMap<u64, KeyedSet<String>>,
    grown: u64,
    grown_handles: KeyedSet<u64>,
    until_growth: Option<i64>,
    until_observed: Option<i64>,
}

/// What the caller must do after a new assignment was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Its segment key was not seen before in its experiment.
    pub new_key: bool,
    /// The growth countdown ended (`take_grown`, then `grow_in`).
    pub grow: bool,
}

impl Default for UnaryLane {
    fn default() -> Self {
        Self::new()
    }
}

impl UnaryLane {
    /// Ids from 1; neither countdown running.
    pub fn new() -> Self {
        UnaryLane {
            next_seq: 1,
            levels: KeyedMap::default(),
            keys: KeyedMap::default(),
            grown: 0,
            grown_handles: KeyedSet::default(),
            until_growth: None,
            until_observed: None,
        }
    }

    /// The next id, without taking it.
    pub fn peek_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next `n` ids: the first of them (the next one, when `n` is 0).
    pub fn take_seqs(&mut self, n: u64) -> u64 {
        let first = self.next_seq;
        self.next_seq += n;
        first
    }

    /// Count a new assignment (its id taken already) of experiment `handle` at cascade
    /// `level`, whose segment is `segment_key`.
    pub fn count(&mut self, handle: u64, segment_key: &str, level: usize) -> Counted {
        *self.levels.entry((handle, level)).or_insert(0) += 1;
        let keys = self.keys.entry(handle).or_default();
        let new_key = !keys.contains(segment_key);
        if new_key {
            keys.insert(segment_key.to_string());
        }
        let mut grow = false;
        if let Some(left) = self.until_growth.as_mut() {
            self.grown += 1;
            self.grown_handles.insert(handle);
            *left -= 1;
            if *left <= 0 {
                self.until_growth = None;
                grow = true;
            }
        }
        Counted { new_key, grow }
    }

    /// Count one answered call down to the next observed one: true when this is it (the
    /// countdown stops until `observe_in`).
    pub fn observes_next(&mut self) -> bool {
        let Some(left) = self.until_observed.as_mut() else {
            return false;
        };
        *left -= 1;
        if *left > 0 {
            return false;
        }
        self.until_observed = None;
        true
    }

    /// Observe the `calls`-th call from now (None: none).
    pub fn observe_in(&mut self, calls: Option<i64>) {
        self.until_observed = calls;
    }

    /// Report growth after `allocations` more new assignments (None: stop counting them).
    pub fn grow_in(&mut self, allocations: Option<i64>) {
        self.until_growth = allocations;
    }

    /// New assignments counted toward growth since the last call, and their experiments.
    pub fn take_grown(&mut self) -> (u64, Vec<u64>) {
        let mut handles: Vec<u64> = self.grown_handles.drain().collect();
        handles.sort_unstable();
        (std::mem::take(&mut self.grown), handles)
    }

    /// (cascade level, new assignments) of experiment `handle`, by level.
    pub fn level_counts(&self, handle: u64) -> Vec<(usize, u64)> {
        let mut counts: Vec<(usize, u64)> = self
            .levels
            .iter()
            .filter(|((h, _), _)| *h == handle)
            .map(|(&(_, level), &n)| (level, n))
            .collect();
        counts.sort_unstable();
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_taken_in_order() {
        let mut lane = UnaryLane::new();
        assert_eq!(lane.take_seqs(0), 1);
        assert_eq!(lane.take_seqs(3), 1);
        assert_eq!(lane.peek_seq(), 4);
        assert_eq!(lane.take_seqs(1), 4);
        assert_eq!(lane.peek_seq(), 5);
    }

    #[test]
    fn a_key_is_new_once_per_experiment_and_levels_are_counted() {
        let mut lane = UnaryLane::new();
        assert!(lane.count(1, "a", 1).new_key);
        assert!(!lane.count(1, "a", 1).new_key);
        assert!(lane.count(2, "a", 0).new_key);
        assert!(lane.count(1, "", 0).new_key);
        assert_eq!(lane.level_counts(1), vec![(0, 1), (1, 2)]);
        assert_eq!(lane.level_counts(2), vec![(0, 1)]);
        assert_eq!(lane.level_counts(3), vec![]);
    }

    #[test]
    fn growth_is_reported_when_its_countdown_ends_and_not_again_until_rearmed() {
        let mut lane = UnaryLane::new();
        assert!(!lane.count(1, "a", 0).grow);
        assert_eq!(lane.take_grown(), (0, vec![]), "not counted before grow_in");
        lane.grow_in(Some(3));
        assert!(!lane.count(2, "a", 0).grow);
        assert!(!lane.count(1, "a", 0).grow);
        assert!(lane.count(2, "a", 0).grow);
        assert!(!lane.count(2, "a", 0).grow, "stopped until rearmed");
        assert_eq!(lane.take_grown(), (3, vec![1, 2]));
        assert_eq!(lane.take_grown(), (0, vec![]));
        lane.grow_in(Some(1));
        assert!(lane.count(1, "a", 0).grow);
    }

    #[test]
    fn observation_counts_calls_down_and_stops_until_rearmed() {
        let mut lane = UnaryLane::new();
        assert!(!lane.observes_next(), "off until observe_in");
        lane.observe_in(Some(2));
        assert!(!lane.observes_next());
        assert!(lane.observes_next());
        assert!(!lane.observes_next());
        lane.observe_in(Some(1));
        assert!(lane.observes_next());
        lane.observe_in(None);
        assert!(!lane.observes_next());
    }
}
