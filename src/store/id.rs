//! Dispatch ids: ULIDs (48-bit Unix milliseconds + 80 random bits, Crockford base32).

/// Crockford's base32 alphabet (no I, L, O, U).
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of a dispatch id in characters.
pub const DISPATCH_ID_LEN: usize = 26;

/// A new dispatch id for a letter taken in at `now_ms` (Unix milliseconds): a ULID,
/// 26 upper-case Crockford base32 characters, sortable by creation time. Ids made in the
/// same millisecond are not ordered among themselves (no monotonic counter).
///
/// # Panics
///
/// If OpenSSL's random generator fails: without randomness no id is safe to hand out.
pub fn new_dispatch_id(now_ms: u64) -> String {
    let mut random = [0u8; 10];
    // RAND_bytes only fails when the CSPRNG cannot be seeded, a broken system on which
    // the gateway must not invent identifiers.
    openssl::rand::rand_bytes(&mut random).expect("openssl random generator failed");
    dispatch_id_from_parts(now_ms, random)
}

/// The ULID made of `now_ms` (only its low 48 bits are used) and `random`. Deterministic;
/// [`new_dispatch_id`] is this with fresh random bytes.
pub fn dispatch_id_from_parts(now_ms: u64, random: [u8; 10]) -> String {
    let mut value: u128 = u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80;
    for (i, b) in random.iter().enumerate() {
        value |= u128::from(*b) << (8 * (9 - i));
    }
    let mut out = [0u8; DISPATCH_ID_LEN];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (DISPATCH_ID_LEN - 1 - i);
        // The mask keeps the index below 32.
        *slot = CROCKFORD[((value >> shift) & 0x1F) as usize];
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// The creation time (Unix milliseconds) of a dispatch id, or `None` when `id` is not a
/// ULID. Decoding is case-insensitive and accepts Crockford's aliases (`I`/`L` for 1,
/// `O` for 0).
pub fn dispatch_id_time_ms(id: &str) -> Option<u64> {
    let value = decode(id)?;
    u64::try_from(value >> 80).ok()
}

/// Whether `id` is a well-formed ULID (see [`dispatch_id_time_ms`]).
pub fn is_dispatch_id(id: &str) -> bool {
    decode(id).is_some()
}

/// The canonical (upper-case, aliases resolved) spelling of a dispatch id.
pub fn canonical_dispatch_id(id: &str) -> Option<String> {
    let value = decode(id)?;
    let random: [u8; 10] = {
        let bytes = value.to_be_bytes();
        let mut r = [0u8; 10];
        r.copy_from_slice(&bytes[6..]);
        r
    };
    let ms = u64::try_from(value >> 80).ok()?;
    Some(dispatch_id_from_parts(ms, random))
}

fn decode(id: &str) -> Option<u128> {
    let bytes = id.as_bytes();
    if bytes.len() != DISPATCH_ID_LEN {
        return None;
    }
    let mut value: u128 = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let digit = match c.to_ascii_uppercase() {
            b'O' => 0,
            b'I' | b'L' => 1,
            up => CROCKFORD.iter().position(|&a| a == up)? as u128,
        };
        // 26 characters carry 130 bits: the first may only use its low 3.
        if i == 0 && digit > 7 {
            return None;
        }
        value = (value << 5) | digit;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_part_matches_the_ulid_spec_example() {
        // github.com/ulid/spec: 1469918176385 ms -> "01ARYZ6S41".
        let id = dispatch_id_from_parts(1_469_918_176_385, [0; 10]);
        assert_eq!(&id[..10], "01ARYZ6S41");
        assert_eq!(&id[10..], "0000000000000000");
        assert_eq!(dispatch_id_time_ms(&id), Some(1_469_918_176_385));
    }

    #[test]
    fn extremes_round_trip() {
        let max = dispatch_id_from_parts(u64::MAX, [0xFF; 10]);
        assert_eq!(max, "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
        assert_eq!(dispatch_id_time_ms(&max), Some(0xFFFF_FFFF_FFFF));
        assert_eq!(
            canonical_dispatch_id(&max.to_lowercase()).as_deref(),
            Some(&*max)
        );
        assert!(!is_dispatch_id("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert!(!is_dispatch_id("01ARYZ6S41"));
        assert!(!is_dispatch_id("01ARYZ6S41TSV4RRFFQ69G5FA!"));
        assert!(!is_dispatch_id("01ARYZ6S41TSV4RRFFQ69G5FAU"));
    }

    #[test]
    fn random_part_is_big_endian() {
        let mut r = [0u8; 10];
        r[9] = 1;
        assert!(dispatch_id_from_parts(0, r).ends_with("01"));
        r = [0u8; 10];
        r[0] = 0x80;
        // Bit 79 of the value: the 16th random character's top bit.
        assert_eq!(&dispatch_id_from_parts(0, r)[10..11], "G");
    }

    #[test]
    fn fresh_ids_are_distinct_sortable_and_well_formed() {
        let a = new_dispatch_id(1_700_000_000_000);
        let b = new_dispatch_id(1_700_000_000_000);
        let c = new_dispatch_id(1_700_000_000_001);
        assert_ne!(a, b);
        assert!(a < c && b < c);
        for id in [&a, &b, &c] {
            assert_eq!(id.len(), DISPATCH_ID_LEN);
            assert!(is_dispatch_id(id));
            assert_eq!(canonical_dispatch_id(id).as_deref(), Some(id.as_str()));
        }
        assert_eq!(dispatch_id_time_ms(&c), Some(1_700_000_000_001));
    }

    #[test]
    fn aliases_decode() {
        let id = dispatch_id_from_parts(1, [0x11; 10]);
        let aliased = id.replace('1', "l").replace('0', "o");
        assert_eq!(
            canonical_dispatch_id(&aliased).as_deref(),
            Some(id.as_str())
        );
    }
}
