//! A direct Avro binary codec for the records every message of the hot topics carries
//! (samples, heartbeats, usage, watermarks, revenue events) and for the instance states
//! the enricher reads at every start: bytes to struct and back,
//! with no `Value` tree in between. apache-avro builds that tree with a `String` per
//! field name and a big integer per decimal, which was most of each stage's time.
//!
//! It is held to apache-avro, which stays the codec of every other record type and the
//! reference for these: the same bytes decode to the same record or fail with the same
//! reason code (`undecodable` for anything structural — truncation, a bad length, a bad
//! union index, invalid UTF-8, trailing bytes; `invalid_value` for a well-formed datum
//! whose values do not fit, judged only once the whole datum has been read, as the
//! `Value` path does), and a record encodes to the same bytes (a map of several entries
//! aside: apache-avro writes those in hash order, this codec in key order). The tests
//! below and the fuzz targets check both directions.

use crate::DecodeError;
use meterflow_types::{Dec, Labels};

/// Reads one datum. Structural errors stop it at once; the first value that does not fit
/// is remembered and reported by `finish` if the rest of the datum is sound.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    schema: &'static str,
    invalid: Option<String>,
}

type Res<T> = Result<T, DecodeError>;

impl<'a> Reader<'a> {
    pub fn new(schema: &'static str, datum: &'a [u8]) -> Reader<'a> {
        Reader {
            buf: datum,
            pos: 0,
            schema,
            invalid: None,
        }
    }

    fn broken(&self, detail: impl Into<String>) -> DecodeError {
        DecodeError::Undecodable {
            schema: self.schema,
            detail: format!("{} at byte {}", detail.into(), self.pos),
        }
    }

    /// A value that does not fit its field: reported once the datum is read whole.
    pub fn invalid(&mut self, field: &str, what: &str) {
        if self.invalid.is_none() {
            self.invalid = Some(format!("field {field}: {what}"));
        }
    }

    /// The datum was read to its last byte and every value fits.
    pub fn finish(self) -> Res<()> {
        if self.pos != self.buf.len() {
            return Err(self.broken(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        match self.invalid {
            Some(detail) => Err(DecodeError::InvalidValue {
                schema: self.schema,
                detail,
            }),
            None => Ok(()),
        }
    }

    fn byte(&mut self) -> Res<u8> {
        match self.buf.get(self.pos) {
            Some(b) => {
                self.pos += 1;
                Ok(*b)
            }
            None => Err(self.broken("truncated")),
        }
    }

    /// A zig-zag varint of at most ten bytes (bits past the 64th are dropped, as
    /// apache-avro does).
    pub fn long(&mut self) -> Res<i64> {
        let mut z = 0u64;
        for j in 0..10 {
            let b = self.byte()?;
            z |= u64::from(b & 0x7F) << (j * 7);
            if b & 0x80 == 0 {
                return Ok(if z & 1 == 0 {
                    (z >> 1) as i64
                } else {
                    !(z >> 1) as i64
                });
            }
        }
        Err(self.broken("integer overflow"))
    }

    pub fn int(&mut self) -> Res<i32> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| self.broken(format!("{v} is not an int")))
    }

    pub fn boolean(&mut self) -> Res<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.broken(format!("boolean byte {b}"))),
        }
    }

    fn len(&mut self) -> Res<usize> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| self.broken(format!("negative length {n}")))?;
        if n > self.buf.len() - self.pos {
            return Err(self.broken(format!("length {n} past the end")));
        }
        Ok(n)
    }

    pub fn bytes(&mut self) -> Res<&'a [u8]> {
        let n = self.len()?;
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    pub fn str(&mut self) -> Res<&'a str> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|e| self.broken(format!("invalid UTF-8: {e}")))
    }

    pub fn string(&mut self) -> Res<String> {
        self.str().map(str::to_string)
    }

    /// The branch of a union of `n` types.
    pub fn union(&mut self, n: usize) -> Res<usize> {
        let i = self.long()?;
        match usize::try_from(i) {
            Ok(i) if i < n => Ok(i),
            _ => Err(self.broken(format!("union index {i} of {n}"))),
        }
    }

    /// A decimal (bytes, big-endian two's complement) of precision 38, scale 9.
    pub fn dec(&mut self, field: &str) -> Res<Dec> {
        let b = self.bytes()?;
        if b.is_empty() {
            self.invalid(field, "empty decimal");
            return Ok(Dec::ZERO);
        }
        if b.len() > 16 {
            self.invalid(field, "decimal does not fit 128 bits");
            return Ok(Dec::ZERO);
        }
        let fill = if b[0] & 0x80 != 0 { 0xFF } else { 0 };
        let mut raw = [fill; 16];
        raw[16 - b.len()..].copy_from_slice(b);
        match Dec::ZERO.checked_add(Dec::from_raw(i128::from_be_bytes(raw))) {
            Ok(d) => Ok(d),
            Err(e) => {
                self.invalid(field, &e.to_string());
                Ok(Dec::ZERO)
            }
        }
    }

    pub fn opt_str(&mut self) -> Res<Option<&'a str>> {
        Ok(match self.union(2)? {
            0 => None,
            _ => Some(self.str()?),
        })
    }

    pub fn opt_string(&mut self) -> Res<Option<String>> {
        Ok(self.opt_str()?.map(str::to_string))
    }

    pub fn opt_long(&mut self) -> Res<Option<i64>> {
        Ok(match self.union(2)? {
            0 => None,
            _ => Some(self.long()?),
        })
    }

    pub fn opt_dec(&mut self, field: &str) -> Res<Option<Dec>> {
        Ok(match self.union(2)? {
            0 => None,
            _ => Some(self.dec(field)?),
        })
    }

    /// A map of strings (blocks of entries until an empty one; a negative count is
    /// followed by the block's size in bytes). A key given twice keeps its last value.
    pub fn labels(&mut self) -> Res<Labels> {
        let mut out = Labels::new();
        self.map_entries(|k, v| {
            out.insert(k.to_string(), v.to_string());
        })?;
        Ok(out)
    }

    /// A map of strings read and checked as `labels` reads it, and not kept.
    pub fn skip_labels(&mut self) -> Res<()> {
        self.map_entries(|_, _| {})
    }

    fn map_entries(&mut self, mut entry: impl FnMut(&'a str, &'a str)) -> Res<()> {
        loop {
            let count = self.long()?;
            let n = match count {
                0 => return Ok(()),
                c if c < 0 => {
                    self.long()?; // the block's size in bytes
                    c.checked_neg()
                        .ok_or_else(|| self.broken("map block count overflows"))?
                }
                c => c,
            };
            if n as u64 > crate::MAX_MESSAGE_BYTES as u64 {
                return Err(
                    self.broken(format!("map block of {n} entries exceeds the message size"))
                );
            }
            for _ in 0..n {
                let k = self.str()?;
                let v = self.str()?;
                entry(k, v);
            }
        }
    }
}

/// Writes one datum.
pub struct Writer<'a> {
    pub out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z > 0x7F {
            self.out.push((z as u8 & 0x7F) | 0x80);
            z >>= 7;
        }
        self.out.push(z as u8);
    }

    pub fn int(&mut self, v: i32) {
        self.long(i64::from(v));
    }

    pub fn boolean(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.out.extend_from_slice(b);
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Always the full sixteen bytes, as apache-avro writes a decimal made from them.
    pub fn dec(&mut self, d: Dec) {
        self.long(16);
        self.out.extend_from_slice(&d.raw().to_be_bytes());
    }

    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.long(0),
            Some(s) => {
                self.long(1);
                self.str(s);
            }
        }
    }

    pub fn opt_long(&mut self, v: Option<i64>) {
        match v {
            None => self.long(0),
            Some(v) => {
                self.long(1);
                self.long(v);
            }
        }
    }

    pub fn opt_dec(&mut self, v: Option<Dec>) {
        match v {
            None => self.long(0),
            Some(v) => {
                self.long(1);
                self.dec(v);
            }
        }
    }

    /// One block of entries in key order, then the empty block.
    pub fn labels(&mut self, l: &Labels) {
        if !l.is_empty() {
            self.long(l.len() as i64);
            for (k, v) in l {
                self.str(k);
                self.str(v);
            }
        }
        self.long(0);
    }
}
