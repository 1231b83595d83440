//! Just enough of the protobuf wire format for the batch path: reading fields of a message and
//! writing strings, varints, doubles and nested messages. Unknown fields are skipped, as every
//! protobuf parser does; a field with an unexpected wire type counts as unknown.

use crate::error::CoreError;

/// Wire types (the low three bits of a tag).
pub const VARINT: u8 = 0;
pub const FIXED64: u8 = 1;
pub const LEN: u8 = 2;
pub const FIXED32: u8 = 5;

/// One field's value as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Reads the fields of one message in order.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn malformed(what: &str) -> CoreError {
    CoreError::invalid(format!("message: malformed protobuf ({what})"))
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, CoreError> {
        // Tags and short lengths take one byte.
        if let Some(&byte) = self.buf.get(self.pos) {
            if byte < 0x80 {
                self.pos += 1;
                return Ok(u64::from(byte));
            }
        }
        self.varint_slow()
    }

    fn varint_slow(&mut self) -> Result<u64, CoreError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| malformed("truncated varint"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], CoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("truncated field"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Where the next field starts, in bytes from the start of the message.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next (field number, value), or None at the end of the message.
    #[inline]
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, CoreError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| malformed("field number"))?;
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        let value = match (tag & 7) as u8 {
            VARINT => Value::Varint(self.varint()?),
            FIXED64 => {
                let b = self.take(8)?;
                Value::Fixed64(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            LEN => {
                let n = usize::try_from(self.varint()?).map_err(|_| malformed("length"))?;
                Value::Bytes(self.take(n)?)
            }
            FIXED32 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            _ => return Err(malformed("group or unknown wire type")),
        };
        Ok(Some((number, value)))
    }
}

/// A proto3 `string`: UTF-8 is required.
pub fn text(bytes: &[u8]) -> Result<String, CoreError> {
    text_ref(bytes).map(str::to_string)
}

/// [`text`] borrowed from the message bytes.
pub fn text_ref(bytes: &[u8]) -> Result<&str, CoreError> {
    std::str::from_utf8(bytes).map_err(|_| malformed("string field is not UTF-8"))
}

/// How many bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: u64) -> usize {
    // 7 bits a byte; 0 takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// How many bytes [`put_str`] writes.
pub fn str_len(number: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        tag_len(number) + varint_len(value.len() as u64) + value.len()
    }
}

/// How many bytes [`put_uint`] writes.
pub fn uint_len(number: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        tag_len(number) + varint_len(value)
    }
}

/// How many bytes [`put_double`] writes.
pub fn double_len(number: u32, value: f64) -> usize {
    if value.to_bits() == 0 {
        0
    } else {
        tag_len(number) + 8
    }
}

fn tag_len(number: u32) -> usize {
    varint_len(u64::from(number) << 3)
}

pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub fn put_tag(out: &mut Vec<u8>, number: u32, wire_type: u8) {
    put_varint(out, (u64::from(number) << 3) | u64::from(wire_type));
}

/// A proto3 string field (left out when empty, as proto3 does).
pub fn put_str(out: &mut Vec<u8>, number: u32, value: &str) {
    if !value.is_empty() {
        put_bytes(out, number, value.as_bytes());
    }
}

/// A length-delimited field, always written (nested messages, oneof members).
pub fn put_bytes(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    put_tag(out, number, LEN);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A proto3 uint32/uint64/bool field (left out when 0).
pub fn put_uint(out: &mut Vec<u8>, number: u32, value: u64) {
    if value != 0 {
        put_tag(out, number, VARINT);
        put_varint(out, value);
    }
}

/// A proto3 double field (left out when +0.0).
pub fn put_double(out: &mut Vec<u8>, number: u32, value: f64) {
    if value.to_bits() != 0 {
        put_tag(out, number, FIXED64);
        out.extend_from_slice(&value.to_bits().to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_wire_type() {
        let mut out = Vec::new();
        put_str(&mut out, 1, "héllo");
        put_uint(&mut out, 2, 300);
        put_double(&mut out, 3, 0.25);
        put_str(&mut out, 4, "");
        put_uint(&mut out, 5, 0);
        put_bytes(&mut out, 6, b"");
        let mut r = Reader::new(&out);
        assert_eq!(
            r.next_field().unwrap(),
            Some((1, Value::Bytes("héllo".as_bytes())))
        );
        assert_eq!(r.next_field().unwrap(), Some((2, Value::Varint(300))));
        assert_eq!(
            r.next_field().unwrap(),
            Some((3, Value::Fixed64(0.25f64.to_bits())))
        );
        assert_eq!(r.next_field().unwrap(), Some((6, Value::Bytes(b""))));
        assert_eq!(r.next_field().unwrap(), None);
    }

    #[test]
    fn negative_int64_is_ten_bytes() {
        let mut out = Vec::new();
        put_tag(&mut out, 6, VARINT);
        put_varint(&mut out, (-5i64) as u64);
        assert_eq!(out.len(), 11);
        let mut r = Reader::new(&out);
        assert_eq!(
            r.next_field().unwrap(),
            Some((6, Value::Varint((-5i64) as u64)))
        );
    }

    #[test]
    fn truncated_and_bad_input_is_an_error() {
        for bad in [
            &[0x0a, 0x05, b'a'][..],
            &[0x08, 0x80],
            &[0x0b],
            &[0x00, 0x01],
        ] {
            let mut r = Reader::new(bad);
            assert!(r.next_field().is_err(), "{bad:?}");
        }
        assert!(text(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn field_lengths_are_what_the_writers_write() {
        for (number, text) in [
            (1, ""),
            (2, "a"),
            (15, "héllo"),
            (16, "x"),
            (3000, &"y".repeat(200)),
        ] {
            let mut out = Vec::new();
            put_str(&mut out, number, text);
            assert_eq!(str_len(number, text), out.len());
        }
        for (number, value) in [(1, 0), (7, 1), (9, 300), (20, u64::MAX)] {
            let mut out = Vec::new();
            put_uint(&mut out, number, value);
            assert_eq!(uint_len(number, value), out.len());
        }
        for (number, value) in [(8, 0.0), (8, -0.0), (8, 0.25), (16, f64::NAN)] {
            let mut out = Vec::new();
            put_double(&mut out, number, value);
            assert_eq!(double_len(number, value), out.len());
        }
    }

    #[test]
    fn varint_len_is_what_put_varint_writes() {
        for value in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(varint_len(value), out.len(), "{value}");
        }
    }
}
