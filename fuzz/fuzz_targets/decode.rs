//! The decoder on arbitrary bytes: it must return an error or a chunk,
//! never panic, hang or allocate beyond its limit.
#![no_main]

use cachegen::codec::{decode_with_limits, DecodeLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_output_bytes: 64 << 20 };
    if let Ok(kv) = decode_with_limits(data, None, limits) {
        assert!(kv.validate().is_ok());
    }
});
