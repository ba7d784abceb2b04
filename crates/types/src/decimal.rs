//! Fixed-point decimal with scale 9 held in an `i128`: the one representation of money
//! and usage quantities in meterflow. It maps 1:1 to Arrow `Decimal128(38, 9)` and to Avro
//! `{"type":"bytes","logicalType":"decimal","precision":38,"scale":9}`. No float is ever
//! involved: parsing, printing, arithmetic and rounding are integer operations.

use std::fmt;
use std::str::FromStr;

/// Number of decimal places carried everywhere.
pub const SCALE: u32 = 9;
/// Precision of the Arrow / Avro decimal.
pub const PRECISION: u8 = 38;
const ONE: i128 = 1_000_000_000;
const MAX_ABS: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999; // 38 nines

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dec(i128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecError {
    #[error("not a decimal number: {0:?}")]
    Parse(String),
    #[error("more than {SCALE} decimal places: {0:?}")]
    TooPrecise(String),
    #[error("decimal overflow (more than 38 digits)")]
    Overflow,
}

impl Dec {
    pub const ZERO: Dec = Dec(0);

    /// From the raw scaled integer (value × 10^9).
    pub const fn from_raw(raw: i128) -> Dec {
        Dec(raw)
    }
    pub const fn raw(self) -> i128 {
        self.0
    }
    pub fn from_int(v: i64) -> Dec {
        Dec(v as i128 * ONE)
    }
    /// `num / 10^places` exactly (places ≤ 9).
    pub fn from_scaled(num: i128, places: u32) -> Result<Dec, DecError> {
        if places > SCALE {
            return Err(DecError::TooPrecise(format!("{num}e-{places}")));
        }
        let raw = num
            .checked_mul(10i128.pow(SCALE - places))
            .ok_or(DecError::Overflow)?;
        Dec::checked(raw)
    }
    fn checked(raw: i128) -> Result<Dec, DecError> {
        // unsigned: `i128::MIN.abs()` overflows (a panic in debug builds, and in release
        // it stays negative and passed this check)
        if raw.unsigned_abs() > MAX_ABS as u128 {
            Err(DecError::Overflow)
        } else {
            Ok(Dec(raw))
        }
    }
    pub fn checked_add(self, o: Dec) -> Result<Dec, DecError> {
        Dec::checked(self.0.checked_add(o.0).ok_or(DecError::Overflow)?)
    }
    pub fn checked_sub(self, o: Dec) -> Result<Dec, DecError> {
        Dec::checked(self.0.checked_sub(o.0).ok_or(DecError::Overflow)?)
    }
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Round half-to-even to `places` decimal places (the currency's minor unit).
    /// This is the only rounding meterflow performs on money, once per settlement line.
    pub fn round_half_even(self, places: u32) -> Dec {
        if places >= SCALE {
            return self;
        }
        // in 64 bits when it fits (every line's amount: a 128-bit division is a call)
        if let Ok(v) = i64::try_from(self.0) {
            let unit = 10i64.pow(SCALE - places);
            let (q, r) = (v.div_euclid(unit), v.rem_euclid(unit));
            let twice = r * 2;
            let q = if twice > unit || (twice == unit && q % 2 != 0) {
                q + 1
            } else {
                q
            };
            return Dec(q as i128 * unit as i128);
        }
        let unit = 10i128.pow(SCALE - places);
        let q = self.0.div_euclid(unit);
        let r = self.0.rem_euclid(unit);
        let twice = r * 2;
        let q = if twice > unit || (twice == unit && q % 2 != 0) {
            q + 1
        } else {
            q
        };
        Dec(q * unit)
    }

    /// Split `self` into parts proportional to `weights` so that the parts add up to
    /// `self` exactly: part i = floor(v·W_i/W) − floor(v·W_{i−1}/W) over cumulative weights.
    /// Used for pro-rata splitting of an interval's usage across windows.
    pub fn split_pro_rata(self, weights: &[i64]) -> Vec<Dec> {
        let total: i128 = weights.iter().map(|w| *w as i128).sum();
        if total <= 0 {
            let mut out = vec![Dec::ZERO; weights.len()];
            if let Some(first) = out.first_mut() {
                *first = self;
            }
            return out;
        }
        let mut out = Vec::with_capacity(weights.len());
        let mut cum: i128 = 0;
        let mut prev = 0i128;
        for w in weights {
            cum += *w as i128;
            let cur = mul_div_floor(self.0, cum, total);
            out.push(Dec(cur - prev));
            prev = cur;
        }
        out
    }
}

/// floor(a·b / c) without overflow for |a| < 10^38, 0 ≤ b ≤ c, c > 0.
fn mul_div_floor(a: i128, b: i128, c: i128) -> i128 {
    // a = q·c + r  ⇒  a·b/c = q·b + r·b/c, with |r| < c and b ≤ c keeps r·b in range
    // for the window weights meterflow uses (milliseconds).
    let q = a.div_euclid(c);
    let r = a.rem_euclid(c);
    q * b + (r * b).div_euclid(c)
}

impl std::ops::Add for Dec {
    type Output = Dec;
    fn add(self, o: Dec) -> Dec {
        Dec(self.0 + o.0)
    }
}
impl std::ops::AddAssign for Dec {
    fn add_assign(&mut self, o: Dec) {
        self.0 += o.0;
    }
}
impl std::ops::Sub for Dec {
    type Output = Dec;
    fn sub(self, o: Dec) -> Dec {
        Dec(self.0 - o.0)
    }
}
impl std::ops::Neg for Dec {
    type Output = Dec;
    fn neg(self) -> Dec {
        Dec(-self.0)
    }
}
impl std::iter::Sum for Dec {
    fn sum<I: Iterator<Item = Dec>>(iter: I) -> Dec {
        Dec(iter.map(|d| d.0).sum())
    }
}

impl fmt::Display for Dec {
    /// Plain decimal with trailing zeros trimmed, at least one digit after the point
    /// only when there is a fraction: `12`, `-0.5`, `0.000000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = split(self.0.unsigned_abs());
        // the fraction's digits without its trailing zeros
        let (mut digits, mut width) = (frac, 9usize);
        if frac == 0 {
            width = 0;
        } else {
            while digits % 10 == 0 {
                digits /= 10;
                width -= 1;
            }
        }
        put(f, self.0 < 0, int, digits, width)
    }
}

/// A `Dec` shown with exactly a number of decimals (`Dec::fixed`).
#[derive(Clone, Copy, Debug)]
pub struct Fixed(Dec, u32);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let places = self.1;
        let r = self.0.round_half_even(places);
        let (int, frac) = split(r.0.unsigned_abs());
        // rounded to `places`, the fraction's remaining digits are zeros
        let digits = frac / 10u64.pow(9 - places);
        put(f, r.0 < 0, int, digits, places as usize)
    }
}

/// An absolute value's integer part and its fraction's nine digits — in 64-bit
/// arithmetic when it fits (every amount a bill holds; a 128-bit division is a call).
fn split(abs: u128) -> (u128, u64) {
    match u64::try_from(abs) {
        Ok(a) => ((a / ONE as u64) as u128, a % ONE as u64),
        Err(_) => (abs / ONE as u128, (abs % ONE as u128) as u64),
    }
}

/// Write `[-]int[.frac]` in one piece, the fraction zero-padded to `width` digits (no
/// point when `width` is 0). Settlement lines print three decimals each: this is most
/// of their encoding, so no formatting machinery per digit group.
fn put(f: &mut fmt::Formatter<'_>, neg: bool, int: u128, frac: u64, width: usize) -> fmt::Result {
    // 39 integer digits at most, a sign, a point and nine fraction digits
    let mut buf = [0u8; 52];
    let mut i = buf.len();
    if width > 0 {
        let mut d = frac;
        for _ in 0..width {
            i -= 1;
            buf[i] = b'0' + (d % 10) as u8;
            d /= 10;
        }
        i -= 1;
        buf[i] = b'.';
    }
    match u64::try_from(int) {
        Ok(mut n) => loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        },
        Err(_) => {
            let mut n = int;
            loop {
                i -= 1;
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    // ASCII digits, a sign and a point
    f.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
}

impl Dec {
    /// Format with exactly `places` decimals (for settlement files after rounding; at
    /// most the 9 a `Dec` holds).
    pub fn to_fixed(self, places: u32) -> String {
        self.fixed(places).to_string()
    }

    /// `to_fixed` without allocating: shown with exactly `places` decimals (at most 9),
    /// rounded half to even.
    pub fn fixed(self, places: u32) -> Fixed {
        Fixed(self, places.min(9))
    }
}

impl FromStr for Dec {
    type Err = DecError;
    fn from_str(s: &str) -> Result<Dec, DecError> {
        let t = s.trim();
        let (neg, body) = match t.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        let digits_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits_ok(int) || !digits_ok(frac) {
            return Err(DecError::Parse(s.to_string()));
        }
        if frac.len() > SCALE as usize {
            return Err(DecError::TooPrecise(s.to_string()));
        }
        if int.len() > 29 {
            return Err(DecError::Overflow);
        }
        let i: i128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| DecError::Parse(s.to_string()))?
        };
        let f: i128 = if frac.is_empty() {
            0
        } else {
            frac.parse::<i128>()
                .map_err(|_| DecError::Parse(s.to_string()))?
                * 10i128.pow(SCALE - frac.len() as u32)
        };
        let raw = i * ONE + f;
        Dec::checked(if neg { -raw } else { raw })
    }
}

impl serde::Serialize for Dec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> serde::Deserialize<'de> for Dec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Minor-unit digits of a currency (ISO 4217). Unknown codes settle at 2 places.
pub fn minor_units(currency: &str) -> u32 {
    match currency {
        "JPY" | "KRW" | "VND" | "CLP" | "ISK" | "UGX" | "XAF" | "XOF" | "PYG" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" | "IQD" | "LYD" => 3,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dec {
        s.parse().expect("valid decimal")
    }

    #[test]
    fn parses_and_prints_exactly() {
        for s in [
            "0",
            "1",
            "-1",
            "0.000000001",
            "123456789.123456789",
            "-0.5",
            "12.3",
        ] {
            assert_eq!(d(s).to_string(), s);
        }
        assert_eq!(d("+1.50").to_string(), "1.5");
        assert!(matches!(
            "1.0000000001".parse::<Dec>(),
            Err(DecError::TooPrecise(_))
        ));
        assert!(matches!("1e5".parse::<Dec>(), Err(DecError::Parse(_))));
        assert!(matches!("".parse::<Dec>(), Err(DecError::Parse(_))));
        assert!(matches!("NaN".parse::<Dec>(), Err(DecError::Parse(_))));
    }

    /// The printing of earlier builds (through `write!`), which settlement files hold.
    fn printed_before(v: Dec, places: Option<u32>) -> String {
        let one = ONE as u128;
        match places {
            None => {
                let abs = v.0.unsigned_abs();
                let (int, frac) = (abs / one, abs % one);
                let sign = if v.0 < 0 { "-" } else { "" };
                if frac == 0 {
                    return format!("{sign}{int}");
                }
                let (mut digits, mut width) = (frac, 9usize);
                while digits % 10 == 0 {
                    digits /= 10;
                    width -= 1;
                }
                format!("{sign}{int}.{digits:0width$}")
            }
            Some(places) => {
                // rounded half to even in 128 bits, as before
                let r = if places >= SCALE {
                    v
                } else {
                    let unit = 10i128.pow(SCALE - places);
                    let (q, rem) = (v.0.div_euclid(unit), v.0.rem_euclid(unit));
                    let q = if rem * 2 > unit || (rem * 2 == unit && q % 2 != 0) {
                        q + 1
                    } else {
                        q
                    };
                    Dec(q * unit)
                };
                let abs = r.0.unsigned_abs();
                let sign = if r.0 < 0 { "-" } else { "" };
                if places == 0 {
                    return format!("{sign}{}", abs / one);
                }
                let digits = (abs % one) / 10u128.pow(9 - places);
                format!(
                    "{sign}{}.{digits:0width$}",
                    abs / one,
                    width = places as usize
                )
            }
        }
    }

    #[test]
    fn prints_what_earlier_builds_printed() {
        let mut edges = vec![
            0,
            1,
            -1,
            9,
            10,
            ONE - 1,
            ONE,
            ONE + 1,
            5,
            15,
            25,
            500_000_000,
        ];
        for b in [
            u64::MAX as i128,
            (u64::MAX as i128) + 1,
            MAX_ABS,
            i64::MAX as i128,
        ] {
            edges.extend([b - 1, b, b + 1]);
        }
        // a fixed xorshift sequence over every magnitude up to 38 digits
        let mut x: u128 = 0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15;
        let mut values: Vec<i128> = edges.iter().flat_map(|&e| [e, -e]).collect();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = (x % 39) as u32;
            let v = (x >> 8) as i128 % 10i128.pow(digits).max(1);
            values.push(if x & 1 == 0 { v } else { -v });
        }
        for raw in values {
            if raw.unsigned_abs() > MAX_ABS as u128 {
                continue;
            }
            let v = Dec::from_raw(raw);
            assert_eq!(v.to_string(), printed_before(v, None), "{raw}");
            for places in 0..=9 {
                assert_eq!(
                    v.fixed(places).to_string(),
                    printed_before(v, Some(places)),
                    "{raw} at {places}"
                );
            }
        }
    }

    #[test]
    fn the_128_bit_extremes_are_out_of_range() {
        // i128::MIN has no absolute value in i128: found by the Avro codec's differential test
        for raw in [i128::MIN, i128::MAX, MAX_ABS + 1, -MAX_ABS - 1] {
            assert_eq!(
                Dec::ZERO.checked_add(Dec::from_raw(raw)),
                Err(DecError::Overflow)
            );
        }
        for raw in [MAX_ABS, -MAX_ABS] {
            assert_eq!(
                Dec::ZERO.checked_add(Dec::from_raw(raw)),
                Ok(Dec::from_raw(raw))
            );
        }
    }

    #[test]
    fn rounds_half_to_even_once() {
        assert_eq!(d("0.125").round_half_even(2), d("0.12"));
        assert_eq!(d("0.135").round_half_even(2), d("0.14"));
        assert_eq!(d("0.1251").round_half_even(2), d("0.13"));
        assert_eq!(d("-0.125").round_half_even(2), d("-0.12"));
        assert_eq!(d("-0.135").round_half_even(2), d("-0.14"));
        assert_eq!(d("2.5").round_half_even(0), d("2"));
        assert_eq!(d("1.0005").to_fixed(3), "1.000");
        assert_eq!(d("-1.0015").to_fixed(3), "-1.002");
        assert_eq!(d("7").to_fixed(2), "7.00");
    }

    #[test]
    fn formatting_without_allocation_gives_the_bytes_it_always_gave() {
        // the formatting of earlier builds (a settlement file regenerated must be
        // byte-identical): the fraction through a nine-digit string, then cut
        let plain = |v: Dec| {
            let abs = v.0.unsigned_abs();
            let (int, frac) = (abs / ONE as u128, abs % ONE as u128);
            let sign = if v.0 < 0 { "-" } else { "" };
            if frac == 0 {
                return format!("{sign}{int}");
            }
            format!("{sign}{int}.{}", format!("{frac:09}").trim_end_matches('0'))
        };
        let fixed = |v: Dec, places: u32| {
            let r = v.round_half_even(places);
            let abs = r.0.unsigned_abs();
            let (int, frac) = (abs / ONE as u128, abs % ONE as u128);
            let sign = if r.0 < 0 { "-" } else { "" };
            if places == 0 {
                return format!("{sign}{int}");
            }
            format!("{sign}{int}.{}", &format!("{frac:09}")[..places as usize])
        };
        let mut raws: Vec<i128> = vec![0, 1, -1, 5, -5, 10, 999_999_999, 1_000_000_000];
        raws.extend([
            i128::MAX / 1000,
            i128::MIN / 1000,
            -4_000_000,
            4_999_999,
            125_000_000,
        ]);
        let mut x: i128 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            // xorshift: a spread of magnitudes and fractions, negatives included
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x &= (1i128 << 100) - 1;
            let v = x >> (x % 97);
            raws.push(if x % 3 == 0 { -v } else { v });
        }
        for raw in raws {
            let v = Dec(raw);
            assert_eq!(v.to_string(), plain(v), "{raw}");
            for places in 0..=9 {
                assert_eq!(v.to_fixed(places), fixed(v, places), "{raw} at {places}");
            }
        }
    }

    #[test]
    fn pro_rata_split_never_loses_a_nano() {
        let v = d("10.000000001");
        let parts = v.split_pro_rata(&[1, 1, 1]);
        assert_eq!(parts.iter().copied().sum::<Dec>(), v);
        let parts = d("-7").split_pro_rata(&[3, 0, 4]);
        assert_eq!(parts, vec![d("-3"), d("0"), d("-4")]);
        assert_eq!(d("5").split_pro_rata(&[0, 0]), vec![d("5"), d("0")]);
        let big = Dec::from_raw(MAX_ABS / 2);
        let parts = big.split_pro_rata(&[3_600_000, 7, 1]);
        assert_eq!(parts.iter().copied().sum::<Dec>(), big);
    }

    #[test]
    fn minor_units_follow_iso_4217() {
        assert_eq!(minor_units("USD"), 2);
        assert_eq!(minor_units("JPY"), 0);
        assert_eq!(minor_units("KWD"), 3);
    }
}
