//! Python faces of [`Held`] (the assignments a process holds) and [`Made`] (a batch's new
//! assignments on their way to the write-behind).
//!
//! An assignment crosses to Python as the tuple `allocsvc.allocation.service.Held`:
//! (id, experiment key, handle, user id, variant, segment key, cascade level, propensity,
//! created ms).

use allocsvc_core::block;
use allocsvc_core::compact;
use allocsvc_core::filter::{self, Filter};
use allocsvc_core::held::{self, Assignment, Held, Made};
use allocsvc_core::holder::Holder;
use allocsvc_core::keyed::KeyedMap;
use allocsvc_core::keys;
use allocsvc_core::shared;

use crate::error::to_py;
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Experiment keys by handle, as Python strs (shared by every tuple of the experiment).
#[derive(Default)]
pub(crate) struct Names(KeyedMap<u64, Py<PyString>>);

impl Names {
    fn get<'py>(&self, py: Python<'py>, handle: u64) -> Bound<'py, PyString> {
        match self.0.get(&handle) {
            Some(name) => name.bind(py).clone(),
            None => PyString::new(py, ""),
        }
    }

    fn tuple<'py>(&self, py: Python<'py>, a: &Assignment<'_>) -> PyResult<Bound<'py, PyTuple>> {
        (
            &*a.id,
            self.get(py, a.handle),
            a.handle,
            a.user_id,
            a.variant,
            a.segment_key,
            a.level,
            a.propensity,
            a.created_ms,
        )
            .into_pyobject(py)
    }
}

/// (id, experiment key, handle, user id, variant, segment key, level, propensity, created ms)
type HeldIn<'py> = (
    PyBackedStr,
    Bound<'py, PyString>,
    u64,
    PyBackedStr,
    usize,
    PyBackedStr,
    usize,
    f64,
    i64,
);

/// (position, handle, user id) of two lists that must be of one length.
fn pairs<'a>(
    handles: &'a [u64],
    user_ids: &'a [PyBackedStr],
) -> PyResult<impl Iterator<Item = (usize, u64, &'a str)>> {
    if handles.len() != user_ids.len() {
        return Err(PyValueError::new_err(
            "handles and user_ids are not of one length",
        ));
    }
    Ok(handles
        .iter()
        .zip(user_ids)
        .enumerate()
        .map(|(i, (&h, u))| (i, h, &**u)))
}

/// Python face of [`Held`].
#[pyclass(name = "HeldAssignments", frozen, module = "allocsvc._core")]
pub(crate) struct PyHeld {
    pub(crate) inner: Holder,
    pub(crate) names: Mutex<Names>,
}

impl PyHeld {
    fn tuples<'py>(
        &self,
        py: Python<'py>,
        all: &[Assignment<'_>],
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let names = self.names.lock();
        all.iter().map(|a| names.tuple(py, a)).collect()
    }

    /// Experiment keys of `handles` (for a batch's [`PyMade`]).
    fn names_of(&self, py: Python<'_>, handles: &[u64]) -> Names {
        let names = self.names.lock();
        let mut out = Names::default();
        for &h in handles {
            out.0.entry(h).or_insert_with(|| names.get(py, h).unbind());
        }
        out
    }
}

#[pymethods]
impl PyHeld {
    /// A store of at most `capacity` assignments (0: no bound; the oldest go first) whose
    /// own assignment ids are `{id_prefix}-{seq:x}` (kept as numbers).
    #[new]
    #[pyo3(signature = (id_prefix, capacity=0, evicted_keys=0))]
    fn new(id_prefix: &str, capacity: usize, evicted_keys: usize) -> Self {
        PyHeld {
            inner: Holder::new(Held::with_filter(id_prefix, capacity, evicted_keys)),
            names: Mutex::new(Names::default()),
        }
    }

    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }

    /// Name experiment `handle` (the key its assignments carry).
    fn name(&self, handle: u64, key: Bound<'_, PyString>) {
        self.names.lock().0.insert(handle, key.unbind());
    }

    /// Hold an assignment (a `Held` tuple); with `latest`, also as its (experiment, user)'s
    /// latest. An id held already is updated.
    #[pyo3(signature = (a, latest=true))]
    fn add(&self, a: HeldIn<'_>, latest: bool) {
        let (id, name, handle, user_id, variant, segment_key, level, propensity, created_ms) = a;
        self.names
            .lock()
            .0
            .entry(handle)
            .or_insert_with(|| name.unbind());
        let a = Assignment {
            id: Cow::Borrowed(&id),
            handle,
            user_id: &user_id,
            variant,
            segment_key: &segment_key,
            level,
            propensity,
            created_ms,
        };
        self.inner.lock().add(&a, latest);
    }

    fn latest<'py>(
        &self,
        py: Python<'py>,
        handle: u64,
        user_id: &str,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let held = self.inner.lock();
        held.latest(handle, user_id)
            .map(|a| self.names.lock().tuple(py, &a))
            .transpose()
    }

    fn by_id<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let held = self.inner.lock();
        held.by_id(id)
            .map(|a| self.names.lock().tuple(py, &a))
            .transpose()
    }

    /// Hold `made` (`PreparedBatch.finish(..., record=False)`'s new assignments, once claimed) as
    /// `PreparedBatch.finish` holds its own: on the store's thread, before any other call
    /// here looks.
    fn hand_over(&self, made: PyRef<'_, PyMade>) {
        self.inner.hand_over(Arc::clone(&made.inner));
    }

    /// New assignments of batches handed over and not yet held (see
    /// `allocsvc_core::holder`); every other method holds them first.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// Assignments evicted so far (the store was full).
    #[getter]
    fn evictions(&self) -> u64 {
        self.inner.lock().evictions()
    }

    /// The positions of the (experiment `handles[i]`, `user_ids[i]`) whose latest assignment
    /// may be in the durable store and not here (look them up there; see [`Held::may_be_stored`]).
    fn may_be_stored(&self, handles: Vec<u64>, user_ids: Vec<PyBackedStr>) -> PyResult<Vec<usize>> {
        let held = self.inner.lock();
        Ok(pairs(&handles, &user_ids)?
            .filter(|(_, h, u)| held.may_be_stored(*h, u))
            .map(|(i, _, _)| i)
            .collect())
    }

    /// The latest assignments held of (experiment `handles[i]`, `user_ids[i]`), by position
    /// `i`; positions of users not held are left out.
    fn latest_many<'py>(
        &self,
        py: Python<'py>,
        handles: Vec<u64>,
        user_ids: Vec<PyBackedStr>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let held = self.inner.lock();
        let names = self.names.lock();
        for (i, h, u) in pairs(&handles, &user_ids)? {
            if let Some(a) = held.latest(h, u) {
                out.set_item(i, names.tuple(py, &a)?)?;
            }
        }
        Ok(out)
    }

    /// Experiment `handle` has stored assignments a restart did not read back: every user not
    /// held may have one until `listed(handle)`.
    fn unlisted(&self, handle: u64) {
        self.inner.lock().unlisted(handle);
    }

    /// Put the stored users of experiment `handle` in `data`, a piece of a binary COPY stream
    /// of their ids, among those that may have a stored assignment not held (as `add_copied`
    /// reads its pieces): (bytes read, users, whether the stream ended).
    fn list_copied(
        &self,
        handle: u64,
        data: &[u8],
        at_start: bool,
    ) -> PyResult<(usize, usize, bool)> {
        let read = self
            .inner
            .lock()
            .list_copied(handle, data, at_start)
            .map_err(to_py)?;
        Ok((read.consumed, read.rows, read.ended))
    }

    /// Once the filter of evicted keys is full, start a new one and mark every experiment
    /// that evicted unlisted, to be listed again (`list_block`, `list_copied`, `listed`):
    /// whether it did (see [`Held::renew_filter`]).
    fn renew_filter(&self) -> bool {
        self.inner.lock().renew_filter()
    }

    /// Put the users of a compressed assignment block's rows of experiments that evicted
    /// among those that may have a stored assignment not held, without the GIL: its rows.
    fn list_block(&self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        py.allow_threads(|| {
            // Read without the store's lock: only the keys' insertion holds it.
            let payload = decompressed(data).map_err(not_a_block)?;
            let keys = held::block_user_keys(&payload).map_err(to_py)?;
            self.inner.lock().list_keys(&keys);
            Ok(keys.len())
        })
    }

    /// Every stored user of experiment `handle` is listed.
    fn listed(&self, handle: u64) {
        self.inner.lock().listed(handle);
    }

    /// The experiments `unlisted` and not yet `listed`, in order of handle.
    #[getter]
    fn unlisted_experiments(&self) -> Vec<u64> {
        self.inner.lock().unlisted_experiments()
    }

    /// Bytes taken by the filter of evicted (experiment, user) keys.
    #[getter]
    fn evicted_filter_size(&self) -> usize {
        self.inner.lock().evicted_filter_size()
    }

    /// Whether that filter is full (it then passes every key).
    #[getter]
    fn evicted_filter_full(&self) -> bool {
        self.inner.lock().evicted_filter_full()
    }

    /// Whether some stored assignment may not be held (see [`Held::incomplete`]).
    #[getter]
    fn incomplete(&self) -> bool {
        self.inner.lock().incomplete()
    }

    /// At a restart, take in a compressed assignment block's rows after the table's (see
    /// [`Held::add_block`]), without the GIL: (rows, rows held).
    fn add_block(&self, py: Python<'_>, data: &[u8], made_ms: i64) -> PyResult<(usize, usize)> {
        py.allow_threads(|| {
            let payload = decompressed(data).map_err(not_a_block)?;
            self.inner
                .lock()
                .add_block(&payload, made_ms)
                .map_err(to_py)
        })
    }

    fn has_id(&self, id: &str) -> bool {
        self.inner.lock().by_id(id).is_some()
    }

    fn has_latest(&self, handle: u64, user_id: &str) -> bool {
        self.inner.lock().latest(handle, user_id).is_some()
    }

    /// Every assignment of the user, newest first.
    fn of_user<'py>(&self, py: Python<'py>, user_id: &str) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let held = self.inner.lock();
        self.tuples(py, &held.of_user(user_id))
    }

    /// Drop every assignment of the user; return them (newest first).
    fn forget_user<'py>(
        &self,
        py: Python<'py>,
        user_id: &str,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let mut gone = Vec::new();
        let names = self.names.lock();
        let mut err = None;
        self.inner
            .lock()
            .forget_user(user_id, |a| match names.tuple(py, a) {
                Ok(t) => gone.push(t),
                Err(e) => err = Some(e),
            });
        err.map_or(Ok(gone), Err)
    }

    fn user_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let held = self.inner.lock();
        PyList::new(py, held.user_ids().collect::<Vec<_>>())
    }

    /// Hold the assignments of experiment `handle` in `data`, a piece of a PostgreSQL binary
    /// COPY stream of `RESTORE_COPY_COLUMNS`, oldest first (see [`Held::add_copied`]):
    /// (bytes read, assignments held, their distinct segment keys, whether the stream ended).
    fn add_copied(
        &self,
        handle: u64,
        data: &[u8],
        at_start: bool,
    ) -> PyResult<(usize, usize, Vec<String>, bool)> {
        let read = self
            .inner
            .lock()
            .add_copied(handle, data, at_start)
            .map_err(to_py)?;
        let keys = read.keys.iter().map(|k| k.to_string()).collect();
        Ok((read.consumed, read.rows, keys, read.ended))
    }
}

/// The new assignments of unary allocations that the write-behind has not taken yet: a
/// [`Made`] that `BatchCatalogue.allocate_one` appends to (each at its own time), no Python
/// object per assignment. The write-behind takes them as one `MadeAssignments`.
#[pyclass(name = "AssignmentLog", frozen, module = "allocsvc._core")]
pub(crate) struct PyLog {
    inner: Mutex<Made>,
    names: Mutex<Names>,
    /// Set by `count_days`: assignments counted by (experiment handle, UTC day number since
    /// the epoch) instead of kept, for a journal that keeps nothing else of them.
    days: Mutex<Option<KeyedMap<(u64, i64), u64>>>,
    /// The most assignments it may hold before `allocate_one` leaves new ones to its caller
    /// (`set_room`: the write-behind's bound less what else is pending); unbounded until set.
    room: AtomicI64,
}

const DAY_MS: i64 = 86_400_000;

impl PyLog {
    /// Whether one more assignment fits (`set_room`).
    pub(crate) fn has_room(&self) -> bool {
        let len = i64::try_from(self.inner.lock().len()).unwrap_or(i64::MAX);
        len < self.room.load(Ordering::Relaxed)
    }

    /// Log a new assignment; its experiment's key comes from `held` (which names it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &self,
        py: Python<'_>,
        held: &PyHeld,
        created_ms: i64,
        seq: u64,
        handle: u64,
        user_id: &str,
        variant: usize,
        segment_key: &str,
        level: usize,
        propensity: f64,
    ) {
        if let Some(days) = self.days.lock().as_mut() {
            *days
                .entry((handle, created_ms.div_euclid(DAY_MS)))
                .or_insert(0) += 1;
            return;
        }
        let mut names = self.names.lock();
        names
            .0
            .entry(handle)
            .or_insert_with(|| held.names.lock().get(py, handle).unbind());
        drop(names);
        self.inner.lock().push_at(
            created_ms,
            seq,
            handle,
            user_id,
            variant,
            segment_key,
            level,
            propensity,
        );
    }

    fn names_copy(&self, py: Python<'_>) -> Names {
        Names(
            self.names
                .lock()
                .0
                .iter()
                .map(|(&h, name)| (h, name.clone_ref(py)))
                .collect(),
        )
    }
}

#[pymethods]
impl PyLog {
    /// An empty log of assignments named `{id_prefix}-{seq:x}`.
    #[new]
    fn new(id_prefix: &str) -> Self {
        PyLog {
            inner: Mutex::new(Made::new(id_prefix, 0)),
            names: Mutex::new(Names::default()),
            days: Mutex::new(None),
            room: AtomicI64::new(i64::MAX),
        }
    }

    /// Hold at most `room` assignments (those logged already included): past it,
    /// `allocate_one` leaves new assignments to its caller, whose journal refuses them.
    fn set_room(&self, room: i64) {
        self.room.store(room, Ordering::Relaxed);
    }

    /// From now on, count each assignment logged by its experiment and UTC day instead of
    /// keeping it (what `take_days` returns); what was kept before stays.
    fn count_days(&self) {
        self.days.lock().get_or_insert_with(KeyedMap::default);
    }

    /// (handle, UTC day number since the epoch, assignments) counted since the last call,
    /// sorted; empty unless `count_days` was called.
    fn take_days(&self) -> Vec<(u64, i64, u64)> {
        let mut days = self.days.lock();
        let mut taken: Vec<(u64, i64, u64)> = days
            .as_mut()
            .map(|d| d.drain().map(|((h, day), n)| (h, day, n)).collect())
            .unwrap_or_default();
        taken.sort_unstable();
        taken
    }

    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }

    /// When (ms since the epoch) the oldest assignment logged was made; None when empty.
    #[getter]
    fn oldest_ms(&self) -> Option<i64> {
        let made = self.inner.lock();
        (!made.is_empty()).then(|| made.created_at(0))
    }

    /// Everything logged, as one `MadeAssignments`; the log starts empty again.
    fn take(&self, py: Python<'_>) -> PyMade {
        let inner = self.inner.lock().take();
        PyMade {
            inner: Arc::new(inner),
            names: self.names_copy(py),
        }
    }

    /// The user's logged assignments as `Held` tuples, oldest first.
    fn of_user<'py>(&self, py: Python<'py>, user_id: &str) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let made = self.inner.lock();
        let names = self.names.lock();
        let mut id = String::new();
        made.positions_of_user(user_id)
            .into_iter()
            .map(|k| {
                made.write_id(k, &mut id);
                names.tuple(py, &made.get(k, &id))
            })
            .collect()
    }

    /// Drop the user's logged assignments; return how many there were.
    fn forget_user(&self, user_id: &str) -> usize {
        let mut made = self.inner.lock();
        let before = made.len();
        *made = made.without_user(user_id);
        before - made.len()
    }
}

/// Python face of [`Made`].
#[pyclass(name = "MadeAssignments", frozen, module = "allocsvc._core")]
pub(crate) struct PyMade {
    inner: Arc<Made>,
    names: Names,
}

impl PyMade {
    /// A batch's new assignments, with the experiment keys `held` knows.
    pub(crate) fn new(py: Python<'_>, inner: Arc<Made>, held: &PyHeld) -> Self {
        let names = held.names_of(py, inner.handles());
        PyMade { inner, names }
    }

    pub(crate) fn inner(&self) -> &Made {
        &self.inner
    }

    /// `inner` under this one's experiment keys.
    fn with(&self, py: Python<'_>, inner: Made) -> PyMade {
        let names = self.names.0.iter();
        PyMade {
            inner: Arc::new(inner),
            names: Names(names.map(|(&h, name)| (h, name.clone_ref(py))).collect()),
        }
    }

    fn tuple_at<'py>(
        &self,
        py: Python<'py>,
        k: usize,
        id: &mut String,
    ) -> PyResult<Bound<'py, PyTuple>> {
        self.inner.write_id(k, id);
        self.names.tuple(py, &self.inner.get(k, id))
    }
}

#[pymethods]
impl PyMade {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn created_ms(&self) -> i64 {
        self.inner.created_ms()
    }

    /// Every assignment as a `Held` tuple, in order.
    fn assignments<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let mut id = String::new();
        (0..self.inner.len())
            .map(|k| self.tuple_at(py, k, &mut id))
            .collect()
    }

    /// The user's assignments as `Held` tuples.
    fn of_user<'py>(&self, py: Python<'py>, user_id: &str) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let mut id = String::new();
        self.inner
            .positions_of_user(user_id)
            .into_iter()
            .map(|k| self.tuple_at(py, k, &mut id))
            .collect()
    }

    /// The same assignments without the user's.
    fn without_user(&self, py: Python<'_>, user_id: &str) -> PyMade {
        self.with(py, self.inner.without_user(user_id))
    }

    /// The same assignments without those at `positions`.
    fn without(&self, py: Python<'_>, positions: Vec<usize>) -> PyMade {
        self.with(py, self.inner.without(&positions))
    }

    /// ((handle, cascade level), assignments) pairs.
    fn level_counts(&self) -> Vec<((u64, usize), usize)> {
        self.inner.level_counts()
    }

    /// Distinct (handle, segment key) pairs.
    fn distinct_keys(&self) -> Vec<(u64, &str)> {
        self.inner.distinct_keys()
    }
}

/// The start of a COPY stream of `singles` and `made` (`copy_assignments`' arguments): its
/// header and the rows of `singles`, with room for those of `made`.
fn copy_singles(singles: &[HeldIn<'_>], made: &[&Made]) -> Vec<u8> {
    let rows = singles.len() + made.iter().map(|m| m.len()).sum::<usize>();
    let mut out = Vec::with_capacity(19 + rows * held::COPY_ROW_BYTES);
    held::copy_header(&mut out);
    for single in singles {
        let a = assignment_of(single);
        held::copy_row(&mut out, &a, keys::key_hash(a.segment_key));
    }
    out
}

/// The assignment a `Held` tuple is.
fn assignment_of<'a>(single: &'a HeldIn<'_>) -> Assignment<'a> {
    let (id, _, handle, user_id, variant, segment_key, level, propensity, created_ms) = single;
    Assignment {
        id: Cow::Borrowed(id),
        handle: *handle,
        user_id,
        variant: *variant,
        segment_key,
        level: *level,
        propensity: *propensity,
        created_ms: *created_ms,
    }
}

/// Assignments as one PostgreSQL binary COPY stream (columns `ASSIGNMENT_COPY_COLUMNS`):
/// `singles` (`Held` tuples) first, then those of `made`; with `compressed`, that stream as an
/// LZ4 block with its length in front (`decompress_block` gives it back). The rows of `made`
/// and the compression are written without the GIL.
#[pyfunction]
#[pyo3(signature = (made, singles=None, *, compressed=false))]
pub(crate) fn copy_assignments<'py>(
    py: Python<'py>,
    made: Vec<PyRef<'py, PyMade>>,
    singles: Option<Vec<HeldIn<'py>>>,
    compressed: bool,
) -> Bound<'py, PyBytes> {
    let made: Vec<&Made> = made.iter().map(|m| &*m.inner).collect();
    let mut out = copy_singles(&singles.unwrap_or_default(), &made);
    let out = py.allow_threads(move || {
        for m in made {
            m.copy_rows(&mut out);
        }
        held::copy_trailer(&mut out);
        if compressed {
            lz4_flex::compress_prepend_size(&out)
        } else {
            out
        }
    });
    PyBytes::new(py, &out)
}

/// The experiment keys of `made`'s assignments by handle, copied out of Python (for work done
/// without the GIL).
fn experiment_keys(py: Python<'_>, made: &[PyRef<'_, PyMade>]) -> PyResult<HashMap<u64, String>> {
    let mut names: HashMap<u64, String> = HashMap::new();
    for m in made {
        for (&handle, name) in &m.names.0 {
            if let std::collections::hash_map::Entry::Vacant(e) = names.entry(handle) {
                e.insert(name.bind(py).to_str()?.to_owned());
            }
        }
    }
    Ok(names)
}

/// These assignments' records for shared state (`singles`, `Held` tuples, first, then those of
/// `made`): each its key (`key_prefix` + id) and its JSON value, each preceded by its length
/// (see `allocsvc_core::shared`); those of `made` written without the GIL.
#[pyfunction]
#[pyo3(signature = (made, key_prefix, singles=None))]
pub(crate) fn shared_records<'py>(
    py: Python<'py>,
    made: Vec<PyRef<'py, PyMade>>,
    key_prefix: &str,
    singles: Option<Vec<HeldIn<'py>>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let names = experiment_keys(py, &made)?;
    let singles = singles.unwrap_or_default();
    let records = singles.len() + made.iter().map(|m| m.inner.len()).sum::<usize>();
    let mut out = Vec::with_capacity(records * shared::RECORD_BYTES);
    let mut value = Vec::new();
    for single in &singles {
        let experiment_key = single.1.to_str()?;
        let a = assignment_of(single);
        shared::push_record(&mut out, &mut value, key_prefix, &a, experiment_key);
    }
    let made: Vec<&Made> = made.iter().map(|m| &*m.inner).collect();
    let out = py.allow_threads(move || {
        for m in made {
            m.shared_records(&mut out, key_prefix, |handle| {
                names.get(&handle).map_or("", String::as_str)
            });
        }
        out
    });
    Ok(PyBytes::new(py, &out))
}

/// `texts`, each preceded by its length (4 bytes, big-endian), as `shared_records` frames.
#[pyfunction]
pub(crate) fn framed<'py>(py: Python<'py>, texts: Vec<PyBackedStr>) -> Bound<'py, PyBytes> {
    let mut out = Vec::with_capacity(texts.iter().map(|t| t.len() + 4).sum());
    for text in &texts {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    PyBytes::new(py, &out)
}

/// The sticky claims of `made`'s assignments of the experiments `sticky_keys` names (handle ->
/// key of its hash of sticky assignments): each that key, the user id and the record's value,
/// framed as `shared_records` frames (see `allocsvc_core::shared`), written without the GIL;
/// and the positions in `made` of the claimed assignments, in order.
#[pyfunction]
pub(crate) fn sticky_claims<'py>(
    py: Python<'py>,
    made: PyRef<'py, PyMade>,
    sticky_keys: HashMap<u64, String>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>)> {
    let names = experiment_keys(py, std::slice::from_ref(&made))?;
    let inner = &*made.inner;
    let (out, claimed) = py.allow_threads(|| {
        let mut out = Vec::with_capacity(inner.len() * shared::RECORD_BYTES);
        let claimed = inner.sticky_claims(
            &mut out,
            |handle| sticky_keys.get(&handle).map(String::as_str),
            |handle| names.get(&handle).map_or("", String::as_str),
        );
        (out, claimed)
    });
    Ok((PyBytes::new(py, &out), claimed))
}

/// A block of these assignments (`copy_assignments`' arguments, in the same order) as stored:
/// its compressed compact stream (see `allocsvc_core::compact`; `decompress_block` gives the
/// COPY stream `copy_assignments` would) and its filter (see `allocsvc_core::filter`: their
/// (experiment, user) pairs and ids, a batch's ids as ranges); those of `made` without the GIL.
#[pyfunction]
#[pyo3(signature = (made, singles=None))]
pub(crate) fn assignment_block<'py>(
    py: Python<'py>,
    made: Vec<PyRef<'py, PyMade>>,
    singles: Option<Vec<HeldIn<'py>>>,
) -> (Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
    let singles = singles.unwrap_or_default();
    let singles: Vec<Assignment<'_>> = singles.iter().map(assignment_of).collect();
    let made: Vec<&Made> = made.iter().map(|m| &*m.inner).collect();
    let keys = 2 * singles.len() + made.iter().map(|m| m.filter_keys()).sum::<usize>();
    let mut filter = Filter::for_keys(keys);
    let mut out = Vec::new();
    compact::start(&mut out);
    if !singles.is_empty() {
        compact::write_rows(&mut out, &singles);
        for a in &singles {
            filter.insert_assignment(&a.id, a.handle, a.user_id);
        }
    }
    let (payload, filter) = py.allow_threads(move || {
        for m in made {
            m.compact_into_filter(&mut out, &mut filter);
        }
        compact::end(&mut out);
        (lz4_flex::compress_prepend_size(&out), filter.into_bytes())
    });
    (PyBytes::new(py, &payload), PyBytes::new(py, &filter))
}

/// Whether a block's `filter` may hold an assignment of (`handle`, `user_id`); an empty filter
/// (a block stored without one) may hold anything.
#[pyfunction]
pub(crate) fn filter_may_hold_user(filter: &[u8], handle: u64, user_id: &str) -> bool {
    filter::may_hold(filter, filter::user_key(handle, user_id))
}

/// Whether a block's `filter` may hold assignment `id`; an empty filter may hold anything.
#[pyfunction]
pub(crate) fn filter_may_hold_id(filter: &[u8], id: &str) -> bool {
    filter::may_hold_id(filter, &filter::IdProbe::new(id))
}

/// Positions in `filters` of the blocks' filters that may hold an assignment of `handle` and
/// one of `user_ids` (an empty filter may hold anything): a lookup's pass over every block in
/// one call, each user hashed once.
#[pyfunction]
pub(crate) fn filters_may_hold_users(
    filters: Vec<PyBackedBytes>,
    handle: u64,
    user_ids: Vec<PyBackedStr>,
) -> Vec<usize> {
    let keys: Vec<u64> = user_ids
        .iter()
        .map(|u| filter::user_key(handle, u))
        .collect();
    filter::holding_any(&filters, &keys)
}

/// Positions in `filters` of the blocks' filters that may hold one of the assignments `ids`
/// (an empty filter may hold anything).
#[pyfunction]
pub(crate) fn filters_may_hold_ids(
    filters: Vec<PyBackedBytes>,
    ids: Vec<PyBackedStr>,
) -> Vec<usize> {
    let probes: Vec<filter::IdProbe> = ids.iter().map(|i| filter::IdProbe::new(i)).collect();
    filter::holding_any_id(&filters, &probes)
}

/// A block's payload decompressed: a compact stream (as `assignment_block` builds blocks
/// since 2026-11-26, see `allocsvc_core::compact`) or a binary COPY stream (blocks of
/// `copy_assignments(..., compressed=True)`, as stored before), which
/// `allocsvc_core::block::each_row` both read.
fn decompressed(data: &[u8]) -> Result<Vec<u8>, String> {
    let out = lz4_flex::decompress_size_prepended(data).map_err(|e| e.to_string())?;
    // A block cut short can still decode, to fewer bytes than its length in front says.
    let declared = data
        .get(..4)
        .map(|n| u32::from_le_bytes([n[0], n[1], n[2], n[3]]));
    match declared {
        Some(n) if n as usize == out.len() => Ok(out),
        _ => Err(format!(
            "{} bytes decoded, {declared:?} declared",
            out.len()
        )),
    }
}

fn not_a_block(e: String) -> PyErr {
    PyValueError::new_err(format!("not an assignment block: {e}"))
}

/// The binary COPY stream of a stored block's rows (a compact block's made from its columns),
/// without the GIL.
#[pyfunction]
pub(crate) fn decompress_block<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let out = py
        .allow_threads(|| {
            let payload = decompressed(data)?;
            if !payload.starts_with(compact::MAGIC) {
                return Ok(payload);
            }
            compact::to_copy_stream(&payload).map_err(|e| e.to_string())
        })
        .map_err(not_a_block)?;
    Ok(PyBytes::new(py, &out))
}

/// A row of a block as `block_rows_of_users` gives it: (id, handle, user id, variant, segment
/// key, segment hash, cascade level, propensity, created ms or None).
type BlockTuple = (String, u64, String, i16, String, u64, i16, f64, Option<i64>);

/// The rows of a compressed block that are `wanted`, decompressed and read without the GIL.
fn rows_of(py: Python<'_>, data: &[u8], wanted: block::Wanted<'_>) -> PyResult<Vec<BlockTuple>> {
    py.allow_threads(|| {
        let payload = decompressed(data)?;
        let mut rows = Vec::new();
        block::each_row(&payload, wanted, |r| {
            rows.push((
                r.id.to_owned(),
                r.handle,
                r.user_id.to_owned(),
                r.variant,
                r.segment_key.to_owned(),
                r.segment_hash,
                r.level,
                r.propensity,
                r.created_ms,
            ))
        })
        .map_err(|e| e.to_string())?;
        Ok(rows)
    })
    .map_err(not_a_block)
}

/// The rows in experiment `handle` of `user_ids` in a compressed block, in the block's order.
#[pyfunction]
pub(crate) fn block_rows_of_users(
    py: Python<'_>,
    data: &[u8],
    handle: u64,
    user_ids: Vec<PyBackedStr>,
) -> PyResult<Vec<BlockTuple>> {
    let user_ids: HashSet<&str> = user_ids.iter().map(|u| &**u).collect();
    rows_of(
        py,
        data,
        block::Wanted::Users {
            handle,
            user_ids: &user_ids,
        },
    )
}

/// The rows with one of the assignment ids `ids` in a compressed block, in the block's order.
#[pyfunction]
pub(crate) fn block_rows_of_ids(
    py: Python<'_>,
    data: &[u8],
    ids: Vec<PyBackedStr>,
) -> PyResult<Vec<BlockTuple>> {
    let ids: HashSet<&str> = ids.iter().map(|i| &**i).collect();
    rows_of(py, data, block::Wanted::Ids(&ids))
}
