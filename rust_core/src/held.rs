//! The assignments a server process holds in memory: the latest one of each (experiment, user)
//! for sticky answers, every one by id for conversions, every one of a user for data
//! protection.
//!
//! Records live in one vector; three hash tables of record numbers index them. A table entry
//! keeps 32 bits of its key's hash, so growing a table never reads the records (a rehash of
//! millions of entries would otherwise miss the cache once per entry). Ids this process made
//! (`{prefix}-{seq:x}`) are kept as their sequence number, other ids as text. A record takes
//! about 80 bytes plus its user id, against about 400 bytes as Python tuples in dictionaries,
//! and adding a batch's assignments needs no Python object per item.
//!
//! A user id is hashed once per new record: the record keeps that hash, the (experiment, user)
//! hash is mixed from it and the experiment, and an own id's hash is mixed from its number, so
//! evicting a record hashes no text and formats no id. A batch's own ids are consecutive
//! numbers in consecutive records: they are found through a run (first id, first record,
//! length) instead of one entry each in the id table, which spares two random accesses to a
//! large table per assignment (its entry's insertion and, on eviction, its removal).
//!
//! With a capacity, the records form a ring: once it is full each new record takes the place
//! of the oldest, which leaves every index. The caller looks evicted assignments up in the
//! durable store; [`Held::may_be_stored`] says for which users: those whose latest one was
//! evicted pass a growing filter of their (experiment, user) keys (a user never seen passes
//! about one in a few hundred), or all users of an experiment a restart did not read whole
//! until [`Held::list_copied`] has put its stored users in the filter.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use hashbrown::hash_table::Entry as Found;
use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::block;
use crate::compact;
use crate::error::CoreError;
use crate::filter::{self, Growing};
use crate::keyed::KeyedMap;

const NONE: u32 = u32::MAX;
/// Parts of the filter of evicted keys: the first for a capacity's worth, the fifth for 16
/// times that, 2 x 31 bytes per assignment held in all. Past that, every user not held may
/// be stored (each is looked up).
const EVICTED_FILTERS: usize = 5;
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;
/// Another odd multiplier (splitmix64's), for the second step of a mix.
const MIX: u64 = 0xBF58_476D_1CE4_E5B9;

/// One assignment as the caller gives and gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment<'a> {
    pub id: Cow<'a, str>,
    pub handle: u64,
    pub user_id: &'a str,
    pub variant: usize,
    pub segment_key: &'a str,
    pub level: usize,
    pub propensity: f64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
enum Id {
    /// `{prefix}-{seq:x}` of this process's prefix.
    Own(u64),
    Other(Box<str>),
}

/// An [`Id`] borrowing its text (looked up or about to be held).
#[derive(Debug, Clone, Copy, PartialEq)]
enum IdRef<'a> {
    Own(u64),
    Other(&'a str),
}

impl Id {
    fn as_ref(&self) -> IdRef<'_> {
        match self {
            Id::Own(seq) => IdRef::Own(*seq),
            Id::Other(text) => IdRef::Other(text),
        }
    }
}

impl IdRef<'_> {
    fn to_owned(self) -> Id {
        match self {
            IdRef::Own(seq) => Id::Own(seq),
            IdRef::Other(text) => Id::Other(text.into()),
        }
    }
}

struct Record {
    id: Id,
    user: Box<str>,
    handle: u64,
    propensity: f64,
    created_ms: i64,
    key: u32,
    variant: u32,
    /// The user's previous and next records (NONE: none), newest first from `by_user`.
    older: u32,
    newer: u32,
    /// 32 bits of the user id's hash (see [`Held::hash_user`]).
    user_hash: u32,
    level: u16,
    live: bool,
    /// In `by_id` (else found through `own_runs`).
    by_id: bool,
}

/// Own ids `seq..seq + len` held in records `n..n + len` (each there until overwritten).
#[derive(Debug, Clone, Copy)]
struct Run {
    seq: u64,
    n: u32,
    len: u32,
}

impl Run {
    fn last(&self) -> (u64, u32) {
        (self.seq + u64::from(self.len) - 1, self.n + self.len - 1)
    }
}

/// A table entry: a record number and 32 bits of its key's hash.
#[derive(Clone, Copy)]
struct Entry {
    hash: u32,
    n: u32,
}

/// A number spread over all 64 bits (hashbrown takes the bucket from the low bits and a tag
/// from the top 7): the table hash of an experiment handle, or of a 32-bit key hash.
pub(crate) fn spread(x: u64) -> u64 {
    x.wrapping_mul(SPREAD)
}

/// The table hash of a 32-bit key hash.
fn wide(hash: u32) -> u64 {
    spread(u64::from(hash))
}

fn find(table: &HashTable<Entry>, hash: u32, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
    table
        .find(wide(hash), |e| e.hash == hash && eq(e.n))
        .map(|e| e.n)
}

fn insert(table: &mut HashTable<Entry>, hash: u32, n: u32) {
    table.insert_unique(wide(hash), Entry { hash, n }, |e| wide(e.hash));
}

fn remove(table: &mut HashTable<Entry>, hash: u32, n: u32) {
    if let Ok(entry) = table.find_entry(wide(hash), |e| e.n == n) {
        entry.remove();
    }
}

/// The hash of (experiment `handle`, a user whose hash is `user_hash`).
fn slot_hash(handle: u64, user_hash: u32) -> u32 {
    ((u64::from(user_hash) ^ spread(handle)).wrapping_mul(MIX) >> 32) as u32
}

/// A user id in the place of `old` (a dead record's): its allocation is reused when the
/// lengths agree (user ids of one service mostly have one length).
fn reuse_text(old: Box<str>, new: &str) -> Box<str> {
    if old.len() != new.len() {
        return new.into();
    }
    // Through a String: its capacity stays, and text copied from a str is not validated again.
    let mut text = old.into_string();
    text.clear();
    text.push_str(new);
    text.into_boxed_str()
}

/// One assignment's fields as [`Held::insert`] takes them.
struct NewRecord<'a> {
    id: IdRef<'a>,
    user: &'a str,
    handle: u64,
    variant: usize,
    key: u32,
    level: usize,
    propensity: f64,
    created_ms: i64,
}

/// Assignments held in memory; see the module's text.
pub struct Held {
    prefix: String,
    records: Vec<Record>,
    free: Vec<u32>,
    keys: Vec<Box<str>>,
    key_numbers: KeyedMap<Box<str>, u32>,
    /// (handle, user) -> the latest record given as latest.
    latest: HashTable<Entry>,
    /// id -> record, for records not in `own_runs`.
    by_id: HashTable<Entry>,
    /// Runs of a batch's own ids, in order of id (ids of different runs do not overlap).
    own_runs: VecDeque<Run>,
    /// user -> the user's newest record.
    by_user: HashTable<Entry>,
    seed: u64,
    live: usize,
    /// At most this many records (0: no bound); then `cursor` is the oldest record's slot.
    capacity: usize,
    cursor: usize,
    evictions: u64,
    /// Experiments whose latest assignment of some user was evicted, or some of whose stored
    /// assignments a restart did not read or hold (hashed by `wide`).
    evicted_from: HashTable<u64>,
    /// The (experiment, user) keys (`filter::user_key`) of latest assignments evicted.
    stored: Growing,
    /// Experiments with stored users a restart did not read back nor list yet.
    unlisted: HashSet<u64>,
    /// Per experiment, when the oldest row [`Held::add_copied`] read was made: a restart reads
    /// an experiment's newest rows, so the rows it left were made no later.
    read_from: HashMap<u64, i64>,
}

impl Held {
    /// The prefix of this process's own ids (`{prefix}-{seq:x}`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A store whose own ids are `{id_prefix}-{seq:x}`, with no bound.
    pub fn new(id_prefix: &str) -> Self {
        Self::bounded(id_prefix, 0)
    }

    /// A store of at most `capacity` assignments (0: no bound); the oldest go first.
    pub fn bounded(id_prefix: &str, capacity: usize) -> Self {
        Self::with_filter(id_prefix, capacity, 0)
    }

    /// [`Held::bounded`], the first part of whose filter of evicted keys holds `evicted_keys`
    /// (0: `capacity`, at least 65,536).
    pub fn with_filter(id_prefix: &str, capacity: usize, evicted_keys: usize) -> Self {
        let first = if evicted_keys > 0 {
            evicted_keys
        } else {
            capacity.max(1 << 16)
        };
        Held {
            prefix: id_prefix.to_string(),
            records: Vec::new(),
            free: Vec::new(),
            keys: Vec::new(),
            key_numbers: KeyedMap::default(),
            latest: HashTable::new(),
            by_id: HashTable::new(),
            own_runs: VecDeque::new(),
            by_user: HashTable::new(),
            // Keyed per process: user ids come from callers.
            seed: rand::random(),
            live: 0,
            capacity,
            cursor: 0,
            evictions: 0,
            evicted_from: HashTable::new(),
            stored: Growing::new(first, EVICTED_FILTERS),
            unlisted: HashSet::new(),
            read_from: HashMap::new(),
        }
    }

    /// Whether some stored assignment may not be held: one was evicted, or a restart did not
    /// read them all (then look up there what is not found here).
    pub fn incomplete(&self) -> bool {
        !self.evicted_from.is_empty()
    }

    /// Assignments evicted so far (the store was full).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether a latest assignment of experiment `handle` was evicted (or a restart left some
    /// of its stored ones): a user not found may then have one in the durable store.
    pub fn evicted(&self, handle: u64) -> bool {
        self.evicted_from
            .find(spread(handle), |&h| h == handle)
            .is_some()
    }

    fn mark_evicted(&mut self, handle: u64) {
        if let Found::Vacant(v) =
            self.evicted_from
                .entry(spread(handle), |&x| x == handle, |&x| spread(x))
        {
            v.insert(handle);
        }
    }

    /// Whether the latest assignment of `user_id` in experiment `handle` may be in the durable
    /// store and not here (then look it up there): it is not held, and one of the experiment
    /// was evicted and the user's key passes the filter of evicted ones, or the experiment
    /// is [`Held::unlisted`].
    pub fn may_be_stored(&self, handle: u64, user_id: &str) -> bool {
        self.evicted(handle)
            && self.latest(handle, user_id).is_none()
            && (self.unlisted.contains(&handle)
                || self.stored.may_hold(filter::user_key(handle, user_id)))
    }

    /// Experiment `handle` has stored assignments a restart did not read back: every user not
    /// held may have one until its stored users are listed ([`Held::list_copied`], then
    /// [`Held::listed`]).
    pub fn unlisted(&mut self, handle: u64) {
        self.mark_evicted(handle);
        self.unlisted.insert(handle);
    }

    /// The stored users of experiment `handle` are listed: only those may have a stored
    /// assignment not held.
    pub fn listed(&mut self, handle: u64) {
        self.unlisted.remove(&handle);
    }

    /// The experiments [`Held::unlisted`] and not yet [`Held::listed`], in order of handle.
    pub fn unlisted_experiments(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.unlisted.iter().copied().collect();
        out.sort_unstable();
        out
    }

    /// Bytes taken by the filter of evicted keys.
    pub fn evicted_filter_size(&self) -> usize {
        self.stored.size()
    }

    /// Whether the filter of evicted keys is full: every user not held of an experiment that
    /// evicted is then looked up in the durable store.
    pub fn evicted_filter_full(&self) -> bool {
        self.stored.full()
    }

    /// Live records.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Seeded: user ids (and ids not this process's) come from callers.
    fn hash_user(&self, s: &str) -> u32 {
        xxh3_64_with_seed(s.as_bytes(), self.seed) as u32
    }

    fn hash_id(&self, id: IdRef<'_>) -> u32 {
        match id {
            // Numbers this process chose: a mix is enough.
            IdRef::Own(seq) => ((seq ^ self.seed).wrapping_mul(MIX) >> 32) as u32,
            IdRef::Other(text) => self.hash_user(text),
        }
    }

    /// The sequence number of an id in this process's own form.
    fn own_seq(&self, id: &str) -> Option<u64> {
        let hex = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        let canonical = !hex.is_empty()
            && hex.len() <= 16
            && (hex == "0" || !hex.starts_with('0'))
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        canonical
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    }

    fn parse_id<'a>(&self, id: &'a str) -> IdRef<'a> {
        match self.own_seq(id) {
            Some(seq) => IdRef::Own(seq),
            None => IdRef::Other(id),
        }
    }

    fn id_text<'a>(&self, id: &'a Id) -> Cow<'a, str> {
        match id {
            Id::Own(seq) => {
                let mut out = String::with_capacity(self.prefix.len() + 17);
                write_own_id(&mut out, &self.prefix, *seq);
                Cow::Owned(out)
            }
            Id::Other(text) => Cow::Borrowed(text),
        }
    }

    fn key_number(&mut self, key: &str) -> u32 {
        if let Some(&n) = self.key_numbers.get(key) {
            return n;
        }
        let n = self.keys.len() as u32;
        self.keys.push(key.into());
        self.key_numbers.insert(key.into(), n);
        n
    }

    fn view(&self, n: u32) -> Assignment<'_> {
        let r = &self.records[n as usize];
        Assignment {
            id: self.id_text(&r.id),
            handle: r.handle,
            user_id: &r.user,
            variant: r.variant as usize,
            segment_key: &self.keys[r.key as usize],
            level: r.level as usize,
            propensity: r.propensity,
            created_ms: r.created_ms,
        }
    }

    fn find_id(&self, id: &str) -> Option<u32> {
        let wanted = self.parse_id(id);
        if let IdRef::Own(seq) = wanted {
            if let Some(n) = self.find_in_runs(seq) {
                return Some(n);
            }
        }
        let records = &self.records;
        find(&self.by_id, self.hash_id(wanted), |n| {
            records[n as usize].id.as_ref() == wanted
        })
    }

    /// The record of own id `seq` if a run holds it.
    fn find_in_runs(&self, seq: u64) -> Option<u32> {
        let i = self
            .own_runs
            .partition_point(|r| r.seq <= seq)
            .checked_sub(1)?;
        let run = self.own_runs[i];
        let k = seq - run.seq;
        if k >= u64::from(run.len) {
            return None;
        }
        let n = run.n + k as u32;
        let r = &self.records[n as usize];
        (r.live && !r.by_id && r.id == Id::Own(seq)).then_some(n)
    }

    /// Note own id `seq` held in record `n` (not in `by_id`), if it extends the last run or
    /// can start one; false: it cannot (the caller indexes it by id).
    fn add_to_runs(&mut self, seq: u64, n: u32) -> bool {
        match self.own_runs.back_mut() {
            Some(run) if run.last() == (seq.wrapping_sub(1), n.wrapping_sub(1)) => {
                run.len += 1;
                true
            }
            Some(run) if run.last().0 >= seq => false,
            _ => {
                self.own_runs.push_back(Run { seq, n, len: 1 });
                true
            }
        }
    }

    /// Drop the oldest runs whose records have all been overwritten (a ring overwrites a run's
    /// records in order, its last one last). Without a capacity, forgotten records are reused
    /// in any order: runs stay (one per batch at most) and lookups check the record.
    fn prune_runs(&mut self) {
        if self.capacity == 0 {
            return;
        }
        while let Some(run) = self.own_runs.front() {
            let (seq, n) = run.last();
            let r = &self.records[n as usize];
            if !r.by_id && r.id == Id::Own(seq) {
                break;
            }
            self.own_runs.pop_front();
        }
    }

    fn new_record<'a>(&self, a: &'a Assignment<'_>, key: u32) -> NewRecord<'a> {
        NewRecord {
            id: self.parse_id(&a.id),
            user: a.user_id,
            handle: a.handle,
            variant: a.variant,
            key,
            level: a.level,
            propensity: a.propensity,
            created_ms: a.created_ms,
        }
    }

    /// Hold `a`; with `latest`, it is also the (experiment, user)'s latest. An id held already
    /// is updated in place.
    pub fn add(&mut self, a: &Assignment<'_>, latest: bool) {
        let key = self.key_number(a.segment_key);
        let n = match self.find_id(&a.id) {
            Some(n) => {
                let r = &mut self.records[n as usize];
                r.variant = a.variant as u32;
                r.key = key;
                r.level = a.level as u16;
                r.propensity = a.propensity;
                r.created_ms = a.created_ms;
                n
            }
            None => {
                let record = self.new_record(a, key);
                let n = self.insert(&record);
                self.index_id(n);
                n
            }
        };
        if latest {
            self.set_latest(n);
        }
    }

    /// Hold `a`, an assignment whose id is new (this process made it just now), as its
    /// (experiment, user)'s latest: `add` without looking the id up.
    pub fn add_new(&mut self, a: &Assignment<'_>) {
        debug_assert!(self.find_id(&a.id).is_none(), "{} is held already", a.id);
        let key = self.key_number(a.segment_key);
        let record = self.new_record(a, key);
        let n = self.insert(&record);
        self.index_id(n);
        self.set_latest(n);
    }

    /// Hold a batch's new assignments (made just now by this process), each as its
    /// (experiment, user)'s latest, in order: `add_new` of each, with each segment key looked
    /// up once and the indexes grown once.
    pub fn add_made(&mut self, made: &Made) {
        let keys: Vec<u32> = made.keys.iter().map(|k| self.key_number(k)).collect();
        let own = made.id_prefix == self.prefix;
        let room = if self.capacity == 0 {
            made.len().saturating_sub(self.free.len())
        } else {
            made.len()
                .min(self.capacity - self.records.len().min(self.capacity))
        };
        self.records.reserve(room);
        if !own {
            self.by_id.reserve(room, |e| wide(e.hash));
        }
        self.by_user.reserve(room, |e| wide(e.hash));
        self.latest.reserve(room, |e| wide(e.hash));
        let mut text = String::new();
        for k in 0..made.len() {
            let id = if own {
                IdRef::Own(made.seqs[k])
            } else {
                made.write_id(k, &mut text);
                self.parse_id(&text)
            };
            debug_assert!(self.find_id(&made.id_text(k)).is_none(), "held already");
            let record = NewRecord {
                id,
                user: made.user_id(k),
                handle: made.handles[k],
                variant: made.variants[k] as usize,
                key: keys[made.key_of[k] as usize],
                level: usize::from(made.levels[k]),
                propensity: made.propensities[k],
                created_ms: made.created_at(k),
            };
            let n = self.insert(&record);
            if !(own && self.add_to_runs(made.seqs[k], n)) {
                self.index_id(n);
            }
            self.set_latest(n);
        }
        self.prune_runs();
    }

    /// Put `a` in a record (not yet in `by_id` or `own_runs`: see [`Held::index_id`]) as its
    /// user's newest.
    fn insert(&mut self, a: &NewRecord<'_>) -> u32 {
        // The slot first: an eviction changes the indexes.
        let reused = self.free_slot();
        let n = reused.unwrap_or(self.records.len() as u32);
        let user_hash = self.hash_user(a.user);
        let records = &self.records;
        let newest = match self.by_user.entry(
            wide(user_hash),
            |e| e.hash == user_hash && &*records[e.n as usize].user == a.user,
            |e| wide(e.hash),
        ) {
            Found::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().n, n)),
            Found::Vacant(v) => {
                v.insert(Entry { hash: user_hash, n });
                None
            }
        };
        let mut record = Record {
            id: a.id.to_owned(),
            user: Box::default(),
            handle: a.handle,
            propensity: a.propensity,
            created_ms: a.created_ms,
            key: a.key,
            variant: a.variant as u32,
            older: newest.unwrap_or(NONE),
            newer: NONE,
            user_hash,
            level: a.level as u16,
            live: true,
            by_id: false,
        };
        match reused {
            Some(n) => {
                let old = &mut self.records[n as usize];
                record.user = reuse_text(std::mem::take(&mut old.user), a.user);
                *old = record;
            }
            None => {
                record.user = a.user.into();
                self.records.push(record);
            }
        }
        self.live += 1;
        if let Some(m) = newest {
            self.records[m as usize].newer = n;
        }
        n
    }

    /// Index record `n` by its id.
    fn index_id(&mut self, n: u32) {
        let r = &mut self.records[n as usize];
        r.by_id = true;
        let hash = self.hash_id(self.records[n as usize].id.as_ref());
        insert(&mut self.by_id, hash, n);
    }

    /// A dead record's slot to reuse (evicting the oldest record when the store is full), or
    /// None: push a new one.
    fn free_slot(&mut self) -> Option<u32> {
        if self.capacity == 0 {
            return self.free.pop();
        }
        if self.records.len() < self.capacity {
            return None;
        }
        let n = self.cursor as u32;
        self.cursor = (self.cursor + 1) % self.capacity;
        if self.records[n as usize].live {
            self.evict(n);
        }
        Some(n)
    }

    /// Take record `n` (the oldest) out of every index. Its user id stays, for the next
    /// record in its place to reuse.
    fn evict(&mut self, n: u32) {
        let r = &mut self.records[n as usize];
        let (handle, older, newer, user_hash) = (r.handle, r.older, r.newer, r.user_hash);
        r.older = NONE;
        r.newer = NONE;
        r.live = false;
        if std::mem::take(&mut r.by_id) {
            let id_hash = self.hash_id(self.records[n as usize].id.as_ref());
            remove(&mut self.by_id, id_hash, n);
        }
        let latest_hash = slot_hash(handle, user_hash);
        if let Ok(entry) = self.latest.find_entry(wide(latest_hash), |e| e.n == n) {
            entry.remove();
            let user = &self.records[n as usize].user;
            self.stored.insert(filter::user_key(handle, user));
            self.mark_evicted(handle);
        }
        // Out of the user's chain (doubly linked: a user with many records costs nothing more).
        if older != NONE {
            self.records[older as usize].newer = newer;
        }
        if newer != NONE {
            self.records[newer as usize].older = older;
        } else if let Ok(entry) = self.by_user.find_entry(wide(user_hash), |e| e.n == n) {
            if older == NONE {
                entry.remove();
            } else {
                entry.into_mut().n = older;
            }
        }
        self.live -= 1;
        self.evictions += 1;
    }

    fn set_latest(&mut self, n: u32) {
        let (handle, hash) = {
            let r = &self.records[n as usize];
            (r.handle, slot_hash(r.handle, r.user_hash))
        };
        let records = &self.records;
        let user = &records[n as usize].user;
        let eq = |e: &Entry| {
            e.hash == hash && {
                let r = &records[e.n as usize];
                r.handle == handle && r.user == *user
            }
        };
        match self.latest.entry(wide(hash), eq, |e| wide(e.hash)) {
            Found::Occupied(mut o) => o.get_mut().n = n,
            Found::Vacant(v) => {
                v.insert(Entry { hash, n });
            }
        }
    }

    /// The latest assignment of `user_id` in experiment `handle`.
    pub fn latest(&self, handle: u64, user_id: &str) -> Option<Assignment<'_>> {
        let records = &self.records;
        find(
            &self.latest,
            slot_hash(handle, self.hash_user(user_id)),
            |m| {
                let r = &records[m as usize];
                r.handle == handle && &*r.user == user_id
            },
        )
        .map(|n| self.view(n))
    }

    pub fn by_id(&self, id: &str) -> Option<Assignment<'_>> {
        self.find_id(id).map(|n| self.view(n))
    }

    fn newest_of_user(&self, user_id: &str) -> Option<u32> {
        let records = &self.records;
        find(&self.by_user, self.hash_user(user_id), |m| {
            &*records[m as usize].user == user_id
        })
    }

    fn numbers_of_user(&self, user_id: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut n = self.newest_of_user(user_id).unwrap_or(NONE);
        while n != NONE {
            out.push(n);
            n = self.records[n as usize].older;
        }
        out
    }

    /// Every assignment of `user_id`, newest first.
    pub fn of_user(&self, user_id: &str) -> Vec<Assignment<'_>> {
        self.numbers_of_user(user_id)
            .into_iter()
            .map(|n| self.view(n))
            .collect()
    }

    /// Every user id held.
    pub fn user_ids(&self) -> impl Iterator<Item = &str> {
        self.by_user
            .iter()
            .map(|e| &*self.records[e.n as usize].user)
    }

    /// Drop every assignment of `user_id`; `f` sees each before it goes (newest first).
    pub fn forget_user(&mut self, user_id: &str, mut f: impl FnMut(&Assignment<'_>)) -> usize {
        let numbers = self.numbers_of_user(user_id);
        let user_hash = self.hash_user(user_id);
        for &n in &numbers {
            f(&self.view(n));
            let r = &self.records[n as usize];
            let latest_hash = slot_hash(r.handle, user_hash);
            if r.by_id {
                let id_hash = self.hash_id(r.id.as_ref());
                remove(&mut self.by_id, id_hash, n);
            }
            remove(&mut self.latest, latest_hash, n);
        }
        if let Some(&newest) = numbers.first() {
            remove(&mut self.by_user, user_hash, newest);
        }
        for &n in &numbers {
            let r = &mut self.records[n as usize];
            // An own id stays: a run ends at a record overwritten, not at one forgotten.
            if let Id::Other(_) = r.id {
                r.id = Id::Own(0);
            }
            r.by_id = false;
            r.user = Box::default();
            r.older = NONE;
            r.newer = NONE;
            r.live = false;
            // A ring (with a capacity) reuses its slots in turn.
            if self.capacity == 0 {
                self.free.push(n);
            }
        }
        self.live -= numbers.len();
        numbers.len()
    }
}

/// Assignments made in one call (a batch's new ones), or by unary calls since the write-behind
/// last took them (see [`Made::push_at`]), as the write-behind takes them: one object with
/// columns, no Python object per item.
#[derive(Debug, Default, Clone)]
pub struct Made {
    id_prefix: String,
    created_ms: i64,
    /// Each assignment's time, where it is not `created_ms` (unary calls' logs); else empty.
    created: Vec<i64>,
    seqs: Vec<u64>,
    handles: Vec<u64>,
    users: String,
    user_ends: Vec<usize>,
    variants: Vec<u32>,
    keys: Vec<Box<str>>,
    key_of: Vec<u32>,
    levels: Vec<u16>,
    propensities: Vec<f64>,
}

impl Made {
    /// Assignments named `{id_prefix}-{seq:x}`, made at `created_ms`.
    pub fn new(id_prefix: &str, created_ms: i64) -> Self {
        Made {
            id_prefix: id_prefix.to_string(),
            created_ms,
            ..Made::default()
        }
    }

    /// `push_at` the time the log was made at (a batch's assignments, all made at once).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        seq: u64,
        handle: u64,
        user_id: &str,
        variant: usize,
        segment_key: &str,
        level: usize,
        propensity: f64,
    ) {
        let at = self.created_ms;
        self.push_at(
            at,
            seq,
            handle,
            user_id,
            variant,
            segment_key,
            level,
            propensity,
        );
    }

    /// Add an assignment made at `created_ms` (the assignments of unary calls, each made at its
    /// own time: `created` is kept only once two rows differ).
    #[allow(clippy::too_many_arguments)]
    pub fn push_at(
        &mut self,
        created_ms: i64,
        seq: u64,
        handle: u64,
        user_id: &str,
        variant: usize,
        segment_key: &str,
        level: usize,
        propensity: f64,
    ) {
        if self.created.is_empty() {
            if self.is_empty() {
                self.created_ms = created_ms;
            }
            if created_ms != self.created_ms {
                self.created = vec![self.created_ms; self.len()];
            }
        }
        if !self.created.is_empty() {
            self.created.push(created_ms);
        }
        if self.keys.last().map(|k| &**k) != Some(segment_key) {
            self.keys.push(segment_key.into());
        }
        self.seqs.push(seq);
        self.handles.push(handle);
        self.users.push_str(user_id);
        self.user_ends.push(self.users.len());
        self.variants.push(variant as u32);
        self.key_of.push((self.keys.len() - 1) as u32);
        self.levels.push(level as u16);
        self.propensities.push(propensity);
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// When the first assignment was made (all of them, unless made by `push_at` at
    /// different times: see `created_at`).
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// When assignment `k` was made.
    pub fn created_at(&self, k: usize) -> i64 {
        self.created.get(k).copied().unwrap_or(self.created_ms)
    }

    /// Everything made so far; this log starts empty again (same id prefix).
    pub fn take(&mut self) -> Made {
        let fresh = Made::new(&self.id_prefix, 0);
        std::mem::replace(self, fresh)
    }

    /// The id of assignment `k`, written into `out`.
    pub fn write_id(&self, k: usize, out: &mut String) {
        write_own_id(out, &self.id_prefix, self.seqs[k]);
    }

    /// The id of assignment `k`.
    pub fn id_text(&self, k: usize) -> String {
        let mut out = String::new();
        self.write_id(k, &mut out);
        out
    }

    pub fn user_id(&self, k: usize) -> &str {
        let start = if k == 0 { 0 } else { self.user_ends[k - 1] };
        &self.users[start..self.user_ends[k]]
    }

    pub fn segment_key(&self, k: usize) -> &str {
        &self.keys[self.key_of[k] as usize]
    }

    pub fn variant(&self, k: usize) -> usize {
        self.variants[k] as usize
    }

    pub fn level(&self, k: usize) -> usize {
        usize::from(self.levels[k])
    }

    pub fn propensity(&self, k: usize) -> f64 {
        self.propensities[k]
    }

    /// Assignment `k`, its id in `id` (written there).
    pub fn get<'a>(&'a self, k: usize, id: &'a str) -> Assignment<'a> {
        Assignment {
            id: Cow::Borrowed(id),
            handle: self.handles[k],
            user_id: self.user_id(k),
            variant: self.variants[k] as usize,
            segment_key: self.segment_key(k),
            level: self.levels[k] as usize,
            propensity: self.propensities[k],
            created_ms: self.created_at(k),
        }
    }

    /// The same without `user_id`'s assignments.
    pub fn without_user(&self, user_id: &str) -> Made {
        self.retained(|k| self.user_id(k) != user_id)
    }

    /// The same without the assignments at `positions`.
    pub fn without(&self, positions: &[usize]) -> Made {
        let dropped: HashSet<usize> = positions.iter().copied().collect();
        self.retained(|k| !dropped.contains(&k))
    }

    /// The assignments `keep` keeps, in order.
    fn retained(&self, keep: impl Fn(usize) -> bool) -> Made {
        let mut out = Made::new(&self.id_prefix, self.created_ms);
        for k in 0..self.len() {
            if keep(k) {
                out.push_at(
                    self.created_at(k),
                    self.seqs[k],
                    self.handles[k],
                    self.user_id(k),
                    self.variants[k] as usize,
                    self.segment_key(k),
                    self.levels[k] as usize,
                    self.propensities[k],
                );
            }
        }
        out
    }

    /// Positions of `user_id`'s assignments.
    pub fn positions_of_user(&self, user_id: &str) -> Vec<usize> {
        (0..self.len())
            .filter(|&k| self.user_id(k) == user_id)
            .collect()
    }

    /// (handle, cascade level) -> assignments, in order of first appearance.
    pub fn level_counts(&self) -> Vec<((u64, usize), usize)> {
        // A batch has long runs of one (handle, level): each run is counted whole, and only a
        // new run looks its pair up.
        let mut out: Vec<((u64, usize), usize)> = Vec::new();
        let mut index: HashMap<(u64, u16), usize> = HashMap::new();
        let mut k = 0;
        while k < self.handles.len() {
            let pair = (self.handles[k], self.levels[k]);
            let run = self.handles[k..]
                .iter()
                .zip(&self.levels[k..])
                .take_while(|&(&h, &lv)| (h, lv) == pair)
                .count();
            let i = *index.entry(pair).or_insert_with(|| {
                out.push(((pair.0, pair.1 as usize), 0));
                out.len() - 1
            });
            out[i].1 += run;
            k += run;
        }
        out
    }

    /// Distinct (handle, segment key) pairs, in order of first appearance.
    pub fn distinct_keys(&self) -> Vec<(u64, &str)> {
        // Keys are stored once per run (`key_of`), so a key that comes back after another is
        // stored again: pairs are compared by text, and only where the pair changes.
        let mut seen: HashSet<(u64, &str)> = HashSet::new();
        let mut out = Vec::new();
        let mut last = None;
        for (&h, &k) in self.handles.iter().zip(&self.key_of) {
            if last != Some((h, k)) {
                last = Some((h, k));
                let pair = (h, &*self.keys[k as usize]);
                if seen.insert(pair) {
                    out.push(pair);
                }
            }
        }
        out
    }

    pub fn handles(&self) -> &[u64] {
        &self.handles
    }

    /// Append the assignments as rows of PostgreSQL's binary COPY format, columns
    /// [`COPY_COLUMNS`] (see [`copy_header`] and [`copy_trailer`]).
    pub fn copy_rows(&self, out: &mut Vec<u8>) {
        let hashes: Vec<u64> = self.keys.iter().map(|k| crate::keys::key_hash(k)).collect();
        out.reserve(self.len() * COPY_ROW_BYTES);
        let mut id = String::new();
        for k in 0..self.len() {
            self.write_id(k, &mut id);
            let key = self.key_of[k] as usize;
            let a = Assignment {
                id: Cow::Borrowed(&id),
                handle: self.handles[k],
                user_id: self.user_id(k),
                variant: self.variants[k] as usize,
                segment_key: &self.keys[key],
                level: self.levels[k] as usize,
                propensity: self.propensities[k],
                created_ms: self.created_at(k),
            };
            copy_row(out, &a, hashes[key]);
        }
    }

    /// Its columns, as a compact block stores them (see [`crate::compact`]).
    pub fn columns(&self) -> compact::Columns<'_> {
        compact::Columns {
            ids: compact::Ids::Numbered {
                prefix: &self.id_prefix,
                seqs: &self.seqs,
            },
            created_ms: self.created_ms,
            created: &self.created,
            handles: &self.handles,
            users: &self.users,
            user_ends: &self.user_ends,
            variants: &self.variants,
            keys: &self.keys,
            key_of: &self.key_of,
            levels: &self.levels,
            propensities: &self.propensities,
        }
    }

    /// Append its assignments to a compact stream as one group (see [`crate::compact`]), and
    /// each one's (experiment, user) and id to `filter` (see [`crate::filter`]; the ids as
    /// ranges when they run in few, as a batch's do): a block's stream and its filter, built on
    /// the write-behind's thread.
    pub fn compact_into_filter(&self, out: &mut Vec<u8>, filter: &mut crate::filter::Filter) {
        self.columns().write(out);
        if filter::ids_as_ranges(&self.seqs) {
            filter.insert_id_ranges(&self.id_prefix, &self.seqs);
        } else {
            let mut id = String::new();
            for k in 0..self.len() {
                self.write_id(k, &mut id);
                filter.insert(filter::id_key(&id));
            }
        }
        for k in 0..self.len() {
            filter.insert(filter::user_key(self.handles[k], self.user_id(k)));
        }
    }

    /// How many keys `compact_into_filter` puts in a filter: one a user, and one an id unless
    /// its ids go in as ranges.
    pub fn filter_keys(&self) -> usize {
        let ids = if filter::ids_as_ranges(&self.seqs) {
            0
        } else {
            self.len()
        };
        self.len() + ids
    }
}

/// Bytes to set aside per row of [`copy_row`] (its fixed part is 74 bytes; ids, user ids and
/// segment keys make the rest): a block's stream is written without growing it again.
pub const COPY_ROW_BYTES: usize = 128;

/// Append one assignment as a row of PostgreSQL's binary COPY format, columns
/// [`COPY_COLUMNS`]; `segment_hash` is its segment key's hash.
pub fn copy_row(out: &mut Vec<u8>, a: &Assignment<'_>, segment_hash: u64) {
    let text = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as i32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend_from_slice(&(COPY_COLUMNS.len() as i16).to_be_bytes());
    text(out, &a.id);
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&(a.handle as i64).to_be_bytes());
    text(out, a.user_id);
    out.extend_from_slice(&2i32.to_be_bytes());
    out.extend_from_slice(&(a.variant as i16).to_be_bytes());
    text(out, a.segment_key);
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&(segment_hash as i64).to_be_bytes());
    out.extend_from_slice(&2i32.to_be_bytes());
    out.extend_from_slice(&(a.level as i16).to_be_bytes());
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&a.propensity.to_bits().to_be_bytes());
    out.extend_from_slice(&8i32.to_be_bytes());
    let micros = (a.created_ms - POSTGRES_EPOCH_MS).saturating_mul(1000);
    out.extend_from_slice(&micros.to_be_bytes());
}

/// The `assignments` columns [`Made::copy_rows`] writes, in order (types text, bigint, text,
/// smallint, text, bigint, smallint, double precision, timestamptz). `created_at` is when the
/// assignment was made, not when its row was written (a block's rows are written minutes
/// later): the latest of a user is the one made last. Streams of blocks stored before it was
/// written have the first eight.
pub const COPY_COLUMNS: [&str; 9] = [
    "id",
    "experiment_id",
    "user_id",
    "variant",
    "segment_key",
    "segment_hash",
    "cascade_level",
    "propensity",
    "created_at",
];

/// The start of a binary COPY stream: signature, flags, header extension length.
pub fn copy_header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
}

/// The end of a binary COPY stream.
pub fn copy_trailer(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// The columns of the binary COPY stream [`Held::add_copied`] reads, in order (types text,
/// text, smallint, text, smallint, double precision or NULL, timestamptz).
pub const RESTORE_COLUMNS: [&str; 7] = [
    "id",
    "user_id",
    "variant",
    "segment_key",
    "cascade_level",
    "propensity",
    "created_at",
];

/// PostgreSQL's epoch (2000-01-01 UTC) in Unix milliseconds.
const POSTGRES_EPOCH_MS: i64 = 946_684_800_000;

/// What one [`Held::add_copied`] call read.
#[derive(Debug, Default, PartialEq)]
pub struct Copied<'d> {
    /// Bytes read: whole rows (and the header, the trailer). The rest is the start of a row
    /// whose end is still to come.
    pub consumed: usize,
    /// Rows read: assignments held, or users listed.
    pub rows: usize,
    /// Their distinct segment keys, in order of first appearance.
    pub keys: Vec<&'d str>,
    /// The stream's trailer was read: nothing may follow.
    pub ended: bool,
}

/// A reader of whole fields of one row; `None` once the data ends within the row.
pub(crate) struct Fields<'d> {
    pub(crate) data: &'d [u8],
    pub(crate) at: usize,
}

impl<'d> Fields<'d> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'d [u8]> {
        let bytes = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    pub(crate) fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The header of a binary COPY stream (signature, flags, extension): `Ok(false)` if the
    /// data ends within it.
    pub(crate) fn header(&mut self) -> Result<bool, CoreError> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        let Some(signature) = self.take(SIGNATURE.len()) else {
            return Ok(false);
        };
        if signature != SIGNATURE {
            return Err(CoreError::invalid("data: not a binary COPY stream"));
        }
        let (Some(_flags), Some(extension)) = (self.i32(), self.i32()) else {
            return Ok(false);
        };
        if extension < 0 {
            return Err(CoreError::invalid(format!(
                "data: a COPY header extension of length {extension}"
            )));
        }
        Ok(self.take(extension as usize).is_some())
    }

    /// One field: its bytes, or `Some(None)` for NULL; `Ok(None)` if the data ends within it.
    pub(crate) fn field(&mut self) -> Result<Option<Option<&'d [u8]>>, CoreError> {
        Ok(match self.i32() {
            None => None,
            Some(-1) => Some(None),
            Some(n) if n >= 0 => self.take(n as usize).map(Some),
            Some(n) => {
                return Err(CoreError::invalid(format!(
                    "data: a copied field has length {n}"
                )))
            }
        })
    }
}

fn copied_field<'d>(column: &str, bytes: Option<&'d [u8]>) -> Result<&'d [u8], CoreError> {
    bytes
        .ok_or_else(|| CoreError::invalid(format!("data: {column} is NULL in a copied assignment")))
}

/// The text of field `column` of a copied row (an error names the column).
pub(crate) fn copied_text<'d>(column: &str, bytes: Option<&'d [u8]>) -> Result<&'d str, CoreError> {
    std::str::from_utf8(copied_field(column, bytes)?).map_err(|_| {
        CoreError::invalid(format!(
            "data: {column} of a copied assignment is not UTF-8"
        ))
    })
}

/// The `N` bytes of number field `column` of a copied row (an error names the column).
pub(crate) fn copied_number<const N: usize>(
    column: &str,
    bytes: Option<&[u8]>,
) -> Result<[u8; N], CoreError> {
    copied_field(column, bytes)?.try_into().map_err(|_| {
        CoreError::invalid(format!(
            "data: {column} of a copied assignment is not {N} bytes"
        ))
    })
}

/// A `timestamptz` of a COPY stream (microseconds since PostgreSQL's epoch) in Unix
/// milliseconds.
pub(crate) fn unix_ms(micros: [u8; 8]) -> i64 {
    i64::from_be_bytes(micros).div_euclid(1000) + POSTGRES_EPOCH_MS
}

/// Read the whole rows of `N` fields in `data`, a piece of a binary COPY stream (`at_start`:
/// it begins with the stream's header), giving each to `each`. A row cut off at the end of
/// `data` is left unread (see [`Copied::consumed`]).
fn read_copied<'d, const N: usize>(
    data: &'d [u8],
    at_start: bool,
    mut each: impl FnMut([Option<&'d [u8]>; N]) -> Result<(), CoreError>,
) -> Result<Copied<'d>, CoreError> {
    let mut out = Copied::default();
    let mut fields = Fields { data, at: 0 };
    if at_start {
        if !fields.header()? {
            return Ok(out);
        }
        out.consumed = fields.at;
    }
    while let Some(count) = fields.i16() {
        if count == -1 {
            out.consumed = fields.at;
            out.ended = true;
            if fields.at != data.len() {
                return Err(CoreError::invalid("data: bytes after the COPY trailer"));
            }
            break;
        }
        if count as usize != N {
            return Err(CoreError::invalid(format!(
                "data: a copied row has {count} columns, not {N}"
            )));
        }
        let mut row: [Option<&'d [u8]>; N] = [None; N];
        let mut whole = true;
        for value in &mut row {
            match fields.field()? {
                Some(v) => *value = v,
                None => {
                    whole = false;
                    break;
                }
            }
        }
        if !whole {
            break;
        }
        each(row)?;
        out.rows += 1;
        out.consumed = fields.at;
    }
    Ok(out)
}

impl Held {
    /// Hold the assignments of experiment `handle` in `data`, a piece of a PostgreSQL binary
    /// COPY stream of [`RESTORE_COLUMNS`] (oldest first), each as its (experiment, user)'s
    /// latest, as [`Held::add`] does. `at_start`: `data` begins with the stream's header. A
    /// row cut off at the end of `data` is left unread (see [`Copied::consumed`]): the caller
    /// passes it again with what follows. A NULL propensity is held as 0.
    pub fn add_copied<'d>(
        &mut self,
        handle: u64,
        data: &'d [u8],
        at_start: bool,
    ) -> Result<Copied<'d>, CoreError> {
        let mut keys = Vec::new();
        let mut seen: HashSet<&'d str> = HashSet::new();
        let mut oldest = i64::MAX;
        let mut out = read_copied(data, at_start, |row| {
            let [id, user_id, variant, segment_key, level, propensity, created_at] = row;
            let column = |i: usize| RESTORE_COLUMNS[i];
            let segment_key = copied_text(column(3), segment_key)?;
            let propensity = match propensity {
                None => 0.0,
                p => f64::from_be_bytes(copied_number(column(5), p)?),
            };
            let a = Assignment {
                id: Cow::Borrowed(copied_text(column(0), id)?),
                handle,
                user_id: copied_text(column(1), user_id)?,
                variant: i16::from_be_bytes(copied_number(column(2), variant)?).max(0) as usize,
                segment_key,
                level: i16::from_be_bytes(copied_number(column(4), level)?).max(0) as usize,
                propensity,
                created_ms: unix_ms(copied_number(column(6), created_at)?),
            };
            oldest = oldest.min(a.created_ms);
            self.add(&a, true);
            if keys.last() != Some(&segment_key) && seen.insert(segment_key) {
                keys.push(segment_key);
            }
            Ok(())
        })?;
        out.keys = keys;
        if oldest != i64::MAX {
            let from = self.read_from.entry(handle).or_insert(oldest);
            *from = (*from).min(oldest);
        }
        Ok(out)
    }

    /// At a restart that leaves the assignment blocks unexpanded, take in one block's rows
    /// (`payload`: its decompressed payload, see [`block::each_row`]; `made_ms`: when rows
    /// stored without `created_at` were made), after the table's rows ([`Held::add_copied`]) and
    /// [`Held::unlisted`]. A row is held as its (experiment, user)'s latest when it was made
    /// after the latest held, or, none held, when no newer one may be stored: none of the user's
    /// was evicted (filter) and it was made after the rows of its experiment the restart left
    /// unread. Any other row is left to the store (found there by id), and when no latest is
    /// held its user may have a newer one there: the key goes in the filter. (rows, held).
    pub fn add_block(&mut self, payload: &[u8], made_ms: i64) -> Result<(usize, usize), CoreError> {
        let (mut rows, mut held) = (0, 0);
        block::each_row(payload, block::Wanted::All, |r| {
            rows += 1;
            let created_ms = r.created_ms.unwrap_or(made_ms);
            let key = filter::user_key(r.handle, r.user_id);
            let (has_latest, hold) = match self.latest(r.handle, r.user_id) {
                Some(l) => (
                    true,
                    (created_ms, r.id.len(), r.id) > (l.created_ms, l.id.len(), &*l.id),
                ),
                None => {
                    let after_unread = !self.unlisted.contains(&r.handle)
                        || self
                            .read_from
                            .get(&r.handle)
                            .is_some_and(|&from| created_ms > from);
                    (false, after_unread && !self.stored.may_hold(key))
                }
            };
            if hold {
                let a = Assignment {
                    id: Cow::Borrowed(r.id),
                    handle: r.handle,
                    user_id: r.user_id,
                    variant: r.variant.max(0) as usize,
                    segment_key: r.segment_key,
                    level: r.level.max(0) as usize,
                    propensity: r.propensity,
                    created_ms,
                };
                self.add(&a, true);
                held += 1;
            } else {
                if !has_latest {
                    self.stored.insert(key);
                }
                self.mark_evicted(r.handle);
            }
        })?;
        Ok((rows, held))
    }

    /// Put the users of experiment `handle` in `data`, a piece of a binary COPY stream of one
    /// text column (stored users' ids), among those that may have a stored assignment not
    /// held ([`Held::may_be_stored`]), as [`Held::add_copied`] reads its pieces.
    pub fn list_copied<'d>(
        &mut self,
        handle: u64,
        data: &'d [u8],
        at_start: bool,
    ) -> Result<Copied<'d>, CoreError> {
        read_copied(data, at_start, |[user_id]: [Option<&'d [u8]>; 1]| {
            let user_id = copied_text("user_id", user_id)?;
            self.stored.insert(filter::user_key(handle, user_id));
            Ok(())
        })
    }

    /// Once the filter of evicted keys is full (it passes every key, so each user not held of
    /// an experiment that evicted is looked up), start a new one, sized for the keys the full
    /// one took and what memory holds, and mark every experiment that evicted unlisted: looked
    /// up all the same until its stored users are listed into the new filter. The caller
    /// first has every assignment made before this call stored, then lists, in one snapshot
    /// of the store, every block's users ([`Held::list_keys`]) and the table's
    /// ([`Held::list_copied`]), then calls [`Held::listed`]. Evictions from now on go into
    /// the new filter. False (nothing done) unless the filter is full, or while a listing
    /// (a restart's) is under way: its keys would go partly into the old filter.
    pub fn renew_filter(&mut self) -> bool {
        if !self.stored.full() || !self.unlisted.is_empty() {
            return false;
        }
        let took = usize::try_from(self.evictions).unwrap_or(usize::MAX);
        self.stored = Growing::new(
            took.saturating_add(self.capacity).max(1 << 16),
            EVICTED_FILTERS,
        );
        self.unlisted.extend(self.evicted_from.iter().copied());
        true
    }

    /// Put a block's users ([`block_user_keys`], read without the store) of experiments that
    /// evicted among those that may have a stored assignment not held.
    pub fn list_keys(&mut self, keys: &[(u64, u64)]) {
        for &(handle, key) in keys {
            if self.evicted(handle) {
                self.stored.insert(key);
            }
        }
    }
}

/// The (experiment handle, user key) of each row of a block (its decompressed payload),
/// for [`Held::list_keys`].
pub fn block_user_keys(payload: &[u8]) -> Result<Vec<(u64, u64)>, CoreError> {
    let mut keys = Vec::new();
    block::each_row(payload, block::Wanted::All, |r| {
        keys.push((r.handle, filter::user_key(r.handle, r.user_id)))
    })?;
    Ok(keys)
}

/// Write into `out` (cleared first) the id `{prefix}-{seq:x}` that a process whose ids have
/// `prefix` gives its assignment number `seq`.
#[inline]
pub fn write_own_id(out: &mut String, prefix: &str, seq: u64) {
    out.clear();
    out.push_str(prefix);
    out.push('-');
    push_hex(out, seq);
}

/// Append `n` in lower-case hexadecimal without leading zeros (as `{:x}` writes it).
pub fn push_hex(out: &mut String, n: u64) {
    let digits = (64 - (n | 1).leading_zeros() as usize).div_ceil(4);
    for i in (0..digits).rev() {
        out.push(char::from(
            b"0123456789abcdef"[((n >> (4 * i)) & 0xf) as usize],
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a<'a>(id: &'a str, handle: u64, user: &'a str, variant: usize) -> Assignment<'a> {
        Assignment {
            id: Cow::Borrowed(id),
            handle,
            user_id: user,
            variant,
            segment_key: "country:us",
            level: 1,
            propensity: 0.25,
            created_ms: 7,
        }
    }

    #[test]
    fn the_latest_of_each_slot_and_every_id_are_found() {
        let mut held = Held::new("own");
        held.add(&a("x-1", 1, "u", 0), true);
        held.add(&a("x-2", 1, "u", 1), true);
        held.add(&a("x-3", 2, "u", 2), true);
        held.add(&a("x-4", 1, "v", 3), false);
        assert_eq!(held.latest(1, "u").unwrap().id, "x-2");
        assert_eq!(held.latest(2, "u").unwrap().variant, 2);
        assert!(held.latest(1, "v").is_none());
        assert_eq!(held.by_id("x-1").unwrap().variant, 0);
        assert_eq!(held.by_id("x-4").unwrap().user_id, "v");
        assert_eq!(held.by_id("x-1").unwrap().segment_key, "country:us");
        let ids: Vec<String> = held.of_user("u").iter().map(|x| x.id.to_string()).collect();
        assert_eq!(ids, ["x-3", "x-2", "x-1"]);
        let mut users: Vec<&str> = held.user_ids().collect();
        users.sort_unstable();
        assert_eq!(users, ["u", "v"]);
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn an_id_held_again_is_updated_in_place() {
        let mut held = Held::new("own");
        held.add(&a("x-1", 1, "u", 0), false);
        held.add(&a("x-1", 1, "u", 3), true);
        assert_eq!(held.len(), 1);
        assert_eq!(held.latest(1, "u").unwrap().variant, 3);
        assert_eq!(held.of_user("u").len(), 1);
    }

    #[test]
    fn a_forgotten_user_leaves_nothing_and_others_stay() {
        let mut held = Held::new("own");
        for i in 0..100u64 {
            let id = format!("x-{i}");
            let user = format!("u{}", i % 10);
            held.add(&a(&id, i % 3, &user, 0), true);
        }
        let mut seen = Vec::new();
        let gone = held.forget_user("u3", |x| seen.push(x.id.to_string()));
        assert!(seen.iter().all(|id| id.starts_with("x-")));
        assert_eq!(gone, 10);
        assert_eq!(seen.len(), 10);
        assert!(held.of_user("u3").is_empty());
        assert!(held.by_id("x-3").is_none());
        assert!((0..3).all(|h| held.latest(h, "u3").is_none()));
        assert_eq!(held.len(), 90);
        assert_eq!(held.of_user("u4").len(), 10);
        assert_eq!(held.by_id("x-4").unwrap().user_id, "u4");
        // Freed records are reused, and the user can come back.
        held.add(&a("y-1", 0, "u3", 4), true);
        assert_eq!(held.latest(0, "u3").unwrap().variant, 4);
        assert_eq!(held.of_user("u3").len(), 1);
        assert_eq!(held.records.len(), 100);
        assert_eq!(held.user_ids().count(), 10);
    }

    #[test]
    fn own_ids_are_kept_as_numbers_and_read_back_as_text() {
        let mut held = Held::new("own");
        held.add(&a("own-1f", 1, "u", 0), true);
        held.add(&a("own-0", 1, "v", 1), true);
        // Not in the canonical form: kept as text, a different id.
        held.add(&a("own-01f", 1, "w", 2), true);
        held.add(&a("own-1F", 1, "w", 3), false);
        assert_eq!(held.records[0].id, Id::Own(0x1f));
        assert_eq!(held.records[1].id, Id::Own(0));
        assert_eq!(held.records[2].id, Id::Other("own-01f".into()));
        assert_eq!(held.by_id("own-1f").unwrap().user_id, "u");
        assert_eq!(held.by_id("own-0").unwrap().variant, 1);
        assert_eq!(held.by_id("own-01f").unwrap().variant, 2);
        assert_eq!(held.by_id("own-1F").unwrap().variant, 3);
        assert!(held.by_id("own-2").is_none());
        assert_eq!(held.latest(1, "u").unwrap().id, "own-1f");
        let mut fresh = Held::new("own");
        fresh.add_new(&a("own-ff", 2, "u", 4));
        assert_eq!(fresh.by_id("own-ff").unwrap().variant, 4);
        assert_eq!(fresh.latest(2, "u").unwrap().id, "own-ff");
    }

    #[test]
    fn tables_grow_without_losing_entries() {
        let mut held = Held::new("p");
        let ids: Vec<String> = (0..50_000u64).map(|i| format!("p-{i:x}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let user = format!("user-{}", i % 20_000);
            held.add_new(&a(id, (i % 3) as u64, &user, i % 5));
        }
        assert_eq!(held.len(), 50_000);
        for (i, id) in ids.iter().enumerate().step_by(997) {
            let found = held.by_id(id).unwrap();
            assert_eq!((found.variant, found.handle), (i % 5, (i % 3) as u64));
        }
        // user-7 made items 7, 20007 and 40007; the newest per experiment is the latest.
        assert_eq!(held.of_user("user-7").len(), 3);
        assert_eq!(held.latest(40_007 % 3, "user-7").unwrap().id, "p-9c47");
        assert_eq!(held.user_ids().count(), 20_000);
    }

    #[test]
    fn a_full_store_evicts_the_oldest_and_keeps_its_indexes_whole() {
        let mut held = Held::bounded("p", 100);
        let ids: Vec<String> = (0..1_000u64).map(|i| format!("p-{i:x}")).collect();
        // A user comes back every 131 items, in each experiment every 262: some latest
        // assignments are evicted.
        let users: Vec<String> = (0..1_000).map(|i| format!("user-{}", i % 131)).collect();
        for (i, id) in ids.iter().enumerate() {
            held.add_new(&a(id, (i % 2) as u64, &users[i], i % 5));
        }
        assert_eq!(held.len(), 100);
        assert_eq!(held.evictions(), 900);
        assert_eq!(held.records.len(), 100);
        assert!(held.evicted(0) && held.evicted(1) && !held.evicted(2));
        // The newest 100 are held, and nothing older.
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(held.by_id(id).is_some(), i >= 900, "{id}");
        }
        for u in 0..131 {
            let user = format!("user-{u}");
            let mine: Vec<usize> = (900..1_000).filter(|&i| i % 131 == u).collect();
            let got: Vec<String> = held
                .of_user(&user)
                .iter()
                .map(|x| x.id.to_string())
                .collect();
            let want: Vec<String> = mine.iter().rev().map(|&i| ids[i].clone()).collect();
            assert_eq!(got, want, "{user}");
            for h in 0..2u64 {
                let latest = mine.iter().rev().find(|&&i| (i % 2) as u64 == h);
                let found = held.latest(h, &user).map(|x| x.id.to_string());
                assert_eq!(found, latest.map(|&i| ids[i].clone()), "{user} in {h}");
            }
        }
        assert_eq!(held.user_ids().count(), 100);
        // Forgetting in a ring leaves slots the ring fills in turn.
        assert_eq!(held.forget_user("user-3", |_| ()), 1);
        held.add_new(&a("p-fff", 0, "user-3", 1));
        assert_eq!(held.len(), 99);
        assert_eq!(held.of_user("user-3").len(), 1);
    }

    #[test]
    fn a_restart_holds_a_block_s_rows_unless_a_newer_one_may_be_stored() {
        let at = |id: &'static str, handle: u64, user: &'static str, ms: i64| Assignment {
            created_ms: ms,
            ..a(id, handle, user, 0)
        };
        let mut held = Held::new("p");
        // Read from the table: u1's latest (made at 10); experiment 2 only from 100 on.
        held.add(&at("x-1", 1, "u1", 10), true);
        held.unlisted(2);
        held.read_from.insert(2, 100);
        assert!(!held.evicted(1));
        let mut stream = Vec::new();
        copy_header(&mut stream);
        for row in [
            at("x-2", 1, "u1", 20),  // newer than the latest held: the latest now
            at("x-3", 1, "u1", 5),   // older: left in the store
            at("x-4", 1, "u2", 1),   // no other of u2's may be stored
            at("x-5", 2, "u3", 150), // after the rows not read
            at("x-6", 2, "u4", 50),  // maybe before one not read: looked up
        ] {
            copy_row(&mut stream, &row, 42);
        }
        copy_trailer(&mut stream);
        assert_eq!(held.add_block(&stream, 0).unwrap(), (5, 3));
        assert_eq!(held.latest(1, "u1").unwrap().id, "x-2");
        assert!(held.by_id("x-1").is_some() && held.by_id("x-3").is_none());
        assert_eq!(held.latest(1, "u2").unwrap().id, "x-4");
        assert_eq!(held.latest(2, "u3").unwrap().id, "x-5");
        assert!(held.latest(2, "u4").is_none() && held.may_be_stored(2, "u4"));
        // x-3 is only in the store: lookups by id go there.
        assert!(held.evicted(1) && held.incomplete());
        assert!(!held.may_be_stored(1, "u1") && !held.may_be_stored(1, "nobody"));

        // A user whose latest was evicted may have a newer one stored than the block's.
        let mut small = Held::bounded("p", 1);
        small.add(&at("x-7", 1, "u5", 30), true);
        small.add(&at("x-8", 1, "u6", 40), true); // evicts x-7
        let mut stream = Vec::new();
        copy_header(&mut stream);
        copy_row(&mut stream, &at("x-9", 1, "u5", 20), 42);
        copy_trailer(&mut stream);
        assert_eq!(small.add_block(&stream, 0).unwrap(), (1, 0));
        assert!(small.latest(1, "u5").is_none() && small.may_be_stored(1, "u5"));
    }

    #[test]
    fn only_users_evicted_or_not_read_back_may_be_stored() {
        let mut held = Held::bounded("p", 100);
        for i in 0..1_000u64 {
            held.add_new(&a(&format!("p-{i:x}"), i % 2, &format!("user-{i}"), 0));
        }
        // Evicted: 0..900; held: 900..1000; never seen: 1000.. (and experiment 2 entirely).
        for i in 0..900u64 {
            assert!(held.may_be_stored(i % 2, &format!("user-{i}")), "user-{i}");
        }
        assert!((900..1_000u64).all(|i| !held.may_be_stored(i % 2, &format!("user-{i}"))));
        let passed = (1_000..101_000u64)
            .filter(|i| held.may_be_stored(i % 2, &format!("user-{i}")))
            .count();
        assert!(
            passed < 100_000 / 500,
            "{passed} of 100,000 never seen passed"
        );
        assert!((0..1_000).all(|i| !held.may_be_stored(2, &format!("user-{i}"))));
        assert_eq!(held.evicted_filter_size(), (1 << 16) * 2);

        // A restart that did not read experiment 2 whole: anyone not held may be stored there,
        // until its stored users are listed.
        held.unlisted(2);
        held.add_new(&a("p-1000", 2, "held", 0));
        assert!(held.may_be_stored(2, "anyone") && !held.may_be_stored(2, "held"));
        let listing = user_listing(["old", "older"]);
        let (first, rest) = listing.split_at(listing.len() - 9);
        let read = held.list_copied(2, first, true).unwrap();
        assert_eq!((read.rows, read.ended), (1, false));
        let mut pending = first[read.consumed..].to_vec();
        pending.extend_from_slice(rest);
        let read = held.list_copied(2, &pending, false).unwrap();
        assert_eq!(
            (read.rows, read.ended, read.consumed),
            (1, true, pending.len())
        );
        assert_eq!(held.unlisted_experiments(), [2]);
        held.listed(2);
        assert!(held.unlisted_experiments().is_empty());
        assert!(held.may_be_stored(2, "old") && held.may_be_stored(2, "older"));
        assert!(!held.may_be_stored(2, "anyone") && !held.may_be_stored(2, "held"));
        assert!(held.list_copied(2, &copy_stream(&COPIED), true).is_err());
    }

    #[test]
    fn a_full_filter_of_evicted_keys_is_renewed_from_a_listing() {
        // Parts of at least a line (32 keys): 992 keys, then full.
        let mut held = Held::with_filter("p", 10, 2);
        for i in 0..1_100u64 {
            held.add_new(&a(&format!("p-{i:x}"), i % 2, &format!("user-{i}"), 0));
        }
        assert!(held.evicted_filter_full());
        assert!(held.may_be_stored(0, "never seen") && held.may_be_stored(1, "never seen"));
        // A restart's listing under way: not now.
        held.unlisted(1);
        assert!(!held.renew_filter());
        held.listed(1);
        assert!(held.renew_filter());
        assert!(!held.evicted_filter_full() && !held.renew_filter());
        assert_eq!(held.unlisted_experiments(), [0, 1]);
        // Unlisted: everyone not held may be stored, as with the full filter.
        assert!(held.may_be_stored(0, "never seen") && !held.may_be_stored(1, "user-1099"));
        // Evicted from now on (user-1090): into the new filter.
        held.add_new(&a("p-1100", 0, "user-1100", 0));
        // The listing: a block's users (and one of an experiment that evicted nothing), and
        // the table's.
        let mut stream = Vec::new();
        copy_header(&mut stream);
        for i in (0..500u64).chain([5_000]) {
            let id = format!("p-{i:x}");
            let user = format!("user-{i}");
            let handle = if i == 5_000 { 2 } else { i % 2 };
            copy_row(&mut stream, &a(&id, handle, &user, 0), 42);
        }
        copy_trailer(&mut stream);
        let keys = block_user_keys(&stream).unwrap();
        assert_eq!(keys.len(), 501);
        held.list_keys(&keys);
        for handle in [0, 1] {
            let users = (500..1_090u64).filter(|i| i % 2 == handle);
            let listing = user_listing(users.map(|i| format!("user-{i}")));
            held.list_copied(handle, &listing, true).unwrap();
            held.listed(handle);
        }
        assert!(!held.evicted_filter_full());
        // Every evicted user may be stored; few never-seen users pass; experiment 2 evicted
        // nothing: its block's user is not looked up.
        for i in 0..1_091u64 {
            assert!(held.may_be_stored(i % 2, &format!("user-{i}")), "user-{i}");
        }
        let passed = (10_000..20_000u64)
            .filter(|i| held.may_be_stored(i % 2, &format!("user-{i}")))
            .count();
        assert!(
            passed < 10_000 / 200,
            "{passed} of 10,000 never seen passed"
        );
        assert!(!held.may_be_stored(2, "user-5000") && !held.evicted(2));
    }

    #[test]
    fn evicting_from_a_long_user_chain_keeps_it_linked() {
        let mut held = Held::bounded("p", 50);
        let ids: Vec<String> = (0..500u64).map(|i| format!("p-{i:x}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let user = if i % 2 == 0 { "busy" } else { "other" };
            held.add_new(&a(id, 0, user, i % 5));
        }
        let busy: Vec<String> = held
            .of_user("busy")
            .iter()
            .map(|x| x.id.to_string())
            .collect();
        let want: Vec<String> = (450..500)
            .rev()
            .filter(|i| i % 2 == 0)
            .map(|i| ids[i].clone())
            .collect();
        assert_eq!(busy, want);
        assert_eq!(held.of_user("other").len(), 25);
        assert_eq!(held.latest(0, "busy").unwrap().id, ids[498]);
    }

    /// Everything a store answers about `ids` and `users`.
    fn answers(held: &Held, ids: &[String], users: &[String]) -> Vec<String> {
        let mut out = vec![format!("{} {}", held.len(), held.evictions())];
        out.extend((0..4).map(|h| held.evicted(h).to_string()));
        out.extend(ids.iter().map(|id| format!("{:?}", held.by_id(id))));
        for user in users {
            out.push(format!("{:?}", held.of_user(user)));
            out.extend((0..4).map(|h| format!("{:?}", held.latest(h, user))));
        }
        out
    }

    #[test]
    fn a_made_batch_held_whole_answers_as_held_one_by_one() {
        // Batches of 7 own ids, a unary own id (by text) and a forgotten user between some,
        // users coming back; a ring that wraps mid-batch, and a store without a bound.
        for capacity in [0, 40, 45] {
            let mut whole = Held::bounded("p", capacity);
            let mut single = Held::bounded("p", capacity);
            let users: Vec<String> = (0..23).map(|u| format!("user-{u}")).collect();
            let mut ids = Vec::new();
            let mut seq = 1u64;
            for b in 0..30u64 {
                let mut made = Made::new(if b % 11 == 10 { "q" } else { "p" }, 7);
                for k in 0..7u64 {
                    let user = &users[((b * 7 + k) * 5 % 23) as usize];
                    made.push(
                        seq,
                        (b + k) % 3,
                        user,
                        (k % 5) as usize,
                        "country:us",
                        1,
                        0.25,
                    );
                    seq += 1;
                }
                whole.add_made(&made);
                let mut id = String::new();
                for k in 0..made.len() {
                    made.write_id(k, &mut id);
                    ids.push(id.clone());
                    single.add_new(&made.get(k, &id));
                }
                if b % 4 == 1 {
                    let id = format!("p-{seq:x}");
                    seq += 1;
                    let unary = a(&id, 3, &users[(b % 23) as usize], 2);
                    whole.add(&unary, true);
                    single.add(&unary, true);
                    ids.push(id);
                }
                if b % 6 == 5 {
                    let user = &users[(b % 23) as usize];
                    assert_eq!(
                        whole.forget_user(user, |_| ()),
                        single.forget_user(user, |_| ())
                    );
                }
                assert_eq!(
                    answers(&whole, &ids, &users),
                    answers(&single, &ids, &users),
                    "capacity {capacity}, batch {b}"
                );
            }
            // Own ids held again by text are updated in place, wherever they are indexed.
            let again: Vec<(String, String, u64)> = ids
                .iter()
                .rev()
                .filter_map(|id| single.by_id(id))
                .map(|x| (x.id.to_string(), x.user_id.to_string(), x.handle))
                .take(5)
                .collect();
            assert_eq!(again.len(), 5);
            for (id, user, handle) in &again {
                let x = a(id, *handle, user, 4);
                whole.add(&x, false);
                single.add(&x, false);
            }
            assert_eq!(
                answers(&whole, &ids, &users),
                answers(&single, &ids, &users)
            );
            // Most own ids were found through runs.
            assert!(whole.by_id.len() * 3 < single.by_id.len());
            if capacity > 0 {
                assert!(whole.evictions() > 0);
                assert!(whole.own_runs.len() <= 4, "{:?}", whole.own_runs);
            }
        }
    }

    #[test]
    fn forgetting_the_last_of_a_run_keeps_the_run() {
        let batch = |first: u64, users: &[&str]| {
            let mut made = Made::new("p", 7);
            for (k, user) in users.iter().enumerate() {
                made.push(first + k as u64, 1, user, 0, "s", 0, 0.5);
            }
            made
        };
        // Without a bound, the forgotten record's place is reused first.
        let mut held = Held::new("p");
        held.add_made(&batch(1, &["a", "b", "c"]));
        held.forget_user("c", |_| ());
        held.add_made(&batch(4, &["d"]));
        assert_eq!(held.by_id("p-1").unwrap().user_id, "a");
        assert_eq!(held.by_id("p-4").unwrap().user_id, "d");
        assert!(held.by_id("p-3").is_none());
        // In a ring, records after a forgotten one are overwritten later.
        let mut held = Held::bounded("p", 4);
        held.add_made(&batch(1, &["a", "b", "c"]));
        held.forget_user("c", |_| ());
        held.add(&a("p-5", 1, "e", 0), true);
        held.add_made(&batch(6, &["f"]));
        assert!(held.by_id("p-1").is_none());
        assert_eq!(held.by_id("p-2").unwrap().user_id, "b");
        assert_eq!(held.by_id("p-5").unwrap().user_id, "e");
        assert_eq!(held.by_id("p-6").unwrap().user_id, "f");
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn counts_and_keys_of_runs_that_come_back() {
        // (handle, level, key) runs: a pair or key seen before a change counts with its first.
        let mut made = Made::new("p", 5);
        let items = [
            (1, 1, "a"),
            (1, 1, "a"),
            (2, 0, "b"),
            (1, 1, "a"),
            (1, 2, "c"),
            (1, 2, "a"),
            (2, 0, "b"),
        ];
        for (seq, (handle, level, key)) in items.into_iter().enumerate() {
            made.push(seq as u64, handle, "u", 0, key, level, 1.0);
        }
        assert_eq!(made.level_counts(), [((1, 1), 3), ((2, 0), 2), ((1, 2), 2)]);
        assert_eq!(made.distinct_keys(), [(1, "a"), (2, "b"), (1, "c")]);
    }

    #[test]
    fn made_assignments_keep_their_columns() {
        let mut made = Made::new("p", 5);
        made.push(10, 1, "u", 2, "a", 1, 0.5);
        made.push(11, 1, "vv", 0, "a", 1, 0.25);
        made.push(255, 2, "u", 1, "b", 0, 1.0);
        let mut id = String::new();
        made.write_id(2, &mut id);
        assert_eq!(id, "p-ff");
        let x = made.get(1, &id);
        assert_eq!((x.user_id, x.segment_key, x.variant), ("vv", "a", 0));
        assert_eq!(made.level_counts(), [((1, 1), 2), ((2, 0), 1)]);
        assert_eq!(made.distinct_keys(), [(1, "a"), (2, "b")]);
        assert_eq!(made.positions_of_user("u"), [0, 2]);
        let rest = made.without_user("u");
        assert_eq!(rest.len(), 1);
        rest.write_id(0, &mut id);
        assert_eq!((id.as_str(), rest.user_id(0)), ("p-b", "vv"));
    }

    #[test]
    fn a_compact_group_and_its_filter_give_the_copy_rows_and_the_filter_built_alone() {
        let mut made = Made::new("p", 5);
        for seq in 0..300u64 {
            let user = format!("user-{}", seq % 97);
            let key = if seq % 3 == 0 { "a" } else { "b|c" };
            made.push(seq * 7, 1 + seq % 2, &user, (seq % 5) as usize, key, 1, 0.2);
        }
        let (mut rows, mut filter) = (Vec::new(), crate::filter::Filter::for_keys(600));
        copy_header(&mut rows);
        made.copy_rows(&mut rows);
        copy_trailer(&mut rows);
        for k in 0..made.len() {
            filter.insert_assignment(&made.id_text(k), made.handles()[k], made.user_id(k));
        }
        let (mut compact, mut both_filter) = (Vec::new(), crate::filter::Filter::for_keys(600));
        compact::start(&mut compact);
        made.compact_into_filter(&mut compact, &mut both_filter);
        compact::end(&mut compact);
        assert_eq!(compact::to_copy_stream(&compact).unwrap(), rows);
        assert_eq!(both_filter.into_bytes(), filter.into_bytes());
        assert!(rows.len() > 300 * 74);
        // About half the COPY rows' bytes before compression (the segment key changing on
        // two rows of three, each change a key written again).
        assert!(
            compact.len() * 10 < rows.len() * 6,
            "{} of {}",
            compact.len(),
            rows.len()
        );
    }

    #[test]
    fn a_batchs_ids_go_in_its_blocks_filter_as_a_range() {
        let mut made = Made::new("p", 5);
        for seq in 100..1_100u64 {
            made.push(seq, 1, &format!("user-{seq}"), 0, "a", 1, 0.5);
        }
        // A user key each, the ids one range.
        assert_eq!(made.filter_keys(), 1_000);
        let mut filter = crate::filter::Filter::for_keys(made.filter_keys());
        made.compact_into_filter(&mut Vec::new(), &mut filter);
        let bytes = filter.into_bytes();
        assert_eq!(bytes.len(), 2_048 + 24 + 12);
        for k in 0..made.len() {
            let id = crate::filter::IdProbe::new(&made.id_text(k));
            assert!(crate::filter::may_hold_id(&bytes, &id));
            assert!(crate::filter::may_hold(
                &bytes,
                filter::user_key(1, made.user_id(k))
            ));
        }
        let next = crate::filter::IdProbe::new("p-44c");
        assert!(!crate::filter::may_hold_id(&bytes, &next));
        // Without one user's, still one range; ids apart from each other go in as keys.
        assert_eq!(made.without_user("user-100").filter_keys(), 999);
        let mut apart = Made::new("p", 5);
        for seq in 0..100u64 {
            apart.push(seq * 7, 1, "u", 0, "a", 1, 0.5);
        }
        assert_eq!(apart.filter_keys(), 200);
    }

    #[test]
    fn a_log_keeps_each_assignments_time_and_starts_empty_when_taken() {
        let mut log = Made::new("p", 0);
        log.push_at(100, 1, 1, "u", 0, "a", 1, 0.5);
        log.push_at(100, 2, 1, "v", 1, "a", 1, 0.5);
        // One time so far: no column of times yet.
        assert!(log.created.is_empty());
        log.push_at(107, 3, 2, "u", 2, "b", 0, 1.0);
        log.push(4, 2, "w", 0, "b", 0, 1.0); // a batch's push: the first one's time
        let times: Vec<i64> = (0..log.len()).map(|k| log.created_at(k)).collect();
        assert_eq!(times, [100, 100, 107, 100]);
        let rest = log.without_user("u");
        let times: Vec<i64> = (0..rest.len()).map(|k| rest.created_at(k)).collect();
        assert_eq!((rest.user_id(0), rest.user_id(1)), ("v", "w"));
        assert_eq!(times, [100, 100]);
        let mut held = Held::new("p");
        held.add_made(&log);
        assert_eq!(held.by_id("p-3").map(|a| a.created_ms), Some(107));
        let taken = log.take();
        assert_eq!((taken.len(), log.len(), log.created.len()), (4, 0, 0));
        assert_eq!(taken.id_text(2), "p-3");
        log.push_at(200, 5, 1, "x", 0, "a", 0, 0.5);
        assert_eq!(
            (log.created_ms(), log.created_at(0), log.id_text(0)),
            (200, 200, "p-5".into())
        );
    }

    /// A stored row: id, user, variant, key, level, propensity or NULL, created_at in
    /// PostgreSQL microseconds.
    type Stored = (
        &'static str,
        &'static str,
        i16,
        &'static str,
        i16,
        Option<f64>,
        i64,
    );

    /// A binary COPY stream of one text column: user ids, as a listing of stored users reads.
    fn user_listing<S: AsRef<str>>(users: impl IntoIterator<Item = S>) -> Vec<u8> {
        let mut out = Vec::new();
        copy_header(&mut out);
        for user in users {
            let user = user.as_ref();
            out.extend_from_slice(&1i16.to_be_bytes());
            out.extend_from_slice(&(user.len() as i32).to_be_bytes());
            out.extend_from_slice(user.as_bytes());
        }
        copy_trailer(&mut out);
        out
    }

    /// A binary COPY stream of [`RESTORE_COLUMNS`] rows.
    fn copy_stream(rows: &[Stored]) -> Vec<u8> {
        let mut out = Vec::new();
        copy_header(&mut out);
        let text = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as i32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for &(id, user, variant, key, level, propensity, created_us) in rows {
            out.extend_from_slice(&(RESTORE_COLUMNS.len() as i16).to_be_bytes());
            text(&mut out, id);
            text(&mut out, user);
            out.extend_from_slice(&2i32.to_be_bytes());
            out.extend_from_slice(&variant.to_be_bytes());
            text(&mut out, key);
            out.extend_from_slice(&2i32.to_be_bytes());
            out.extend_from_slice(&level.to_be_bytes());
            match propensity {
                Some(p) => {
                    out.extend_from_slice(&8i32.to_be_bytes());
                    out.extend_from_slice(&p.to_bits().to_be_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&created_us.to_be_bytes());
        }
        copy_trailer(&mut out);
        out
    }

    const COPIED: [Stored; 4] = [
        ("old-1", "u", 0, "country:us", 1, Some(0.5), 1_000_000),
        ("old-2", "v", 2, "country:fr", 1, None, 2_000_999),
        ("old-3", "u", 1, "country:us", 1, Some(0.25), -1),
        ("old-4", "w", 1, "", 0, Some(1.0), 0),
    ];

    /// (latest id and variant of u, v and w; by-id lookups of every row) of a store.
    fn restored(held: &Held) -> Vec<(String, usize, usize, String, i64, u64)> {
        ["old-1", "old-2", "old-3", "old-4"]
            .iter()
            .map(|id| {
                let a = held.by_id(id).expect("held");
                let latest = held.latest(9, a.user_id).expect("latest");
                (
                    latest.id.to_string(),
                    a.variant,
                    a.level,
                    a.segment_key.to_string(),
                    a.created_ms,
                    a.propensity.to_bits(),
                )
            })
            .collect()
    }

    #[test]
    fn copied_rows_are_held_as_their_users_latest() {
        let data = copy_stream(&COPIED);
        let mut held = Held::new("new");
        let read = held.add_copied(9, &data, true).unwrap();
        assert_eq!(read.consumed, data.len());
        assert_eq!(read.rows, 4);
        assert!(read.ended);
        assert_eq!(read.keys, ["country:us", "country:fr", ""]);
        assert_eq!(held.len(), 4);
        let epoch = POSTGRES_EPOCH_MS;
        assert_eq!(
            restored(&held),
            [
                (
                    "old-3".into(),
                    0,
                    1,
                    "country:us".into(),
                    epoch + 1000,
                    0.5f64.to_bits()
                ),
                (
                    "old-2".into(),
                    2,
                    1,
                    "country:fr".into(),
                    epoch + 2000,
                    0.0f64.to_bits()
                ),
                (
                    "old-3".into(),
                    1,
                    1,
                    "country:us".into(),
                    epoch - 1,
                    0.25f64.to_bits()
                ),
                ("old-4".into(), 1, 0, "".into(), epoch, 1.0f64.to_bits()),
            ]
        );
    }

    #[test]
    fn a_stream_cut_anywhere_is_read_the_same() {
        let data = copy_stream(&COPIED);
        let whole = {
            let mut held = Held::new("new");
            held.add_copied(9, &data, true).unwrap();
            restored(&held)
        };
        for size in 1..=data.len() {
            // Pieces of `size` bytes, each appended to what the last call left unread.
            let mut held = Held::new("new");
            let (mut pending, mut at_start, mut rows, mut ended) = (Vec::new(), true, 0, false);
            for piece in data.chunks(size) {
                pending.extend_from_slice(piece);
                let read = held.add_copied(9, &pending, at_start).unwrap();
                if read.consumed > 0 {
                    at_start = false;
                }
                rows += read.rows;
                ended |= read.ended;
                pending.drain(..read.consumed);
            }
            assert!(pending.is_empty() && ended, "size {size}");
            assert_eq!(rows, 4, "size {size}");
            assert_eq!(restored(&held), whole, "size {size}");
        }
    }

    #[test]
    fn a_stream_that_is_not_assignments_is_refused() {
        let mut held = Held::new("new");
        let mut data = copy_stream(&COPIED);
        data[0] = b'X';
        assert!(held.add_copied(9, &data, true).is_err());
        let mut data = Vec::new();
        copy_header(&mut data);
        data.extend_from_slice(&3i16.to_be_bytes());
        assert!(held.add_copied(9, &data, true).is_err());
        let mut data = copy_stream(&COPIED);
        data.push(0);
        assert!(held.add_copied(9, &data, true).is_err());
        let mut data = Vec::new();
        copy_header(&mut data);
        data[15..19].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(held.add_copied(9, &data, true).is_err());
    }
}
