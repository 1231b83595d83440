//! Hash maps for the tables a call looks up: keyed per process, as the held store's user
//! hashes are, and cheaper than std's SipHash, which took about 2.5k instructions of a unary
//! call (bench/RESULTS.md, item 54). Strings (user agents, experiment and segment keys, which
//! clients choose) are hashed with XXH3 seeded by a random number of this process, so a client
//! cannot aim keys at one bucket without knowing it; numbers (handles, levels, days: the
//! process's own) are mixed with it by a multiply.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A `HashMap` with [`Keyed`] hashes.
pub type KeyedMap<K, V> = HashMap<K, V, Keyed>;
/// A `HashSet` with [`Keyed`] hashes.
pub type KeyedSet<T> = HashSet<T, Keyed>;

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// The process's seed: random, drawn once.
fn process_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| RandomState::new().hash_one(0x5eed_u64))
}

/// Builds [`KeyedHasher`]s under the process's seed.
#[derive(Clone, Copy, Debug)]
pub struct Keyed {
    seed: u64,
}

impl Default for Keyed {
    fn default() -> Self {
        Keyed {
            seed: process_seed(),
        }
    }
}

impl BuildHasher for Keyed {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(self.seed)
    }
}

/// XXH3 of each run of bytes, seeded with the state so far; each number multiplied in.
pub struct KeyedHasher(u64);

impl KeyedHasher {
    #[inline]
    fn mix(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(MIX).rotate_left(26);
    }
}

impl Hasher for KeyedHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.mix(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.mix(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.mix(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }

    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.mix(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // hashbrown takes the bucket from the low bits and a tag from the top 7.
        self.0.wrapping_mul(MIX) ^ (self.0 >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_hash_alike_and_maps_work() {
        let keyed = Keyed::default();
        assert_eq!(keyed.hash_one("country:us"), keyed.hash_one("country:us"));
        assert_ne!(keyed.hash_one("country:us"), keyed.hash_one("country:uk"));
        assert_ne!(
            keyed.hash_one((1u64, 2usize)),
            keyed.hash_one((2u64, 1usize))
        );
        let mut map: KeyedMap<String, usize> = KeyedMap::default();
        for i in 0..10_000 {
            map.insert(format!("key-{i}"), i);
        }
        assert!((0..10_000).all(|i| map[&format!("key-{i}")] == i));
        let set: KeyedSet<(u64, i64)> = (0..1000).map(|i| (i % 7, i as i64)).collect();
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn the_seed_is_the_process_own() {
        assert_eq!(Keyed::default().seed, Keyed::default().seed);
        // Unkeyed, "a" would hash as XXH3 with seed 0 does.
        assert_ne!(
            Keyed::default().hash_one("a"),
            Keyed { seed: 0 }.hash_one("a")
        );
    }

    #[test]
    fn small_numbers_spread_over_the_buckets_and_tags() {
        let keyed = Keyed::default();
        let low: HashSet<u64> = (0..1024u64).map(|h| keyed.hash_one(h) & 1023).collect();
        let top: HashSet<u64> = (0..1024u64).map(|h| keyed.hash_one(h) >> 57).collect();
        assert!(low.len() > 600, "{} of 1024 low buckets", low.len());
        assert_eq!(top.len(), 128);
    }
}
