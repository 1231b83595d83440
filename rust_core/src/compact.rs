//! The compact form of an assignment block's stream, as the write-behind stores blocks since
//! 2026-11-26 (LZ4-compressed in `assignment_blocks.payload`): each batch's columns as the batch
//! holds them ([`crate::held::Made`]), ids as numbers after one prefix, a segment key once per run
//! of rows, instead of the binary COPY rows that expanding the block sends to PostgreSQL. Building
//! a block this way skips the COPY rows and gives LZ4 half the bytes, which it compresses to a
//! third of what the COPY rows took (item 74 of bench/RESULTS.md). Expansion turns it back into
//! the COPY stream it sends ([`to_copy_stream`]), which blocks stored before are; lookups and
//! restarts read its columns ([`crate::block::each_row`], which reads both forms).
//!
//! Layout (integers little-endian, a text its length as a u32 and its UTF-8 bytes): [`MAGIC`], then
//! groups of rows, then [`END`]. A group: its row count `n` (u32, not [`END`]); its ids (a byte 0,
//! a prefix and `n` u64 numbers, an id being `{prefix}-{number:x}`, each number written as its
//! difference from the one before, wrapping, the first from 0: a batch's are consecutive, and LZ4
//! then finds them all alike; or a byte 1 and `n` texts); when its rows were made (a byte 0 and one
//! i64 of Unix milliseconds; or a byte 1 and `n` of them); `n` u64 experiment handles; `n` u32
//! lengths of user ids, then the user ids' bytes; `n` u16 variants; a u32 count of segment keys and
//! the keys as texts, then `n` u32 positions among them; `n` u16 cascade levels; `n` f64
//! propensities.
use std::borrow::Cow;

use crate::error::CoreError;
use crate::held::{copy_header, copy_row, copy_trailer, write_own_id, Assignment, Fields};
use crate::keys::key_hash;

/// How a compact stream starts (a binary COPY stream starts `PGCOPY\n`).
pub const MAGIC: &[u8] = b"allocsvc block 1\n";
/// What ends a compact stream, where the next group's row count would be.
const END: u32 = u32::MAX;

/// A group's ids.
#[derive(Clone, Copy, Debug)]
pub enum Ids<'a> {
    /// `{prefix}-{seq:x}` for each of `seqs`.
    Numbered { prefix: &'a str, seqs: &'a [u64] },
    /// Each its own.
    Each(&'a [Box<str>]),
}

/// One group's columns, one entry a row in each (see the module's layout).
#[derive(Clone, Copy, Debug)]
pub struct Columns<'a> {
    pub ids: Ids<'a>,
    /// When every row was made, unless `created` has each row's time.
    pub created_ms: i64,
    pub created: &'a [i64],
    pub handles: &'a [u64],
    /// The user ids, one after the other; `user_ends` has where each ends.
    pub users: &'a str,
    pub user_ends: &'a [usize],
    pub variants: &'a [u32],
    pub keys: &'a [Box<str>],
    /// Each row's segment key, a position in `keys`.
    pub key_of: &'a [u32],
    pub levels: &'a [u16],
    pub propensities: &'a [f64],
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Start a compact stream.
pub fn start(out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
}

/// End a compact stream.
pub fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&END.to_le_bytes());
}

impl Columns<'_> {
    /// Append this group to a compact stream.
    pub fn write(&self, out: &mut Vec<u8>) {
        let n = self.handles.len();
        out.reserve(64 + n * 40 + self.users.len());
        put_u32(out, n);
        match self.ids {
            Ids::Numbered { prefix, seqs } => {
                out.push(0);
                put_text(out, prefix);
                let mut last = 0u64;
                for &s in seqs.iter() {
                    out.extend_from_slice(&s.wrapping_sub(last).to_le_bytes());
                    last = s;
                }
            }
            Ids::Each(ids) => {
                out.push(1);
                ids.iter().for_each(|id| put_text(out, id));
            }
        }
        if self.created.is_empty() {
            out.push(0);
            out.extend_from_slice(&self.created_ms.to_le_bytes());
        } else {
            out.push(1);
            self.created
                .iter()
                .for_each(|c| out.extend_from_slice(&c.to_le_bytes()));
        }
        self.handles
            .iter()
            .for_each(|h| out.extend_from_slice(&h.to_le_bytes()));
        let mut start = 0;
        for &end in self.user_ends {
            put_u32(out, end - start);
            start = end;
        }
        out.extend_from_slice(self.users.as_bytes());
        self.variants
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes()));
        put_u32(out, self.keys.len());
        self.keys.iter().for_each(|k| put_text(out, k));
        self.key_of
            .iter()
            .for_each(|k| out.extend_from_slice(&k.to_le_bytes()));
        self.levels
            .iter()
            .for_each(|l| out.extend_from_slice(&l.to_le_bytes()));
        self.propensities
            .iter()
            .for_each(|p| out.extend_from_slice(&p.to_bits().to_le_bytes()));
    }
}

/// Append `rows` (single assignments, each with its own id and time) as one group.
pub fn write_rows(out: &mut Vec<u8>, rows: &[Assignment<'_>]) {
    let mut users = String::new();
    let mut user_ends = Vec::with_capacity(rows.len());
    for a in rows {
        users.push_str(a.user_id);
        user_ends.push(users.len());
    }
    let ids: Vec<Box<str>> = rows.iter().map(|a| a.id.as_ref().into()).collect();
    // A segment key once per run of rows, as a batch keeps them: a reader hashes each once.
    let (mut keys, mut key_of): (Vec<Box<str>>, Vec<u32>) = (Vec::new(), Vec::new());
    for a in rows {
        if keys.last().map(|k| &**k) != Some(a.segment_key) {
            keys.push(a.segment_key.into());
        }
        key_of.push(keys.len() as u32 - 1);
    }
    Columns {
        ids: Ids::Each(&ids),
        created_ms: 0,
        created: &rows.iter().map(|a| a.created_ms).collect::<Vec<_>>(),
        handles: &rows.iter().map(|a| a.handle).collect::<Vec<_>>(),
        users: &users,
        user_ends: &user_ends,
        variants: &rows.iter().map(|a| a.variant as u32).collect::<Vec<_>>(),
        keys: &keys,
        key_of: &key_of,
        levels: &rows.iter().map(|a| a.level as u16).collect::<Vec<_>>(),
        propensities: &rows.iter().map(|a| a.propensity).collect::<Vec<_>>(),
    }
    .write(out);
}

/// A group's ids as read: a prefix and a column of numbers, or each id.
enum IdColumn<'d> {
    Numbered(&'d str, &'d [u8]),
    Each(Vec<&'d str>),
}

/// When a group's rows were made, as read: all at once, or a column of times.
#[derive(Clone, Copy)]
enum TimeColumn<'d> {
    All(i64),
    Each(&'d [u8]),
}

fn cut_short() -> CoreError {
    CoreError::invalid("data: a compact assignment block ends within a group")
}

/// A column of `n` values of `width` bytes each.
fn column<'d>(fields: &mut Fields<'d>, n: usize, width: usize) -> Result<&'d [u8], CoreError> {
    let bytes = n.checked_mul(width).ok_or_else(cut_short)?;
    fields.take(bytes).ok_or_else(cut_short)
}

fn u32_at(column: &[u8], k: usize) -> u32 {
    u32::from_le_bytes(column[4 * k..4 * k + 4].try_into().unwrap())
}

fn u64_at(column: &[u8], k: usize) -> u64 {
    u64::from_le_bytes(column[8 * k..8 * k + 8].try_into().unwrap())
}

fn u16_at(column: &[u8], k: usize) -> u16 {
    u16::from_le_bytes([column[2 * k], column[2 * k + 1]])
}

fn byte(fields: &mut Fields<'_>) -> Result<u8, CoreError> {
    fields.take(1).map(|b| b[0]).ok_or_else(cut_short)
}

fn count(fields: &mut Fields<'_>) -> Result<u32, CoreError> {
    fields
        .take(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(cut_short)
}

fn text<'d>(fields: &mut Fields<'d>) -> Result<&'d str, CoreError> {
    let n = count(fields)? as usize;
    let bytes = fields.take(n).ok_or_else(cut_short)?;
    std::str::from_utf8(bytes)
        .map_err(|_| CoreError::invalid("data: a compact assignment block's text is not UTF-8"))
}

/// Call `each` with the rows of a compact stream that `keep` keeps (it is given each row's
/// experiment handle and user id, before the row's id is made), in order, and each one's
/// segment key's hash.
pub fn each_row(
    stream: &[u8],
    mut keep: impl FnMut(u64, &str) -> bool,
    mut each: impl FnMut(&Assignment<'_>, u64),
) -> Result<(), CoreError> {
    let invalid =
        |what: &str| CoreError::invalid(format!("data: a compact assignment block {what}"));
    let Some(body) = stream.strip_prefix(MAGIC) else {
        return Err(invalid("does not start as one"));
    };
    let mut fields = Fields { data: body, at: 0 };
    let mut id = String::new();
    loop {
        let n = count(&mut fields)?;
        if n == END {
            break;
        }
        let n = n as usize;
        let ids = match byte(&mut fields)? {
            0 => IdColumn::Numbered(text(&mut fields)?, column(&mut fields, n, 8)?),
            1 => {
                let mut ids = Vec::new();
                for _ in 0..n {
                    ids.push(text(&mut fields)?);
                }
                IdColumn::Each(ids)
            }
            other => return Err(invalid(&format!("has ids of kind {other}"))),
        };
        let created = match byte(&mut fields)? {
            0 => TimeColumn::All(u64_at(column(&mut fields, 1, 8)?, 0) as i64),
            1 => TimeColumn::Each(column(&mut fields, n, 8)?),
            other => return Err(invalid(&format!("has times of kind {other}"))),
        };
        let handles = column(&mut fields, n, 8)?;
        let lengths = column(&mut fields, n, 4)?;
        let total: usize = (0..n).map(|k| u32_at(lengths, k) as usize).sum();
        let users = std::str::from_utf8(fields.take(total).ok_or_else(cut_short)?)
            .map_err(|_| invalid("has user ids that are not UTF-8"))?;
        let variants = column(&mut fields, n, 2)?;
        let key_count = count(&mut fields)? as usize;
        let mut keys = Vec::new();
        for _ in 0..key_count {
            let key = text(&mut fields)?;
            keys.push((key, key_hash(key)));
        }
        let key_of = column(&mut fields, n, 4)?;
        let levels = column(&mut fields, n, 2)?;
        let propensities = column(&mut fields, n, 8)?;
        let mut user_start = 0;
        let mut seq = 0u64;
        for k in 0..n {
            let user_end = user_start + u32_at(lengths, k) as usize;
            let user_id = users
                .get(user_start..user_end)
                .ok_or_else(|| invalid("cuts a user id within a character"))?;
            user_start = user_end;
            let (segment_key, segment_hash) = *keys
                .get(u32_at(key_of, k) as usize)
                .ok_or_else(|| invalid("names a segment key it does not have"))?;
            if let IdColumn::Numbered(_, seqs) = &ids {
                seq = seq.wrapping_add(u64_at(seqs, k));
            }
            let handle = u64_at(handles, k);
            if !keep(handle, user_id) {
                continue;
            }
            let a = Assignment {
                id: match &ids {
                    IdColumn::Numbered(prefix, _) => {
                        write_own_id(&mut id, prefix, seq);
                        Cow::Borrowed(id.as_str())
                    }
                    IdColumn::Each(each) => Cow::Borrowed(each[k]),
                },
                handle,
                user_id,
                variant: u16_at(variants, k) as usize,
                segment_key,
                level: u16_at(levels, k) as usize,
                propensity: f64::from_bits(u64_at(propensities, k)),
                created_ms: match created {
                    TimeColumn::All(all) => all,
                    TimeColumn::Each(each) => u64_at(each, k) as i64,
                },
            };
            each(&a, segment_hash);
        }
    }
    if fields.at != body.len() {
        return Err(invalid("has bytes after its end"));
    }
    Ok(())
}

/// The binary COPY stream ([`crate::held::COPY_COLUMNS`]) of a compact stream's rows, as
/// expanding its block sends it and as blocks stored before were.
pub fn to_copy_stream(stream: &[u8]) -> Result<Vec<u8>, CoreError> {
    let mut out = Vec::with_capacity(stream.len() * 3);
    copy_header(&mut out);
    each_row(
        stream,
        |_, _| true,
        |a, segment_hash| copy_row(&mut out, a, segment_hash),
    )?;
    copy_trailer(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{rows_of, Wanted};
    use crate::held::Made;

    fn single<'a>(id: &'a str, user_id: &'a str, created_ms: i64) -> Assignment<'a> {
        Assignment {
            id: Cow::Borrowed(id),
            handle: 9,
            user_id,
            variant: 2,
            segment_key: "country:fr",
            level: 1,
            propensity: 0.125,
            created_ms,
        }
    }

    /// A stream of two singles and two batches (one of rows made at different times).
    fn stream() -> Vec<u8> {
        let mut first = Made::new("w1", 1_700_000_000_000);
        first.push(10, 7, "ann", 0, "", 0, 0.5);
        first.push(11, 7, "bøb", 1, "device:mobile", 1, 0.25);
        let mut second = Made::new("w2", 0);
        second.push_at(1_700_000_000_005, 255, 8, "ann", 3, "a", 2, 1.0);
        second.push_at(1_700_000_000_009, 256, 8, "cy", 0, "a", 2, 0.75);
        let mut out = Vec::new();
        start(&mut out);
        write_rows(
            &mut out,
            &[
                single("s-1", "dee", 1_600_000_000_000),
                single("s-2", "ann", 1),
            ],
        );
        first.columns().write(&mut out);
        second.columns().write(&mut out);
        end(&mut out);
        out
    }

    #[test]
    fn every_row_comes_back_in_order_with_its_columns() {
        let mut rows = Vec::new();
        each_row(
            &stream(),
            |_, _| true,
            |a, hash| {
                assert_eq!(hash, key_hash(a.segment_key));
                rows.push((
                    a.id.to_string(),
                    a.handle,
                    a.user_id.to_string(),
                    a.variant,
                    a.segment_key.to_string(),
                    a.level,
                    a.propensity,
                    a.created_ms,
                ));
            },
        )
        .unwrap();
        // One row a line, as a table.
        #[rustfmt::skip]
        let expected = [
            ("s-1", 9, "dee", 2, "country:fr", 1, 0.125, 1_600_000_000_000),
            ("s-2", 9, "ann", 2, "country:fr", 1, 0.125, 1),
            ("w1-a", 7, "ann", 0, "", 0, 0.5, 1_700_000_000_000),
            ("w1-b", 7, "bøb", 1, "device:mobile", 1, 0.25, 1_700_000_000_000),
            ("w2-ff", 8, "ann", 3, "a", 2, 1.0, 1_700_000_000_005),
            ("w2-100", 8, "cy", 0, "a", 2, 0.75, 1_700_000_000_009),
        ];
        let got: Vec<_> = rows
            .iter()
            .map(|(id, h, u, v, k, l, p, at)| {
                (id.as_str(), *h, u.as_str(), *v, k.as_str(), *l, *p, *at)
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn its_copy_stream_reads_as_the_rows() {
        let copy = to_copy_stream(&stream()).unwrap();
        let all = rows_of(&copy, Wanted::All).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(
            (all[3].id, all[3].user_id, all[3].variant),
            ("w1-b", "bøb", 1)
        );
        assert_eq!(all[5].created_ms, Some(1_700_000_000_009));
        // An empty block: no group.
        let mut empty = Vec::new();
        start(&mut empty);
        end(&mut empty);
        assert!(rows_of(&to_copy_stream(&empty).unwrap(), Wanted::All)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn its_rows_are_read_as_from_its_copy_stream_without_making_it() {
        use crate::block::each_row as block_rows;
        use std::collections::HashSet;
        let compact = stream();
        let copy = to_copy_stream(&compact).unwrap();
        let owned = |payload: &[u8], wanted: Wanted<'_>| {
            let mut out = Vec::new();
            block_rows(payload, wanted, |r| {
                out.push((
                    r.id.to_string(),
                    r.handle,
                    r.user_id.to_string(),
                    r.segment_hash,
                ))
            })
            .unwrap();
            out
        };
        let ann: HashSet<&str> = ["ann"].into();
        let ids: HashSet<&str> = ["w2-100", "s-1", "w1-z"].into();
        for wanted in [
            Wanted::All,
            Wanted::Users {
                handle: 8,
                user_ids: &ann,
            },
            Wanted::Ids(&ids),
        ] {
            assert_eq!(owned(&compact, wanted), owned(&copy, wanted), "{wanted:?}");
        }
        let found = owned(
            &compact,
            Wanted::Users {
                handle: 8,
                user_ids: &ann,
            },
        );
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.as_str(), found[0].1), ("w2-ff", 8));
        assert_eq!(owned(&compact, Wanted::Ids(&ids)).len(), 2);
    }

    #[test]
    fn a_damaged_stream_is_an_error_never_a_panic() {
        let good = stream();
        // Cut at every length, every byte changed, bytes added after its end.
        for cut in 0..good.len() {
            assert!(
                each_row(&good[..cut], |_, _| true, |_, _| {}).is_err(),
                "cut at {cut}"
            );
        }
        for at in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                // Some changes still read (a propensity's bit); none may panic.
                let _ = each_row(&bad, |_, _| true, |_, _| {});
            }
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(each_row(&longer, |_, _| true, |_, _| {}).is_err());
        assert!(each_row(b"PGCOPY\n\xff\r\n\0", |_, _| true, |_, _| {}).is_err());
    }
}
