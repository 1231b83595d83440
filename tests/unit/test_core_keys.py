"""Canonical segment keys, their stable hash and user buckets, against the `xxhash` package."""

from __future__ import annotations

import string

import numpy as np
import pytest
import xxhash
from scipy import stats

from allocsvc.core import bucket, key_hash, parent_keys, path_keys, segment_key

pytestmark = pytest.mark.unit

# Committed vectors (rust_core/src/keys.rs has the same): a change orphans every stored counter.
HASH_VECTORS = [
    ("", 0x2D06800538D394C2),
    ("country:us", 0x84C0CABAD0F97B9A),
    ("country:us|device:mobile", 0xFF8C3B17408F868F),
    ("country:us|device:mobile|source:instagram", 0x879CF138808511DB),
    ("source:instagram|device:mobile", 0x30D150D30EFF194D),
    ("city:münchen", 0xDEAD5268BAD4C73C),
    ("cluster:3", 0xE79CC45179B54374),
]


@pytest.mark.parametrize(("key", "expected"), HASH_VECTORS)
def test_key_hash_test_vectors(key: str, expected: int) -> None:
    assert key_hash(key) == expected
    assert xxhash.xxh3_64_intdigest(key.encode()) == expected


def some_keys() -> list[str]:
    rng = np.random.default_rng(20240101)
    alphabet = string.printable + "äöüßéèñçøåÆŒ€£¥中文日本語한국어ΑΒΓαβγЖжЯя🙂🚀\u0301\u200d"
    keys = ["", "a", "a:b", "country:us|device:mobile", "x" * 10_000, "emoji:🙂|zh:中文"]
    # every length around the xxh3 size-class boundaries (0-3, 4-8, 9-16, 17-128, 129-240, 240+)
    keys += ["k" * n for n in range(0, 300)]
    for _ in range(1000):
        n = int(rng.integers(0, 80))
        keys.append("".join(alphabet[i] for i in rng.integers(0, len(alphabet), n)))
    return keys


def test_key_hash_equals_reference_xxh3_for_many_keys() -> None:
    for key in some_keys():
        assert key_hash(key) == xxhash.xxh3_64_intdigest(key.encode("utf-8")), repr(key)


def reference_value(value: str) -> str:
    """The documented canonical form of one value: trimmed, lower-cased per character, escaped."""
    escaped = {"%": "%25", "|": "%7c", ":": "%3a"}
    return "".join(escaped.get(ch, ch.lower()) for ch in value.strip(" \t\r\n"))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([" US ", "Mobile", "Instagram"], "country:us|device:mobile|source:instagram"),
        (["\tUS\n", " MOBILE", "instagram "], "country:us|device:mobile|source:instagram"),
        (["us", "mobile", "Insta|gram:x%"], "country:us|device:mobile|source:insta%7cgram%3ax%25"),
        (["%7c", "a|b", "::"], "country:%257c|device:a%7cb|source:%3a%3a"),
        (["", " ", "x"], "country:|device:|source:x"),
        (["DE", "Tablet", "MÜNCHEN"], "country:de|device:tablet|source:münchen"),
        (["日本", "Ünïcödé", "🙂"], "country:日本|device:ünïcödé|source:🙂"),
    ],
)
def test_segment_key_canonical_form(values: list[str], expected: str) -> None:
    dims = ["country", "device", "source"]
    assert segment_key(dims, values) == expected
    parts = [f"{d}:{reference_value(v)}" for d, v in zip(dims, values, strict=True)]
    assert expected == "|".join(parts)


def test_segment_key_of_no_dimensions_is_global() -> None:
    assert segment_key([], []) == ""
    assert path_keys([], []) == [""]


def test_canonical_form_matches_the_reference_on_random_values() -> None:
    rng = np.random.default_rng(7)
    alphabet = string.ascii_letters + string.digits + " %|:_-.éÉßÄä中🙂"
    for _ in range(500):
        values = [
            "".join(alphabet[i] for i in rng.integers(0, len(alphabet), int(rng.integers(0, 12))))
            for _ in range(3)
        ]
        dims = ["a", "b_2", "c3"]
        expected = [""]
        for d, v in zip(dims, values, strict=True):
            part = f"{d}:{reference_value(v)}"
            expected.append(f"{expected[-1]}|{part}" if expected[-1] else part)
        assert path_keys(dims, values) == expected
        assert segment_key(dims, values) == expected[-1]
        # escaping keeps `|` out of values, so the full key splits back into its path
        assert parent_keys(expected[-1]) == expected


def test_path_keys_and_parent_keys() -> None:
    dims = ["country", "device", "source"]
    keys = path_keys(dims, ["US", "Mobile", "Instagram"])
    assert keys == [
        "",
        "country:us",
        "country:us|device:mobile",
        "country:us|device:mobile|source:instagram",
    ]
    assert parent_keys(keys[-1]) == keys
    assert parent_keys("") == [""]
    assert parent_keys("a:x") == ["", "a:x"]
    assert [key_hash(k) for k in keys] == [h for _, h in HASH_VECTORS[:4]]


@pytest.mark.parametrize("dimension", ["", "Country", "a|b", "a:b", "dé", "a b", "x" * 65])
def test_bad_dimension_names_are_rejected(dimension: str) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        segment_key([dimension], ["x"])
    with pytest.raises(ValueError, match="dimensions"):
        path_keys(["ok", dimension], ["x", "y"])


def test_dimension_names_of_64_characters_are_accepted() -> None:
    assert segment_key(["a_1" + "x" * 61], ["v"]) == "a_1" + "x" * 61 + ":v"


def test_values_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="values"):
        segment_key(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="values"):
        path_keys(["a"], ["x", "y"])


def reference_bucket(user_id: str, seed: int) -> float:
    return (xxhash.xxh3_64_intdigest(user_id.encode(), seed) >> 11) * 2.0**-53


@pytest.mark.parametrize("seed", [0, 1, 9, 2**32 + 5, 2**64 - 1])
def test_bucket_is_the_top_53_bits_of_seeded_xxh3(seed: int) -> None:
    for user in ["", "alice", "bob", "用户-1", "🙂" * 40, *(f"user-{i}" for i in range(2000))]:
        assert bucket(user, seed) == reference_bucket(user, seed)


def test_bucket_vector() -> None:
    assert bucket("alice", 1) == 0.41252817306600664


def test_bucket_is_deterministic_and_depends_on_the_seed() -> None:
    assert bucket("alice", 1) == bucket("alice", 1)
    assert bucket("alice", 1) != bucket("alice", 2)


def test_bucket_is_uniform() -> None:
    n = 100_000
    positions = np.array([bucket(f"user-{i}", 9) for i in range(n)])
    assert np.all((positions >= 0.0) & (positions < 1.0))
    for q in (0.01, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 0.99):
        assert np.mean(positions < q) == pytest.approx(q, abs=0.01)
    assert stats.kstest(positions, "uniform").pvalue > 0.001
