//! Bloom filters of assignment blocks (`assignment_blocks.filter`): the (experiment, user) pairs
//! and the assignment ids a block may hold. A lookup of one user or one id then reads only the
//! blocks whose filter may hold it (see [`crate::block`]), instead of expanding every block
//! (minutes of work after a long batch burst). A filter never misses what was put in it; about
//! 0.1% of other keys pass.
//!
//! Keys are xxh3 hashes, stable across processes and versions: a filter is read by every
//! replica and after restarts. A filter is its bits as bytes (bit `p` is bit `p % 8` of byte
//! `p / 8`), in lines of 64 bytes; its length gives the number of lines.
//!
//! Since 2026-11-26 a block's filter may end in ranges of ids instead of holding their keys
//! (a batch's ids are consecutive numbers after one prefix, `{prefix}-{n:x}`: putting each in the
//! lines was 40% of what building a block cost, bench/RESULTS.md item 75). Such a filter is its
//! lines, then each range as three u64 (little-endian): its prefix's key ([`prefix_key`]), its
//! first and last number; then the number of ranges (u32) and [`RANGES_TAG`]. Its length is then
//! never a multiple of 64 bytes, so a reader of lines alone (an older version) takes it for a
//! filter of another shape, which may hold anything: it reads the block, as correct as before.
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bits per key: with [`PROBES`] probes in one 512-bit line, about 0.1% of absent keys pass. A
/// lookup that a filter passes falsely reads its block for nothing (about 4 ms).
const BITS_PER_KEY: usize = 16;
const PROBES: u64 = 11;
/// A key's bits are all in one line of this many bytes (one cache line: building a filter of
/// 400,000 keys takes a cache miss per key, not one per probe).
const LINE: usize = 64;
/// Seed of id keys (user keys are seeded by their experiment's handle).
const ID_SEED: u64 = 0x6964_5f6b_6579_5f31;
/// Seed of the keys of id prefixes.
const PREFIX_SEED: u64 = 0x7072_6566_6978_5f31;
/// What ends a filter with id ranges.
const RANGES_TAG: [u8; 8] = *b"idranges";
/// Bytes of one id range.
const RANGE: usize = 24;
/// Ids kept as ranges only when a range stands for at least this many of them on average (a
/// range takes 24 bytes, an id's key 2 bytes of lines).
const IDS_PER_RANGE: usize = 8;

/// The key of (experiment `handle`, `user_id`).
pub fn user_key(handle: u64, user_id: &str) -> u64 {
    xxh3_64_with_seed(user_id.as_bytes(), handle)
}

/// The key of an assignment id.
pub fn id_key(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), ID_SEED)
}

/// The key of the prefix of ids `{prefix}-{n:x}`.
pub fn prefix_key(prefix: &str) -> u64 {
    xxh3_64_with_seed(prefix.as_bytes(), PREFIX_SEED)
}

/// Runs of consecutive numbers in `seqs`, in order: (first, last) each.
fn runs(seqs: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut k = 0;
    std::iter::from_fn(move || {
        let first = *seqs.get(k)?;
        let mut last = first;
        k += 1;
        while let Some(next) = last.checked_add(1).filter(|n| seqs.get(k) == Some(n)) {
            last = next;
            k += 1;
        }
        Some((first, last))
    })
}

/// Whether ids numbered `seqs` go in a block's filter as ranges ([`Filter::insert_id_ranges`])
/// rather than as keys: when they run in few ranges (a batch's ids are one).
pub fn ids_as_ranges(seqs: &[u64]) -> bool {
    runs(seqs).take(seqs.len() / IDS_PER_RANGE + 1).count() * IDS_PER_RANGE <= seqs.len()
}

/// One range of ids, as a filter ends with them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct IdRange {
    prefix: u64,
    first: u64,
    last: u64,
}

/// What each probe multiplies by once more.
const MULTIPLIER: u64 = 0xbf58_476d_1ce4_e5b9;
/// `MULTIPLIER` to the powers 1 to `PROBES` (wrapping): probe `i` multiplies the mixed key
/// once by the `i`-th, the same bits as `i` multiplications in turn, without each probe
/// waiting for the last.
const POWERS: [u64; PROBES as usize] = {
    let mut powers = [0; PROBES as usize];
    let mut power = MULTIPLIER;
    let mut i = 0;
    while i < powers.len() {
        powers[i] = power;
        power = power.wrapping_mul(MULTIPLIER);
        i += 1;
    }
    powers
};

/// Where a key's bits are in a filter of `lines` lines: the byte its line starts at, chosen by
/// the key's high half, and `PROBES` bits in that line, each the top 9 bits of the key
/// multiplied once more.
fn positions(key: u64, lines: usize) -> (usize, impl Iterator<Item = usize>) {
    let line = (((key >> 32) * lines as u64) >> 32) as usize * LINE;
    let h = key ^ (key >> 31);
    (
        line,
        POWERS
            .iter()
            .map(move |&p| (h.wrapping_mul(p) >> 55) as usize),
    )
}

/// A filter being built.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Its lines.
    bytes: Vec<u8>,
    ranges: Vec<IdRange>,
}

impl Filter {
    /// A filter sized for `keys` keys.
    pub fn for_keys(keys: usize) -> Self {
        let lines = (keys * BITS_PER_KEY).div_ceil(LINE * 8).max(1);
        Filter {
            bytes: vec![0; lines * LINE],
            ranges: Vec::new(),
        }
    }

    /// Put in the ids `{prefix}-{n:x}` for each `n` of `seqs` as ranges of numbers, a range
    /// continued where it is the last one's next number.
    pub fn insert_id_ranges(&mut self, prefix: &str, seqs: &[u64]) {
        let prefix = prefix_key(prefix);
        for (first, last) in runs(seqs) {
            match self.ranges.last_mut() {
                Some(r) if r.prefix == prefix && r.last.checked_add(1) == Some(first) => {
                    r.last = last
                }
                _ => self.ranges.push(IdRange {
                    prefix,
                    first,
                    last,
                }),
            }
        }
    }

    /// Put in the keys of an assignment: its id and its (experiment `handle`, user).
    pub fn insert_assignment(&mut self, id: &str, handle: u64, user_id: &str) {
        self.insert(id_key(id));
        self.insert(user_key(handle, user_id));
    }

    pub fn insert(&mut self, key: u64) {
        let (start, bits) = positions(key, self.bytes.len() / LINE);
        let line: &mut [u8; LINE] = (&mut self.bytes[start..start + LINE]).try_into().unwrap();
        for b in bits {
            line[b / 8] |= 1 << (b % 8);
        }
    }

    /// Its bytes as stored: its lines, then its id ranges if it has any (see the module's doc).
    pub fn into_bytes(self) -> Vec<u8> {
        let mut bytes = self.bytes;
        if !self.ranges.is_empty() {
            bytes.reserve(self.ranges.len() * RANGE + 12);
            for r in &self.ranges {
                for n in [r.prefix, r.first, r.last] {
                    bytes.extend_from_slice(&n.to_le_bytes());
                }
            }
            bytes.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&RANGES_TAG);
        }
        bytes
    }

    /// How many keys it was sized for.
    fn keys(&self) -> usize {
        self.bytes.len() * 8 / BITS_PER_KEY
    }
}

/// A filter of keys whose number is not known ahead (the (experiment, user) pairs memory has
/// evicted): [`Filter`]s, each made when the last is full, twice its size, at most a given
/// number of them; then it is full and may hold anything. A key absent from all passes one of
/// `n` filters about `n` times in 1,000; a lookup reads one line of each.
#[derive(Debug, Clone)]
pub struct Growing {
    first: usize,
    most: usize,
    filters: Vec<Filter>,
    /// Keys put in the last filter.
    in_last: usize,
    full: bool,
}

impl Growing {
    /// An empty filter whose first part holds `first` keys, of at most `most` parts (`first`
    /// x (2^`most` - 1) keys, 2 bytes each).
    pub fn new(first: usize, most: usize) -> Self {
        Growing {
            first: first.max(1),
            most,
            filters: Vec::new(),
            in_last: 0,
            full: false,
        }
    }

    pub fn insert(&mut self, key: u64) {
        let size = match self.filters.last() {
            None => Some(self.first),
            Some(last) if self.in_last >= last.keys() => Some(2 * last.keys()),
            Some(_) => None,
        };
        if let Some(keys) = size {
            if self.filters.len() == self.most {
                self.full = true;
                return;
            }
            self.filters.push(Filter::for_keys(keys));
            self.in_last = 0;
        }
        if let Some(last) = self.filters.last_mut() {
            last.insert(key);
            self.in_last += 1;
        }
    }

    pub fn may_hold(&self, key: u64) -> bool {
        self.full || self.filters.iter().any(|f| may_hold(&f.bytes, key))
    }

    /// Whether a key did not fit: it then may hold anything.
    pub fn full(&self) -> bool {
        self.full
    }

    /// Bytes taken by its bits.
    pub fn size(&self) -> usize {
        self.filters.iter().map(|f| f.bytes.len()).sum()
    }
}

/// A filter's lines and its id ranges' bytes; `None` for an empty one (no filter) or one of
/// another shape.
fn parts(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() % LINE == 0 {
        return Some((bytes, &[]));
    }
    let (rest, tag) = bytes.split_at_checked(bytes.len().checked_sub(RANGES_TAG.len())?)?;
    let (rest, count) = rest.split_at_checked(rest.len().checked_sub(4)?)?;
    if tag != RANGES_TAG {
        return None;
    }
    let count = u32::from_le_bytes(count.try_into().ok()?) as usize;
    let (lines, ranges) =
        rest.split_at_checked(rest.len().checked_sub(count.checked_mul(RANGE)?)?)?;
    (lines.len() % LINE == 0).then_some((lines, ranges))
}

/// Whether `lines` have every bit of `key`.
fn lines_hold(lines: &[u8], key: u64) -> bool {
    if lines.is_empty() {
        return false;
    }
    let (start, mut bits) = positions(key, lines.len() / LINE);
    let line = &lines[start..start + LINE];
    bits.all(|b| line[b / 8] & (1 << (b % 8)) != 0)
}

/// Whether the filter `bytes` may hold `key` (a user's key, or an id's among its lines: see
/// [`may_hold_id`] for an id); an empty one (no filter), or one of another shape, may hold
/// anything.
pub fn may_hold(bytes: &[u8], key: u64) -> bool {
    parts(bytes).is_none_or(|(lines, _)| lines_hold(lines, key))
}

/// An assignment id as lookups look for it in filters: its key, and its prefix's key and its
/// number if it is `{prefix}-{n:x}`.
#[derive(Debug, Clone, Copy)]
pub struct IdProbe {
    key: u64,
    numbered: Option<(u64, u64)>,
}

impl IdProbe {
    pub fn new(id: &str) -> Self {
        let numbered = id.rsplit_once('-').and_then(|(prefix, n)| {
            let n = u64::from_str_radix(n, 16).ok()?;
            Some((prefix_key(prefix), n))
        });
        IdProbe {
            key: id_key(id),
            numbered,
        }
    }
}

/// Whether the filter `bytes` may hold the id `probe` looks for: among its lines' keys or its
/// ranges; an empty one (no filter), or one of another shape, may hold anything.
pub fn may_hold_id(bytes: &[u8], probe: &IdProbe) -> bool {
    let Some((lines, ranges)) = parts(bytes) else {
        return true;
    };
    let in_range = |(prefix, n): (u64, u64)| {
        ranges.chunks_exact(RANGE).any(|r| {
            let at = |k: usize| u64::from_le_bytes(r[k..k + 8].try_into().unwrap());
            at(0) == prefix && (at(8)..=at(16)).contains(&n)
        })
    };
    lines_hold(lines, probe.key) || probe.numbered.is_some_and(in_range)
}

/// Positions in `filters` of those that may hold one of `keys` (a lookup's pass over every
/// block for all the users it looks for).
pub fn holding_any<F: AsRef<[u8]>>(filters: &[F], keys: &[u64]) -> Vec<usize> {
    positions_where(filters, |f| keys.iter().any(|&k| may_hold(f, k)))
}

/// Positions in `filters` of those that may hold one of the ids `probes` look for.
pub fn holding_any_id<F: AsRef<[u8]>>(filters: &[F], probes: &[IdProbe]) -> Vec<usize> {
    positions_where(filters, |f| probes.iter().any(|p| may_hold_id(f, p)))
}

fn positions_where<F: AsRef<[u8]>>(filters: &[F], pass: impl Fn(&[u8]) -> bool) -> Vec<usize> {
    filters
        .iter()
        .enumerate()
        .filter(|(_, f)| pass(f.as_ref()))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_holding_any_of_the_keys_are_found_by_position() {
        let mut with_a = Filter::for_keys(100);
        with_a.insert(user_key(1, "a"));
        let mut with_b = Filter::for_keys(100);
        with_b.insert(user_key(1, "b"));
        let filters = [with_a.into_bytes(), with_b.into_bytes(), Vec::new()];
        let (a, b, c) = (user_key(1, "a"), user_key(1, "b"), user_key(1, "c"));
        // The empty one (a block stored without a filter) may hold anything.
        assert_eq!(holding_any(&filters, &[a]), vec![0, 2]);
        assert_eq!(holding_any(&filters, &[b, a]), vec![0, 1, 2]);
        assert_eq!(holding_any(&filters, &[c]), vec![2]);
        assert_eq!(holding_any(&filters, &[]), Vec::<usize>::new());
        // Ids: in lines (blocks stored before ranges, and ids that run in many) or in ranges.
        let mut in_lines = Filter::for_keys(100);
        in_lines.insert(id_key("p-a"));
        let mut in_ranges = Filter::for_keys(100);
        in_ranges.insert_id_ranges("p", &[11, 12, 13]);
        let filters = [in_lines.into_bytes(), in_ranges.into_bytes(), Vec::new()];
        let probes = |ids: &[&str]| ids.iter().map(|i| IdProbe::new(i)).collect::<Vec<_>>();
        assert_eq!(holding_any_id(&filters, &probes(&["p-a"])), vec![0, 2]);
        assert_eq!(
            holding_any_id(&filters, &probes(&["p-c", "p-a"])),
            vec![0, 1, 2]
        );
        assert_eq!(holding_any_id(&filters, &probes(&["p-e"])), vec![2]);
    }

    #[test]
    fn a_filter_holds_every_key_put_in_and_few_others() {
        let mut f = Filter::for_keys(20_000);
        for i in 0..10_000u64 {
            f.insert(user_key(i % 3, &format!("user-{i}")));
            f.insert(id_key(&format!("p-{i:x}")));
        }
        let bytes = f.into_bytes();
        assert_eq!(bytes.len(), 40_000);
        assert_eq!(bytes.len() % LINE, 0);
        for i in 0..10_000u64 {
            assert!(may_hold(&bytes, user_key(i % 3, &format!("user-{i}"))));
            assert!(may_hold(&bytes, id_key(&format!("p-{i:x}"))));
        }
        // Other users, the same users in another experiment, other ids.
        let others = (10_000..30_000u64)
            .map(|i| user_key(i % 3, &format!("user-{i}")))
            .chain((0..10_000u64).map(|i| user_key(3 + i % 3, &format!("user-{i}"))))
            .chain((10_000..20_000u64).map(|i| id_key(&format!("p-{i:x}"))));
        let passed = others.filter(|&k| may_hold(&bytes, k)).count();
        assert!(
            passed < 40_000 / 500,
            "{passed} of 40,000 absent keys passed"
        );
    }

    #[test]
    fn bits_are_where_stored_filters_have_them() {
        // Filters stored by earlier versions are read by this one: a key's bits are still at
        // bit p of the whole filter, p = line * 512 + the top 9 bits of each multiplication.
        let lines = 7;
        let mut f = Filter::for_keys(lines * LINE * 8 / BITS_PER_KEY);
        let key = id_key("p-2a");
        f.insert(key);
        let bytes = f.into_bytes();
        let line = (((key >> 32) * lines as u64) >> 32) as usize;
        let mut h = key ^ (key >> 31);
        let mut expected = vec![0u8; lines * LINE];
        for _ in 0..PROBES {
            h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let p = line * LINE * 8 + (h >> 55) as usize;
            expected[p / 8] |= 1 << (p % 8);
        }
        assert_eq!(bytes, expected);
        assert!(may_hold(&bytes, key));
    }

    #[test]
    fn no_filter_may_hold_anything() {
        assert!(may_hold(&[], user_key(1, "anyone")));
        let empty = Filter::for_keys(0).into_bytes();
        assert_eq!(empty.len(), LINE);
        assert!(!may_hold(&empty, user_key(1, "anyone")));
        assert!(may_hold(&[0; 10], user_key(1, "anyone")));
    }

    #[test]
    fn ids_in_ranges_are_held_after_the_lines_and_few_others() {
        // Three batches of one process (the second continuing the first), one of another.
        let mut f = Filter::for_keys(3_000);
        let (first, second): (Vec<u64>, Vec<u64>) =
            ((0..1_000).collect(), (1_000..2_000).collect());
        f.insert_id_ranges("p", &first);
        f.insert_id_ranges("p", &second);
        f.insert_id_ranges("q", &(500..1_500).collect::<Vec<_>>());
        f.insert_id_ranges("p", &(5_000..5_010).collect::<Vec<_>>());
        for i in 0..3_000u64 {
            f.insert(user_key(1, &format!("user-{i}")));
        }
        let ranges = [
            IdRange {
                prefix: prefix_key("p"),
                first: 0,
                last: 1_999,
            },
            IdRange {
                prefix: prefix_key("q"),
                first: 500,
                last: 1_499,
            },
            IdRange {
                prefix: prefix_key("p"),
                first: 5_000,
                last: 5_009,
            },
        ];
        assert_eq!(f.ranges, ranges);
        let bytes = f.into_bytes();
        assert_eq!(bytes.len(), 6_016 + 3 * 24 + 12);
        // A reader of lines alone (before ranges) takes it for another shape: may hold anything.
        assert_ne!(bytes.len() % LINE, 0);
        let holds = |id: String| may_hold_id(&bytes, &IdProbe::new(&id));
        assert!((0..2_000u64).all(|n| holds(format!("p-{n:x}"))));
        assert!((500..1_500u64).all(|n| holds(format!("q-{n:x}"))));
        assert!((5_000..5_010u64).all(|n| holds(format!("p-{n:x}"))));
        assert!((0..3_000u64).all(|i| may_hold(&bytes, user_key(1, &format!("user-{i}")))));
        let absent = (2_000..5_000u64)
            .chain(5_010..10_000)
            .map(|n| format!("p-{n:x}"))
            .chain((0..500u64).chain(1_500..4_000).map(|n| format!("q-{n:x}")))
            .chain((0..2_000u64).map(|n| format!("r-{n:x}")))
            .chain(["p-zz", "p-", "p", ""].map(String::from));
        let (tried, passed) = absent.fold((0, 0), |(t, p), id| (t + 1, p + holds(id) as usize));
        assert!(
            passed * 500 < tried,
            "{passed} of {tried} absent ids passed"
        );
        assert!(!holds("p-7d0".into()) && holds("p-7cf".into()));
    }

    #[test]
    fn ids_go_in_as_ranges_only_when_they_run_in_few() {
        let batch: Vec<u64> = (40..1_040).collect();
        assert!(ids_as_ranges(&batch));
        assert_eq!(runs(&batch).collect::<Vec<_>>(), [(40, 1_039)]);
        // One run per eight ids at most.
        let eights: Vec<u64> = (0..800).map(|n| n + n / 8).collect();
        assert_eq!(runs(&eights).count(), 100);
        assert!(ids_as_ranges(&eights));
        let sevens: Vec<u64> = (0..700).map(|n| n + n / 7).collect();
        assert!(!ids_as_ranges(&sevens));
        assert!(!ids_as_ranges(&[1, 2, 3]));
        assert_eq!(
            runs(&[u64::MAX, 0, 1, 9]).collect::<Vec<_>>(),
            [(u64::MAX, u64::MAX), (0, 1), (9, 9)]
        );
    }

    #[test]
    fn a_filter_cut_short_or_with_another_tail_may_hold_anything() {
        let mut f = Filter::for_keys(10);
        f.insert_id_ranges("p", &(0..100).collect::<Vec<_>>());
        let bytes = f.into_bytes();
        let (nobody, far) = (user_key(1, "nobody"), IdProbe::new("p-fffff"));
        assert!(!may_hold(&bytes, nobody) && !may_hold_id(&bytes, &far));
        for cut in [1, 8, 12, 24, 30] {
            let short = &bytes[..bytes.len() - cut];
            assert!(
                may_hold(short, nobody) && may_hold_id(short, &far),
                "cut {cut}"
            );
        }
        let mut other_tail = bytes.clone();
        *other_tail.last_mut().unwrap() ^= 1;
        assert!(may_hold(&other_tail, nobody) && may_hold_id(&other_tail, &far));
        // A count of ranges past the filter's bytes.
        let mut too_many = bytes.clone();
        let at = too_many.len() - 12;
        too_many[at..at + 4].copy_from_slice(&1_000u32.to_le_bytes());
        assert!(may_hold(&too_many, nobody) && may_hold_id(&too_many, &far));
    }

    #[test]
    fn a_growing_filter_holds_every_key_put_in_and_few_others() {
        let mut g = Growing::new(1_000, 5);
        assert!(!g.may_hold(user_key(0, "user-0")));
        for i in 0..20_000u64 {
            g.insert(user_key(0, &format!("user-{i}")));
        }
        // Sized in whole lines: 1,024 keys, then 2,048, ... 16,384.
        assert_eq!(g.filters.len(), 5);
        assert_eq!(g.size(), (1_024 + 2_048 + 4_096 + 8_192 + 16_384) * 2);
        assert!((0..20_000u64).all(|i| g.may_hold(user_key(0, &format!("user-{i}")))));
        let passed = (20_000..120_000u64)
            .filter(|i| g.may_hold(user_key(0, &format!("user-{i}"))))
            .count();
        assert!(
            passed < 100_000 * 5 / 500,
            "{passed} of 100,000 absent keys passed"
        );
        // Five parts hold 31,744 keys: then it is full, and may hold anything.
        for i in 20_000..31_744u64 {
            g.insert(user_key(0, &format!("user-{i}")));
        }
        assert!(!g.full() && !g.may_hold(user_key(1, "someone")));
        g.insert(user_key(0, "one-more"));
        assert!(g.full() && g.may_hold(user_key(1, "someone")));
        assert_eq!(g.filters.len(), 5);
    }

    #[test]
    fn keys_are_stable() {
        // Filters are read by other processes and versions: the hashes must not change.
        assert_eq!(user_key(7, "user-1"), 5_115_668_431_000_630_912);
        assert_eq!(id_key("x-1"), 302_906_831_333_309_489);
    }
}
