//! The PyO3 binding of allocsvc-core, imported as `allocsvc._core`.
//!
//! This crate only converts types and errors; all logic lives in `allocsvc-core`.

mod error;
mod held;

use allocsvc_core::batch::{
    self, BatchLimits, Catalogue, ExperimentInfo, Features, GivenAllocation, ItemError, OneChecked,
    PreparedBatch, VariantInfo,
};
use allocsvc_core::beta::{self, with_thread_rng};
use allocsvc_core::cascade::Tree;
use allocsvc_core::context::ContextLimits;
use allocsvc_core::decide::{Engine, ExperimentConfig, Policy, MAX_LEVELS};
use allocsvc_core::held::Assignment;
use allocsvc_core::unary::UnaryLane;
use allocsvc_core::{keys, CountRow};
use error::{invalid, to_py};
use held::{
    assignment_block, block_rows_of_ids, block_rows_of_users, copy_assignments, decompress_block,
    filter_may_hold_id, filter_may_hold_user, filters_may_hold_ids, filters_may_hold_users, framed,
    shared_records, sticky_claims, PyHeld, PyLog, PyMade,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

/// The segment key buffer `Engine.decide` reuses, and the last key it returned with its str
/// and its result tuple.
#[derive(Default)]
struct KeyCache {
    buffer: String,
    last: String,
    last_str: Option<Py<PyString>>,
    /// (variant, level, propensity bits) of `last_tuple`, whose key is `last`.
    last_result: (usize, usize, u64),
    last_tuple: Option<Py<PyTuple>>,
}

impl KeyCache {
    /// The result tuple of a decision whose key is in `buffer`: the last tuple again when the
    /// decision is the same (tuples are immutable; this saves three allocations).
    fn result<'py>(
        &mut self,
        py: Python<'py>,
        variant: usize,
        level: usize,
        propensity: f64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let result = (variant, level, propensity.to_bits());
        if let Some(t) = &self.last_tuple {
            if self.last_result == result && self.last == self.buffer {
                return Ok(t.bind(py).clone());
            }
        }
        let t = (variant, level, propensity, self.key_str(py)).into_pyobject(py)?;
        self.last_result = result;
        self.last_tuple = Some(t.clone().unbind());
        Ok(t)
    }

    /// The str of the key in `buffer`: the last one again when the key is the same.
    fn key_str<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyString> {
        if let Some(s) = &self.last_str {
            if self.last == self.buffer {
                return s.bind(py).clone();
            }
        }
        let s = PyString::new(py, &self.buffer);
        std::mem::swap(&mut self.last, &mut self.buffer);
        self.last_str = Some(s.clone().unbind());
        s
    }
}

thread_local! {
    /// Taken out while in use (a Python allocation can run a finalizer that calls `decide`
    /// again on this thread), and put back after.
    static KEY_CACHE: Cell<KeyCache> = Cell::new(KeyCache::default());
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

/// Segment values of all rows, and each row's (start, end) in them.
type FlatRows = (Vec<PyBackedStr>, Vec<(usize, usize)>);

/// Rows of segment values from a list or tuple of lists or tuples of str, flattened without
/// copying the strings, with each row's (start, end) in the flat list; None for anything else.
/// A row that is the same object as the row before shares its span (nothing runs Python code
/// meanwhile, so it cannot have changed).
fn flat_rows(values: &Bound<'_, PyAny>) -> Option<FlatRows> {
    fn rows<'py>(outer: impl ExactSizeIterator<Item = Bound<'py, PyAny>>) -> Option<FlatRows> {
        let mut flat = Vec::with_capacity(outer.len() * 4);
        let mut spans = Vec::with_capacity(outer.len());
        let mut previous: Option<Bound<'py, PyAny>> = None;
        for row in outer {
            if let (Some(p), Some(&span)) = (&previous, spans.last()) {
                if row.is(p) {
                    spans.push(span);
                    continue;
                }
            }
            let start = flat.len();
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
            spans.push((start, flat.len()));
            previous = Some(row);
        }
        Some((flat, spans))
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

/// The serialized items at `positions` of a serialized AllocateBatchRequest.
#[pyfunction]
fn batch_items<'py>(
    py: Python<'py>,
    request: &[u8],
    positions: Vec<usize>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let items = batch::batch_items(request, &positions).map_err(to_py)?;
    Ok(items.into_iter().map(|b| PyBytes::new(py, b)).collect())
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

/// One item as learning keeps it: `PreparedBatch.features`.
type PyFeatures<'a> = (
    &'a str,
    &'static str,
    &'static str,
    &'a str,
    usize,
    usize,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

fn py_features(f: Features<'_>) -> PyFeatures<'_> {
    let [pages, seconds, engagement, drop] = f.signals;
    (
        f.user_id,
        f.channel,
        f.device,
        f.source,
        f.hour,
        f.day_of_week,
        pages,
        seconds,
        engagement,
        drop,
    )
}

/// Python face of [`UnaryLane`].
#[pyclass(name = "UnaryLane", frozen, module = "allocsvc._core")]
struct PyUnaryLane {
    inner: parking_lot::Mutex<UnaryLane>,
}

#[pymethods]
impl PyUnaryLane {
    #[new]
    fn new() -> Self {
        PyUnaryLane {
            inner: parking_lot::Mutex::new(UnaryLane::new()),
        }
    }

    fn take_seqs(&self, n: u64) -> u64 {
        self.inner.lock().take_seqs(n)
    }

    fn observes_next(&self) -> bool {
        self.inner.lock().observes_next()
    }

    #[pyo3(signature = (calls))]
    fn observe_in(&self, calls: Option<i64>) {
        self.inner.lock().observe_in(calls)
    }

    #[pyo3(signature = (allocations))]
    fn grow_in(&self, allocations: Option<i64>) {
        self.inner.lock().grow_in(allocations)
    }

    fn take_grown(&self) -> (u64, Vec<u64>) {
        self.inner.lock().take_grown()
    }

    fn level_counts(&self, handle: u64) -> Vec<(usize, u64)> {
        self.inner.lock().level_counts(handle)
    }
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

    fn prepare(&self, py: Python<'_>, request: &[u8], now_ms: i64) -> PyResult<PyPreparedBatch> {
        py.allow_threads(|| self.inner.prepare(request, now_ms))
            .map(|inner| PyPreparedBatch { inner })
            .map_err(to_py)
    }

    /// What learning keeps of a unary request `allocate_one` takes, as
    /// `PreparedBatch.features` gives a batch item's: None when the caller's path answers it
    /// or its user agent is not classified yet.
    fn features_one<'py>(
        &self,
        py: Python<'py>,
        request: &[u8],
        now_ms: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let OneChecked::Ready(one) = self.inner.check_one(request, now_ms) else {
            return Ok(py.None().into_bound(py));
        };
        py_features(one.features()).into_bound_py_any(py)
    }

    /// Unary Allocate on the wire format, in one call: None when the caller's path must
    /// answer; a user agent (str) whose device class to learn before calling again; the
    /// response (bytes) when the caller has nothing more to do; else a tuple. A sticky user
    /// whose latest assignment `held` has is answered it (when `held` may have evicted it, or
    /// under `shared` for a new sticky user, whose claim is made in shared state, the caller's
    /// way; so is a new assignment past `log`'s room). A new decision is named
    /// `{held's prefix}-{seq:x}`, `seq` taken from `lane`. With a `log`, it is held by
    /// `held`, logged for the write-behind and counted by `lane`; the tuple, when the caller
    /// has something to do, is (response, (handle, segment key) when the key is new to
    /// `lane`, else None, whether `lane`'s growth countdown ended, and when learning observes
    /// this call its features as `features_one` gives them, else None: then `lane`'s
    /// countdown stops until `observe_in`). Without a log, it is
    /// (response, (seq, handle, user id, variant, segment key, level, propensity)), for the
    /// caller to keep, count and observe. Short work: the GIL stays held.
    #[pyo3(signature = (engine, request, held, lane, log, now_ms, shared, region))]
    #[allow(clippy::too_many_arguments)]
    fn allocate_one<'py>(
        &self,
        py: Python<'py>,
        engine: &PyEngine,
        request: &[u8],
        held: &PyHeld,
        lane: &PyUnaryLane,
        log: Option<&PyLog>,
        now_ms: i64,
        shared: bool,
        region: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let one = match self.inner.check_one(request, now_ms) {
            OneChecked::Caller => return Ok(py.None().into_bound(py)),
            OneChecked::UnknownUserAgent(ua) => return Ok(PyString::new(py, &ua).into_any()),
            OneChecked::Ready(one) => one,
        };
        let store = held.inner.lock();
        if one.sticky() {
            let earlier = store
                .latest(one.handle(), one.user_id())
                .map(|a| GivenAllocation {
                    assignment_id: a.id.to_string(),
                    variant: a.variant,
                    segment_key: a.segment_key.to_string(),
                    level: a.level,
                    propensity: a.propensity,
                    sticky: true,
                });
            if earlier.is_none() && (shared || store.evicted(one.handle())) {
                // A new user's claim in shared state, or an assignment memory may have
                // evicted: the caller's way.
                return Ok(py.None().into_bound(py));
            }
            if let Some(given) = earlier {
                drop(store);
                let response = PyBytes::new(py, &one.answer(&given, region).map_err(to_py)?);
                if !lane.inner.lock().observes_next() {
                    return Ok(response.into_any());
                }
                return (response, py.None(), false, py_features(one.features()))
                    .into_bound_py_any(py);
            }
        }
        if log.is_some_and(|log| !log.has_room()) {
            // The write-behind is full: the caller's journal refuses a new assignment.
            return Ok(py.None().into_bound(py));
        }
        let seq = lane.inner.lock().peek_seq();
        let mut assignment_id = String::with_capacity(store.prefix().len() + 17);
        allocsvc_core::held::write_own_id(&mut assignment_id, store.prefix(), seq);
        drop(store);
        let d = one
            .decide(&engine.inner, region, &assignment_id)
            .map_err(to_py)?;
        lane.inner.lock().take_seqs(1);
        let response = PyBytes::new(py, &d.response);
        let Some(log) = log else {
            let kept = (
                seq,
                one.handle(),
                one.user_id(),
                d.variant,
                d.segment_key,
                d.level,
                d.propensity,
            );
            return (response, kept).into_bound_py_any(py);
        };
        held.inner.lock().add_new(&Assignment {
            id: Cow::Borrowed(&assignment_id),
            handle: one.handle(),
            user_id: one.user_id(),
            variant: d.variant,
            segment_key: &d.segment_key,
            level: d.level,
            propensity: d.propensity,
            created_ms: now_ms,
        });
        log.push(
            py,
            held,
            now_ms,
            seq,
            one.handle(),
            one.user_id(),
            d.variant,
            &d.segment_key,
            d.level,
            d.propensity,
        );
        let (counted, observe) = {
            let mut lane = lane.inner.lock();
            (
                lane.count(one.handle(), &d.segment_key, d.level),
                lane.observes_next(),
            )
        };
        if !counted.new_key && !counted.grow && !observe {
            return Ok(response.into_any());
        }
        let new_key = counted.new_key.then(|| (one.handle(), d.segment_key));
        let features = observe.then(|| py_features(one.features()));
        (response, new_key, counted.grow, features).into_bound_py_any(py)
    }
}

/// `BatchCatalogue.allocate_one` bound to everything but the request, for a server's unary
/// `Allocate` with a log (no shared state): `allocate` reads the clock itself and answers the
/// response bytes, or what `after(request, now_ms, outcome, region)` answers for any other
/// outcome. The calls it answers whole run no Python between gRPC's handler and the answer.
#[pyclass(name = "UnaryPath", frozen, module = "allocsvc._core")]
struct PyUnaryPath {
    catalogue: Py<PyBatchCatalogue>,
    engine: Py<PyEngine>,
    held: Py<PyHeld>,
    lane: Py<PyUnaryLane>,
    log: Py<PyLog>,
    region: String,
    after: PyObject,
}

#[pymethods]
impl PyUnaryPath {
    #[new]
    #[pyo3(signature = (catalogue, engine, held, lane, log, region, after))]
    fn new(
        catalogue: Py<PyBatchCatalogue>,
        engine: Py<PyEngine>,
        held: Py<PyHeld>,
        lane: Py<PyUnaryLane>,
        log: Py<PyLog>,
        region: String,
        after: PyObject,
    ) -> Self {
        PyUnaryPath {
            catalogue,
            engine,
            held,
            lane,
            log,
            region,
            after,
        }
    }

    fn allocate<'py>(
        &self,
        py: Python<'py>,
        request: &Bound<'py, PyBytes>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let out = self.catalogue.get().allocate_one(
            py,
            self.engine.get(),
            request.as_bytes(),
            self.held.get(),
            self.lane.get(),
            Some(self.log.get()),
            now_ms,
            false,
            &self.region,
        )?;
        if out.is_instance_of::<PyBytes>() {
            return Ok(out);
        }
        self.after
            .bind(py)
            .call1((request, now_ms, out, &self.region))
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

    #[getter]
    fn has_sticky(&self) -> bool {
        self.inner.has_sticky()
    }

    /// (user id, channel, device, source, hour, day of week, pages_viewed, time_seconds,
    /// engagement_score, drop_risk) of the ready items at `positions`.
    fn features(
        &self,
        catalogue: &PyBatchCatalogue,
        positions: Vec<usize>,
    ) -> PyResult<Vec<PyFeatures<'_>>> {
        let features = self
            .inner
            .features(&catalogue.inner, &positions)
            .map_err(to_py)?;
        Ok(features.into_iter().map(py_features).collect())
    }

    /// Decide the items, hold the new assignments in `held` (ids `{id_prefix}-{seq:x}` from
    /// `first_seq` on, made at `now_ms`); return the response, the new assignments and the
    /// item each answers. With `record` false, neither count nor hold them (a shared replica
    /// claims those of sticky experiments first).
    #[pyo3(signature = (engine, catalogue, held, *, region, id_prefix, first_seq, now_ms, given,
        errors, record=true))]
    #[allow(clippy::too_many_arguments)]
    fn finish<'py>(
        &self,
        py: Python<'py>,
        engine: &PyEngine,
        catalogue: &PyBatchCatalogue,
        held: &PyHeld,
        region: &str,
        id_prefix: &str,
        first_seq: u64,
        now_ms: i64,
        given: HashMap<usize, PyGiven>,
        errors: HashMap<usize, PyItemError>,
        record: bool,
    ) -> PyResult<(Bound<'py, PyBytes>, PyMade, Vec<usize>)> {
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
        // Decided on this thread (its generator), with the GIL released; the new assignments
        // go to the holder's thread, and any call that looks for them waits until they are
        // held (allocsvc_core::holder).
        let (response, made, positions) = py
            .allow_threads(|| {
                let out = self.inner.finish(
                    &engine.inner,
                    &catalogue.inner,
                    region,
                    id_prefix,
                    first_seq,
                    now_ms,
                    &given,
                    &errors,
                    record,
                )?;
                let made = Arc::new(out.made);
                if record {
                    held.inner.hand_over(Arc::clone(&made));
                }
                Ok::<_, allocsvc_core::CoreError>((out.response, made, out.positions))
            })
            .map_err(to_py)?;
        let made = PyMade::new(py, made, held);
        Ok((PyBytes::new(py, &response), made, positions))
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
        weights=None, prior_alpha=1.0, prior_beta=1.0, warm_start=10.0, exploration=0.0, salt=0,
        propensity_floor=0.0))]
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
        propensity_floor: f64,
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
            propensity_floor,
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
        let mut cache = KEY_CACHE.take();
        let key = &mut cache.buffer;
        let decided = match n {
            Some(count) => self
                .inner
                .decide_into(experiment, user_id, &strs[..count], record, key),
            None => self
                .inner
                .decide_into(experiment, user_id, &fallback, record, key),
        };
        let out = match decided {
            Ok((variant, level, propensity)) => cache.result(py, variant, level, propensity),
            Err(e) => Err(to_py(e)),
        };
        KEY_CACHE.set(cache);
        out
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
        let (flat, spans) = match flat_rows(values) {
            Some(rows) => rows,
            None => {
                let nested: Vec<Vec<PyBackedStr>> = values
                    .extract()
                    .map_err(|e| argument_error(py, "values", e))?;
                let mut spans = Vec::with_capacity(nested.len());
                let mut total = 0;
                for row in &nested {
                    spans.push((total, total + row.len()));
                    total += row.len();
                }
                (nested.into_iter().flatten().collect(), spans)
            }
        };
        let rows: Vec<&[PyBackedStr]> = spans.iter().map(|&(s, e)| &flat[s..e]).collect();
        let out = py
            .allow_threads(|| {
                self.inner
                    .decide_batch_rows(experiment, &user_ids, &rows, record)
            })
            .map_err(to_py)?;
        let keys: Vec<Bound<'py, PyString>> =
            out.keys.iter().map(|k| PyString::new(py, k)).collect();
        // Consecutive equal decisions (variant, level, propensity bits, key) share one
        // (immutable) tuple.
        type Item = (usize, usize, u64, usize);
        let mut last: Option<(Item, Bound<'py, PyTuple>)> = None;
        let mut items = Vec::with_capacity(out.items.len());
        for &(variant, level, propensity, k) in &out.items {
            let id = (variant, level, propensity.to_bits(), k);
            let item = match &last {
                Some((last_id, t)) if *last_id == id => t.clone(),
                _ => {
                    let t = (variant, level, propensity, keys[k].clone()).into_pyobject(py)?;
                    last = Some((id, t.clone()));
                    t
                }
            };
            items.push(item);
        }
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

    /// Count each of `made`'s assignments (`finish(..., record=False)`'s, once claimed).
    fn record_made(&self, py: Python<'_>, made: PyRef<'_, PyMade>) -> PyResult<()> {
        let made = made.inner();
        py.allow_threads(|| self.inner.record_made(made))
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
    m.add_class::<PyUnaryLane>()?;
    m.add_class::<PyUnaryPath>()?;
    m.add_class::<PyHeld>()?;
    m.add_class::<PyMade>()?;
    m.add_class::<PyLog>()?;
    m.add_function(wrap_pyfunction!(batch_items, m)?)?;
    m.add_function(wrap_pyfunction!(copy_assignments, m)?)?;
    m.add_function(wrap_pyfunction!(decompress_block, m)?)?;
    m.add_function(wrap_pyfunction!(block_rows_of_users, m)?)?;
    m.add_function(wrap_pyfunction!(block_rows_of_ids, m)?)?;
    m.add_function(wrap_pyfunction!(assignment_block, m)?)?;
    m.add_function(wrap_pyfunction!(filter_may_hold_user, m)?)?;
    m.add_function(wrap_pyfunction!(filter_may_hold_id, m)?)?;
    m.add_function(wrap_pyfunction!(filters_may_hold_users, m)?)?;
    m.add_function(wrap_pyfunction!(filters_may_hold_ids, m)?)?;
    m.add_function(wrap_pyfunction!(shared_records, m)?)?;
    m.add_function(wrap_pyfunction!(sticky_claims, m)?)?;
    m.add_function(wrap_pyfunction!(framed, m)?)?;
    m.add(
        "ASSIGNMENT_COPY_COLUMNS",
        allocsvc_core::held::COPY_COLUMNS.to_vec(),
    )?;
    m.add(
        "RESTORE_COPY_COLUMNS",
        allocsvc_core::held::RESTORE_COLUMNS.to_vec(),
    )?;
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
