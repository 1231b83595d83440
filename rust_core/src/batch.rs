//! `AllocateBatch` from request bytes to response bytes: decode, check, extract the context,
//! decide (through [`Engine::decide_into`], in request order) and encode, with no Python per item.
//!
//! Two steps, so that the caller can add what only it knows in between:
//! [`Catalogue::prepare`] decodes and checks every item and lists what the caller must answer
//! (device classes of new user agents, earlier sticky assignments, the errors of bad items);
//! [`PreparedBatch::finish`] decides the rest and encodes the response.
//!
//! An item costs no heap allocation of its own: text is borrowed from the request while it is
//! decoded, user ids go into one buffer of the batch, a run of items with the same raw context
//! shares one extraction (and one device lookup), the items of one experiment share one lookup,
//! and the response and assignment ids are written into reused buffers.

use crate::context::{self, Clock, ContextLimits, Device, Extracted};
use crate::decide::{Decision, Engine};
use crate::error::CoreError;
use crate::held::{spread, write_own_id, Made};
use crate::keyed::KeyedMap;
use crate::wire::{self, Reader, Value};
use hashbrown::HashTable;
use parking_lot::RwLock;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A variant as the response names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantInfo {
    pub id: String,
    pub name: String,
    pub payload_json: String,
}

/// What the batch path needs to know of an experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExperimentInfo {
    pub key: String,
    pub handle: u64,
    pub running: bool,
    pub sticky: bool,
    /// Segment values come from the caller (learned clusters): items go the caller's way.
    pub caller_segments: bool,
    pub dimensions: Vec<String>,
    pub variants: Vec<VariantInfo>,
}

impl ExperimentInfo {
    /// Items of this experiment go the caller's way (segment values only it knows).
    fn needs_caller(&self) -> bool {
        self.caller_segments || !self.dimensions.iter().all(|d| context::is_dimension(d))
    }
}

/// Request limits the item checks apply (the server's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLimits {
    pub context: ContextLimits,
    pub max_user_id_chars: usize,
    /// Most user agents whose device class is remembered.
    pub device_cache_size: usize,
}

/// Experiments by id and device classes by user agent, shared by every batch.
pub struct Catalogue {
    experiments: RwLock<KeyedMap<String, Arc<ExperimentInfo>>>,
    devices: RwLock<KeyedMap<String, &'static str>>,
    limits: BatchLimits,
}

/// One decoded `AllocateRequest`, its text borrowed from the request bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest<'a> {
    pub experiment_id: &'a str,
    pub user_id: &'a str,
    pub channel: &'a str,
    pub context: Vec<(&'a str, &'a str)>,
    pub signals: Vec<(&'a str, f64)>,
    pub timestamp_ms: i64,
}

/// An allocation the caller made (earlier sticky assignment, or an item it allocated itself).
#[derive(Debug, Clone, PartialEq)]
pub struct GivenAllocation {
    pub assignment_id: String,
    pub variant: usize,
    pub segment_key: String,
    pub level: usize,
    pub propensity: f64,
    pub sticky: bool,
}

/// The failure of one item, as `ItemError` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub code: u32,
    pub message: String,
    pub field: String,
}

#[derive(Debug, Clone, Copy)]
enum Item {
    /// Breaks a rule: the caller words the error (or allocates it, if it disagrees).
    Invalid,
    /// Indexes into the batch's experiments and contexts, and where its user id is in the
    /// batch's user id buffer.
    Ready {
        experiment: usize,
        context: usize,
        user: (usize, usize),
    },
}

/// A decoded and checked batch, waiting for [`PreparedBatch::finish`].
pub struct PreparedBatch {
    items: Vec<Item>,
    /// The experiments of ready items: one entry per run of items naming the same one.
    experiments: Vec<Arc<ExperimentInfo>>,
    /// The contexts of ready items: one per run of items with the same raw context and clock.
    contexts: Vec<Extracted>,
    /// The user ids of ready items, one after another.
    users: String,
    /// An item the batch path does not handle: the caller should take the whole batch.
    pub needs_caller: bool,
}

/// One item as learning keeps it (`RawFeatures`, and the user).
#[derive(Debug, Clone, PartialEq)]
pub struct Features<'a> {
    pub user_id: &'a str,
    pub channel: &'static str,
    pub device: &'static str,
    pub source: &'a str,
    pub hour: usize,
    pub day_of_week: usize,
    /// `context::LEARNED_SIGNALS`.
    pub signals: [Option<f64>; 4],
}

impl<'a> Features<'a> {
    /// What learning keeps of `user_id`'s request `context`, its user agent classed in `known`
    /// (an error when it is not).
    fn of(
        user_id: &'a str,
        context: &'a Extracted,
        known: &KeyedMap<String, &'static str>,
    ) -> Result<Self, CoreError> {
        Ok(Self::classed(
            user_id,
            context,
            resolved(context, class_of(context, known))?,
        ))
    }

    /// The same, its device class `device` known.
    fn classed(user_id: &'a str, context: &'a Extracted, device: &'static str) -> Self {
        Features {
            user_id,
            channel: context.channel,
            device,
            source: &context.source,
            hour: context.hour,
            day_of_week: context.day_of_week,
            signals: context.learned,
        }
    }
}

/// The encoded `AllocateBatchResponse` and the new assignments in it (in request order, for
/// the caller to hold and write behind).
pub struct BatchOutput {
    pub response: Vec<u8>,
    pub made: Made,
    /// The item each new assignment answers (`made`'s order).
    pub positions: Vec<usize>,
}

/// The answer of new assignment `k` of `made` under `assignment_id`.
fn made_answer<'b>(
    made: &'b Made,
    k: usize,
    assignment_id: &'b str,
    experiment: &'b ExperimentInfo,
    sticky: bool,
) -> Answer<'b> {
    Answer {
        assignment_id,
        experiment,
        variant: made.variant(k),
        segment_key: made.segment_key(k),
        level: made.level(k),
        propensity: made.propensity(k),
        sticky,
    }
}

fn decode_map(bytes: &[u8]) -> Result<(&str, Value<'_>), CoreError> {
    let mut key = "";
    let mut value = Value::Bytes(b"");
    let mut r = Reader::new(bytes);
    while let Some((n, v)) = r.next_field()? {
        match (n, v) {
            (1, Value::Bytes(b)) => key = wire::text_ref(b)?,
            (2, v) => value = v,
            _ => {}
        }
    }
    Ok((key, value))
}

/// Later entries of a map win, as in every protobuf parser.
fn keep_last<T>(entries: &mut Vec<(&str, T)>) {
    let n = entries.len();
    // Small maps (the usual context): a pairwise check costs less than hashing.
    if n <= 16 && (1..n).all(|i| entries[..i].iter().all(|(k, _)| *k != entries[i].0)) {
        return;
    }
    if n > 1 {
        let mut seen = HashSet::with_capacity(n);
        let mut kept = Vec::with_capacity(n);
        for (k, v) in entries.drain(..).rev() {
            if seen.insert(k) {
                kept.push((k, v));
            }
        }
        kept.reverse();
        *entries = kept;
    }
}

/// The fields of one `AllocateRequest` as found on the wire, before its channel and map
/// entries are decoded: a batch's items mostly repeat the previous item's, byte for byte.
#[derive(Default)]
struct Fields<'a> {
    experiment_id: &'a str,
    user_id: &'a str,
    channel: &'a [u8],
    /// Entries of the `context` map, in order.
    context: Vec<&'a [u8]>,
    /// Entries of the `signals` map, in order.
    signals: Vec<&'a [u8]>,
    timestamp_ms: i64,
    /// The bytes of the channel and map fields when no other field comes between them (as
    /// protobuf writers order fields by number), else None.
    context_bytes: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    /// Read the fields of one `AllocateRequest` into `self`, reusing its buffers.
    fn read(&mut self, bytes: &'a [u8]) -> Result<(), CoreError> {
        self.experiment_id = "";
        self.user_id = "";
        self.channel = b"";
        self.context.clear();
        self.signals.clear();
        self.timestamp_ms = 0;
        // The span of fields 3-5 so far, and whether another field came after it.
        let mut span: Option<(usize, usize)> = None;
        let mut contiguous = true;
        let mut r = Reader::new(bytes);
        loop {
            let start = r.position();
            let Some((n, v)) = r.next_field()? else {
                break;
            };
            let context_field = matches!(n, 3..=5);
            match (n, v) {
                (1, Value::Bytes(b)) => self.experiment_id = wire::text_ref(b)?,
                (2, Value::Bytes(b)) => self.user_id = wire::text_ref(b)?,
                (3, Value::Bytes(b)) => self.channel = b,
                (4, Value::Bytes(b)) => self.context.push(b),
                (5, Value::Bytes(b)) => self.signals.push(b),
                (6, Value::Varint(x)) => self.timestamp_ms = x as i64,
                _ => {}
            }
            match (&mut span, context_field) {
                (None, true) => span = Some((start, r.position())),
                (Some((_, end)), true) => {
                    contiguous &= *end == start;
                    *end = r.position();
                }
                _ => {}
            }
        }
        self.context_bytes = match span {
            Some((start, end)) if contiguous => Some(&bytes[start..end]),
            Some(_) => None,
            None => Some(b""),
        };
        Ok(())
    }

    /// Same channel and map entries, byte for byte: the same decoded context and signals.
    fn same_context(&self, other: &Fields<'_>) -> bool {
        match (self.context_bytes, other.context_bytes) {
            // The same fields 3-5 in the same order (one comparison for all of them).
            (Some(a), Some(b)) => a == b,
            _ => {
                self.channel == other.channel
                    && self.context == other.context
                    && self.signals == other.signals
            }
        }
    }

    /// Decode the channel and map entries into `out` (its experiment, user and timestamp too),
    /// reusing its buffers.
    fn decode_into(&self, out: &mut RawRequest<'a>) -> Result<(), CoreError> {
        out.experiment_id = self.experiment_id;
        out.user_id = self.user_id;
        out.channel = wire::text_ref(self.channel)?;
        out.timestamp_ms = self.timestamp_ms;
        out.context.clear();
        out.signals.clear();
        for entry in &self.context {
            let (k, v) = decode_map(entry)?;
            let v = match v {
                Value::Bytes(s) => wire::text_ref(s)?,
                _ => "",
            };
            out.context.push((k, v));
        }
        for entry in &self.signals {
            let (k, v) = decode_map(entry)?;
            let x = match v {
                Value::Fixed64(bits) => f64::from_bits(bits),
                _ => 0.0,
            };
            out.signals.push((k, x));
        }
        keep_last(&mut out.context);
        keep_last(&mut out.signals);
        Ok(())
    }
}

/// Decode one `AllocateRequest`.
pub fn decode_request(bytes: &[u8]) -> Result<RawRequest<'_>, CoreError> {
    let mut fields = Fields::default();
    fields.read(bytes)?;
    let mut out = RawRequest::default();
    fields.decode_into(&mut out)?;
    Ok(out)
}

/// Decode an `AllocateBatchRequest` into its items.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RawRequest<'_>>, CoreError> {
    let mut items = Vec::new();
    let mut r = Reader::new(bytes);
    while let Some((n, v)) = r.next_field()? {
        if let (1, Value::Bytes(b)) = (n, v) {
            items.push(decode_request(b)?);
        }
    }
    Ok(items)
}

/// The serialized items at `positions` of an `AllocateBatchRequest`, without decoding the
/// others (positions past the end are skipped); read up to the last position only.
pub fn batch_items<'a>(bytes: &'a [u8], positions: &[usize]) -> Result<Vec<&'a [u8]>, CoreError> {
    let Some(&last) = positions.iter().max() else {
        return Ok(Vec::new());
    };
    let mut items = Vec::new();
    let mut r = Reader::new(bytes);
    while items.len() <= last {
        let Some((n, v)) = r.next_field()? else {
            break;
        };
        if let (1, Value::Bytes(b)) = (n, v) {
            items.push(b);
        }
    }
    Ok(positions
        .iter()
        .filter_map(|&i| items.get(i).copied())
        .collect())
}

impl Catalogue {
    pub fn new(limits: BatchLimits) -> Self {
        Catalogue {
            experiments: RwLock::new(KeyedMap::default()),
            devices: RwLock::new(KeyedMap::default()),
            limits,
        }
    }

    /// Add or replace an experiment (by its id).
    pub fn put(&self, info: ExperimentInfo) {
        self.experiments
            .write()
            .insert(info.key.clone(), Arc::new(info));
    }

    pub fn remove(&self, key: &str) {
        self.experiments.write().remove(key);
    }

    /// Remember device classes of user agents ("mobile", "desktop", "tablet" or "unknown").
    /// A call's agents are kept together (the batch that named them needs them all): a cache
    /// without room for them is emptied first, never in the middle of a call.
    pub fn learn_devices<S: AsRef<str>>(&self, pairs: &[(S, S)]) -> Result<(), CoreError> {
        let classes = pairs
            .iter()
            .map(|(_, class)| device_class(class.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if self.limits.device_cache_size == 0 {
            return Ok(());
        }
        let mut devices = self.devices.write();
        if devices.len() + pairs.len() > self.limits.device_cache_size {
            devices.clear();
        }
        for ((ua, _), class) in pairs.iter().zip(classes) {
            devices.insert(ua.as_ref().to_string(), class);
        }
        Ok(())
    }

    /// The running experiment named `key`.
    fn running(&self, key: &str) -> Option<Arc<ExperimentInfo>> {
        self.experiments
            .read()
            .get(key)
            .filter(|e| e.running)
            .cloned()
    }

    fn user_ok(&self, user: &str) -> bool {
        // A string of at most n bytes has at most n characters: count them only when longer.
        let max = self.limits.max_user_id_chars;
        !user.is_empty()
            && (user.len() <= max || user.chars().count() <= max)
            && !user.contains('\0')
    }

    /// Decode and check a batch. (Under shared state, the caller claims the new assignments
    /// of sticky experiments: see [`PreparedBatch::finish`]'s `record`.)
    pub fn prepare(&self, request: &[u8], now_ms: i64) -> Result<PreparedBatch, CoreError> {
        let mut batch = PreparedBatch {
            items: Vec::new(),
            experiments: Vec::new(),
            contexts: Vec::new(),
            users: String::new(),
            needs_caller: false,
        };
        // Whether the items of `batch.experiments[i]` need the caller.
        let mut experiment_needs_caller: Vec<bool> = Vec::new();
        let mut fields = Fields::default();
        // The last item whose channel and map entries were decoded (into `raw`), and its
        // extraction: the clock, and an index into `batch.contexts` (None: breaks a rule).
        let mut decoded = Fields::default();
        let mut raw = RawRequest::default();
        let mut extraction: Option<(Clock, Option<usize>)> = None;
        let mut any_decoded = false;
        let mut r = Reader::new(request);
        while let Some((n, v)) = r.next_field()? {
            let (1, Value::Bytes(b)) = (n, v) else {
                continue;
            };
            fields.read(b)?;
            // Every item is decoded (a malformed one fails the batch), but an item whose
            // channel and map entries repeat the last decoded item's bytes decodes the same.
            if !any_decoded || !fields.same_context(&decoded) {
                fields.decode_into(&mut raw)?;
                std::mem::swap(&mut fields, &mut decoded);
                extraction = None;
                any_decoded = true;
            } else {
                // Keep `decoded` (its entries are the same bytes); take this item's ids.
                decoded.experiment_id = fields.experiment_id;
                decoded.user_id = fields.user_id;
                decoded.timestamp_ms = fields.timestamp_ms;
            }
            let item = &decoded;
            // Batches mostly name one experiment: reuse the previous item's lookup.
            let experiment = match batch.experiments.last() {
                Some(e) if e.key == item.experiment_id => batch.experiments.len() - 1,
                _ => match self.running(item.experiment_id) {
                    Some(e) => {
                        experiment_needs_caller.push(e.needs_caller());
                        batch.experiments.push(e);
                        batch.experiments.len() - 1
                    }
                    None => {
                        batch.items.push(Item::Invalid);
                        continue;
                    }
                },
            };
            let clock = context::clock(item.timestamp_ms, now_ms);
            let (true, Some(clock)) = (self.user_ok(item.user_id), clock) else {
                batch.items.push(Item::Invalid);
                continue;
            };
            let context = match extraction {
                Some((c, context)) if c == clock => context,
                _ => {
                    let context = context::extract_at(
                        raw.channel,
                        &raw.context,
                        &raw.signals,
                        clock,
                        &self.limits.context,
                    )
                    .map(|c| {
                        batch.contexts.push(c);
                        batch.contexts.len() - 1
                    });
                    extraction = Some((clock, context));
                    context
                }
            };
            let Some(context) = context else {
                batch.items.push(Item::Invalid);
                continue;
            };
            let start = batch.users.len();
            batch.users.push_str(item.user_id);
            batch.needs_caller |= experiment_needs_caller[experiment];
            batch.items.push(Item::Ready {
                experiment,
                context,
                user: (start, batch.users.len()),
            });
        }
        Ok(batch)
    }

    fn device_of(&self, ua: &str) -> Option<&'static str> {
        self.devices.read().get(ua).copied()
    }

    /// Decode and check one `AllocateRequest` (unary Allocate), as an item of a batch.
    pub fn check_one(&self, request: &[u8], now_ms: i64) -> OneChecked {
        let Ok(raw) = decode_request(request) else {
            return OneChecked::Caller;
        };
        let Some(experiment) = self.running(raw.experiment_id) else {
            return OneChecked::Caller;
        };
        if !self.user_ok(raw.user_id) {
            return OneChecked::Caller;
        }
        let Some(context) = context::extract(
            raw.channel,
            &raw.context,
            &raw.signals,
            raw.timestamp_ms,
            now_ms,
            &self.limits.context,
        ) else {
            return OneChecked::Caller;
        };
        if experiment.needs_caller() {
            return OneChecked::Caller;
        }
        // Looked up once: deciding and learning's features take the class from here.
        let device = match &context.device {
            Device::Known(d) => *d,
            Device::UserAgent(ua) => match self.device_of(ua) {
                Some(d) => d,
                None => return OneChecked::UnknownUserAgent(ua.clone()),
            },
        };
        OneChecked::Ready(Box::new(PreparedOne {
            experiment,
            user_id: raw.user_id.to_string(),
            context,
            device,
        }))
    }
}

/// What [`Catalogue::check_one`] found.
pub enum OneChecked {
    /// The caller's path must answer: a bad request (it words the error), or segments only
    /// the caller knows.
    Caller,
    /// The device class of this user agent is unknown: learn it and check again.
    UnknownUserAgent(String),
    Ready(Box<PreparedOne>),
}

/// A checked unary request: look the user up (sticky experiments), then decide or answer.
pub struct PreparedOne {
    experiment: Arc<ExperimentInfo>,
    user_id: String,
    context: Extracted,
    /// The device class of `context`, given or learned for its user agent.
    device: &'static str,
}

/// A unary decision: the encoded `AllocateResponse` and what to keep of the new assignment.
pub struct DecidedOne {
    pub response: Vec<u8>,
    pub variant: usize,
    pub segment_key: String,
    pub level: usize,
    pub propensity: f64,
}

impl PreparedOne {
    pub fn handle(&self) -> u64 {
        self.experiment.handle
    }

    pub fn sticky(&self) -> bool {
        self.experiment.sticky
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// What learning keeps of this request, as [`PreparedBatch::features`] gives a batch
    /// item's.
    pub fn features(&self) -> Features<'_> {
        Features::classed(&self.user_id, &self.context, self.device)
    }

    /// The response for an earlier assignment of this user (answered as sticky).
    pub fn answer(&self, given: &GivenAllocation, region: &str) -> Result<Vec<u8>, CoreError> {
        let experiment = &self.experiment;
        check_variant(experiment, given.variant)?;
        let mut out = Vec::with_capacity(256);
        encode_response(
            &mut out,
            &Answer::given(given, experiment, given.sticky),
            region,
        );
        Ok(out)
    }

    /// Decide (counting the allocation) exactly as a batch item is decided, and encode the
    /// answer under `assignment_id`.
    pub fn decide(
        &self,
        engine: &Engine,
        region: &str,
        assignment_id: &str,
    ) -> Result<DecidedOne, CoreError> {
        let mut values = Vec::with_capacity(self.experiment.dimensions.len());
        segment_values(&self.experiment, &self.context, self.device, &mut values);
        let d = engine.decide(self.experiment.handle, &self.user_id, &values, true)?;
        let mut response = Vec::with_capacity(256);
        encode_response(
            &mut response,
            &Answer::decided(assignment_id, &self.experiment, &d),
            region,
        );
        Ok(DecidedOne {
            response,
            variant: d.variant,
            segment_key: d.segment_key,
            level: d.level,
            propensity: d.propensity,
        })
    }
}

/// The device class of a context: given, or its user agent's in `known` (None: not learned).
fn class_of(context: &Extracted, known: &KeyedMap<String, &'static str>) -> Option<&'static str> {
    match &context.device {
        Device::Known(d) => Some(*d),
        Device::UserAgent(ua) => known.get(ua.as_str()).copied(),
    }
}

/// The device class of a context, once looked up (`device`): an error when its user agent has
/// none yet.
fn resolved(context: &Extracted, device: Option<&'static str>) -> Result<&'static str, CoreError> {
    device.ok_or_else(|| match &context.device {
        Device::UserAgent(ua) => {
            CoreError::invalid(format!("devices: no class for user agent {ua:?}"))
        }
        Device::Known(d) => CoreError::invalid(format!("devices: no class {d:?}")),
    })
}

/// The experiment's segment values in `context` (cleared first), its device class `device`.
fn segment_values<'a>(
    experiment: &ExperimentInfo,
    context: &'a Extracted,
    device: &'a str,
    values: &mut Vec<&'a str>,
) {
    values.clear();
    values.extend(
        experiment
            .dimensions
            .iter()
            .map(|d| context.dimension(d, device)),
    );
}

fn device_class(name: &str) -> Result<&'static str, CoreError> {
    ["mobile", "desktop", "tablet", context::UNKNOWN]
        .into_iter()
        .find(|c| *c == name)
        .ok_or_else(|| CoreError::invalid(format!("device: {name:?} is not a device class")))
}

/// Fields of one `AllocateResponse`.
struct Answer<'a> {
    assignment_id: &'a str,
    experiment: &'a ExperimentInfo,
    variant: usize,
    segment_key: &'a str,
    level: usize,
    propensity: f64,
    sticky: bool,
}

impl<'a> Answer<'a> {
    /// The answer of a new decision.
    fn decided(assignment_id: &'a str, experiment: &'a ExperimentInfo, d: &'a Decision) -> Self {
        Answer {
            assignment_id,
            experiment,
            variant: d.variant,
            segment_key: &d.segment_key,
            level: d.level,
            propensity: d.propensity,
            sticky: false,
        }
    }

    /// The answer of an allocation the caller made.
    fn given(g: &'a GivenAllocation, experiment: &'a ExperimentInfo, sticky: bool) -> Self {
        Answer {
            assignment_id: &g.assignment_id,
            experiment,
            variant: g.variant,
            segment_key: &g.segment_key,
            level: g.level,
            propensity: g.propensity,
            sticky,
        }
    }
}

/// A bare `AllocateResponse` (appended to `out`).
fn encode_response(out: &mut Vec<u8>, a: &Answer<'_>, region: &str) {
    let v = &a.experiment.variants[a.variant];
    wire::put_str(out, 1, a.assignment_id);
    wire::put_str(out, 2, &a.experiment.key);
    wire::put_str(out, 3, &v.id);
    wire::put_str(out, 4, &v.name);
    wire::put_str(out, 5, &v.payload_json);
    wire::put_str(out, 6, a.segment_key);
    wire::put_uint(out, 7, a.level as u64);
    wire::put_double(out, 8, a.propensity);
    wire::put_uint(out, 9, u64::from(a.sticky));
    wire::put_str(out, 10, region);
}

/// The tag of field 1, length-delimited: one byte.
const RESULT_TAG_LEN: usize = 1;

/// Writes a batch's `AllocateResult`s. What repeats is encoded once: the experiment and variant
/// fields (2-5) of each experiment's variants, and the region (10).
struct ResultEncoder {
    region: Vec<u8>,
    /// By experiment (an index into the batch's experiments), then variant; empty until used.
    fixed: Vec<Vec<Vec<u8>>>,
}

impl ResultEncoder {
    fn new(region: &str, experiments: usize) -> Self {
        let mut encoded = Vec::new();
        wire::put_str(&mut encoded, 10, region);
        ResultEncoder {
            region: encoded,
            fixed: vec![Vec::new(); experiments],
        }
    }

    /// Append `AllocateResult { allocation = a }` (`a` of experiment number `e`), the same
    /// bytes as [`encode_response`] nested twice.
    fn allocation(&mut self, out: &mut Vec<u8>, e: usize, a: &Answer<'_>) {
        let fixed = &mut self.fixed[e];
        if fixed.is_empty() {
            *fixed = a
                .experiment
                .variants
                .iter()
                .map(|v| {
                    let mut b = Vec::new();
                    wire::put_str(&mut b, 2, &a.experiment.key);
                    wire::put_str(&mut b, 3, &v.id);
                    wire::put_str(&mut b, 4, &v.name);
                    wire::put_str(&mut b, 5, &v.payload_json);
                    b
                })
                .collect();
        }
        let fixed = &fixed[a.variant];
        let n = wire::str_len(1, a.assignment_id)
            + fixed.len()
            + wire::str_len(6, a.segment_key)
            + wire::uint_len(7, a.level as u64)
            + wire::double_len(8, a.propensity)
            + wire::uint_len(9, u64::from(a.sticky))
            + self.region.len();
        wire::put_tag(out, 1, wire::LEN);
        wire::put_varint(
            out,
            (RESULT_TAG_LEN + wire::varint_len(n as u64) + n) as u64,
        );
        wire::put_tag(out, 1, wire::LEN);
        wire::put_varint(out, n as u64);
        wire::put_str(out, 1, a.assignment_id);
        out.extend_from_slice(fixed);
        wire::put_str(out, 6, a.segment_key);
        wire::put_uint(out, 7, a.level as u64);
        wire::put_double(out, 8, a.propensity);
        wire::put_uint(out, 9, u64::from(a.sticky));
        out.extend_from_slice(&self.region);
    }
}

fn encode_error(out: &mut Vec<u8>, scratch: &mut Vec<u8>, e: &ItemError) {
    scratch.clear();
    wire::put_uint(scratch, 1, u64::from(e.code));
    wire::put_str(scratch, 2, &e.message);
    wire::put_str(scratch, 3, &e.field);
    let mut result = Vec::with_capacity(scratch.len() + 8);
    wire::put_bytes(&mut result, 2, scratch);
    wire::put_bytes(out, 1, &result);
}

impl PreparedBatch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn user(&self, (start, end): (usize, usize)) -> &str {
        &self.users[start..end]
    }

    /// Positions of items that break a rule.
    pub fn invalid(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| matches!(self.items[i], Item::Invalid))
            .collect()
    }

    /// Distinct user agents whose device class the catalogue does not know yet, in the order
    /// items name them.
    pub fn unknown_user_agents(&self, catalogue: &Catalogue) -> Vec<String> {
        // Every context is a ready item's, and contexts are in item order.
        let devices = catalogue.devices.read();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for context in &self.contexts {
            if let Device::UserAgent(ua) = &context.device {
                if !devices.contains_key(ua) && seen.insert(ua.as_str()) {
                    out.push(ua.clone());
                }
            }
        }
        out
    }

    /// What learning keeps of the ready items at `positions` (others are skipped), once their
    /// user agents are classified (`learn_devices`): an error names one that is not.
    pub fn features(
        &self,
        catalogue: &Catalogue,
        positions: &[usize],
    ) -> Result<Vec<Features<'_>>, CoreError> {
        let devices = catalogue.devices.read();
        let mut out = Vec::with_capacity(positions.len());
        for &i in positions {
            let Some(&Item::Ready { context, user, .. }) = self.items.get(i) else {
                continue;
            };
            let context = &self.contexts[context];
            out.push(Features::of(self.user(user), context, &devices)?);
        }
        Ok(out)
    }

    /// (position, experiment handle, user id) of every item of a sticky experiment: the caller
    /// answers those users it has an assignment for.
    pub fn sticky_candidates(&self) -> (Vec<usize>, Vec<u64>, Vec<&str>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for (i, handle, user) in self.sticky_items() {
            out.0.push(i);
            out.1.push(handle);
            out.2.push(user);
        }
        out
    }

    /// Whether an item is of a sticky experiment (`sticky_candidates` is not empty).
    pub fn has_sticky(&self) -> bool {
        self.sticky_items().next().is_some()
    }

    /// (position, experiment handle, user id) of each ready item of a sticky experiment.
    fn sticky_items(&self) -> impl Iterator<Item = (usize, u64, &str)> + '_ {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match *item {
                Item::Ready {
                    experiment, user, ..
                } => {
                    let experiment = &self.experiments[experiment];
                    experiment
                        .sticky
                        .then(|| (i, experiment.handle, self.user(user)))
                }
                _ => None,
            })
    }

    /// Decide every item the caller did not answer, in request order, counting each decision
    /// unless not `record` (the caller claims them first, then counts those that stand: see
    /// [`Engine::record_made`]); a user seen twice in a sticky experiment gets the first answer
    /// again. Assignment ids are `{id_prefix}-{seq:x}` from `first_seq` on, one per new
    /// assignment, made at `created_ms`.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        engine: &Engine,
        catalogue: &Catalogue,
        region: &str,
        id_prefix: &str,
        first_seq: u64,
        created_ms: i64,
        given: &HashMap<usize, GivenAllocation>,
        errors: &HashMap<usize, ItemError>,
        record: bool,
    ) -> Result<BatchOutput, CoreError> {
        let mut positions = Vec::new();
        let mut response = Vec::with_capacity(self.items.len() * 128);
        let mut scratch = Vec::with_capacity(256);
        let mut encoder = ResultEncoder::new(region, self.experiments.len());
        let mut made = Made::new(id_prefix, created_ms);
        // (handle, user) -> given allocation or index into `made`, for repeated users of sticky
        // experiments.
        let mut repeats: HashTable<Repeat<'_>> = HashTable::new();
        if self.experiments.iter().any(|e| e.sticky) {
            repeats.reserve(self.items.len(), |r| r.hash);
        }
        // Device classes of the contexts (None: a user agent not learned), looked up once.
        let devices: Vec<Option<&'static str>> = {
            let known = catalogue.devices.read();
            self.contexts.iter().map(|c| class_of(c, &known)).collect()
        };
        // Segment values of (experiment, context), kept while items repeat them.
        let mut values: Vec<&str> = Vec::with_capacity(8);
        let mut values_of: Option<(usize, usize)> = None;
        let mut key = String::new();
        let mut id = String::new();
        let write_id =
            |id: &mut String, k: usize| write_own_id(id, id_prefix, first_seq + k as u64);
        for (i, item) in self.items.iter().enumerate() {
            if let Some(e) = errors.get(&i) {
                encode_error(&mut response, &mut scratch, e);
                continue;
            }
            let Item::Ready {
                experiment: e,
                context: c,
                user,
            } = *item
            else {
                return Err(CoreError::invalid(format!(
                    "errors: item {i} is invalid and has no error"
                )));
            };
            let experiment = &*self.experiments[e];
            let user_id = self.user(user);
            let handle = experiment.handle;
            let hash = if experiment.sticky {
                repeat_hash(handle, user_id)
            } else {
                0
            };
            let earlier = if experiment.sticky {
                repeats
                    .find(hash, |r| r.handle == handle && r.user == user_id)
                    .map(|r| r.earlier)
            } else {
                None
            };
            let mut remember = |earlier| {
                let r = Repeat {
                    hash,
                    handle,
                    user: user_id,
                    earlier,
                };
                repeats.insert_unique(hash, r, |r| r.hash);
            };
            if let Some(g) = given.get(&i) {
                check_variant(experiment, g.variant)?;
                encoder.allocation(&mut response, e, &Answer::given(g, experiment, g.sticky));
                if experiment.sticky && earlier.is_none() {
                    remember(Ok(g));
                }
                continue;
            }
            match earlier {
                Some(Ok(g)) => {
                    encoder.allocation(&mut response, e, &Answer::given(g, experiment, true))
                }
                Some(Err(k)) => {
                    write_id(&mut id, k);
                    encoder.allocation(
                        &mut response,
                        e,
                        &made_answer(&made, k, &id, experiment, true),
                    );
                }
                None => {
                    if values_of != Some((e, c)) {
                        let context = &self.contexts[c];
                        let device = resolved(context, devices[c])?;
                        segment_values(experiment, context, device, &mut values);
                        values_of = Some((e, c));
                    }
                    let (variant, level, propensity) = engine.decide_into(
                        experiment.handle,
                        user_id,
                        &values,
                        record,
                        &mut key,
                    )?;
                    let k = made.len();
                    positions.push(i);
                    made.push(
                        first_seq + k as u64,
                        experiment.handle,
                        user_id,
                        variant,
                        &key,
                        level,
                        propensity,
                    );
                    write_id(&mut id, k);
                    encoder.allocation(
                        &mut response,
                        e,
                        &made_answer(&made, k, &id, experiment, false),
                    );
                    if experiment.sticky {
                        remember(Err(k));
                    }
                }
            }
        }
        Ok(BatchOutput {
            response,
            made,
            positions,
        })
    }
}

/// The first answer of a (handle, user) of a sticky experiment in a batch: an allocation the
/// caller gave, or an index into the batch's new assignments.
struct Repeat<'a> {
    hash: u64,
    handle: u64,
    user: &'a str,
    earlier: Result<&'a GivenAllocation, usize>,
}

/// The hash of a (handle, user) among a batch's repeats: xxh3 keyed per process (user ids come
/// from callers), once per item.
fn repeat_hash(handle: u64, user: &str) -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(rand::random);
    xxh3_64_with_seed(user.as_bytes(), seed ^ spread(handle))
}

fn check_variant(experiment: &ExperimentInfo, variant: usize) -> Result<(), CoreError> {
    if variant >= experiment.variants.len() {
        return Err(CoreError::invalid(format!(
            "variant: {variant} is outside 0..{} of experiment {:?}",
            experiment.variants.len(),
            experiment.key
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beta::seed_thread_rng;
    use crate::decide::ExperimentConfig;
    use crate::held::push_hex;

    fn request(exp: &str, user: &str, ctx: &[(&str, &str)]) -> Vec<u8> {
        let mut m = Vec::new();
        wire::put_str(&mut m, 1, exp);
        wire::put_str(&mut m, 2, user);
        for (k, v) in ctx {
            let mut e = Vec::new();
            wire::put_str(&mut e, 1, k);
            wire::put_str(&mut e, 2, v);
            wire::put_bytes(&mut m, 4, &e);
        }
        wire::put_tag(&mut m, 6, wire::VARINT);
        wire::put_varint(&mut m, 1_700_000_000_000);
        m
    }

    fn batch(items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for i in items {
            wire::put_bytes(&mut out, 1, i);
        }
        out
    }

    fn setup(sticky: bool) -> (Engine, Catalogue) {
        let engine = Engine::new();
        engine
            .configure(
                5,
                ExperimentConfig {
                    salt: 1,
                    ..ExperimentConfig::thompson(2, &["source", "device"], vec![10, 10])
                },
            )
            .unwrap();
        let catalogue = Catalogue::new(BatchLimits {
            context: ContextLimits::default(),
            max_user_id_chars: 256,
            device_cache_size: 16,
        });
        catalogue.put(ExperimentInfo {
            key: "exp".into(),
            handle: 5,
            running: true,
            sticky,
            caller_segments: false,
            dimensions: vec!["source".into(), "device".into()],
            variants: ["A", "B"]
                .iter()
                .map(|v| VariantInfo {
                    id: v.to_string(),
                    name: v.to_lowercase(),
                    payload_json: String::new(),
                })
                .collect(),
        });
        (engine, catalogue)
    }

    fn results(response: &[u8]) -> Vec<(u32, Vec<(u32, String)>)> {
        let mut out = Vec::new();
        let mut r = Reader::new(response);
        while let Some((1, Value::Bytes(result))) = r.next_field().unwrap() {
            let (kind, body) = match Reader::new(result).next_field().unwrap() {
                Some((k, Value::Bytes(b))) => (k, b),
                other => panic!("{other:?}"),
            };
            let mut fields = Vec::new();
            let mut f = Reader::new(body);
            while let Some((n, v)) = f.next_field().unwrap() {
                let text = match v {
                    Value::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
                    Value::Varint(x) => x.to_string(),
                    Value::Fixed64(x) => f64::from_bits(x).to_string(),
                    Value::Fixed32(x) => x.to_string(),
                };
                fields.push((n, text));
            }
            out.push((kind, fields));
        }
        out
    }

    #[test]
    fn a_full_device_cache_keeps_one_call_s_agents_together() {
        let (_, catalogue) = setup(false); // room for 16 agents
        let agents: Vec<(String, String)> = (0..40)
            .map(|i| (format!("ua{i}"), "mobile".to_string()))
            .collect();
        catalogue.learn_devices(&agents[..10]).unwrap();
        // 10 + 8 > 16: emptied first, then all 8 kept.
        catalogue.learn_devices(&agents[10..18]).unwrap();
        assert!((10..18).all(|i| catalogue.device_of(&agents[i].0) == Some("mobile")));
        assert!(catalogue.device_of("ua0").is_none());
        // More than the cache holds, in one call: all kept until the next call.
        catalogue.learn_devices(&agents[18..]).unwrap();
        assert!((18..40).all(|i| catalogue.device_of(&agents[i].0).is_some()));
        // A bad class refuses the call before anything changes.
        let bad = [("ua-new", "mobile"), ("ua-bad", "phone")];
        assert!(catalogue.learn_devices(&bad).is_err());
        assert!(catalogue.device_of("ua-new").is_none());
        assert!(catalogue.device_of("ua20").is_some());
    }

    #[test]
    fn batch_items_reads_only_what_it_is_asked_for() {
        let items: Vec<Vec<u8>> = (0..5)
            .map(|i| request("exp", &format!("u{i}"), &[]))
            .collect();
        let mut bytes = batch(&items);
        assert_eq!(
            batch_items(&bytes, &[3, 0, 9]).unwrap(),
            [&items[3], &items[0]]
        );
        assert!(batch_items(&bytes, &[]).unwrap().is_empty());
        // A broken tail past the last position asked for is not read.
        bytes.extend_from_slice(&[0x0a, 0xff]);
        assert_eq!(batch_items(&bytes, &[1]).unwrap(), [&items[1]]);
        assert!(batch_items(&bytes, &[5]).is_err());
    }

    #[test]
    fn features_are_what_learning_keeps_of_ready_items() {
        let (_, catalogue) = setup(false);
        let mut web = request("exp", "w", &[("utm_source", "News"), ("device", "tablet")]);
        for (name, value) in [("pages_viewed", 3.5), ("drop_risk", 0.25)] {
            let mut e = Vec::new();
            wire::put_str(&mut e, 1, name);
            wire::put_tag(&mut e, 2, wire::FIXED64);
            e.extend_from_slice(&f64::to_le_bytes(value));
            wire::put_bytes(&mut web, 5, &e);
        }
        let ua = "Mozilla/5.0 (Linux; Android 14) Mobile";
        let items = [
            web,
            request("nope", "x", &[]),
            request("exp", "f", &[("user_agent", ua)]),
        ];
        let prepared = catalogue.prepare(&batch(&items), 0).unwrap();
        // The user agent has no class yet: an error names it.
        let err = prepared.features(&catalogue, &[2]).unwrap_err();
        assert!(format!("{err:?}").contains("Android 14"), "{err:?}");
        catalogue.learn_devices(&[(ua, "mobile")]).unwrap();
        let got = prepared.features(&catalogue, &[0, 1, 2]).unwrap();
        // 1_700_000_000_000 ms is a Tuesday, 22:13 UTC.
        assert_eq!(
            got,
            [
                Features {
                    user_id: "w",
                    channel: "web",
                    device: "tablet",
                    source: "news",
                    hour: 22,
                    day_of_week: 1,
                    signals: [Some(3.5), None, None, None],
                },
                Features {
                    user_id: "f",
                    channel: "web",
                    device: "mobile",
                    source: "direct",
                    hour: 22,
                    day_of_week: 1,
                    signals: [None; 4],
                },
            ]
        );
    }

    #[test]
    fn decides_like_unary_calls_with_the_same_seed() {
        let (engine, catalogue) = setup(false);
        let items: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                request(
                    "exp",
                    &format!("u{i}"),
                    &[("utm_source", ["a", "b"][i % 2]), ("device", "mobile")],
                )
            })
            .collect();
        seed_thread_rng(3);
        let prepared = catalogue.prepare(&batch(&items), 0).unwrap();
        assert!(!prepared.needs_caller && prepared.invalid().is_empty());
        assert!(!prepared.has_sticky() && prepared.sticky_candidates().0.is_empty());
        let out = prepared
            .finish(
                &engine,
                &catalogue,
                "eu",
                "p",
                10,
                0,
                &HashMap::new(),
                &HashMap::new(),
                true,
            )
            .unwrap();
        let (unary, _) = setup(false);
        seed_thread_rng(3);
        for (k, i) in (0..50).enumerate() {
            let source = ["a", "b"][i % 2];
            let d = unary
                .decide(5, &format!("u{i}"), &[source, "mobile"], true)
                .unwrap();
            assert_eq!(out.made.variant(k), d.variant);
            assert_eq!(out.made.segment_key(k), d.segment_key);
            assert_eq!(out.made.level(k), d.level);
            assert_eq!(out.made.propensity(k), d.propensity);
        }
        let parsed = results(&out.response);
        assert_eq!(parsed.len(), 50);
        assert_eq!(parsed[1].0, 1);
        assert_eq!(parsed[1].1[0], (1, "p-b".to_string()));
        assert_eq!(parsed[1].1[1], (2, "exp".to_string()));
        assert!(parsed[1].1.contains(&(10, "eu".to_string())));
    }

    #[test]
    fn bad_items_wait_for_their_error_and_sticky_repeats_share_an_answer() {
        let (engine, catalogue) = setup(true);
        let items = vec![
            request("exp", "same", &[]),
            request("exp", "", &[]),
            request("nope", "x", &[]),
            request("exp", "same", &[]),
            request("exp", "known", &[("user_agent", "Bot/1")]),
        ];
        let prepared = catalogue.prepare(&batch(&items), 5).unwrap();
        assert_eq!(prepared.invalid(), vec![1, 2]);
        assert_eq!(prepared.unknown_user_agents(&catalogue), vec!["Bot/1"]);
        assert!(prepared.has_sticky());
        let (pos, handles, users) = prepared.sticky_candidates();
        assert_eq!(
            (pos, handles, users),
            (vec![0, 3, 4], vec![5; 3], vec!["same", "same", "known"])
        );
        assert!(prepared
            .finish(
                &engine,
                &catalogue,
                "",
                "p",
                1,
                0,
                &HashMap::new(),
                &HashMap::new(),
                true,
            )
            .is_err());
        catalogue.learn_devices(&[("Bot/1", "unknown")]).unwrap();
        assert!(catalogue.learn_devices(&[("x", "phone")]).is_err());
        let errors: HashMap<usize, ItemError> = [1, 2]
            .into_iter()
            .map(|i| {
                let e = ItemError {
                    code: 3,
                    message: "bad".into(),
                    field: "user_id".into(),
                };
                (i, e)
            })
            .collect();
        let given: HashMap<usize, GivenAllocation> = [(
            4,
            GivenAllocation {
                assignment_id: "old".into(),
                variant: 1,
                segment_key: "source:direct|device:unknown".into(),
                level: 0,
                propensity: 0.5,
                sticky: true,
            },
        )]
        .into();
        let out = prepared
            .finish(&engine, &catalogue, "", "p", 1, 0, &given, &errors, true)
            .unwrap();
        assert_eq!(
            (0..out.made.len())
                .map(|k| out.made.user_id(k))
                .collect::<Vec<_>>(),
            vec!["same"]
        );
        let parsed = results(&out.response);
        assert_eq!(
            parsed.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 2, 1, 1]
        );
        assert_eq!(parsed[0].1[0], (1, "p-1".to_string()));
        assert_eq!(parsed[3].1[0], (1, "p-1".to_string()));
        assert!(parsed[3].1.contains(&(9, "1".to_string())));
        assert!(!parsed[0].1.iter().any(|f| f.0 == 9));
        assert_eq!(parsed[4].1[0], (1, "old".to_string()));
        assert_eq!(
            parsed[1].1,
            vec![(1, "3".into()), (2, "bad".into()), (3, "user_id".into())]
        );
    }

    #[test]
    fn unrecorded_decisions_count_once_claimed() {
        let (engine, catalogue) = setup(true);
        let items = [
            request("exp", "a", &[("utm_source", "x")]),
            request("nope", "bad", &[]),
            request("exp", "b", &[("utm_source", "x")]),
            request("exp", "a", &[("utm_source", "x")]),
            request("exp", "c", &[("utm_source", "y")]),
        ];
        let prepared = catalogue.prepare(&batch(&items), 0).unwrap();
        let errors: HashMap<usize, ItemError> = [(
            1,
            ItemError {
                code: 5,
                message: "no".into(),
                field: "experiment_id".into(),
            },
        )]
        .into();
        let total = |engine: &Engine| -> u64 {
            let id = crate::store::NodeId::new(5, crate::keys::key_hash(""));
            engine
                .store()
                .get(id)
                .map_or(0, |n| n.counts().iter().map(|c| c.allocations).sum::<u64>())
        };
        let out = prepared
            .finish(
                &engine,
                &catalogue,
                "",
                "p",
                1,
                0,
                &HashMap::new(),
                &errors,
                false,
            )
            .unwrap();
        // Items 0, 2 and 4 are new ("a" again at 3 repeats 0's answer); nothing counted.
        assert_eq!(out.positions, [0, 2, 4]);
        assert_eq!(out.made.len(), 3);
        assert_eq!(total(&engine), 0);
        // The claim of "b" (made's 1) did not stand: the others count, at every level.
        let kept = out.made.without(&[1]);
        assert_eq!(
            (0..kept.len()).map(|k| kept.user_id(k)).collect::<Vec<_>>(),
            ["a", "c"]
        );
        engine.record_made(&kept).unwrap();
        assert_eq!(total(&engine), 2);
        let leaf = crate::keys::key_hash(kept.segment_key(0));
        let node = engine
            .store()
            .get(crate::store::NodeId::new(5, leaf))
            .unwrap();
        assert_eq!(
            node.counts()[kept.variant(0)].allocations,
            1 + u64::from(
                kept.segment_key(1) == kept.segment_key(0) && kept.variant(1) == kept.variant(0)
            )
        );
        // A variant the experiment does not have counts nothing.
        let mut wrong = Made::new("p", 0);
        wrong.push(9, 5, "d", 0, "", 0, 0.5);
        wrong.push(10, 5, "e", 7, "", 0, 0.5);
        assert!(engine.record_made(&wrong).is_err());
        assert_eq!(total(&engine), 2);
    }

    #[test]
    fn one_request_is_answered_like_a_batch_of_one() {
        let m = request("exp", "u1", &[("utm_source", "a"), ("user_agent", "Bot/1")]);
        let (engine, catalogue) = setup(true);
        for bad in [
            vec![0x0a, 0x09],
            request("exp", "", &[]),
            request("nope", "x", &[]),
        ] {
            assert!(matches!(catalogue.check_one(&bad, 0), OneChecked::Caller));
        }
        match catalogue.check_one(&m, 0) {
            OneChecked::UnknownUserAgent(ua) => assert_eq!(ua, "Bot/1"),
            _ => panic!("an unseen user agent must be named"),
        }
        catalogue.learn_devices(&[("Bot/1", "unknown")]).unwrap();
        let OneChecked::Ready(one) = catalogue.check_one(&m, 0) else {
            panic!("a valid request must be ready");
        };
        assert_eq!((one.handle(), one.user_id(), one.sticky()), (5, "u1", true));
        seed_thread_rng(9);
        let d = one.decide(&engine, "eu", "p-7").unwrap();

        let (batch_engine, batch_catalogue) = setup(true);
        batch_catalogue
            .learn_devices(&[("Bot/1", "unknown")])
            .unwrap();
        let prepared = batch_catalogue
            .prepare(&batch(std::slice::from_ref(&m)), 0)
            .unwrap();
        seed_thread_rng(9);
        let out = prepared
            .finish(
                &batch_engine,
                &batch_catalogue,
                "eu",
                "p",
                7,
                0,
                &HashMap::new(),
                &HashMap::new(),
                true,
            )
            .unwrap();
        let mut result = Vec::new();
        wire::put_bytes(&mut result, 1, &d.response);
        assert_eq!(out.response, batch(&[result]));
        assert_eq!(
            (d.variant, d.segment_key.as_str(), d.level),
            (
                out.made.variant(0),
                out.made.segment_key(0),
                out.made.level(0)
            )
        );
        // Both counted the allocation at every level of the path.
        assert_eq!(engine.store().snapshot(Some(5)).len(), 3);
        assert_eq!(
            engine.store().snapshot(Some(5)),
            batch_engine.store().snapshot(Some(5))
        );

        let given = GivenAllocation {
            assignment_id: "old".into(),
            variant: 1,
            segment_key: "source:a|device:unknown".into(),
            level: 1,
            propensity: 0.25,
            sticky: true,
        };
        let answered = one.answer(&given, "eu").unwrap();
        let mut expected = Vec::new();
        encode_response(
            &mut expected,
            &Answer {
                assignment_id: "old",
                experiment: &one.experiment,
                variant: 1,
                segment_key: "source:a|device:unknown",
                level: 1,
                propensity: 0.25,
                sticky: true,
            },
            "eu",
        );
        assert_eq!(answered, expected);
        assert!(one
            .answer(
                &GivenAllocation {
                    variant: 9,
                    ..given
                },
                "eu"
            )
            .is_err());
    }

    #[test]
    fn result_encoder_writes_responses_nested_twice() {
        let (_, catalogue) = setup(false);
        let experiment = catalogue.running("exp").unwrap();
        for region in ["", "eu"] {
            let mut encoder = ResultEncoder::new(region, 1);
            for (id, variant, key, level, propensity, sticky) in [
                ("p-1", 0, "source:a", 1, 0.5, false),
                ("", 1, "", 0, 0.0, true),
                ("x".repeat(200).as_str(), 1, "k", 300, -0.0, false),
            ] {
                let a = Answer {
                    assignment_id: id,
                    experiment: &experiment,
                    variant,
                    segment_key: key,
                    level,
                    propensity,
                    sticky,
                };
                let mut response = Vec::new();
                encode_response(&mut response, &a, region);
                let mut result = Vec::new();
                wire::put_bytes(&mut result, 1, &response);
                let mut expected = Vec::new();
                wire::put_bytes(&mut expected, 1, &result);
                let mut out = Vec::new();
                encoder.allocation(&mut out, 0, &a);
                assert_eq!(out, expected);
            }
        }
    }

    /// An `AllocateRequest` with its fields in the order given: (field number, bytes).
    fn fields(parts: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = Vec::new();
        for (n, b) in parts {
            if *n == 6 {
                wire::put_tag(&mut m, 6, wire::VARINT);
                wire::put_varint(&mut m, u64::from_le_bytes(b[..8].try_into().unwrap()));
            } else {
                wire::put_bytes(&mut m, *n, b);
            }
        }
        m
    }

    fn entry(k: &str, v: &str) -> Vec<u8> {
        let mut e = Vec::new();
        wire::put_str(&mut e, 1, k);
        wire::put_str(&mut e, 2, v);
        e
    }

    #[test]
    fn items_sharing_an_extraction_get_what_each_alone_gets() {
        let (_, catalogue) = setup(false);
        let t = |ms: u64| ms.to_le_bytes().to_vec();
        let (exp, ua) = ((1, b"exp".to_vec()), (4, entry("user_agent", "Bot/1")));
        let user = |u: &str| (2, u.as_bytes().to_vec());
        let src = |s: &str| (4, entry("utm_source", s));
        let items = vec![
            fields(&[exp.clone(), user("a"), src("x"), ua.clone()]),
            fields(&[exp.clone(), user("b"), src("x"), ua.clone()]),
            // The same entries, another order: the last one wins either way.
            fields(&[exp.clone(), user("c"), ua.clone(), src("x")]),
            fields(&[exp.clone(), user("d"), src("y"), ua.clone(), src("x")]),
            // Other fields between the map entries.
            fields(&[exp.clone(), src("x"), user("e"), ua.clone()]),
            fields(&[exp.clone(), src("x"), user("f"), ua.clone()]),
            fields(&[src("x"), (6, t(1)), ua.clone(), exp.clone(), user("g")]),
            fields(&[src("x"), (6, t(1)), ua.clone(), exp.clone(), user("h")]),
            // Another clock, then a bad channel, then a repeat of the first.
            fields(&[
                exp.clone(),
                user("i"),
                src("x"),
                ua.clone(),
                (6, t(7_200_000)),
            ]),
            fields(&[
                exp.clone(),
                user("j"),
                (3, b"fax".to_vec()),
                src("x"),
                ua.clone(),
            ]),
            fields(&[
                exp.clone(),
                user("k"),
                (3, b"fax".to_vec()),
                src("x"),
                ua.clone(),
            ]),
            fields(&[
                exp.clone(),
                user("l"),
                (3, b"web".to_vec()),
                src("x"),
                ua.clone(),
            ]),
            fields(&[exp.clone(), user("m"), src("x"), ua.clone()]),
            fields(&[(1, b"nope".to_vec()), user("n"), src("x"), ua.clone()]),
            fields(&[exp.clone(), user(""), src("z"), ua.clone()]),
            fields(&[exp.clone(), user("o"), src("z"), ua]),
        ];
        let now = 1_700_000_000_000;
        let prepared = catalogue.prepare(&batch(&items), now).unwrap();
        assert_eq!(prepared.len(), items.len());
        assert_eq!(prepared.invalid(), vec![9, 10, 13, 14]);
        // Runs with the same raw context and clock share one extraction.
        assert!(prepared.contexts.len() < items.len() - 4);
        for (i, m) in items.iter().enumerate() {
            let raw = decode_request(m).unwrap();
            let alone = context::extract(
                raw.channel,
                &raw.context,
                &raw.signals,
                raw.timestamp_ms,
                now,
                &ContextLimits::default(),
            );
            match prepared.items[i] {
                Item::Ready { context, user, .. } => {
                    assert_eq!(Some(&prepared.contexts[context]), alone.as_ref(), "{i}");
                    assert_eq!(prepared.user(user), raw.user_id);
                }
                Item::Invalid => assert!(alone.is_none() || i == 13 || i == 14, "{i}"),
            }
        }
    }

    #[test]
    fn hex_is_what_format_writes() {
        for n in [0, 1, 9, 10, 15, 16, 255, 256, 0xdead_beef, u64::MAX] {
            let mut out = String::from("p-");
            push_hex(&mut out, n);
            assert_eq!(out, format!("p-{n:x}"));
        }
    }

    #[test]
    fn maps_keep_the_last_entry_and_only_caller_segments_need_the_caller() {
        let (_, catalogue) = setup(true);
        let m = request("exp", "u", &[("device", "phone"), ("device", "tablet")]);
        let raw = decode_request(&m).unwrap();
        assert_eq!(raw.context, vec![("device", "tablet")]);
        // A sticky experiment's batch is the batch path's (under shared state too: the caller
        // claims what `finish` made without counting it).
        assert!(
            !catalogue
                .prepare(&batch(std::slice::from_ref(&m)), 0)
                .unwrap()
                .needs_caller
        );
        let mut learned = ExperimentInfo::clone(&catalogue.running("exp").unwrap());
        learned.caller_segments = true;
        catalogue.put(learned);
        assert!(catalogue.prepare(&batch(&[m]), 0).unwrap().needs_caller);
        assert!(catalogue.prepare(&[0x0a, 0x09], 0).is_err());
    }
}
