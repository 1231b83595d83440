//! Records of new assignments for the state replicas share (`allocsvc.store.redis`): each
//! assignment under its own key, its value the JSON array Python writes for one
//! (`[id, experiment key, handle, user id, variant, segment key, level, propensity,
//! created ms]`), so that a replica that did not make it finds it by id.
//!
//! A batch's records go to Redis as one argument of one script call (framed: each key and each
//! value preceded by its length, 4 bytes big-endian), not as a command each: sent one command
//! an assignment by redis-py, a shared replica spent about 30 ms of its event loop per batch
//! of 1,000.

use std::io::Write;

use crate::held::{Assignment, Made};

/// Bytes to set aside per record (about 110 with short ids and keys): a batch's records are
/// written without growing their buffer again.
pub const RECORD_BYTES: usize = 160;

/// Append `s` as a JSON string (quotes, backslashes and control characters escaped; other
/// characters as they are, in UTF-8).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        // Ids, keys and most user ids: nothing to escape.
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escaped.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escaped);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Append `x` as a JSON number that reads back as the same f64 (shortest form, with a
/// fraction: `1.0`, not `1`, as Python writes floats).
pub fn push_json_f64(out: &mut Vec<u8>, x: f64) {
    let start = out.len();
    if x.is_finite() {
        write!(out, "{x}").expect("a Vec takes every write");
        if !out[start..].iter().any(|&b| b == b'.' || b == b'e') {
            out.extend_from_slice(b".0");
        }
    } else {
        // Not JSON; a propensity is always in (0, 1].
        out.extend_from_slice(b"null");
    }
}

/// Append `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut rest = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Append `bytes` preceded by its length (4 bytes, big-endian).
fn push_framed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Append the record of `a` (an assignment of experiment `experiment_key`): the key
/// `key_prefix` + its id, then its JSON value, each framed.
pub fn push_record(
    out: &mut Vec<u8>,
    value: &mut Vec<u8>,
    key_prefix: &str,
    a: &Assignment<'_>,
    experiment_key: &str,
) {
    out.extend_from_slice(&((key_prefix.len() + a.id.len()) as u32).to_be_bytes());
    out.extend_from_slice(key_prefix.as_bytes());
    out.extend_from_slice(a.id.as_bytes());
    write_value(value, a, experiment_key);
    push_framed(out, value);
}

/// Write the JSON value of `a`'s record into `value` (cleared first).
fn write_value(value: &mut Vec<u8>, a: &Assignment<'_>, experiment_key: &str) {
    value.clear();
    value.push(b'[');
    push_json_str(value, &a.id);
    value.push(b',');
    push_json_str(value, experiment_key);
    for (n, text) in [(a.handle, a.user_id), (a.variant as u64, a.segment_key)] {
        value.push(b',');
        push_decimal(value, n);
        value.push(b',');
        push_json_str(value, text);
    }
    value.push(b',');
    push_decimal(value, a.level as u64);
    value.push(b',');
    push_json_f64(value, a.propensity);
    value.push(b',');
    if a.created_ms < 0 {
        value.push(b'-');
    }
    push_decimal(value, a.created_ms.unsigned_abs());
    value.push(b']');
}

impl Made {
    /// Append the record of every assignment, in order (see [`push_record`]);
    /// `experiment_key` names each assignment's experiment by its handle.
    pub fn shared_records<'k>(
        &self,
        out: &mut Vec<u8>,
        key_prefix: &str,
        mut experiment_key: impl FnMut(u64) -> &'k str,
    ) {
        let mut id = String::new();
        let mut value = Vec::with_capacity(160);
        out.reserve(self.len() * RECORD_BYTES);
        for k in 0..self.len() {
            self.write_id(k, &mut id);
            let a = self.get(k, &id);
            push_record(out, &mut value, key_prefix, &a, experiment_key(a.handle));
        }
    }
}

impl Made {
    /// Append the sticky claim of each assignment whose experiment `sticky_key` gives a key
    /// (its hash of sticky assignments): that key, the user id and the assignment's record
    /// value (see [`push_record`]), each framed. Returns the positions of the claimed
    /// assignments, in order.
    pub fn sticky_claims<'k>(
        &self,
        out: &mut Vec<u8>,
        mut sticky_key: impl FnMut(u64) -> Option<&'k str>,
        mut experiment_key: impl FnMut(u64) -> &'k str,
    ) -> Vec<usize> {
        let mut claimed = Vec::new();
        let mut id = String::new();
        let mut value = Vec::with_capacity(160);
        for k in 0..self.len() {
            let handle = self.handles()[k];
            let Some(key) = sticky_key(handle) else {
                continue;
            };
            self.write_id(k, &mut id);
            let a = self.get(k, &id);
            push_framed(out, key.as_bytes());
            push_framed(out, a.user_id.as_bytes());
            write_value(&mut value, &a, experiment_key(handle));
            push_framed(out, &value);
            claimed.push(k);
        }
        claimed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_str(s: &str) -> String {
        let mut out = Vec::new();
        push_json_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    /// The framed fields of `out`, in order.
    fn unframed(out: &[u8]) -> Vec<String> {
        let mut fields = Vec::new();
        let mut rest = out;
        while !rest.is_empty() {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            fields.push(String::from_utf8(rest[4..4 + n].to_vec()).unwrap());
            rest = &rest[4 + n..];
        }
        fields
    }

    fn json_f64(x: f64) -> String {
        let mut out = Vec::new();
        push_json_f64(&mut out, x);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_json_needs() {
        assert_eq!(json_str("plain"), "\"plain\"");
        assert_eq!(json_str(""), "\"\"");
        assert_eq!(json_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json_str("l\ni\rn\te"), "\"l\\ni\\rn\\te\"");
        assert_eq!(
            json_str("\u{1}x\u{1f}\u{8}\u{c}"),
            "\"\\u0001x\\u001f\\b\\f\""
        );
        assert_eq!(json_str("ünï 😀"), "\"ünï 😀\"");
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 1_700_000_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn floats_read_back_the_same_and_have_a_fraction() {
        assert_eq!(json_f64(1.0), "1.0");
        assert_eq!(json_f64(0.2), "0.2");
        for x in [0.1 + 0.2, 1e-7, 0.999_999_999_999_999_9, 1.0 / 3.0, 5e-324] {
            assert_eq!(json_f64(x).parse::<f64>().unwrap(), x);
        }
        assert_eq!(json_f64(f64::NAN), "null");
    }

    #[test]
    fn a_batch_s_records_are_framed_keys_and_values_in_order() {
        let mut made = Made::new("p", 1_700_000_000_000);
        made.push(0x1f, 3, "u\"1", 2, "country:us", 1, 0.25);
        made.push(0x20, 4, "u2", 0, "", 0, 1.0);
        let mut out = Vec::new();
        made.shared_records(&mut out, "ns:asg:", |h| if h == 3 { "e3" } else { "e4" });
        let fields = unframed(&out);
        assert_eq!(
            fields,
            [
                "ns:asg:p-1f",
                "[\"p-1f\",\"e3\",3,\"u\\\"1\",2,\"country:us\",1,0.25,1700000000000]",
                "ns:asg:p-20",
                "[\"p-20\",\"e4\",4,\"u2\",0,\"\",0,1.0,1700000000000]",
            ]
        );
    }

    #[test]
    fn claims_are_framed_hash_key_user_and_value_of_sticky_experiments_only() {
        let mut made = Made::new("p", 5);
        made.push(1, 3, "a", 0, "", 0, 0.5);
        made.push(2, 4, "b\n", 1, "k", 1, 1.0);
        made.push(3, 3, "c", 1, "", 0, 0.5);
        let mut out = Vec::new();
        let claimed =
            made.sticky_claims(&mut out, |h| (h == 3).then_some("ns:{x3}:sticky"), |_| "e3");
        assert_eq!(claimed, [0, 2]);
        let fields = unframed(&out);
        assert_eq!(
            fields,
            [
                "ns:{x3}:sticky",
                "a",
                "[\"p-1\",\"e3\",3,\"a\",0,\"\",0,0.5,5]",
                "ns:{x3}:sticky",
                "c",
                "[\"p-3\",\"e3\",3,\"c\",1,\"\",0,0.5,5]",
            ]
        );
    }
}
