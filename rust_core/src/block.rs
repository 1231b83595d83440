//! Reading some users' or one id's assignments out of an assignment block (its decompressed
//! payload: a compact stream, see [`crate::compact`], or in blocks stored before, the binary
//! COPY stream of [`crate::held::COPY_COLUMNS`]) without expanding it into `assignments`: a
//! lookup that a block's filter passes reads the block, about 20,000 rows, instead of waiting
//! for its expansion (about 0.2 s); a restart reads every row.
use std::collections::HashSet;

use crate::compact;
use crate::error::CoreError;
use crate::held::{copied_number, copied_text, unix_ms, Fields, COPY_COLUMNS};

/// What a lookup looks for in a block.
#[derive(Clone, Copy, Debug)]
pub enum Wanted<'a> {
    /// The assignments in experiment `handle` of these users.
    Users {
        handle: u64,
        user_ids: &'a HashSet<&'a str>,
    },
    /// The assignments with these ids.
    Ids(&'a HashSet<&'a str>),
    /// Every row (a restart holding the block's assignments).
    All,
}

impl Wanted<'_> {
    /// Whether rows of experiment `handle` and `user_id` may be wanted, their ids aside.
    fn wants_user(&self, handle: u64, user_id: &str) -> bool {
        match *self {
            Wanted::Users {
                handle: h,
                user_ids,
            } => h == handle && user_ids.contains(user_id),
            Wanted::Ids(_) | Wanted::All => true,
        }
    }

    /// Whether a row with assignment id `id` may be wanted, its user aside.
    fn wants_id(&self, id: &str) -> bool {
        match *self {
            Wanted::Ids(ids) => ids.contains(id),
            Wanted::Users { .. } | Wanted::All => true,
        }
    }

    /// Whether a copied row of experiment `handle`, `user_id` and `id` (their bytes, `None`
    /// for NULL) is wanted: a field that is NULL or not UTF-8 matches no user or id.
    fn matches(&self, handle: u64, user_id: Option<&[u8]>, id: Option<&[u8]>) -> bool {
        fn text(b: Option<&[u8]>) -> Option<&str> {
            b.and_then(|b| std::str::from_utf8(b).ok())
        }
        match *self {
            // Other experiments' rows are passed over before their user ids are read.
            Wanted::Users { handle: h, .. } => {
                h == handle && text(user_id).is_some_and(|u| self.wants_user(handle, u))
            }
            Wanted::Ids(_) => text(id).is_some_and(|i| self.wants_id(i)),
            Wanted::All => true,
        }
    }
}

/// Call `each` with the rows of a block's decompressed payload (compact, or a COPY stream
/// as [`rows_of`] reads) that are `wanted`, in the block's order; a compact block's rows are
/// read without making its COPY stream.
pub fn each_row(
    payload: &[u8],
    wanted: Wanted<'_>,
    mut each: impl FnMut(&BlockRow<'_>),
) -> Result<(), CoreError> {
    if !payload.starts_with(compact::MAGIC) {
        rows_of(payload, wanted)?.iter().for_each(each);
        return Ok(());
    }
    // A user's rows are picked before their ids are made, ids once made.
    let keep = |handle: u64, user_id: &str| wanted.wants_user(handle, user_id);
    compact::each_row(payload, keep, |a, segment_hash| {
        if wanted.wants_id(&a.id) {
            each(&BlockRow {
                id: &a.id,
                handle: a.handle,
                user_id: a.user_id,
                variant: a.variant as i16,
                segment_key: a.segment_key,
                segment_hash,
                level: a.level as i16,
                propensity: a.propensity,
                created_ms: Some(a.created_ms),
            });
        }
    })
}

/// A row of a block: the `assignments` row its expansion would insert (context empty, region
/// NULL, as for every row of the write-behind's COPY stream).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockRow<'d> {
    pub id: &'d str,
    pub handle: u64,
    pub user_id: &'d str,
    pub variant: i16,
    pub segment_key: &'d str,
    pub segment_hash: u64,
    pub level: i16,
    pub propensity: f64,
    /// Unix milliseconds; `None` in blocks stored before rows carried `created_at` (eight
    /// columns), whose rows take the time they are expanded.
    pub created_ms: Option<i64>,
}

fn cut_short() -> CoreError {
    CoreError::invalid("data: an assignment block ends within a row")
}

/// The rows of `stream` (a whole block's COPY stream, rows of [`COPY_COLUMNS`] or of its first
/// eight) that are `wanted`, in the block's order. Other rows are only skipped over.
pub fn rows_of<'d>(stream: &'d [u8], wanted: Wanted<'_>) -> Result<Vec<BlockRow<'d>>, CoreError> {
    let mut fields = Fields {
        data: stream,
        at: 0,
    };
    if !fields.header()? {
        return Err(cut_short());
    }
    let mut out = Vec::new();
    loop {
        let count = fields.i16().ok_or_else(cut_short)?;
        if count == -1 {
            break;
        }
        if !(8..=COPY_COLUMNS.len() as i16).contains(&count) {
            return Err(CoreError::invalid(format!(
                "data: a block's row has {count} columns, not {}",
                COPY_COLUMNS.len()
            )));
        }
        let mut row: [Option<&'d [u8]>; COPY_COLUMNS.len()] = [None; COPY_COLUMNS.len()];
        for value in row.iter_mut().take(count as usize) {
            *value = fields.field()?.ok_or_else(cut_short)?;
        }
        let [id, handle, user_id, variant, segment_key, segment_hash, level, propensity, created] =
            row;
        let column = |i: usize| COPY_COLUMNS[i];
        let handle = u64::from_be_bytes(copied_number(column(1), handle)?);
        if !wanted.matches(handle, user_id, id) {
            continue;
        }
        out.push(BlockRow {
            id: copied_text(column(0), id)?,
            handle,
            user_id: copied_text(column(2), user_id)?,
            variant: i16::from_be_bytes(copied_number(column(3), variant)?),
            segment_key: copied_text(column(4), segment_key)?,
            segment_hash: u64::from_be_bytes(copied_number(column(5), segment_hash)?),
            level: i16::from_be_bytes(copied_number(column(6), level)?),
            propensity: f64::from_be_bytes(copied_number(column(7), propensity)?),
            created_ms: match created {
                None => None,
                micros => Some(unix_ms(copied_number(column(8), micros)?)),
            },
        });
    }
    if fields.at != stream.len() {
        return Err(CoreError::invalid("data: bytes after the COPY trailer"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::held::{copy_header, copy_row, copy_trailer, Assignment};
    use std::borrow::Cow;

    fn stream(users: &[(&str, u64, &str, i64)]) -> Vec<u8> {
        let mut out = Vec::new();
        copy_header(&mut out);
        for (i, &(id, handle, user_id, created_ms)) in users.iter().enumerate() {
            let a = Assignment {
                id: Cow::Borrowed(id),
                handle,
                user_id,
                variant: i % 3,
                segment_key: "source:ads",
                level: 1,
                propensity: 0.25,
                created_ms,
            };
            copy_row(&mut out, &a, 42);
        }
        copy_trailer(&mut out);
        out
    }

    const ROWS: [(&str, u64, &str, i64); 4] = [
        ("p-1", 7, "ann", 1_700_000_000_001),
        ("p-2", 7, "bob", 1_700_000_000_002),
        ("p-3", 8, "ann", 1_700_000_000_003),
        ("p-4", 7, "ann", 1_700_000_000_004),
    ];

    fn users<'a>(handle: u64, user_ids: &'a HashSet<&'a str>) -> Wanted<'a> {
        Wanted::Users { handle, user_ids }
    }

    #[test]
    fn finds_users_rows_of_one_experiment_and_an_id() {
        let data = stream(&ROWS);
        let ann = HashSet::from(["ann"]);
        let found = rows_of(&data, users(7, &ann)).unwrap();
        let ids: Vec<_> = found.iter().map(|r| (r.id, r.created_ms)).collect();
        assert_eq!(
            ids,
            [
                ("p-1", Some(1_700_000_000_001)),
                ("p-4", Some(1_700_000_000_004))
            ]
        );
        let row = &found[1];
        assert_eq!((row.handle, row.user_id, row.variant), (7, "ann", 0));
        assert_eq!(
            (row.segment_key, row.segment_hash, row.level),
            ("source:ads", 42, 1)
        );
        assert_eq!(row.propensity, 0.25);
        let p2 = HashSet::from(["p-2"]);
        let by_id = rows_of(&data, Wanted::Ids(&p2)).unwrap();
        assert_eq!(by_id.iter().map(|r| r.user_id).collect::<Vec<_>>(), ["bob"]);
        let p9 = HashSet::from(["p-9"]);
        assert!(rows_of(&data, Wanted::Ids(&p9)).unwrap().is_empty());
        let some = HashSet::from(["p-4", "p-9", "p-1"]);
        let by_ids = rows_of(&data, Wanted::Ids(&some)).unwrap();
        assert_eq!(
            by_ids.iter().map(|r| r.id).collect::<Vec<_>>(),
            ["p-1", "p-4"]
        );
        let bob = HashSet::from(["bob"]);
        assert!(rows_of(&data, users(8, &bob)).unwrap().is_empty());
        let both = HashSet::from(["ann", "bob", "cat"]);
        let found = rows_of(&data, users(7, &both)).unwrap();
        let ids: Vec<_> = found.iter().map(|r| (r.id, r.user_id)).collect();
        assert_eq!(ids, [("p-1", "ann"), ("p-2", "bob"), ("p-4", "ann")]);
    }

    #[test]
    fn rows_without_creation_time_have_none() {
        // Eight columns: each row's count, then its last field (8 bytes of time, 4 of length)
        // left out.
        let data = stream(&ROWS[..1]);
        let mut old = data[..19].to_vec();
        old.extend_from_slice(&8i16.to_be_bytes());
        old.extend_from_slice(&data[21..data.len() - 2 - 12]);
        copy_trailer(&mut old);
        let p1 = HashSet::from(["p-1"]);
        let found = rows_of(&old, Wanted::Ids(&p1)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].created_ms, None);
    }

    #[test]
    fn a_damaged_stream_is_an_error() {
        let data = stream(&ROWS);
        let ann = HashSet::from(["ann"]);
        let ann = users(7, &ann);
        assert!(rows_of(&data[..data.len() - 5], ann).is_err());
        assert!(rows_of(&data[1..], ann).is_err());
        let mut extra = data.clone();
        extra.push(0);
        assert!(rows_of(&extra, ann).is_err());
        let mut wide = data.clone();
        wide[19..21].copy_from_slice(&10i16.to_be_bytes());
        assert!(rows_of(&wide, ann).is_err());
    }
}
