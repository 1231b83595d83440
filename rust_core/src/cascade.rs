//! Cascade level choice over a segment path.
//!
//! The path is global (level 0), then one node per configured dimension. The cascade uses the
//! deepest node that is present in the experiment's current tree and has at least its level's
//! minimum number of allocations; otherwise it falls back toward global, which always qualifies.

use std::collections::HashSet;

/// The node hashes the current tree keeps (after pruning); the global node is implied.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: HashSet<u64>,
}

impl Tree {
    pub fn new(nodes: impl IntoIterator<Item = u64>) -> Self {
        Tree {
            nodes: nodes.into_iter().collect(),
        }
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.nodes.contains(&hash)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// The level to use and its node's sample count. `samples(l)` is the allocation count of the
/// path's node at level `l` (level 0 = global, `levels` in all), read only for the levels
/// looked at, deepest first; `in_tree[l]` says whether the tree has it, `min_samples[l - 1]`
/// is the minimum for level `l`. A level without a configured minimum needs none.
#[inline]
pub fn cascade_level(
    levels: usize,
    mut samples: impl FnMut(usize) -> u64,
    in_tree: &[bool],
    min_samples: &[u64],
) -> (usize, u64) {
    for level in (1..levels).rev() {
        let needed = min_samples.get(level - 1).copied().unwrap_or(0);
        if in_tree[level] {
            let n = samples(level);
            if n >= needed {
                return (level, n);
            }
        }
    }
    (0, samples(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table_of_cases() {
        let min = [1000, 500, 200];
        let all = [true; 4];
        // (samples per level, expected level)
        let cases: &[([u64; 4], usize)] = &[
            ([10, 5, 3, 1], 0),
            ([5000, 1000, 400, 100], 1),
            ([5000, 1000, 600, 250], 3),
            ([5000, 999, 499, 199], 0),
            ([5000, 900, 600, 100], 2), // level 1 short, level 2 qualifies on its own
            ([5000, 1200, 100, 50], 1),
        ];
        for (samples, expected) in cases {
            let level = cascade_level(4, |l| samples[l], &all, &min);
            assert_eq!(level, (*expected, samples[*expected]), "{samples:?}");
        }
        // A node pruned from the tree is skipped even with data.
        let samples = [5000, 1000, 600, 250];
        assert_eq!(
            cascade_level(4, |l| samples[l], &[true, true, true, false], &min).0,
            2
        );
        assert_eq!(cascade_level(1, |_| 5000, &[true], &[]), (0, 5000));
    }

    proptest! {
        #[test]
        fn chosen_level_qualifies_and_none_deeper_does(
            samples in proptest::collection::vec(0u64..2000, 1..6),
            in_tree in proptest::collection::vec(any::<bool>(), 6),
            min in proptest::collection::vec(0u64..2000, 5),
        ) {
            let (l, n) = cascade_level(samples.len(), |l| samples[l], &in_tree[..samples.len()], &min);
            prop_assert_eq!(n, samples[l]);
            prop_assert!(l < samples.len());
            if l > 0 {
                prop_assert!(in_tree[l] && samples[l] >= min[l - 1]);
            }
            for deeper in l + 1..samples.len() {
                prop_assert!(!(in_tree[deeper] && samples[deeper] >= min[deeper - 1]));
            }
        }
    }
}
