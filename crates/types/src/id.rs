//! Deterministic record ids (idempotency keys): the first 128 bits of SHA-256 over the
//! parts that make a record what it is, hex-encoded. The same input always yields the
//! same id, so a replayed record is recognised as the duplicate it is.

use sha2::{Digest, Sha256};

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    lower_hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`, straight into the string's buffer (`hex::encode` goes
/// through a `char` iterator: a twentieth of the enricher's time went to it, one id per
/// usage record).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xF)]);
    }
    // only ASCII digits were pushed
    String::from_utf8(out).unwrap_or_default()
}

pub fn derive(kind: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for p in parts {
        h.update([0x1f]);
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    lower_hex(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_stable_and_unambiguous() {
        assert_eq!(
            super::derive("s", &["a", "b"]),
            super::derive("s", &["a", "b"])
        );
        assert_ne!(
            super::derive("s", &["ab", ""]),
            super::derive("s", &["a", "b"])
        );
        assert_ne!(super::derive("s", &["a"]), super::derive("u", &["a"]));
        assert_eq!(super::derive("s", &["a"]).len(), 32);
    }

    #[test]
    fn hex_is_the_lower_case_encoding_hex_makes() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(super::lower_hex(&all), hex::encode(&all));
        assert_eq!(super::lower_hex(&[]), "");
        // ids keep their published form
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
