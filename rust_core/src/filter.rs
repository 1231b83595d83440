//! Bloom filters of assignment blocks (`assignment_blocks.filter`): the (experiment, user) pairs
//! and the assignment ids a block may hold. A lookup of one user or one id then reads only the
//! blocks whose filter may hold it (see [`crate::block`]), instead of expanding every block
//! (minutes of work after a long batch burst). A filter never misses what was put in it; about
//! 0.1% of other keys pass.
//!
//! Keys are xxh3 hashes, stable across processes and versions: a filter is read by every
//! replica and after restarts. A filter is its bits as bytes (bit `p` is bit `p % 8` of byte
//! `p / 8`), in lines of 64 bytes; its length gives the number of lines.
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

/// The key of (experiment `handle`, `user_id`).
pub fn user_key(handle: u64, user_id: &str) -> u64 {
    xxh3_64_with_seed(user_id.as_bytes(), handle)
}

/// The key of an assignment id.
pub fn id_key(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), ID_SEED)
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
    bytes: Vec<u8>,
}

impl Filter {
    /// A filter sized for `keys` keys.
    pub fn for_keys(keys: usize) -> Self {
        let lines = (keys * BITS_PER_KEY).div_ceil(LINE * 8).max(1);
        Filter {
            bytes: vec![0; lines * LINE],
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

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
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

/// Whether the filter `bytes` may hold `key`; an empty one (no filter), or one of another
/// shape, may hold anything.
pub fn may_hold(bytes: &[u8], key: u64) -> bool {
    if bytes.is_empty() || bytes.len() % LINE != 0 {
        return true;
    }
    let (start, mut bits) = positions(key, bytes.len() / LINE);
    let line = &bytes[start..start + LINE];
    bits.all(|b| line[b / 8] & (1 << (b % 8)) != 0)
}

/// Positions in `filters` of those that may hold one of `keys` (a lookup's pass over every
/// block for all the keys it looks for).
pub fn holding_any<F: AsRef<[u8]>>(filters: &[F], keys: &[u64]) -> Vec<usize> {
    filters
        .iter()
        .enumerate()
        .filter(|(_, f)| keys.iter().any(|&k| may_hold(f.as_ref(), k)))
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
