//! One allocation decision in one call: segment path → cascade → warm-started posteriors →
//! Thompson sampling with an exploration bonus → choice, propensity and counting.
//!
//! Thompson sampling picks variant i with the probability that its posterior draw plus bonus is
//! the largest. A node keeps those probabilities, computed exactly (`propensity`), for its
//! current posterior state, so a decision draws one uniform number and picks by them: the same
//! distribution as drawing a Beta per variant and taking the best, for a fifth of the work
//! with five variants, and the logged propensity is exactly the probability of the choice.
//! An experiment's `propensity_floor` f mixes those probabilities with the uniform choice,
//! (1 - K f) p_i + f, in the kept state itself, so decisions and logs use the mixed ones.

use crate::beta::with_thread_rng;
use crate::cascade::{cascade_level, Tree};
use crate::error::CoreError;
use crate::held::Made;
use crate::keys::{bucket, key_hash, path_hashes_of_key, push_canonical_value, valid_dimension};
use crate::store::{Node, NodeId, PropensityCache, Segments, Store};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most segment dimensions (cascade levels below global) an experiment may have.
pub const MAX_LEVELS: usize = 8;
/// Most variants an experiment may have in the core (the server sets a lower configured cap).
pub const MAX_VARIANTS: usize = 1024;
/// How far (in posterior standard deviations) any variant's posterior mean plus bonus may move
/// before decisions at a node sample from (and log the probabilities of) its state again.
pub const PROPENSITY_TOLERANCE: f64 = 0.1;

/// How variants are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Thompson sampling over the cascade's posterior (the default).
    Thompson,
    /// A deterministic hash split of user ids by weight (plain A/B).
    Uniform,
    /// A random split by fixed weights.
    Fixed,
}

impl Policy {
    pub fn parse(name: &str) -> Result<Self, CoreError> {
        match name {
            "thompson" => Ok(Policy::Thompson),
            "uniform" => Ok(Policy::Uniform),
            "fixed" => Ok(Policy::Fixed),
            other => Err(CoreError::invalid(format!(
                "policy: {other:?} is not one of thompson, uniform, fixed"
            ))),
        }
    }
}

/// An experiment's allocation settings.
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    pub variants: usize,
    /// Segment dimensions in cascade order (level 1 first).
    pub dimensions: Vec<String>,
    /// Minimum allocations for a node at level l (index l - 1) to be used.
    pub min_samples: Vec<u64>,
    pub policy: Policy,
    /// Split weights for `uniform` and `fixed` (empty = equal).
    pub weights: Vec<f64>,
    /// Beta prior of every posterior.
    pub prior_alpha: f64,
    pub prior_beta: f64,
    /// Equivalent sample size of the parent's posterior mean used as a node's prior.
    pub warm_start: f64,
    /// Scale of the additive bonus `exploration / sqrt(n_variant + 1)`.
    pub exploration: f64,
    /// Seed of the user-id hash for `uniform` splits.
    pub salt: u64,
    /// Least probability f of every variant under Thompson sampling: a decision picks variant
    /// i with probability (1 - K f) p_i + f, p_i its Thompson selection probability, so that
    /// off-policy evaluation has support everywhere. 0 (the default) is plain Thompson
    /// sampling; `uniform` and `fixed` ignore it.
    pub propensity_floor: f64,
}

impl ExperimentConfig {
    /// Thompson sampling over `variants` with the cascade of `dimensions` and their minimum
    /// samples, and the defaults of everything else: a Beta(1, 1) prior, a warm start of 10,
    /// no exploration bonus, salt 0 and no propensity floor.
    pub fn thompson(variants: usize, dimensions: &[&str], min_samples: Vec<u64>) -> Self {
        ExperimentConfig {
            variants,
            dimensions: dimensions.iter().map(|d| d.to_string()).collect(),
            min_samples,
            policy: Policy::Thompson,
            weights: vec![],
            prior_alpha: 1.0,
            prior_beta: 1.0,
            warm_start: 10.0,
            exploration: 0.0,
            salt: 0,
            propensity_floor: 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if self.variants < 1 || self.variants > MAX_VARIANTS {
            return Err(CoreError::invalid(format!(
                "variants: {} is outside 1..={MAX_VARIANTS}",
                self.variants
            )));
        }
        if self.dimensions.len() > MAX_LEVELS {
            return Err(CoreError::invalid(format!(
                "dimensions: {} levels, at most {MAX_LEVELS}",
                self.dimensions.len()
            )));
        }
        if let Some(d) = self.dimensions.iter().find(|d| !valid_dimension(d)) {
            return Err(CoreError::invalid(format!(
                "dimensions: {d:?} is not a dimension name (1-64 of a-z, 0-9, _)"
            )));
        }
        if self.min_samples.len() != self.dimensions.len() {
            return Err(CoreError::invalid(format!(
                "min_samples: expected {} entries (one per dimension), got {}",
                self.dimensions.len(),
                self.min_samples.len()
            )));
        }
        if !self.weights.is_empty() {
            if self.weights.len() != self.variants {
                return Err(CoreError::invalid(format!(
                    "weights: expected {} weights, got {}",
                    self.variants,
                    self.weights.len()
                )));
            }
            if self.weights.iter().any(|w| !w.is_finite() || *w < 0.0)
                || self.weights.iter().sum::<f64>() <= 0.0
            {
                return Err(CoreError::invalid(
                    "weights: must be finite, non-negative and sum to a positive number",
                ));
            }
        }
        for (name, v) in [
            ("prior_alpha", self.prior_alpha),
            ("prior_beta", self.prior_beta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(CoreError::invalid(format!(
                    "{name}: must be positive, got {v}"
                )));
            }
        }
        for (name, v) in [
            ("warm_start", self.warm_start),
            ("exploration", self.exploration),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CoreError::invalid(format!("{name}: must be >= 0, got {v}")));
            }
        }
        let f = self.propensity_floor;
        if !(f.is_finite() && f >= 0.0 && f * (self.variants as f64) < 1.0) {
            return Err(CoreError::invalid(format!(
                "propensity_floor: must be >= 0 and below 1 / variants (1/{}), got {f}",
                self.variants
            )));
        }
        Ok(())
    }

    fn cumulative_weights(&self) -> Vec<f64> {
        let w: Vec<f64> = if self.weights.is_empty() {
            vec![1.0; self.variants]
        } else {
            self.weights.clone()
        };
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        w.iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect()
    }
}

/// What one decision returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub variant: usize,
    /// Cascade level whose posterior decided (0 = global).
    pub level: usize,
    /// Probability that the policy picks this variant in this state.
    pub propensity: f64,
    /// The user's full canonical segment key.
    pub segment_key: String,
}

struct ExperimentEntry {
    config: ExperimentConfig,
    cumulative: Vec<f64>,
    /// What each level adds to the key before its value: `dim:` at level 1, `|dim:` below.
    prefixes: Vec<String>,
    tree: ArcSwapOption<Tree>,
    segments: Arc<Segments>,
    /// Distinct per `configure` call: cached propensities of older settings do not match.
    generation: u64,
}

/// Decisions of a batch: per item (variant, level, propensity, index into `keys`).
#[derive(Debug, Clone, Default)]
pub struct BatchDecisions {
    /// Segment keys, one per run of consecutive items with the same values.
    pub keys: Vec<String>,
    pub items: Vec<(usize, usize, f64, usize)>,
}

/// `key_hash("")`, the global segment's hash (checked in the tests).
const GLOBAL_HASH: u64 = 0x2d06_8005_38d3_94c2;

/// Build the segment key into `key` and the path's hashes (global first) into `hashes`;
/// returns the number of levels, global included.
#[inline]
fn build_path<S: AsRef<str>>(
    entry: &ExperimentEntry,
    values: &[S],
    key: &mut String,
    hashes: &mut [u64; MAX_LEVELS + 1],
) -> Result<usize, CoreError> {
    let depth = entry.prefixes.len();
    if values.len() != depth {
        return Err(CoreError::invalid(format!(
            "values: expected {depth} values (one per dimension), got {}",
            values.len()
        )));
    }
    key.clear();
    key.reserve(16 * depth);
    hashes[0] = GLOBAL_HASH;
    for (l, (prefix, v)) in entry.prefixes.iter().zip(values).enumerate() {
        key.push_str(prefix);
        push_canonical_value(v.as_ref(), key);
        hashes[l + 1] = key_hash(key);
    }
    Ok(depth + 1)
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// An engine's state stamp, distinct over all engines and all their changes (experiments,
/// settings, trees): a path resolved at one epoch stays valid while the epoch is the same.
struct Epoch(AtomicU64);

impl Default for Epoch {
    fn default() -> Self {
        Epoch(AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Epoch {
    #[inline]
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Call after each change is visible.
    fn bump(&self) {
        self.0.store(
            GENERATIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
    }
}

/// A resolved cascade path: the raw values it was built from, the segment key, the path's
/// hashes (global first), tree membership per level and, at one version of the node map, the
/// path's nodes.
#[derive(Default)]
struct Path {
    values: String,
    ends: Vec<usize>,
    key: String,
    hashes: [u64; MAX_LEVELS + 1],
    in_tree: [bool; MAX_LEVELS + 1],
    levels: usize,
    /// Node map version of `nodes`; u64::MAX when they are not resolved yet.
    version: u64,
    nodes: [Option<Arc<Node>>; MAX_LEVELS + 1],
}

impl Path {
    /// Whether `values` are the raw values this path was built from.
    #[inline]
    fn same_values<S: AsRef<str>>(&self, values: &[S]) -> bool {
        if values.len() != self.ends.len() {
            return false;
        }
        let mut start = 0;
        values.iter().zip(&self.ends).all(|(v, &end)| {
            let same = v.as_ref().as_bytes() == &self.values.as_bytes()[start..end];
            start = end;
            same
        })
    }

    /// Build the path of `values` in `entry`; its nodes are looked up on first use.
    fn build<S: AsRef<str>>(
        &mut self,
        entry: &ExperimentEntry,
        values: &[S],
    ) -> Result<(), CoreError> {
        self.ends.clear();
        self.version = u64::MAX;
        self.levels = build_path(entry, values, &mut self.key, &mut self.hashes)?;
        let tree = entry.tree.load();
        for l in 0..self.levels {
            self.in_tree[l] = l == 0 || tree.as_ref().is_none_or(|t| t.contains(self.hashes[l]));
        }
        self.values.clear();
        for v in values {
            self.values.push_str(v.as_ref());
            self.ends.push(self.values.len());
        }
        Ok(())
    }

    /// Make `nodes` those of the map at its current version.
    #[inline]
    fn resolve(&mut self, segments: &Segments) {
        if segments.version() == self.version {
            return;
        }
        let map = segments.read();
        self.version = segments.version();
        for l in 0..self.levels {
            self.nodes[l] = map.get(&self.hashes[l]).cloned();
        }
        for node in &mut self.nodes[self.levels..] {
            *node = None;
        }
    }
}

/// The calling thread's last single decision: its engine epoch, experiment and path.
#[derive(Default)]
struct LastDecision {
    epoch: u64,
    experiment: u64,
    entry: Option<Arc<ExperimentEntry>>,
    path: Path,
}

thread_local! {
    static LAST_DECISION: RefCell<LastDecision> = RefCell::new(LastDecision::default());
}

/// Hasher for experiment handles (small integers): one multiply, no SipHash rounds.
#[derive(Default)]
struct HandleHasher(u64);

impl Hasher for HandleHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ExperimentMap = HashMap<u64, Arc<ExperimentEntry>, BuildHasherDefault<HandleHasher>>;

/// The experiment table, segment trees and posterior store; every method is thread-safe.
#[derive(Default)]
pub struct Engine {
    /// Read on every decision without locking; writers copy, change and swap it.
    experiments: ArcSwap<ExperimentMap>,
    writers: Mutex<()>,
    store: Store,
    epoch: Epoch,
}

fn pick_by_cumulative(cumulative: &[f64], u: f64) -> usize {
    cumulative
        .iter()
        .position(|&c| u < c)
        .unwrap_or(cumulative.len() - 1)
}

/// Posterior of variant `i` at the chosen level: the node's counts on top of a prior made of the
/// parent's posterior mean with weight min(warm_start, parent's allocations of i). The global
/// node (level 0) has only the base prior.
#[inline]
fn posterior(
    nodes: &[Option<&Node>],
    level: usize,
    i: usize,
    cfg: &ExperimentConfig,
) -> (f64, f64) {
    let (n, c) = nodes[level].map_or((0, 0), |node| node.variant(i));
    let mut alpha = cfg.prior_alpha + c as f64;
    let mut beta = cfg.prior_beta + n.saturating_sub(c) as f64;
    if level > 0 && cfg.warm_start > 0.0 {
        let (pn, pc) = nodes[level - 1].map_or((0, 0), |node| node.variant(i));
        if pn > 0 {
            let w = cfg.warm_start.min(pn as f64);
            let mean =
                (cfg.prior_alpha + pc as f64) / (cfg.prior_alpha + cfg.prior_beta + pn as f64);
            alpha += w * mean;
            beta += w * (1.0 - mean);
        }
    }
    (alpha, beta)
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace an experiment's settings; its counters and tree are kept.
    pub fn configure(&self, experiment: u64, config: ExperimentConfig) -> Result<(), CoreError> {
        config.validate()?;
        let cumulative = config.cumulative_weights();
        let prefixes = config
            .dimensions
            .iter()
            .enumerate()
            .map(|(l, d)| format!("{}{d}:", if l == 0 { "" } else { "|" }))
            .collect();
        let _writer = self.writers.lock();
        let mut map = ExperimentMap::clone(&self.experiments.load());
        let tree = map.get(&experiment).and_then(|e| e.tree.load_full());
        map.insert(
            experiment,
            Arc::new(ExperimentEntry {
                config,
                cumulative,
                prefixes,
                tree: ArcSwapOption::new(tree),
                segments: self.store.segments(experiment),
                generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            }),
        );
        self.experiments.store(Arc::new(map));
        self.epoch.bump();
        Ok(())
    }

    /// Forget an experiment and its counters.
    pub fn remove(&self, experiment: u64) {
        let _writer = self.writers.lock();
        let mut map = ExperimentMap::clone(&self.experiments.load());
        map.remove(&experiment);
        self.experiments.store(Arc::new(map));
        self.store.remove_experiment(experiment);
        self.epoch.bump();
    }

    pub fn has_experiment(&self, experiment: u64) -> bool {
        self.experiments.load().contains_key(&experiment)
    }

    fn entry(&self, experiment: u64) -> Result<Arc<ExperimentEntry>, CoreError> {
        self.experiments
            .load()
            .get(&experiment)
            .cloned()
            .ok_or(CoreError::UnknownExperiment(experiment))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Swap in the experiment's tree atomically (None: every node may be used).
    pub fn set_tree(&self, experiment: u64, tree: Option<Tree>) -> Result<(), CoreError> {
        self.entry(experiment)?.tree.store(tree.map(Arc::new));
        self.epoch.bump();
        Ok(())
    }

    /// One allocation decision; with `record`, the allocation is counted at every level.
    pub fn decide<S: AsRef<str>>(
        &self,
        experiment: u64,
        user_id: &str,
        values: &[S],
        record: bool,
    ) -> Result<Decision, CoreError> {
        let mut key = String::new();
        let (variant, level, propensity) =
            self.decide_into(experiment, user_id, values, record, &mut key)?;
        Ok(Decision {
            variant,
            level,
            propensity,
            segment_key: key,
        })
    }

    /// `decide` that writes the segment key into `key` (cleared first) and returns
    /// (variant, level, propensity), so a caller can reuse one key buffer.
    ///
    /// The thread keeps its last path: a decision with the same engine state, experiment and
    /// values reuses its key, hashes, tree membership and nodes.
    pub fn decide_into<S: AsRef<str>>(
        &self,
        experiment: u64,
        user_id: &str,
        values: &[S],
        record: bool,
        key: &mut String,
    ) -> Result<(usize, usize, f64), CoreError> {
        let epoch = self.epoch.get();
        LAST_DECISION.with(|cell| {
            let Ok(mut last) = cell.try_borrow_mut() else {
                // Re-entered on this thread (not done today): decide without the cache.
                let mut path = Path::default();
                let entry = self.entry(experiment)?;
                path.build(&entry, values)?;
                key.clone_from(&path.key);
                return Ok(self.decide_on_path(&entry, &mut path, user_id, record));
            };
            let last = &mut *last;
            let current = last.epoch == epoch
                && last.experiment == experiment
                && last.path.same_values(values);
            if !current {
                last.epoch = 0;
                let entry = self.entry(experiment)?;
                last.path.build(&entry, values)?;
                (last.epoch, last.experiment, last.entry) = (epoch, experiment, Some(entry));
            }
            let Some(entry) = last.entry.as_deref() else {
                return Err(CoreError::UnknownExperiment(experiment));
            };
            key.clone_from(&last.path.key);
            Ok(self.decide_on_path(entry, &mut last.path, user_id, record))
        })
    }

    /// `decide` for many users of one experiment; each item fails or succeeds on its own.
    pub fn decide_batch<U: AsRef<str>, S: AsRef<str>>(
        &self,
        experiment: u64,
        user_ids: &[U],
        values: &[Vec<S>],
        record: bool,
    ) -> Result<Vec<Result<Decision, CoreError>>, CoreError> {
        let rows: Vec<&[S]> = values.iter().map(Vec::as_slice).collect();
        let out = self.decide_batch_rows(experiment, user_ids, &rows, record)?;
        Ok(out
            .items
            .into_iter()
            .map(|(variant, level, propensity, k)| {
                Ok(Decision {
                    variant,
                    level,
                    propensity,
                    segment_key: out.keys[k].clone(),
                })
            })
            .collect())
    }

    /// `decide` for many users of one experiment, rows of segment values borrowed. Checks every
    /// item before deciding any, so a bad batch records nothing. Consecutive items with the same
    /// values share one key (built and hashed once), and so do consecutive runs with one key.
    pub fn decide_batch_rows<U: AsRef<str>, S: AsRef<str>>(
        &self,
        experiment: u64,
        user_ids: &[U],
        rows: &[&[S]],
        record: bool,
    ) -> Result<BatchDecisions, CoreError> {
        if user_ids.len() != rows.len() {
            return Err(CoreError::invalid(format!(
                "values: {} rows for {} user ids",
                rows.len(),
                user_ids.len()
            )));
        }
        let entry = self.entry(experiment)?;
        let depth = entry.config.dimensions.len();
        if let Some(i) = rows.iter().position(|v| v.len() != depth) {
            return Err(CoreError::invalid(format!(
                "values[{i}]: expected {depth} values (one per dimension), got {}",
                rows[i].len()
            )));
        }
        let mut out = BatchDecisions {
            keys: Vec::new(),
            items: Vec::with_capacity(rows.len()),
        };
        let mut path = Path::default();
        let mut previous: Option<&[S]> = None;
        for (user_id, &row) in user_ids.iter().zip(rows) {
            let same = previous.is_some_and(|p| {
                std::ptr::eq(p, row) || p.iter().zip(row).all(|(a, b)| a.as_ref() == b.as_ref())
            });
            if !same {
                path.build(&entry, row)?;
                if out.keys.last() != Some(&path.key) {
                    out.keys.push(path.key.clone());
                }
                previous = Some(row);
            }
            let (variant, level, propensity) =
                self.decide_on_path(&entry, &mut path, user_id.as_ref(), record);
            out.items
                .push((variant, level, propensity, out.keys.len() - 1));
        }
        Ok(out)
    }

    /// The decision once the path is built; its nodes are (re)resolved when the node map
    /// changed. Counting holds the map's read lock at the nodes' version, so a node being
    /// widened (copied) never misses an increment.
    fn decide_on_path(
        &self,
        entry: &ExperimentEntry,
        path: &mut Path,
        user_id: &str,
        record: bool,
    ) -> (usize, usize, f64) {
        let cfg = &entry.config;
        let levels = path.levels;
        let guard = loop {
            path.resolve(&entry.segments);
            if !record {
                break None;
            }
            let guard = entry.segments.read();
            if entry.segments.version() == path.version {
                break Some(guard);
            }
        };
        let mut nodes: [Option<&Node>; MAX_LEVELS + 1] = [None; MAX_LEVELS + 1];
        for (slot, node) in nodes.iter_mut().zip(&path.nodes[..levels]) {
            *slot = node.as_deref();
        }
        let nodes = &nodes[..levels];
        let hashes = &path.hashes[..levels];

        let (variant, level, propensity) = match cfg.policy {
            Policy::Uniform => {
                let v = pick_by_cumulative(&entry.cumulative, bucket(user_id, cfg.salt));
                (v, 0, share(&entry.cumulative, v))
            }
            Policy::Fixed => {
                let u: f64 = with_thread_rng(rand::Rng::gen);
                let v = pick_by_cumulative(&entry.cumulative, u);
                (v, 0, share(&entry.cumulative, v))
            }
            Policy::Thompson => thompson(entry, nodes, &path.in_tree[..levels], hashes),
        };

        if record {
            let complete = nodes
                .iter()
                .all(|n| n.is_some_and(|n| n.variants() > variant));
            if complete {
                for node in nodes.iter().flatten() {
                    node.add_allocation(variant);
                }
            } else {
                drop(guard);
                for &h in hashes {
                    entry
                        .segments
                        .get_or_create(h, cfg.variants)
                        .add_allocation(variant);
                }
            }
        }
        (variant, level, propensity)
    }

    /// Count an allocation of `variant` at every level of the key's path.
    pub fn record_allocation(
        &self,
        experiment: u64,
        segment_key: &str,
        variant: usize,
    ) -> Result<(), CoreError> {
        let n = self.checked_variant(experiment, variant)?;
        for h in path_hashes_of_key(segment_key) {
            self.store
                .get_or_create(NodeId::new(experiment, h), n)
                .add_allocation(variant);
        }
        Ok(())
    }

    /// Count each of `made`'s assignments (decided without counting, then claimed: see
    /// [`crate::batch::PreparedBatch::finish`]) as [`Engine::record_allocation`] would; a run of
    /// one (experiment, segment key) looks its nodes up once. Every variant is checked before
    /// any is counted.
    pub fn record_made(&self, made: &Made) -> Result<(), CoreError> {
        let handles = made.handles();
        // (first, end, variants) of each run.
        let mut runs = Vec::new();
        let mut k = 0;
        while k < made.len() {
            let (handle, key) = (handles[k], made.segment_key(k));
            let end = (k..made.len())
                .find(|&j| handles[j] != handle || made.segment_key(j) != key)
                .unwrap_or(made.len());
            let n = self.entry(handle)?.config.variants;
            if let Some(j) = (k..end).find(|&j| made.variant(j) >= n) {
                return Err(CoreError::invalid(format!(
                    "variant: {} is outside 0..{n}",
                    made.variant(j)
                )));
            }
            runs.push((k, end, n));
            k = end;
        }
        for (first, end, n) in runs {
            let nodes: Vec<Arc<Node>> = path_hashes_of_key(made.segment_key(first))
                .into_iter()
                .map(|h| self.store.get_or_create(NodeId::new(handles[first], h), n))
                .collect();
            for j in first..end {
                for node in &nodes {
                    node.add_allocation(made.variant(j));
                }
            }
        }
        Ok(())
    }

    /// Count a conversion of `variant` at every level of the key's path.
    pub fn record_conversion(
        &self,
        experiment: u64,
        segment_key: &str,
        variant: usize,
        value: f64,
    ) -> Result<(), CoreError> {
        if !value.is_finite() || value < 0.0 {
            return Err(CoreError::invalid(format!(
                "value: must be finite and >= 0, got {value}"
            )));
        }
        let n = self.checked_variant(experiment, variant)?;
        for h in path_hashes_of_key(segment_key) {
            self.store
                .get_or_create(NodeId::new(experiment, h), n)
                .add_conversion(variant, value);
        }
        Ok(())
    }

    fn checked_variant(&self, experiment: u64, variant: usize) -> Result<usize, CoreError> {
        let n = self.entry(experiment)?.config.variants;
        if variant >= n {
            return Err(CoreError::invalid(format!(
                "variant: {variant} is outside 0..{n}"
            )));
        }
        Ok(n)
    }

    /// Selection probabilities at one node, as the decision would compute them there.
    pub fn propensities(&self, experiment: u64, segment_key: &str) -> Result<Vec<f64>, CoreError> {
        let entry = self.entry(experiment)?;
        let cfg = &entry.config;
        if cfg.policy != Policy::Thompson {
            return Ok((0..cfg.variants)
                .map(|v| share(&entry.cumulative, v))
                .collect());
        }
        let hashes = path_hashes_of_key(segment_key);
        let map = entry.segments.read();
        let nodes: Vec<Option<&Node>> = hashes.iter().map(|h| map.get(h).map(|n| &**n)).collect();
        let level = hashes.len() - 1;
        Ok(selection_at(&nodes, level, cfg).0)
    }
}

/// Thompson choice at the cascade's level: (variant, level, propensity). The variant is drawn
/// with the exact selection probabilities of the node's current posterior state (`with_state`),
/// which is how often a Thompson draw from that state picks each variant.
fn thompson(
    entry: &ExperimentEntry,
    nodes: &[Option<&Node>],
    in_tree: &[bool],
    hashes: &[u64],
) -> (usize, usize, f64) {
    let cfg = &entry.config;
    let (level, samples) = cascade_level(
        nodes.len(),
        |l| nodes[l].map_or(0, |n| n.allocations()),
        in_tree,
        &cfg.min_samples,
    );
    with_state(
        nodes,
        level,
        samples,
        hashes[level] ^ entry.generation.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        cfg,
        |state| {
            let u: f64 = with_thread_rng(rand::Rng::gen);
            let variant = pick_by_cumulative(&state.cumulative, u);
            (variant, level, state.probabilities[variant])
        },
    )
}

/// The exploration bonus of variant `i` at a node: `exploration / sqrt(n_i + 1)`.
#[inline]
fn bonus(node: Option<&Node>, i: usize, cfg: &ExperimentConfig) -> f64 {
    if cfg.exploration == 0.0 {
        return 0.0;
    }
    let n = node.map_or(0, |n| n.variant(i).0);
    cfg.exploration / ((n + 1) as f64).sqrt()
}

/// The exact selection probabilities of every variant at the given level (numerical
/// integration, `propensity::selection_probabilities`, with the experiment's propensity floor)
/// and the posteriors they come from.
fn selection_at(
    nodes: &[Option<&Node>],
    level: usize,
    cfg: &ExperimentConfig,
) -> (Vec<f64>, Vec<(f64, f64)>) {
    let posteriors: Vec<(f64, f64)> = (0..cfg.variants)
        .map(|i| posterior(nodes, level, i, cfg))
        .collect();
    let (alphas, betas): (Vec<f64>, Vec<f64>) = posteriors.iter().copied().unzip();
    let bonuses: Vec<f64> = (0..cfg.variants)
        .map(|i| bonus(nodes[level], i, cfg))
        .collect();
    let probabilities = crate::propensity::selection_probabilities(&alphas, &betas, &bonuses);
    (with_floor(probabilities, cfg.propensity_floor), posteriors)
}

/// The Thompson probabilities mixed with the uniform choice so that each is at least `floor`:
/// (1 - K f) p_i + f, which still sums to 1. A floor of 0 returns them untouched.
fn with_floor(mut probabilities: Vec<f64>, floor: f64) -> Vec<f64> {
    if floor > 0.0 {
        let keep = 1.0 - probabilities.len() as f64 * floor;
        for p in &mut probabilities {
            *p = keep * *p + floor;
        }
    }
    probabilities
}

/// `f` of the posterior state decisions at this level draw from: its exact selection
/// probabilities, cached on the node (`allocations` is the node's total now).
///
/// Computing the probabilities costs 10-40 microseconds, so a node's state is kept while every
/// variant's posterior mean plus bonus stays within `PROPENSITY_TOLERANCE` standard deviations
/// of the counts now: decisions then draw from the kept state (Thompson sampling on a
/// posterior at most that far behind, like batched updates), so the propensity they log is
/// the exact probability of the choice made, at any tolerance. One more allocation of variant i
/// without a conversion moves Beta(a, b)'s mean by a / (a + b)^2 and its bonus by less than
/// exploration / (2 (n_i + 1)^1.5); one conversion moves the mean by 1 / (a + b). The entry
/// counts both per variant. Changes of the warm start's parent, which carries a bounded
/// weight, are not tracked.
fn with_state<T>(
    nodes: &[Option<&Node>],
    level: usize,
    allocations: u64,
    level_hash: u64,
    cfg: &ExperimentConfig,
    f: impl FnOnce(&PropensityCache) -> T,
) -> T {
    let Some(node) = nodes[level] else {
        // No node yet (nothing counted there): the prior's state, not kept.
        let (probabilities, _) = selection_at(nodes, level, cfg);
        return f(&PropensityCache::new(
            0,
            probabilities,
            Vec::new(),
            Vec::new(),
            0,
        ));
    };
    // The cache key includes the variant count and cascade depth, which change the result.
    let version_key = level_hash ^ ((cfg.variants as u64) << 32) ^ level as u64;
    {
        let cached = node.propensity.load();
        if let Some(hit) = cached.as_deref() {
            if hit.fresh(version_key, node, allocations) {
                return f(hit);
            }
        }
    }
    let reloads = node.reloads();
    let counts: Vec<(u64, u64)> = (0..cfg.variants).map(|i| node.variant(i)).collect();
    let (probabilities, posteriors) = selection_at(nodes, level, cfg);
    let cost = posteriors
        .iter()
        .zip(&counts)
        .map(|(&(a, b), &(n, _))| {
            let total = a + b;
            let sd = (a * b / (total * total * (total + 1.0))).sqrt();
            let allowed = PROPENSITY_TOLERANCE * sd;
            let per_allocation =
                a / (total * total) + cfg.exploration / (2.0 * ((n + 1) as f64).powf(1.5));
            (per_allocation / allowed, 1.0 / (total * allowed))
        })
        .collect();
    let entry = Arc::new(PropensityCache::new(
        version_key,
        probabilities,
        counts,
        cost,
        reloads,
    ));
    let out = f(&entry);
    node.propensity.store(Some(entry));
    out
}

fn share(cumulative: &[f64], v: usize) -> f64 {
    cumulative[v] - if v == 0 { 0.0 } else { cumulative[v - 1] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beta::seed_thread_rng;

    const NONE: &[&str] = &[];

    fn config(policy: Policy) -> ExperimentConfig {
        ExperimentConfig {
            policy,
            salt: 7,
            ..ExperimentConfig::thompson(2, &["source", "device"], vec![100, 50])
        }
    }

    #[test]
    fn learns_per_segment_best_variant() {
        seed_thread_rng(11);
        let engine = Engine::new();
        engine.configure(1, config(Policy::Thompson)).unwrap();
        // Variant 1 wins in instagram/mobile, variant 0 elsewhere.
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        use rand::{Rng, SeedableRng};
        let segments = [["instagram", "mobile"], ["google", "desktop"]];
        let rates = [[0.04, 0.12], [0.10, 0.03]];
        let mut last = [[0usize; 2]; 2];
        for t in 0..20_000 {
            let s = t % 2;
            let d = engine.decide(1, "u", &segments[s], true).unwrap();
            if rng.gen::<f64>() < rates[s][d.variant] {
                engine
                    .record_conversion(1, &d.segment_key, d.variant, 1.0)
                    .unwrap();
            }
            if t >= 18_000 {
                last[s][d.variant] += 1;
            }
        }
        assert!(last[0][1] > 800, "{last:?}");
        assert!(last[1][0] > 800, "{last:?}");
    }

    #[test]
    fn cascade_falls_back_until_a_node_has_data() {
        seed_thread_rng(1);
        let engine = Engine::new();
        engine.configure(1, config(Policy::Thompson)).unwrap();
        let d = engine.decide(1, "u", &["ads", "tablet"], true).unwrap();
        assert_eq!(d.level, 0);
        assert_eq!(d.segment_key, "source:ads|device:tablet");
        for _ in 0..120 {
            engine.decide(1, "u", &["ads", "tablet"], true).unwrap();
        }
        assert_eq!(
            engine
                .decide(1, "u", &["ads", "tablet"], false)
                .unwrap()
                .level,
            2
        );
        // The tree can withdraw the leaf; the cascade then stops at level 1.
        let level1 = key_hash("source:ads");
        engine.set_tree(1, Some(Tree::new([level1]))).unwrap();
        assert_eq!(
            engine
                .decide(1, "u", &["ads", "tablet"], false)
                .unwrap()
                .level,
            1
        );
    }

    #[test]
    fn the_threads_last_path_follows_every_change() {
        seed_thread_rng(3);
        let (a, b) = (Engine::new(), Engine::new());
        a.configure(1, config(Policy::Thompson)).unwrap();
        b.configure(1, config(Policy::Thompson)).unwrap();
        let values = ["ads", "tablet"];
        // Two engines with the same experiment handle, alternating on one thread: each
        // counts only its own decisions.
        for _ in 0..300 {
            a.decide(1, "u", &values, true).unwrap();
        }
        assert_eq!(a.decide(1, "u", &values, false).unwrap().level, 2);
        assert_eq!(b.decide(1, "u", &values, true).unwrap().level, 0);
        let leaf = NodeId::new(1, key_hash("source:ads|device:tablet"));
        assert_eq!(a.store.get(leaf).unwrap().allocations(), 300);
        assert_eq!(b.store.get(leaf).unwrap().allocations(), 1);
        // New settings: more variants (nodes widen, counts kept), then a uniform split.
        let mut wider = config(Policy::Thompson);
        wider.variants = 3;
        a.configure(1, wider.clone()).unwrap();
        for _ in 0..30 {
            assert!(a.decide(1, "u", &values, true).unwrap().variant < 3);
        }
        assert_eq!(a.store.get(leaf).unwrap().allocations(), 330);
        assert_eq!(a.store.get(leaf).unwrap().variants(), 3);
        wider.policy = Policy::Uniform;
        wider.weights = vec![0.0, 0.0, 1.0];
        a.configure(1, wider).unwrap();
        let d = a.decide(1, "u", &values, false).unwrap();
        assert_eq!((d.variant, d.level, d.propensity), (2, 0, 1.0));
        // Other values, then removal.
        assert_eq!(
            a.decide(1, "u", &["x", "y"], false).unwrap().segment_key,
            "source:x|device:y"
        );
        a.remove(1);
        assert!(matches!(
            a.decide(1, "u", &values, false),
            Err(CoreError::UnknownExperiment(1))
        ));
        assert_eq!(b.decide(1, "u", &values, false).unwrap().level, 0);
    }

    #[test]
    fn global_hash_is_the_empty_keys_hash() {
        assert_eq!(GLOBAL_HASH, key_hash(""));
    }

    #[test]
    fn batch_rows_match_single_decisions() {
        let engine = Engine::new();
        let mut cfg = config(Policy::Uniform);
        cfg.weights = vec![0.4, 0.6];
        engine.configure(6, cfg).unwrap();
        let users = ["a", "b", "c", "d"];
        let rows: [&[&str]; 4] = [&["X", "y"], &["x ", "y"], &["x", "z"], &["x", "z"]];
        let out = engine.decide_batch_rows(6, &users, &rows, false).unwrap();
        assert_eq!(out.keys, vec!["source:x|device:y", "source:x|device:z"]);
        for (i, item) in out.items.iter().enumerate() {
            let d = engine.decide(6, users[i], rows[i], false).unwrap();
            assert_eq!((d.variant, d.level, d.propensity), (item.0, item.1, item.2));
            assert_eq!(d.segment_key, out.keys[item.3]);
        }
        assert_eq!(
            out.items.iter().map(|x| x.3).collect::<Vec<_>>(),
            [0, 0, 1, 1]
        );
        assert!(engine
            .decide_batch_rows(6, &users[..1], &rows, false)
            .is_err());
    }

    #[test]
    fn uniform_split_is_deterministic_and_weighted() {
        let engine = Engine::new();
        let mut cfg = config(Policy::Uniform);
        cfg.weights = vec![0.25, 0.75];
        engine.configure(9, cfg).unwrap();
        let mut ones = 0;
        for i in 0..20_000 {
            let user = format!("user-{i}");
            let a = engine.decide(9, &user, &["x", "y"], false).unwrap();
            let b = engine.decide(9, &user, &["x", "y"], false).unwrap();
            assert_eq!(a.variant, b.variant);
            assert!((a.propensity - [0.25, 0.75][a.variant]).abs() < 1e-12);
            ones += a.variant;
        }
        assert!((ones as f64 / 20_000.0 - 0.75).abs() < 0.01);
    }

    #[test]
    fn warm_start_carries_the_parent_mean() {
        let engine = Engine::new();
        engine.configure(4, config(Policy::Thompson)).unwrap();
        let s = &engine.store;
        s.load(
            &[
                (4, key_hash(""), 1, 1000, 300, 0.0),
                (4, key_hash(""), 0, 1000, 10, 0.0),
            ],
            false,
        );
        let global = s.get(NodeId::new(4, key_hash(""))).unwrap();
        let nodes = [Some(&*global), None];
        let (a, b) = posterior(&nodes, 1, 1, &engine.entry(4).unwrap().config);
        // A node with no data starts at the parent's mean with 10 pseudo-samples (+ the prior).
        assert!((a / (a + b) - (1.0 + 10.0 * 301.0 / 1002.0) / 12.0).abs() < 1e-12);
        let p = engine.propensities(4, "").unwrap();
        assert!(p[1] > 0.99 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    /// An engine with experiments 1 (no floor) and 2 (floor `f`), 3 variants, no dimensions,
    /// and the same counts at their global nodes: variant 1 is far ahead.
    fn floored_pair(f: f64) -> Engine {
        let engine = Engine::new();
        for (experiment, floor) in [(1, 0.0), (2, f)] {
            let mut cfg = config(Policy::Thompson);
            cfg.variants = 3;
            cfg.dimensions = vec![];
            cfg.min_samples = vec![];
            cfg.exploration = 0.01;
            cfg.propensity_floor = floor;
            engine.configure(experiment, cfg).unwrap();
            let g = key_hash("");
            engine.store.load(
                &[
                    (experiment, g, 0, 2000, 80, 0.0),
                    (experiment, g, 1, 2000, 160, 0.0),
                    (experiment, g, 2, 2000, 100, 0.0),
                ],
                false,
            );
        }
        engine
    }

    #[test]
    fn propensity_floor_mixes_thompson_with_uniform() {
        let f = 0.02;
        let engine = floored_pair(f);
        let plain = engine.propensities(1, "").unwrap();
        let floored = engine.propensities(2, "").unwrap();
        // Without a floor the losing variants are all but never chosen.
        assert!(plain[0] < 1e-6 && plain[2] < 1e-3, "{plain:?}");
        for (p, q) in plain.iter().zip(&floored) {
            assert!(
                (q - ((1.0 - 3.0 * f) * p + f)).abs() < 1e-15,
                "{plain:?} {floored:?}"
            );
            assert!(*q >= f);
        }
        assert!((floored.iter().sum::<f64>() - 1.0).abs() < 1e-12);

        // Decisions pick with the mixed probabilities and log the one of their choice.
        seed_thread_rng(5);
        let draws = 60_000;
        let mut picked = [0usize; 3];
        for i in 0..draws {
            let d = engine.decide(2, &format!("u{i}"), NONE, false).unwrap();
            assert_eq!(d.propensity.to_bits(), floored[d.variant].to_bits());
            picked[d.variant] += 1;
        }
        for (v, &n) in picked.iter().enumerate() {
            let p = floored[v];
            let sd = (p * (1.0 - p) / draws as f64).sqrt();
            let share = n as f64 / draws as f64;
            assert!((share - p).abs() < 5.0 * sd, "variant {v}: {share} vs {p}");
        }
    }

    #[test]
    fn propensity_floor_applies_at_a_node_not_yet_created() {
        let engine = Engine::new();
        for (experiment, floor) in [(6, 0.3), (7, 0.0)] {
            let mut cfg = config(Policy::Thompson);
            cfg.dimensions = vec!["source".into()];
            cfg.min_samples = vec![0];
            cfg.propensity_floor = floor;
            engine.configure(experiment, cfg).unwrap();
            engine.store.load(
                &[
                    (experiment, key_hash(""), 0, 5000, 100, 0.0),
                    (experiment, key_hash(""), 1, 5000, 900, 0.0),
                ],
                false,
            );
        }
        // The leaf has no node: its state is the prior warm-started from the global node.
        let plain = engine.propensities(7, "source:a").unwrap();
        let leaf = engine.propensities(6, "source:a").unwrap();
        assert!(plain[0] < 0.3, "{plain:?}");
        for (p, q) in plain.iter().zip(&leaf) {
            assert!((q - (0.4 * p + 0.3)).abs() < 1e-15, "{plain:?} {leaf:?}");
        }
        let d = engine.decide(6, "u", &["a"], false).unwrap();
        assert_eq!(d.level, 1);
        assert_eq!(d.propensity.to_bits(), leaf[d.variant].to_bits());
    }

    #[test]
    fn no_floor_leaves_the_thompson_probabilities_untouched() {
        let engine = floored_pair(0.0);
        let g = engine.store.get(NodeId::new(1, key_hash(""))).unwrap();
        let nodes = [Some(&*g)];
        let cfg = &engine.entry(1).unwrap().config;
        let posteriors: Vec<(f64, f64)> = (0..3).map(|i| posterior(&nodes, 0, i, cfg)).collect();
        let (alphas, betas): (Vec<f64>, Vec<f64>) = posteriors.into_iter().unzip();
        let bonuses: Vec<f64> = (0..3).map(|i| bonus(nodes[0], i, cfg)).collect();
        let exact = crate::propensity::selection_probabilities(&alphas, &betas, &bonuses);
        for experiment in [1, 2] {
            let p = engine.propensities(experiment, "").unwrap();
            let bits: Vec<u64> = p.iter().map(|x| x.to_bits()).collect();
            assert_eq!(bits, exact.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn propensity_floor_is_validated() {
        let engine = Engine::new();
        for bad in [-0.01, 0.5, 0.6, f64::NAN, f64::INFINITY] {
            let mut cfg = config(Policy::Thompson);
            cfg.propensity_floor = bad;
            let err = engine.configure(8, cfg).unwrap_err().to_string();
            assert!(err.contains("propensity_floor"), "{bad}: {err}");
        }
        // Two variants: anything below 1/2 is a floor.
        let mut cfg = config(Policy::Thompson);
        cfg.propensity_floor = 0.499;
        engine.configure(8, cfg).unwrap();
        // Uniform and fixed splits ignore it.
        let mut cfg = config(Policy::Uniform);
        cfg.propensity_floor = 0.2;
        cfg.weights = vec![0.1, 0.9];
        engine.configure(9, cfg).unwrap();
        let split = engine.propensities(9, "").unwrap();
        assert!((split[0] - 0.1).abs() < 1e-12 && (split[1] - 0.9).abs() < 1e-12);
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let engine = Engine::new();
        assert!(matches!(
            engine.decide(3, "u", &["a"], true),
            Err(CoreError::UnknownExperiment(3))
        ));
        let mut cfg = config(Policy::Fixed);
        cfg.weights = vec![0.0, 0.0];
        assert!(engine.configure(3, cfg).is_err());
        engine.configure(3, config(Policy::Thompson)).unwrap();
        assert!(engine.decide(3, "u", &["a"], true).is_err());
        assert!(engine.record_conversion(3, "", 2, 1.0).is_err());
        assert!(engine.record_conversion(3, "", 1, f64::NAN).is_err());
    }
}
