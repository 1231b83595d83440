//! The concurrent posterior counter store.
//!
//! Keyed by (experiment, segment hash); each node holds one counter triple per variant
//! (allocations, conversions, value sum). An increment is one atomic add to the totals the
//! sampler reads; [`Store::take_deltas`] reports what the totals gained since the last export.
//! Increments are lock-free atomics; an experiment's node map is locked for reading on lookups
//! and for writing only when a node is created.

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// (experiment, segment hash, variant, allocations, conversions, value sum)
pub type CountRow = (u64, u64, u32, u64, u64, f64);

/// Identity of a posterior node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub experiment: u64,
    pub segment: u64,
}

impl NodeId {
    pub fn new(experiment: u64, segment: u64) -> Self {
        NodeId {
            experiment,
            segment,
        }
    }
}

/// Hasher for keys that are already uniform 64-bit hashes: passes them through.
#[derive(Default)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Nodes of one experiment by segment hash.
pub type NodeMap = HashMap<u64, Arc<Node>, BuildHasherDefault<PrehashedHasher>>;

#[derive(Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn load(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn store(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed)
    }
    fn swap(&self, v: f64) -> f64 {
        f64::from_bits(self.0.swap(v.to_bits(), Ordering::Relaxed))
    }
    fn add(&self, v: f64) {
        if v == 0.0 {
            return;
        }
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match self
                .0
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Totals of one variant, and how much of them has been exported already.
///
/// An allocation is one atomic add; deltas are `total - exported`, taken under the node's
/// export lock, so no increment is ever counted twice or lost between exports.
#[derive(Default)]
struct Counter {
    allocations: AtomicU64,
    conversions: AtomicU64,
    value_sum: AtomicF64,
}

#[derive(Default, Clone, Copy)]
struct Exported {
    allocations: u64,
    conversions: u64,
    value_sum: f64,
}

/// Per-variant counts of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VariantCounts {
    pub allocations: u64,
    pub conversions: u64,
    pub value_sum: f64,
}

/// One state of a node's posteriors that decisions draw from: the exact probability that a
/// Thompson draw (the largest Beta sample plus bonus) picks each variant. Kept while no
/// variant's posterior has moved by more than a fraction of its standard deviation since.
/// Decisions pick a variant with these probabilities (not from the moving counts), so the
/// probability they log is exactly that of the choice they made.
#[derive(Debug, Clone)]
pub struct PropensityCache {
    /// The settings and level the entry was computed for (0: an entry not kept on a node).
    pub level_key: u64,
    pub probabilities: Vec<f64>,
    /// Running sums of `probabilities`, the last one exactly 1.
    pub cumulative: Vec<f64>,
    /// Per variant: (allocations, conversions) at the node when the entry was computed.
    pub counts: Vec<(u64, u64)>,
    /// Per variant: the share of the allowed movement that one allocation and one conversion
    /// use up (see `decide::state`).
    pub cost: Vec<(f64, f64)>,
    /// The node's total (allocations, conversions) when computed, and the largest per-variant
    /// costs: while the totals have moved so little that even one variant taking all of it
    /// stays within budget, no variant needs checking on its own.
    totals: (u64, u64),
    most_cost: (f64, f64),
    /// `Node::reloads` when computed: a reload may lower counters, and then only the
    /// per-variant check holds.
    reloads: u64,
}

impl PropensityCache {
    /// An entry for `probabilities` (which sum to 1), computed from `counts` after `reloads`
    /// reloads of the node.
    pub fn new(
        level_key: u64,
        probabilities: Vec<f64>,
        counts: Vec<(u64, u64)>,
        cost: Vec<(f64, f64)>,
        reloads: u64,
    ) -> Self {
        let mut sum = 0.0;
        let mut cumulative: Vec<f64> = probabilities
            .iter()
            .map(|p| {
                sum += p;
                sum
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        let totals = counts
            .iter()
            .fold((0, 0), |(n, c), &(vn, vc)| (n + vn, c + vc));
        let most_cost = cost
            .iter()
            .fold((0.0, 0.0), |(a, b): (f64, f64), &(ca, cc)| {
                (a.max(ca), b.max(cc))
            });
        PropensityCache {
            level_key,
            probabilities,
            cumulative,
            counts,
            cost,
            totals,
            most_cost,
            reloads,
        }
    }

    /// Whether the entry still holds for the node as it is now: the same settings, and for
    /// every variant (allocations moved) * cost + (conversions moved) * cost <= 1.
    /// `allocations` is the node's total now (the cascade has it already).
    #[inline]
    pub fn fresh(&self, level_key: u64, node: &Node, allocations: u64) -> bool {
        if self.level_key != level_key {
            return false;
        }
        // Between reloads counters only grow, so no variant moved more than the totals did.
        let (n0, c0) = self.totals;
        if self.reloads == node.reloads() && allocations >= n0 {
            let conversions = node.conversions();
            if conversions >= c0 {
                let moved = (allocations - n0) as f64 * self.most_cost.0
                    + (conversions - c0) as f64 * self.most_cost.1;
                if moved <= 1.0 {
                    return true;
                }
            }
        }
        self.counts.iter().zip(&self.cost).enumerate().all(
            |(i, (&(n, c), &(per_allocation, per_conversion)))| {
                let (n_now, c_now) = node.variant(i);
                n_now.abs_diff(n) as f64 * per_allocation
                    + c_now.abs_diff(c) as f64 * per_conversion
                    <= 1.0
            },
        )
    }
}

/// One posterior node: counters for each variant of one segment of one experiment.
pub struct Node {
    counters: Box<[Counter]>,
    exported: Mutex<Box<[Exported]>>,
    /// The posterior state decisions at this node draw from (read without locking).
    pub propensity: ArcSwapOption<PropensityCache>,
    /// How many times `load` has replaced the counters (which may lower them).
    reloads: AtomicU64,
}

impl Node {
    fn new(variants: usize) -> Self {
        Node {
            counters: (0..variants).map(|_| Counter::default()).collect(),
            exported: Mutex::new(vec![Exported::default(); variants].into_boxed_slice()),
            propensity: ArcSwapOption::empty(),
            reloads: AtomicU64::new(0),
        }
    }

    pub fn variants(&self) -> usize {
        self.counters.len()
    }

    /// How many times the counters were replaced by a load.
    #[inline]
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Acquire)
    }

    /// Total allocations over all variants (the cascade's sample count).
    #[inline]
    pub fn allocations(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.allocations.load(Ordering::Relaxed))
            .sum()
    }

    /// Total conversions over all variants.
    #[inline]
    pub fn conversions(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.conversions.load(Ordering::Relaxed))
            .sum()
    }

    /// (allocations, conversions) of one variant; zero past the node's width.
    #[inline]
    pub fn variant(&self, i: usize) -> (u64, u64) {
        match self.counters.get(i) {
            Some(c) => (
                c.allocations.load(Ordering::Relaxed),
                c.conversions.load(Ordering::Relaxed),
            ),
            None => (0, 0),
        }
    }

    pub fn counts(&self) -> Vec<VariantCounts> {
        self.counters
            .iter()
            .map(|c| VariantCounts {
                allocations: c.allocations.load(Ordering::Relaxed),
                conversions: c.conversions.load(Ordering::Relaxed),
                value_sum: c.value_sum.load(),
            })
            .collect()
    }

    #[inline]
    pub fn add_allocation(&self, variant: usize) {
        self.counters[variant]
            .allocations
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_conversion(&self, variant: usize, value: f64) {
        let c = &self.counters[variant];
        c.conversions.fetch_add(1, Ordering::Relaxed);
        c.value_sum.add(value);
    }

    /// Add to (or, with `replace`, set) the totals of one variant as already-persisted state:
    /// the unexported part of the totals stays pending.
    fn load(
        &self,
        variant: usize,
        allocations: u64,
        conversions: u64,
        value_sum: f64,
        replace: bool,
    ) {
        let c = &self.counters[variant];
        let mut exported = self.exported.lock();
        let e = &mut exported[variant];
        if replace {
            self.reloads.fetch_add(1, Ordering::Release);
            // Swap in the new total, then add back what was pending; increments racing with
            // this land on top and stay pending too.
            let pa = c
                .allocations
                .swap(allocations, Ordering::Relaxed)
                .wrapping_sub(e.allocations);
            c.allocations.fetch_add(pa, Ordering::Relaxed);
            let pc = c
                .conversions
                .swap(conversions, Ordering::Relaxed)
                .wrapping_sub(e.conversions);
            c.conversions.fetch_add(pc, Ordering::Relaxed);
            let pv = c.value_sum.swap(value_sum) - e.value_sum;
            c.value_sum.add(pv);
            *e = Exported {
                allocations,
                conversions,
                value_sum,
            };
        } else {
            c.allocations.fetch_add(allocations, Ordering::Relaxed);
            c.conversions.fetch_add(conversions, Ordering::Relaxed);
            c.value_sum.add(value_sum);
            e.allocations = e.allocations.wrapping_add(allocations);
            e.conversions = e.conversions.wrapping_add(conversions);
            e.value_sum += value_sum;
        }
    }

    /// Changes since the last call, per variant: (variant, allocations, conversions, value).
    fn take_deltas(&self, out: &mut impl FnMut(u32, u64, u64, f64)) {
        let mut exported = self.exported.lock();
        for (i, (c, e)) in self.counters.iter().zip(exported.iter_mut()).enumerate() {
            let a = c.allocations.load(Ordering::Relaxed);
            let k = c.conversions.load(Ordering::Relaxed);
            let v = c.value_sum.load();
            if a != e.allocations || k != e.conversions || v != e.value_sum {
                out(
                    i as u32,
                    a.wrapping_sub(e.allocations),
                    k.wrapping_sub(e.conversions),
                    v - e.value_sum,
                );
                *e = Exported {
                    allocations: a,
                    conversions: k,
                    value_sum: v,
                };
            }
        }
    }

    fn copy_from(&self, other: &Node) {
        let exported = other.exported.lock();
        let mut mine = self.exported.lock();
        for (i, c) in other.counters.iter().enumerate() {
            let d = &self.counters[i];
            d.allocations
                .store(c.allocations.load(Ordering::Relaxed), Ordering::Relaxed);
            d.conversions
                .store(c.conversions.load(Ordering::Relaxed), Ordering::Relaxed);
            d.value_sum.store(c.value_sum.load());
            mine[i] = exported[i];
        }
    }
}

/// The nodes of one experiment. Lookups of a whole cascade path take the read lock once;
/// the write lock is taken only to create or widen a node.
#[derive(Default)]
pub struct Segments {
    nodes: RwLock<NodeMap>,
    /// Bumped (under the write lock) whenever the map changes: node references taken at one
    /// version stay the map's nodes while the version is unchanged.
    version: AtomicU64,
}

impl Segments {
    /// Read access to the node map (hold it briefly: node creation waits for it).
    #[inline]
    pub fn read(&self) -> RwLockReadGuard<'_, NodeMap> {
        self.nodes.read()
    }

    /// The map's change count; stable while a read guard is held.
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    #[inline]
    pub fn get(&self, segment: u64) -> Option<Arc<Node>> {
        self.nodes.read().get(&segment).cloned()
    }

    /// The node, created with at least `variants` counters. A node narrower than `variants`
    /// (the experiment gained variants) is replaced by a wider copy.
    pub fn get_or_create(&self, segment: u64, variants: usize) -> Arc<Node> {
        if let Some(node) = self.get(segment) {
            if node.variants() >= variants {
                return node;
            }
        }
        let mut nodes = self.nodes.write();
        let node = match nodes.get(&segment) {
            Some(node) if node.variants() >= variants => return node.clone(),
            Some(node) => {
                let wider = Arc::new(Node::new(variants));
                wider.copy_from(node);
                wider
            }
            None => Arc::new(Node::new(variants)),
        };
        nodes.insert(segment, node.clone());
        self.version.fetch_add(1, Ordering::Release);
        node
    }

    pub fn len(&self) -> usize {
        self.nodes.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All posterior nodes, per experiment.
#[derive(Default)]
pub struct Store {
    experiments: RwLock<HashMap<u64, Arc<Segments>>>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// The experiment's node map, created empty if missing.
    pub fn segments(&self, experiment: u64) -> Arc<Segments> {
        if let Some(s) = self.experiments.read().get(&experiment) {
            return s.clone();
        }
        self.experiments
            .write()
            .entry(experiment)
            .or_default()
            .clone()
    }

    /// The node, if it exists.
    pub fn get(&self, id: NodeId) -> Option<Arc<Node>> {
        let segments = self.experiments.read().get(&id.experiment).cloned()?;
        segments.get(id.segment)
    }

    /// The node, created with at least `variants` counters.
    pub fn get_or_create(&self, id: NodeId, variants: usize) -> Arc<Node> {
        self.segments(id.experiment)
            .get_or_create(id.segment, variants)
    }

    /// Number of nodes held.
    pub fn len(&self) -> usize {
        self.experiments.read().values().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counter changes since the previous call, each taken atomically (an increment racing with
    /// this call lands either in this export or in the next, never in both or neither).
    pub fn take_deltas(&self) -> Vec<CountRow> {
        let experiments: Vec<(u64, Arc<Segments>)> = self
            .experiments
            .read()
            .iter()
            .map(|(e, s)| (*e, s.clone()))
            .collect();
        let mut out = Vec::new();
        for (experiment, segments) in experiments {
            for (segment, node) in segments.read().iter() {
                node.take_deltas(&mut |variant, a, k, v| {
                    out.push((experiment, *segment, variant, a, k, v))
                });
            }
        }
        out
    }

    /// Load persisted counts: added to the totals, or with `replace` set as the totals (plus any
    /// pending delta not yet exported). Pending deltas themselves are not changed.
    pub fn load(&self, rows: &[CountRow], replace: bool) {
        for &(experiment, segment, variant, a, k, v) in rows {
            let node = self.get_or_create(NodeId::new(experiment, segment), variant as usize + 1);
            node.load(variant as usize, a, k, v, replace);
        }
    }

    /// Current totals of every node of one experiment (all experiments with `None`).
    pub fn snapshot(&self, experiment: Option<u64>) -> Vec<CountRow> {
        let experiments: Vec<(u64, Arc<Segments>)> = self
            .experiments
            .read()
            .iter()
            .filter(|(e, _)| experiment.is_none_or(|x| x == **e))
            .map(|(e, s)| (*e, s.clone()))
            .collect();
        let mut out = Vec::new();
        for (e, segments) in experiments {
            for (segment, node) in segments.read().iter() {
                for (i, c) in node.counts().into_iter().enumerate() {
                    if c.allocations != 0 || c.conversions != 0 || c.value_sum != 0.0 {
                        out.push((
                            e,
                            *segment,
                            i as u32,
                            c.allocations,
                            c.conversions,
                            c.value_sum,
                        ));
                    }
                }
            }
        }
        out
    }

    /// Drop every node of an experiment.
    pub fn remove_experiment(&self, experiment: u64) {
        self.experiments.write().remove(&experiment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::thread;

    #[test]
    fn concurrent_increments_sum_exactly() {
        let store = Arc::new(Store::new());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let node = store.get_or_create(NodeId::new(1, i % 7), 3);
                        node.add_allocation((i % 3) as usize);
                        if (i + t) % 4 == 0 {
                            node.add_conversion((i % 3) as usize, 0.5);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = (0..7)
            .map(|s| store.get(NodeId::new(1, s)).unwrap().allocations())
            .sum();
        assert_eq!(total, 80_000);
        let deltas = store.take_deltas();
        assert_eq!(deltas.iter().map(|r| r.3).sum::<u64>(), 80_000);
        assert_eq!(deltas.iter().map(|r| r.4).sum::<u64>(), 20_000);
        assert!((deltas.iter().map(|r| r.5).sum::<f64>() - 10_000.0).abs() < 1e-9);
        assert!(store.take_deltas().is_empty(), "deltas are taken once");
    }

    #[test]
    fn load_adds_or_replaces_and_keeps_pending() {
        let store = Store::new();
        let id = NodeId::new(2, 99);
        store.load(&[(2, 99, 1, 100, 10, 5.0)], false);
        let node = store.get(id).unwrap();
        assert_eq!(node.variant(1), (100, 10));
        assert!(
            store.take_deltas().is_empty(),
            "loaded state is not a delta"
        );
        node.add_allocation(1);
        store.load(&[(2, 99, 1, 500, 50, 25.0)], true);
        assert_eq!(
            node.variant(1),
            (501, 50),
            "replace keeps the unexported allocation"
        );
        assert_eq!(node.allocations(), 501);
        assert_eq!(store.take_deltas(), vec![(2, 99, 1, 1, 0, 0.0)]);
        assert_eq!(store.snapshot(Some(2)), vec![(2, 99, 1, 501, 50, 25.0)]);
        assert!(store.snapshot(Some(3)).is_empty());
    }

    #[test]
    fn nodes_widen_when_variants_are_added() {
        let store = Store::new();
        let id = NodeId::new(3, 1);
        store.get_or_create(id, 2).add_allocation(1);
        let wide = store.get_or_create(id, 4);
        assert_eq!(wide.variants(), 4);
        assert_eq!(wide.variant(1), (1, 0));
        wide.add_allocation(3);
        assert_eq!(wide.allocations(), 2);
        store.remove_experiment(3);
        assert!(store.is_empty());
    }

    proptest! {
        #[test]
        fn deltas_equal_increments(ops in proptest::collection::vec((0u64..4, 0usize..3, any::<bool>()), 0..200)) {
            let store = Store::new();
            let mut expected = std::collections::HashMap::new();
            for (seg, v, conv) in &ops {
                let node = store.get_or_create(NodeId::new(5, *seg), 3);
                node.add_allocation(*v);
                let e = expected.entry((*seg, *v)).or_insert((0u64, 0u64));
                e.0 += 1;
                if *conv { node.add_conversion(*v, 1.0); e.1 += 1; }
            }
            let mut got = std::collections::HashMap::new();
            for (_, seg, v, a, k, _) in store.take_deltas() {
                got.insert((seg, v as usize), (a, k));
            }
            prop_assert_eq!(got, expected);
        }
    }
}
