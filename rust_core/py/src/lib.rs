//! The PyO3 binding of allocsvc-core, imported as `allocsvc._core`.
//!
//! This crate only converts types and errors; all logic lives in `allocsvc-core`.

mod error;

use allocsvc_core::batch::{
    BatchLimits, Catalogue, ExperimentInfo, GivenAllocation, ItemError, PreparedBatch, VariantInfo,
};
use allocsvc_core::beta::{self, with_thread_rng};
use allocsvc_core::cascade::Tree;
use allocsvc_core::context::ContextLimits;
use allocsvc_core::decide::{Engine, ExperimentConfig, Policy, MAX_LEVELS};
use allocsvc_core::{keys, CountRow};
use error::{invalid, to_py};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use std::cell::Cell;
use std::collections::HashMap;

thread_local! {
    /// The segment key buffer `Engine.decide` reuses (taken out while in use, so re-entry is safe).
    static KEY_BUFFER: Cell<String> = const { Cell::new(String::new()) };
}

/// Borrow the str items of a list or tuple, as the items' strong references (kept in `held`),
/// without copying; None when `values` is anything else (or too long, or an item is not a
/// str), and the caller extracts it the general way, with its usual errors.
fn hold_strs<'py>(
    values: &Bound<'py, PyAny>,
    held: &mut [Option<Bound<'py, PyString>>; MAX_LEVELS],
) -> Option<usize> {
    fn fill<'py>(
        items: impl ExactSizeIterator<Item = Bound<'py, PyAny>>,
        held: &mut [Option<Bound<'py, PyString>>; MAX_LEVELS],
    ) -> Option<usize> {
        if items.len() > MAX_LEVELS {
            return None;
        }
        let mut n = 0;
        for (slot, item) in held.iter_mut().zip(items) {
            *slot = Some(item.downcast_into::<PyString>().ok()?);
            n += 1;
        }
        Some(n)
    }
    if let Ok(list) = values.downcast::<PyList>() {
        fill(list.iter(), held)
    } else if let Ok(tuple) = values.downcast::<PyTuple>() {
        fill(tuple.iter(), held)
    } else {
        None
    }
}

/// A failed extraction of argument `name` worded as PyO3 words it for declared arguments.
fn argument_error(py: Python<'_>, name: &str, err: PyErr) -> PyErr {
    if err.get_type(py).is(&py.get_type::<PyTypeError>()) {
        let e = PyTypeError::new_err(format!("argument '{name}': {}", err.value(py)));
        e.set_cause(py, Some(err));
        e
    } else {
        err
    }
}

/// Rows of segment values from a list or tuple of lists or tuples of str, flattened without
/// copying the strings; None for anything else.
fn flat_rows(values: &Bound<'_, PyAny>) -> Option<(Vec<PyBackedStr>, Vec<usize>)> {
    fn rows<'py>(
        outer: impl ExactSizeIterator<Item = Bound<'py, PyAny>>,
    ) -> Option<(Vec<PyBackedStr>, Vec<usize>)> {
        let mut flat = Vec::with_capacity(outer.len() * 4);
        let mut ends = Vec::with_capacity(outer.len());
        for row in outer {
            let push = |flat: &mut Vec<PyBackedStr>, item: Bound<'py, PyAny>| -> Option<()> {
                flat.push(item.downcast_into::<PyString>().ok()?.try_into().ok()?);
                Some(())
            };
            if let Ok(list) = row.downcast::<PyList>() {
                for item in list.iter() {
                    push(&mut flat, item)?;
                }
            } else if let Ok(tuple) = row.downcast::<PyTuple>() {
                for item in tuple.iter() {
                    push(&mut flat, item)?;
                }
            } else {
                return None;
            }
            ends.push(flat.len());
        }
        Some((flat, ends))
    }
    if let Ok(list) = values.downcast::<PyList>() {
        rows(list.iter())
    } else if let Ok(tuple) = values.downcast::<PyTuple>() {
        rows(tuple.iter())
    } else {
        None
    }
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

/// Python face of [`Catalogue`]: the batch path's experiments and user-agent classes.
#[pyclass(name = "BatchCatalogue", frozen, module = "allocsvc._core")]
struct PyBatchCatalogue {
    inner: Catalogue,
}

/// Python face of [`PreparedBatch`].
#[pyclass(name = "PreparedBatch", frozen, module = "allocsvc._core")]
struct PyPreparedBatch {
    inner: PreparedBatch,
}

/// (assignment id, variant, segment key, cascade level, propensity, sticky)
type PyGiven = (String, usize, String, usize, f64, bool);
/// (code, message, field)
type PyItemError = (u32, String, String);
/// (response bytes, handles, user ids, variants, segment keys, levels, propensities)
type PyBatchOutput = (
    Py<PyBytes>,
    Vec<u64>,
    Vec<String>,
    Vec<usize>,
    Vec<String>,
    Vec<usize>,
    Vec<f64>,
);

#[pymethods]
impl PyBatchCatalogue {
    #[new]
    #[pyo3(signature = (*, max_context_entries, max_signals, max_key_chars, max_value_chars,
        max_user_agent_chars, max_referrer_chars, max_user_id_chars, device_cache_size))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_context_entries: usize,
        max_signals: usize,
        max_key_chars: usize,
        max_value_chars: usize,
        max_user_agent_chars: usize,
        max_referrer_chars: usize,
        max_user_id_chars: usize,
        device_cache_size: usize,
    ) -> Self {
        PyBatchCatalogue {
            inner: Catalogue::new(BatchLimits {
                context: ContextLimits {
                    max_context_entries,
                    max_signals,
                    max_key_chars,
                    max_value_chars,
                    max_user_agent_chars,
                    max_referrer_chars,
                },
                max_user_id_chars,
                device_cache_size,
            }),
        }
    }

    #[pyo3(signature = (key, *, handle, running, sticky, caller_segments, dimensions, variants))]
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        key: String,
        handle: u64,
        running: bool,
        sticky: bool,
        caller_segments: bool,
        dimensions: Vec<String>,
        variants: Vec<(String, String, String)>,
    ) {
        self.inner.put(ExperimentInfo {
            key,
            handle,
            running,
            sticky,
            caller_segments,
            dimensions,
            variants: variants
                .into_iter()
                .map(|(id, name, payload_json)| VariantInfo {
                    id,
                    name,
                    payload_json,
                })
                .collect(),
        })
    }

    fn remove(&self, key: &str) {
        self.inner.remove(key)
    }

    fn learn_devices(&self, pairs: Vec<(PyBackedStr, PyBackedStr)>) -> PyResult<()> {
        self.inner.learn_devices(&pairs).map_err(to_py)
    }

    fn prepare(
        &self,
        py: Python<'_>,
        request: &[u8],
        now_ms: i64,
        shared: bool,
    ) -> PyResult<PyPreparedBatch> {
        py.allow_threads(|| self.inner.prepare(request, now_ms, shared))
            .map(|inner| PyPreparedBatch { inner })
            .map_err(to_py)
    }
}

#[pymethods]
impl PyPreparedBatch {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn needs_caller(&self) -> bool {
        self.inner.needs_caller
    }

    fn invalid(&self) -> Vec<usize> {
        self.inner.invalid()
    }

    fn unknown_user_agents(&self, catalogue: &PyBatchCatalogue) -> Vec<String> {
        self.inner.unknown_user_agents(&catalogue.inner)
    }

    fn sticky_candidates(&self) -> (Vec<usize>, Vec<u64>, Vec<&str>) {
        self.inner.sticky_candidates()
    }

    #[pyo3(signature = (engine, catalogue, *, region, id_prefix, first_seq, given, errors))]
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        py: Python<'_>,
        engine: &PyEngine,
        catalogue: &PyBatchCatalogue,
        region: &str,
        id_prefix: &str,
        first_seq: u64,
        given: HashMap<usize, PyGiven>,
        errors: HashMap<usize, PyItemError>,
    ) -> PyResult<PyBatchOutput> {
        let given: HashMap<usize, GivenAllocation> = given
            .into_iter()
            .map(
                |(i, (assignment_id, variant, segment_key, level, propensity, sticky))| {
                    let g = GivenAllocation {
                        assignment_id,
                        variant,
                        segment_key,
                        level,
                        propensity,
                        sticky,
                    };
                    (i, g)
                },
            )
            .collect();
        let errors: HashMap<usize, ItemError> = errors
            .into_iter()
            .map(|(i, (code, message, field))| {
                (
                    i,
                    ItemError {
                        code,
                        message,
                        field,
                    },
                )
            })
            .collect();
        // Decided on this thread (its generator), with the GIL released.
        let out = py
            .allow_threads(|| {
                self.inner.finish(
                    &engine.inner,
                    &catalogue.inner,
                    region,
                    id_prefix,
                    first_seq,
                    &given,
                    &errors,
                )
            })
            .map_err(to_py)?;
        let d = out.decided;
        Ok((
            PyBytes::new(py, &out.response).unbind(),
            d.handles,
            d.user_ids,
            d.variants,
            d.segment_keys,
            d.levels,
            d.propensities,
        ))
    }
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
    fn decide<'py>(
        &self,
        py: Python<'py>,
        experiment: u64,
        user_id: &str,
        values: &Bound<'py, PyAny>,
        record: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let mut held: [Option<Bound<'py, PyString>>; MAX_LEVELS] = Default::default();
        let mut strs: [&str; MAX_LEVELS] = [""; MAX_LEVELS];
        let mut fallback: Vec<PyBackedStr> = Vec::new();
        let mut n = None;
        if let Some(count) = hold_strs(values, &mut held) {
            n = Some(count);
            for (s, item) in strs.iter_mut().zip(held.iter().flatten()) {
                match item.to_str() {
                    Ok(v) => *s = v,
                    Err(_) => n = None,
                }
            }
        }
        if n.is_none() {
            fallback = values
                .extract()
                .map_err(|e| argument_error(py, "values", e))?;
        }
        let mut key = KEY_BUFFER.take();
        let decided = match n {
            Some(count) => {
                self.inner
                    .decide_into(experiment, user_id, &strs[..count], record, &mut key)
            }
            None => self
                .inner
                .decide_into(experiment, user_id, &fallback, record, &mut key),
        };
        match decided {
            Ok((variant, level, propensity)) => {
                let out = (variant, level, propensity, PyString::new(py, &key)).into_pyobject(py);
                KEY_BUFFER.set(key);
                out
            }
            Err(e) => {
                KEY_BUFFER.set(key);
                Err(to_py(e))
            }
        }
    }

    #[pyo3(signature = (experiment, user_ids, values, record=true))]
    fn decide_batch<'py>(
        &self,
        py: Python<'py>,
        experiment: u64,
        user_ids: Vec<PyBackedStr>,
        values: &Bound<'py, PyAny>,
        record: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let (flat, ends) = match flat_rows(values) {
            Some(rows) => rows,
            None => {
                let nested: Vec<Vec<PyBackedStr>> = values
                    .extract()
                    .map_err(|e| argument_error(py, "values", e))?;
                let mut ends = Vec::with_capacity(nested.len());
                let mut total = 0;
                for row in &nested {
                    total += row.len();
                    ends.push(total);
                }
                (nested.into_iter().flatten().collect(), ends)
            }
        };
        let mut start = 0;
        let rows: Vec<&[PyBackedStr]> = ends
            .iter()
            .map(|&end| {
                let row = &flat[start..end];
                start = end;
                row
            })
            .collect();
        let out = py
            .allow_threads(|| {
                self.inner
                    .decide_batch_rows(experiment, &user_ids, &rows, record)
            })
            .map_err(to_py)?;
        let keys: Vec<Bound<'py, PyString>> =
            out.keys.iter().map(|k| PyString::new(py, k)).collect();
        let items = out
            .items
            .iter()
            .map(|&(variant, level, propensity, k)| {
                (variant, level, propensity, keys[k].clone()).into_pyobject(py)
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
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
    m.add_class::<PyBatchCatalogue>()?;
    m.add_class::<PyPreparedBatch>()?;
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
