//! `AllocateBatch` from request bytes to response bytes: decode, check, extract the context,
//! decide (through [`Engine::decide`], in request order) and encode, with no Python per item.
//!
//! Two steps, so that the caller can add what only it knows in between:
//! [`Catalogue::prepare`] decodes and checks every item and lists what the caller must answer
//! (device classes of new user agents, earlier sticky assignments, the errors of bad items);
//! [`PreparedBatch::finish`] decides the rest and encodes the response.

use crate::context::{self, ContextLimits, Device, Extracted};
use crate::decide::{Decision, Engine};
use crate::error::CoreError;
use crate::wire::{self, Reader, Value};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

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
    experiments: RwLock<HashMap<String, Arc<ExperimentInfo>>>,
    devices: RwLock<HashMap<String, &'static str>>,
    limits: BatchLimits,
}

/// One decoded `AllocateRequest`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest {
    pub experiment_id: String,
    pub user_id: String,
    pub channel: String,
    pub context: Vec<(String, String)>,
    pub signals: Vec<(String, f64)>,
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

enum Item {
    /// Breaks a rule: the caller words the error (or allocates it, if it disagrees).
    Invalid,
    Ready(Box<Ready>),
}

struct Ready {
    experiment: Arc<ExperimentInfo>,
    user_id: String,
    context: Extracted,
}

/// A decoded and checked batch, waiting for [`PreparedBatch::finish`].
pub struct PreparedBatch {
    items: Vec<Item>,
    /// An item the batch path does not handle: the caller should take the whole batch.
    pub needs_caller: bool,
}

/// The new assignments a batch made, in request order, for the caller's write-behind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decided {
    pub handles: Vec<u64>,
    pub user_ids: Vec<String>,
    pub variants: Vec<usize>,
    pub segment_keys: Vec<String>,
    pub levels: Vec<usize>,
    pub propensities: Vec<f64>,
}

/// The encoded `AllocateBatchResponse` and the new assignments in it.
pub struct BatchOutput {
    pub response: Vec<u8>,
    pub decided: Decided,
}

fn decode_map(bytes: &[u8]) -> Result<(String, Value<'_>), CoreError> {
    let mut key = String::new();
    let mut value = Value::Bytes(b"");
    let mut r = Reader::new(bytes);
    while let Some((n, v)) = r.next_field()? {
        match (n, v) {
            (1, Value::Bytes(b)) => key = wire::text(b)?,
            (2, v) => value = v,
            _ => {}
        }
    }
    Ok((key, value))
}

/// Later entries of a map win, as in every protobuf parser.
fn keep_last<T>(entries: &mut Vec<(String, T)>) {
    let n = entries.len();
    // Small maps (the usual context): a pairwise check costs less than hashing.
    if n <= 16 && (1..n).all(|i| entries[..i].iter().all(|(k, _)| *k != entries[i].0)) {
        return;
    }
    if n > 1 {
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        let mut kept: Vec<(String, T)> = Vec::with_capacity(entries.len());
        for (k, v) in entries.drain(..).rev() {
            if seen.insert(k.clone()) {
                kept.push((k, v));
            }
        }
        kept.reverse();
        *entries = kept;
    }
}

/// Decode one `AllocateRequest`.
pub fn decode_request(bytes: &[u8]) -> Result<RawRequest, CoreError> {
    let mut out = RawRequest::default();
    let mut r = Reader::new(bytes);
    while let Some((n, v)) = r.next_field()? {
        match (n, v) {
            (1, Value::Bytes(b)) => out.experiment_id = wire::text(b)?,
            (2, Value::Bytes(b)) => out.user_id = wire::text(b)?,
            (3, Value::Bytes(b)) => out.channel = wire::text(b)?,
            (4, Value::Bytes(b)) => {
                let (k, v) = decode_map(b)?;
                let v = match v {
                    Value::Bytes(s) => wire::text(s)?,
                    _ => String::new(),
                };
                out.context.push((k, v));
            }
            (5, Value::Bytes(b)) => {
                let (k, v) = decode_map(b)?;
                let x = match v {
                    Value::Fixed64(bits) => f64::from_bits(bits),
                    _ => 0.0,
                };
                out.signals.push((k, x));
            }
            (6, Value::Varint(x)) => out.timestamp_ms = x as i64,
            _ => {}
        }
    }
    keep_last(&mut out.context);
    keep_last(&mut out.signals);
    Ok(out)
}

/// Decode an `AllocateBatchRequest` into its items.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RawRequest>, CoreError> {
    let mut items = Vec::new();
    let mut r = Reader::new(bytes);
    while let Some((n, v)) = r.next_field()? {
        if let (1, Value::Bytes(b)) = (n, v) {
            items.push(decode_request(b)?);
        }
    }
    Ok(items)
}

impl Catalogue {
    pub fn new(limits: BatchLimits) -> Self {
        Catalogue {
            experiments: RwLock::new(HashMap::new()),
            devices: RwLock::new(HashMap::new()),
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
    pub fn learn_devices<S: AsRef<str>>(&self, pairs: &[(S, S)]) -> Result<(), CoreError> {
        let mut devices = self.devices.write();
        for (ua, class) in pairs {
            let class = device_class(class.as_ref())?;
            if devices.len() >= self.limits.device_cache_size {
                devices.clear();
            }
            if self.limits.device_cache_size > 0 {
                devices.insert(ua.as_ref().to_string(), class);
            }
        }
        Ok(())
    }

    fn check_item(
        &self,
        raw: RawRequest,
        now_ms: i64,
        shared: bool,
        last: &mut Option<Arc<ExperimentInfo>>,
    ) -> (Item, bool) {
        // Batches mostly name one experiment: reuse the previous item's lookup.
        let cached = last
            .as_ref()
            .filter(|e| e.key == raw.experiment_id)
            .cloned();
        let found = cached.or_else(|| self.experiments.read().get(&raw.experiment_id).cloned());
        let experiment = match found {
            Some(e) if e.running => e,
            _ => return (Item::Invalid, false),
        };
        *last = Some(experiment.clone());
        let user = &raw.user_id;
        if user.is_empty()
            || user.chars().count() > self.limits.max_user_id_chars
            || user.contains('\0')
        {
            return (Item::Invalid, false);
        }
        let Some(context) = context::extract(
            &raw.channel,
            &raw.context,
            &raw.signals,
            raw.timestamp_ms,
            now_ms,
            &self.limits.context,
        ) else {
            return (Item::Invalid, false);
        };
        let needs_caller = experiment.caller_segments
            || (shared && experiment.sticky)
            || !experiment
                .dimensions
                .iter()
                .all(|d| context::is_dimension(d));
        let ready = Ready {
            experiment,
            user_id: raw.user_id,
            context,
        };
        (Item::Ready(Box::new(ready)), needs_caller)
    }

    /// Decode and check a batch. With `shared`, sticky experiments need the caller (their
    /// assignments are claimed in a shared store).
    pub fn prepare(
        &self,
        request: &[u8],
        now_ms: i64,
        shared: bool,
    ) -> Result<PreparedBatch, CoreError> {
        let mut needs_caller = false;
        let mut last = None;
        let items = decode_batch(request)?
            .into_iter()
            .map(|raw| {
                let (item, caller) = self.check_item(raw, now_ms, shared, &mut last);
                needs_caller |= caller;
                item
            })
            .collect();
        Ok(PreparedBatch {
            items,
            needs_caller,
        })
    }

    fn device_of(&self, ua: &str) -> Option<&'static str> {
        self.devices.read().get(ua).copied()
    }

    /// Decode and check one `AllocateRequest` (unary Allocate), as an item of a batch.
    pub fn check_one(&self, request: &[u8], now_ms: i64, shared: bool) -> OneChecked {
        let Ok(raw) = decode_request(request) else {
            return OneChecked::Caller;
        };
        match self.check_item(raw, now_ms, shared, &mut None) {
            (Item::Ready(ready), false) => match &ready.context.device {
                Device::UserAgent(ua) if self.device_of(ua).is_none() => {
                    OneChecked::UnknownUserAgent(ua.clone())
                }
                _ => OneChecked::Ready(PreparedOne { ready }),
            },
            _ => OneChecked::Caller,
        }
    }
}

/// What [`Catalogue::check_one`] found.
pub enum OneChecked {
    /// The caller's path must answer: a bad request (it words the error), sticky claims in
    /// shared state, or segments only the caller knows.
    Caller,
    /// The device class of this user agent is unknown: learn it and check again.
    UnknownUserAgent(String),
    Ready(PreparedOne),
}

/// A checked unary request: look the user up (sticky experiments), then decide or answer.
pub struct PreparedOne {
    ready: Box<Ready>,
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
        self.ready.experiment.handle
    }

    pub fn sticky(&self) -> bool {
        self.ready.experiment.sticky
    }

    pub fn user_id(&self) -> &str {
        &self.ready.user_id
    }

    /// The response for an earlier assignment of this user (answered as sticky).
    pub fn answer(&self, given: &GivenAllocation, region: &str) -> Result<Vec<u8>, CoreError> {
        let experiment = &self.ready.experiment;
        check_variant(experiment, given.variant)?;
        let mut out = Vec::with_capacity(256);
        encode_response(
            &mut out,
            &Answer {
                assignment_id: &given.assignment_id,
                experiment,
                variant: given.variant,
                segment_key: &given.segment_key,
                level: given.level,
                propensity: given.propensity,
                sticky: given.sticky,
            },
            region,
        );
        Ok(out)
    }

    /// Decide (counting the allocation) exactly as a batch item is decided, and encode the
    /// answer under `assignment_id`.
    pub fn decide(
        &self,
        engine: &Engine,
        catalogue: &Catalogue,
        region: &str,
        assignment_id: &str,
    ) -> Result<DecidedOne, CoreError> {
        let d = self.ready.decide(engine, catalogue, &mut Vec::new())?;
        let mut response = Vec::with_capacity(256);
        encode_response(
            &mut response,
            &Answer::decided(assignment_id, &self.ready.experiment, &d),
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
}

impl Ready {
    /// Decide this item through [`Engine::decide`], counting the allocation: the device class
    /// (of its user agent, which `catalogue` must know), the experiment's segment values.
    fn decide<'a>(
        &'a self,
        engine: &Engine,
        catalogue: &Catalogue,
        values: &mut Vec<&'a str>,
    ) -> Result<Decision, CoreError> {
        let device = match &self.context.device {
            Device::Known(d) => *d,
            Device::UserAgent(ua) => catalogue.device_of(ua).ok_or_else(|| {
                CoreError::invalid(format!("devices: no class for user agent {ua:?}"))
            })?,
        };
        values.clear();
        values.extend(
            self.experiment
                .dimensions
                .iter()
                .map(|d| self.context.dimension(d, device)),
        );
        let d = engine.decide(self.experiment.handle, &self.user_id, values, true)?;
        check_variant(&self.experiment, d.variant)?;
        Ok(d)
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

fn encode_allocation(out: &mut Vec<u8>, scratch: &mut Vec<u8>, a: &Answer<'_>, region: &str) {
    scratch.clear();
    encode_response(scratch, a, region);
    // results[i] = AllocateResult { allocation = 1 }
    let mut head = Vec::with_capacity(8);
    wire::put_tag(&mut head, 1, wire::LEN);
    wire::put_varint(&mut head, scratch.len() as u64);
    wire::put_tag(out, 1, wire::LEN);
    wire::put_varint(out, (head.len() + scratch.len()) as u64);
    out.extend_from_slice(&head);
    out.extend_from_slice(scratch);
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

    /// Positions of items that break a rule.
    pub fn invalid(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| matches!(self.items[i], Item::Invalid))
            .collect()
    }

    /// Distinct user agents whose device class the catalogue does not know yet.
    pub fn unknown_user_agents(&self, catalogue: &Catalogue) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for item in &self.items {
            if let Item::Ready(ready) = item {
                if let Device::UserAgent(ua) = &ready.context.device {
                    if catalogue.device_of(ua).is_none() && seen.insert(ua.as_str()) {
                        out.push(ua.clone());
                    }
                }
            }
        }
        out
    }

    /// (position, experiment handle, user id) of every item of a sticky experiment: the caller
    /// answers those users it has an assignment for.
    pub fn sticky_candidates(&self) -> (Vec<usize>, Vec<u64>, Vec<&str>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for (i, item) in self.items.iter().enumerate() {
            if let Item::Ready(ready) = item {
                if ready.experiment.sticky {
                    out.0.push(i);
                    out.1.push(ready.experiment.handle);
                    out.2.push(ready.user_id.as_str());
                }
            }
        }
        out
    }

    /// Decide every item the caller did not answer, in request order, counting each decision;
    /// a user seen twice in a sticky experiment gets the first answer again. Assignment ids are
    /// `{id_prefix}-{seq:x}` from `first_seq` on, one per new assignment.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        engine: &Engine,
        catalogue: &Catalogue,
        region: &str,
        id_prefix: &str,
        first_seq: u64,
        given: &HashMap<usize, GivenAllocation>,
        errors: &HashMap<usize, ItemError>,
    ) -> Result<BatchOutput, CoreError> {
        let mut response = Vec::with_capacity(self.items.len() * 128);
        let mut scratch = Vec::with_capacity(256);
        let mut decided = Decided::default();
        // (handle, user) -> given allocation or index into `decided`, for repeated users.
        let mut repeats: HashMap<(u64, &str), Result<&GivenAllocation, usize>> = HashMap::new();
        let mut values: Vec<&str> = Vec::with_capacity(8);
        let mut ids: Vec<String> = Vec::new();
        for (i, item) in self.items.iter().enumerate() {
            if let Some(e) = errors.get(&i) {
                encode_error(&mut response, &mut scratch, e);
                continue;
            }
            let Item::Ready(ready) = item else {
                return Err(CoreError::invalid(format!(
                    "errors: item {i} is invalid and has no error"
                )));
            };
            let Ready {
                experiment,
                user_id,
                ..
            } = &**ready;
            let slot = (experiment.handle, user_id.as_str());
            let earlier = if experiment.sticky {
                repeats.get(&slot).copied()
            } else {
                None
            };
            if let Some(g) = given.get(&i) {
                check_variant(experiment, g.variant)?;
                encode_allocation(
                    &mut response,
                    &mut scratch,
                    &Answer {
                        assignment_id: &g.assignment_id,
                        experiment,
                        variant: g.variant,
                        segment_key: &g.segment_key,
                        level: g.level,
                        propensity: g.propensity,
                        sticky: g.sticky,
                    },
                    region,
                );
                if experiment.sticky && earlier.is_none() {
                    repeats.insert(slot, Ok(g));
                }
                continue;
            }
            match earlier {
                Some(Ok(g)) => encode_allocation(
                    &mut response,
                    &mut scratch,
                    &Answer {
                        assignment_id: &g.assignment_id,
                        experiment,
                        variant: g.variant,
                        segment_key: &g.segment_key,
                        level: g.level,
                        propensity: g.propensity,
                        sticky: true,
                    },
                    region,
                ),
                Some(Err(k)) => encode_allocation(
                    &mut response,
                    &mut scratch,
                    &Answer {
                        assignment_id: &ids[k],
                        experiment,
                        variant: decided.variants[k],
                        segment_key: &decided.segment_keys[k],
                        level: decided.levels[k],
                        propensity: decided.propensities[k],
                        sticky: true,
                    },
                    region,
                ),
                None => {
                    let d = ready.decide(engine, catalogue, &mut values)?;
                    let k = ids.len();
                    ids.push(format!("{id_prefix}-{:x}", first_seq + k as u64));
                    encode_allocation(
                        &mut response,
                        &mut scratch,
                        &Answer::decided(&ids[k], experiment, &d),
                        region,
                    );
                    decided.handles.push(experiment.handle);
                    decided.user_ids.push(user_id.clone());
                    decided.variants.push(d.variant);
                    decided.segment_keys.push(d.segment_key);
                    decided.levels.push(d.level);
                    decided.propensities.push(d.propensity);
                    if experiment.sticky {
                        repeats.insert(slot, Err(k));
                    }
                }
            }
        }
        Ok(BatchOutput { response, decided })
    }
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
    use crate::decide::{ExperimentConfig, Policy};

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
                    variants: 2,
                    dimensions: vec!["source".into(), "device".into()],
                    min_samples: vec![10, 10],
                    policy: Policy::Thompson,
                    weights: vec![],
                    prior_alpha: 1.0,
                    prior_beta: 1.0,
                    warm_start: 10.0,
                    exploration: 0.0,
                    salt: 1,
                    propensity_floor: 0.0,
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
        let prepared = catalogue.prepare(&batch(&items), 0, false).unwrap();
        assert!(!prepared.needs_caller && prepared.invalid().is_empty());
        let out = prepared
            .finish(
                &engine,
                &catalogue,
                "eu",
                "p",
                10,
                &HashMap::new(),
                &HashMap::new(),
            )
            .unwrap();
        let (unary, _) = setup(false);
        seed_thread_rng(3);
        for (k, i) in (0..50).enumerate() {
            let source = ["a", "b"][i % 2];
            let d = unary
                .decide(5, &format!("u{i}"), &[source, "mobile"], true)
                .unwrap();
            assert_eq!(out.decided.variants[k], d.variant);
            assert_eq!(out.decided.segment_keys[k], d.segment_key);
            assert_eq!(out.decided.levels[k], d.level);
            assert_eq!(out.decided.propensities[k], d.propensity);
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
        let prepared = catalogue.prepare(&batch(&items), 5, false).unwrap();
        assert_eq!(prepared.invalid(), vec![1, 2]);
        assert_eq!(prepared.unknown_user_agents(&catalogue), vec!["Bot/1"]);
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
                &HashMap::new(),
                &HashMap::new()
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
            .finish(&engine, &catalogue, "", "p", 1, &given, &errors)
            .unwrap();
        assert_eq!(out.decided.user_ids, vec!["same"]);
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
    fn one_request_is_answered_like_a_batch_of_one() {
        let m = request("exp", "u1", &[("utm_source", "a"), ("user_agent", "Bot/1")]);
        let (engine, catalogue) = setup(true);
        for bad in [
            vec![0x0a, 0x09],
            request("exp", "", &[]),
            request("nope", "x", &[]),
        ] {
            assert!(matches!(
                catalogue.check_one(&bad, 0, false),
                OneChecked::Caller
            ));
        }
        // A sticky experiment under shared state needs the caller (claims live there).
        assert!(matches!(
            catalogue.check_one(&m, 0, true),
            OneChecked::Caller
        ));
        match catalogue.check_one(&m, 0, false) {
            OneChecked::UnknownUserAgent(ua) => assert_eq!(ua, "Bot/1"),
            _ => panic!("an unseen user agent must be named"),
        }
        catalogue.learn_devices(&[("Bot/1", "unknown")]).unwrap();
        let OneChecked::Ready(one) = catalogue.check_one(&m, 0, false) else {
            panic!("a valid request must be ready");
        };
        assert_eq!((one.handle(), one.user_id(), one.sticky()), (5, "u1", true));
        seed_thread_rng(9);
        let d = one.decide(&engine, &catalogue, "eu", "p-7").unwrap();

        let (batch_engine, batch_catalogue) = setup(true);
        batch_catalogue
            .learn_devices(&[("Bot/1", "unknown")])
            .unwrap();
        let prepared = batch_catalogue
            .prepare(&batch(std::slice::from_ref(&m)), 0, false)
            .unwrap();
        seed_thread_rng(9);
        let out = prepared
            .finish(
                &batch_engine,
                &batch_catalogue,
                "eu",
                "p",
                7,
                &HashMap::new(),
                &HashMap::new(),
            )
            .unwrap();
        let mut result = Vec::new();
        wire::put_bytes(&mut result, 1, &d.response);
        assert_eq!(out.response, batch(&[result]));
        assert_eq!(
            (d.variant, d.segment_key.as_str(), d.level),
            (
                out.decided.variants[0],
                out.decided.segment_keys[0].as_str(),
                out.decided.levels[0]
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
                experiment: &one.ready.experiment,
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
    fn maps_keep_the_last_entry_and_shared_sticky_needs_the_caller() {
        let (_, catalogue) = setup(true);
        let m = request("exp", "u", &[("device", "phone"), ("device", "tablet")]);
        let raw = decode_request(&m).unwrap();
        assert_eq!(
            raw.context,
            vec![("device".to_string(), "tablet".to_string())]
        );
        assert!(
            catalogue
                .prepare(&batch(std::slice::from_ref(&m)), 0, true)
                .unwrap()
                .needs_caller
        );
        assert!(
            !catalogue
                .prepare(&batch(&[m]), 0, false)
                .unwrap()
                .needs_caller
        );
        assert!(catalogue.prepare(&[0x0a, 0x09], 0, false).is_err());
    }
}
