//! Canonical segment keys and their stable 64-bit hash.
//!
//! A key is `dim:value|dim:value` in the experiment's dimension order. Values are trimmed and
//! lower-cased, and the three characters with meaning inside a key are percent-escaped:
//! `%` → `%25`, `|` → `%7c`, `:` → `%3a`. The empty key is the global segment.
//!
//! The hash is XXH3-64 (seed 0) of the key's UTF-8 bytes: a published, platform-independent
//! function, so the same key has the same hash in every process, on every machine, forever.
//! Test vectors are in `tests` below and in the Python suite (checked against the `xxhash`
//! package).

use crate::error::CoreError;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Separator between the `dim:value` parts of a key.
pub const LEVEL_SEPARATOR: char = '|';

/// The stable hash of a canonical key.
#[inline]
pub fn key_hash(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// The hash of the global segment (the empty key).
pub fn global_hash() -> u64 {
    key_hash("")
}

/// Whether a dimension name is usable: 1–64 characters of `[a-z0-9_]`.
pub fn valid_dimension(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Append the canonical form of one value to `out`.
pub fn push_canonical_value(value: &str, out: &mut String) {
    // Fastest path: printable lower-case ASCII without escapes, no space at either end (so
    // nothing to trim): needs no change. Branch-free over the bytes.
    let bytes = value.as_bytes();
    if let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) {
        let plain = bytes.iter().fold(first > b' ' && last > b' ', |ok, &b| {
            ok & (b < 0x80) & !b.is_ascii_uppercase() & (b != b'%') & (b != b'|') & (b != b':')
        });
        if plain {
            out.push_str(value);
            return;
        }
    }
    let value = value.trim();
    // Fast path: plain lower-case ASCII needs no change.
    if value
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase() && !matches!(b, b'%' | b'|' | b':'))
    {
        out.push_str(value);
        return;
    }
    for ch in value.chars() {
        match ch {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7c"),
            ':' => out.push_str("%3a"),
            c if c.is_ascii() => out.push(c.to_ascii_lowercase()),
            c => out.extend(c.to_lowercase()),
        }
    }
}

/// Append level `dim:value` to a key under construction.
#[inline]
pub fn push_level(key: &mut String, dimension: &str, value: &str) {
    if !key.is_empty() {
        key.push(LEVEL_SEPARATOR);
    }
    key.push_str(dimension);
    key.push(':');
    push_canonical_value(value, key);
}

fn check_lengths<D, V>(dimensions: &[D], values: &[V]) -> Result<(), CoreError> {
    if dimensions.len() != values.len() {
        return Err(CoreError::invalid(format!(
            "values: expected {} values (one per dimension), got {}",
            dimensions.len(),
            values.len()
        )));
    }
    Ok(())
}

/// The canonical key of a full segment.
pub fn segment_key<D: AsRef<str>, V: AsRef<str>>(
    dimensions: &[D],
    values: &[V],
) -> Result<String, CoreError> {
    Ok(path_keys(dimensions, values)?.pop().unwrap_or_default())
}

/// The keys of the cascade path: the global key, then one per level, deepest last.
pub fn path_keys<D: AsRef<str>, V: AsRef<str>>(
    dimensions: &[D],
    values: &[V],
) -> Result<Vec<String>, CoreError> {
    check_lengths(dimensions, values)?;
    let mut keys = Vec::with_capacity(dimensions.len() + 1);
    let mut key = String::new();
    keys.push(key.clone());
    for (d, v) in dimensions.iter().zip(values) {
        let d = d.as_ref();
        if !valid_dimension(d) {
            return Err(CoreError::invalid(format!(
                "dimensions: {d:?} is not a dimension name (1-64 of a-z, 0-9, _)"
            )));
        }
        push_level(&mut key, d, v.as_ref());
        keys.push(key.clone());
    }
    Ok(keys)
}

/// The prefixes of a canonical key that form its cascade path, global first.
pub fn parent_keys(key: &str) -> Vec<&str> {
    let mut out = vec![""];
    if key.is_empty() {
        return out;
    }
    for (i, ch) in key.char_indices() {
        if ch == LEVEL_SEPARATOR {
            out.push(&key[..i]);
        }
    }
    out.push(key);
    out
}

/// Hashes of `parent_keys(key)`, global first.
pub fn path_hashes_of_key(key: &str) -> Vec<u64> {
    parent_keys(key).into_iter().map(key_hash).collect()
}

/// A user's deterministic position in [0, 1) for hash splits: the top 53 bits of
/// XXH3-64(user id, seed) scaled to a double.
#[inline]
pub fn bucket(user_id: &str, seed: u64) -> f64 {
    (xxh3_64_with_seed(user_id.as_bytes(), seed) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_form() {
        let k = segment_key(
            &["country", "device", "source"],
            &[" US ", "Mobile", "Insta|gram:x%"],
        )
        .unwrap();
        assert_eq!(k, "country:us|device:mobile|source:insta%7cgram%3ax%25");
        assert_eq!(segment_key::<&str, &str>(&[], &[]).unwrap(), "");
        assert_eq!(
            path_keys(&["a", "b"], &["X", "y"]).unwrap(),
            vec!["", "a:x", "a:x|b:y"]
        );
        assert_eq!(
            segment_key(&["city"], &["MÜNCHEN"]).unwrap(),
            "city:münchen"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(segment_key(&["a", "b"], &["x"]).is_err());
        assert!(segment_key(&["A"], &["x"]).is_err());
        assert!(segment_key(&[""], &["x"]).is_err());
        assert!(segment_key(&["a|b"], &["x"]).is_err());
    }

    // Committed test vectors (checked against the reference XXH3 of the `xxhash` Python package):
    // changing the hash would orphan every stored counter.
    pub(crate) const VECTORS: [(&str, u64); 7] = [
        ("", 0x2d06800538d394c2),
        ("country:us", 0x84c0cabad0f97b9a),
        ("country:us|device:mobile", 0xff8c3b17408f868f),
        (
            "country:us|device:mobile|source:instagram",
            0x879cf138808511db,
        ),
        ("source:instagram|device:mobile", 0x30d150d30eff194d),
        ("city:münchen", 0xdead5268bad4c73c),
        ("cluster:3", 0xe79cc45179b54374),
    ];

    #[test]
    fn hash_test_vectors() {
        for (k, h) in VECTORS {
            assert_eq!(key_hash(k), h, "{k:?}");
        }
        assert_eq!(global_hash(), VECTORS[0].1);
        assert_eq!(bucket("alice", 1), 0.41252817306600664);
    }

    #[test]
    fn parents_of_a_key() {
        assert_eq!(parent_keys(""), vec![""]);
        assert_eq!(parent_keys("a:x"), vec!["", "a:x"]);
        assert_eq!(
            parent_keys("a:x|b:y|c:z"),
            vec!["", "a:x", "a:x|b:y", "a:x|b:y|c:z"]
        );
    }

    #[test]
    fn bucket_is_uniform_and_stable() {
        let n = 100_000;
        let below: usize = (0..n)
            .filter(|i| bucket(&format!("user-{i}"), 9) < 0.3)
            .count();
        assert!((below as f64 / n as f64 - 0.3).abs() < 0.01);
        assert_eq!(bucket("alice", 1), bucket("alice", 1));
        assert_ne!(bucket("alice", 1), bucket("alice", 2));
    }

    proptest! {
        #[test]
        fn path_prefixes_agree(values in proptest::collection::vec(".{0,12}", 0..5)) {
            let dims: Vec<String> = (0..values.len()).map(|i| format!("d{i}")).collect();
            let keys = path_keys(&dims, &values).unwrap();
            let full = keys.last().unwrap().clone();
            let parents: Vec<String> = parent_keys(&full).into_iter().map(String::from).collect();
            // Escaping keeps the separator out of values, so a key splits back into its path.
            prop_assert_eq!(&parents, &keys);
            prop_assert_eq!(path_hashes_of_key(&full), keys.iter().map(|k| key_hash(k)).collect::<Vec<_>>());
        }

        #[test]
        fn canonical_value_matches_the_definition(v in "[ a-zA-Z0-9%|:\\t\\x0b\\x0c\\u{a0}\\u{3000}é]{0,12}") {
            let mut fast = String::new();
            push_canonical_value(&v, &mut fast);
            let mut slow = String::new();
            for ch in v.trim().chars() {
                match ch {
                    '%' => slow.push_str("%25"),
                    '|' => slow.push_str("%7c"),
                    ':' => slow.push_str("%3a"),
                    c => slow.extend(c.to_lowercase()),
                }
            }
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn canonical_is_idempotent_on_values(v in "[a-z0-9 _-]{0,16}") {
            let once = segment_key(&["d"], &[v.as_str()]).unwrap();
            let again = segment_key(&["d"], &[once.trim_start_matches("d:")]).unwrap();
            prop_assert_eq!(once, again);
        }
    }
}
