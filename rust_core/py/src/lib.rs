//! The PyO3 binding of allocsvc-core, imported as `allocsvc._core`.
//!
//! This crate only converts types and errors; all logic lives in `allocsvc-core`.

mod error;

use allocsvc_core::beta::{self, with_thread_rng};
use allocsvc_core::cascade::Tree;
use allocsvc_core::decide::{Decision, Engine, ExperimentConfig, Policy};
use allocsvc_core::{keys, CountRow};
use error::{invalid, to_py};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;

type PyDecision = (usize, usize, f64, String);

fn to_tuple(d: Decision) -> PyDecision {
    (d.variant, d.level, d.propensity, d.segment_key)
}

#[pyfunction]
fn segment_key(dimensions: Vec<PyBackedStr>, values: Vec<PyBackedStr>) -> PyResult<String> {
    keys::segment_key(&dimensions, &values).map_err(to_py)
}

#[pyfunction]
fn path_keys(dimensions: Vec<PyBackedStr>, values: Vec<PyBackedStr>) -> PyResult<Vec<String>> {
    keys::path_keys(&dimensions, &values).map_err(to_py)
}

#[pyfunction]
fn key_hash(key: &str) -> u64 {
    keys::key_hash(key)
}

#[pyfunction]
fn parent_keys(key: &str) -> Vec<String> {
    keys::parent_keys(key)
        .into_iter()
        .map(String::from)
        .collect()
}

#[pyfunction]
fn bucket(user_id: &str, seed: u64) -> f64 {
    keys::bucket(user_id, seed)
}

#[pyfunction]
fn seed_rng(seed: u64) {
    beta::seed_thread_rng(seed)
}

fn check_beta(alpha: f64, beta_: f64) -> PyResult<()> {
    if beta::valid_params(alpha, beta_) {
        Ok(())
    } else {
        Err(invalid(format!(
            "alpha, beta: must be finite and positive, got ({alpha}, {beta_})"
        )))
    }
}

#[pyfunction]
fn sample_beta(alpha: f64, beta: f64, n: usize) -> PyResult<Vec<f64>> {
    check_beta(alpha, beta)?;
    Ok(with_thread_rng(|rng| {
        (0..n)
            .map(|_| beta::beta_sample(rng, alpha, beta))
            .collect()
    }))
}

#[pyfunction]
fn beta_throughput(py: Python<'_>, alpha: f64, beta: f64, n: usize) -> PyResult<f64> {
    check_beta(alpha, beta)?;
    let total = py.allow_threads(|| {
        with_thread_rng(|rng| {
            (0..n)
                .map(|_| beta::beta_sample(rng, alpha, beta))
                .sum::<f64>()
        })
    });
    Ok(if n == 0 { 0.0 } else { total / n as f64 })
}

fn check_arms(alphas: &[f64], betas: &[f64], bonus: Option<&[f64]>) -> PyResult<()> {
    if alphas.is_empty() || alphas.len() != betas.len() {
        return Err(invalid(format!(
            "alphas, betas: need the same non-zero length, got {} and {}",
            alphas.len(),
            betas.len()
        )));
    }
    if let Some(b) = bonus {
        if b.len() != alphas.len() || b.iter().any(|x| !x.is_finite()) {
            return Err(invalid("bonus: needs one finite value per arm".into()));
        }
    }
    for (a, b) in alphas.iter().zip(betas) {
        check_beta(*a, *b)?;
    }
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (alphas, betas, bonus=None))]
fn thompson_select(alphas: Vec<f64>, betas: Vec<f64>, bonus: Option<Vec<f64>>) -> PyResult<usize> {
    check_arms(&alphas, &betas, bonus.as_deref())?;
    Ok(with_thread_rng(|rng| {
        beta::thompson_select(rng, &alphas, &betas, bonus.as_deref())
    }))
}

#[pyfunction]
#[pyo3(signature = (alphas, betas, bonus=None))]
fn selection_probabilities(
    alphas: Vec<f64>,
    betas: Vec<f64>,
    bonus: Option<Vec<f64>>,
) -> PyResult<Vec<f64>> {
    check_arms(&alphas, &betas, bonus.as_deref())?;
    Ok(with_thread_rng(|rng| {
        beta::selection_probabilities(rng, &alphas, &betas, bonus.as_deref(), 20_000)
    }))
}

/// Python face of [`Engine`].
#[pyclass(name = "Engine", frozen, module = "allocsvc._core")]
struct PyEngine {
    inner: Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new() -> Self {
        PyEngine {
            inner: Engine::new(),
        }
    }

    #[pyo3(signature = (experiment, *, variants, dimensions, min_samples, policy="thompson",
        weights=None, prior_alpha=1.0, prior_beta=1.0, warm_start=10.0, exploration=0.0, salt=0))]
    #[allow(clippy::too_many_arguments)]
    fn configure(
        &self,
        experiment: u64,
        variants: usize,
        dimensions: Vec<String>,
        min_samples: Vec<u64>,
        policy: &str,
        weights: Option<Vec<f64>>,
        prior_alpha: f64,
        prior_beta: f64,
        warm_start: f64,
        exploration: f64,
        salt: u64,
    ) -> PyResult<()> {
        let config = ExperimentConfig {
            variants,
            dimensions,
            min_samples,
            policy: Policy::parse(policy).map_err(to_py)?,
            weights: weights.unwrap_or_default(),
            prior_alpha,
            prior_beta,
            warm_start,
            exploration,
            salt,
        };
        self.inner.configure(experiment, config).map_err(to_py)
    }

    fn remove(&self, experiment: u64) {
        self.inner.remove(experiment)
    }

    fn has_experiment(&self, experiment: u64) -> bool {
        self.inner.has_experiment(experiment)
    }

    #[pyo3(signature = (experiment, user_id, values, record=true))]
    fn decide(
        &self,
        experiment: u64,
        user_id: &str,
        values: Vec<PyBackedStr>,
        record: bool,
    ) -> PyResult<PyDecision> {
        self.inner
            .decide(experiment, user_id, &values, record)
            .map(to_tuple)
            .map_err(to_py)
    }

    #[pyo3(signature = (experiment, user_ids, values, record=true))]
    fn decide_batch(
        &self,
        py: Python<'_>,
        experiment: u64,
        user_ids: Vec<String>,
        values: Vec<Vec<String>>,
        record: bool,
    ) -> PyResult<Vec<PyDecision>> {
        let results = py
            .allow_threads(|| {
                self.inner
                    .decide_batch(experiment, &user_ids, &values, record)
            })
            .map_err(to_py)?;
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.map(to_tuple)
                    .map_err(|e| invalid(format!("item {i}: {e}")))
            })
            .collect()
    }

    fn record_allocation(
        &self,
        experiment: u64,
        segment_key: &str,
        variant: usize,
    ) -> PyResult<()> {
        self.inner
            .record_allocation(experiment, segment_key, variant)
            .map_err(to_py)
    }

    #[pyo3(signature = (experiment, segment_key, variant, value=0.0))]
    fn record_conversion(
        &self,
        experiment: u64,
        segment_key: &str,
        variant: usize,
        value: f64,
    ) -> PyResult<()> {
        self.inner
            .record_conversion(experiment, segment_key, variant, value)
            .map_err(to_py)
    }

    fn counts(&self, experiment: u64, segment_key: &str) -> Vec<(u64, u64, f64)> {
        let id = allocsvc_core::NodeId::new(experiment, keys::key_hash(segment_key));
        self.inner.store().get(id).map_or_else(Vec::new, |node| {
            node.counts()
                .into_iter()
                .map(|c| (c.allocations, c.conversions, c.value_sum))
                .collect()
        })
    }

    fn take_deltas(&self, py: Python<'_>) -> Vec<CountRow> {
        py.allow_threads(|| self.inner.store().take_deltas())
    }

    #[pyo3(signature = (experiment=None))]
    fn snapshot(&self, py: Python<'_>, experiment: Option<u64>) -> Vec<CountRow> {
        py.allow_threads(|| self.inner.store().snapshot(experiment))
    }

    #[pyo3(signature = (rows, replace=false))]
    fn load_counts(&self, py: Python<'_>, rows: Vec<CountRow>, replace: bool) {
        py.allow_threads(|| self.inner.store().load(&rows, replace))
    }

    #[pyo3(signature = (experiment, nodes=None))]
    fn set_tree(&self, experiment: u64, nodes: Option<Vec<u64>>) -> PyResult<()> {
        self.inner
            .set_tree(experiment, nodes.map(Tree::new))
            .map_err(to_py)
    }

    fn propensities(&self, experiment: u64, segment_key: &str) -> PyResult<Vec<f64>> {
        self.inner
            .propensities(experiment, segment_key)
            .map_err(to_py)
    }

    fn node_count(&self) -> usize {
        self.inner.store().len()
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(segment_key, m)?)?;
    m.add_function(wrap_pyfunction!(path_keys, m)?)?;
    m.add_function(wrap_pyfunction!(key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(parent_keys, m)?)?;
    m.add_function(wrap_pyfunction!(bucket, m)?)?;
    m.add_function(wrap_pyfunction!(seed_rng, m)?)?;
    m.add_function(wrap_pyfunction!(sample_beta, m)?)?;
    m.add_function(wrap_pyfunction!(beta_throughput, m)?)?;
    m.add_function(wrap_pyfunction!(thompson_select, m)?)?;
    m.add_function(wrap_pyfunction!(selection_probabilities, m)?)?;
    Ok(())
}
