//! The decoder on arbitrary bytes: it must return an error or a chunk,
//! never panic, hang or allocate beyond its limit. Each input is tried as
//! is and with its checksum recomputed, so that mutations get past the
//! checksum to the field validation and the rANS checks behind it.
#![no_main]

use cachegen::codec::{decode_with_limits, DecodeLimits};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    let limits = DecodeLimits { max_output_bytes: 64 << 20 };
    if let Ok(kv) = decode_with_limits(data, None, limits) {
        assert!(kv.validate().is_ok());
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 72 {
        let mut resealed = data.to_vec();
        let n = resealed.len() - 8;
        let sum = xxhash_rust::xxh3::xxh3_64(&resealed[..n]);
        resealed[n..].copy_from_slice(&sum.to_le_bytes());
        check(&resealed);
    }
});
