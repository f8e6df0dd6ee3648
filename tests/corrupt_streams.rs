//! Corrupted, truncated and hostile streams are rejected with an error,
//! never a panic, a hang or a huge allocation.

use cachegen::codec::format::{self, HEADER_LEN};
use cachegen::codec::{decode, decode_with_limits, encode, DecodeLimits, Dtype, EncodeOptions, Error, KvTensors, Level};
use cachegen::interchange;

fn fixture() -> KvTensors {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/smollm2-kernel-doc-320.safetensors")).unwrap();
    let kv = interchange::from_safetensors(&bytes).unwrap().kv;
    // Eight tokens of four layers keep the exhaustive loops below quick.
    let s = kv.shape;
    let row = s.channels() * kv.dtype.size();
    let shape = cachegen::codec::KvShape { layers: 4, tokens: 40, ..s };
    KvTensors { shape, dtype: kv.dtype, tensors: kv.tensors[..shape.tensors()].iter().map(|t| t[..40 * row].to_vec()).collect() }
}

/// Recompute the checksum so corruption reaches the field validation.
fn reseal(b: &mut [u8]) {
    let n = b.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..n]);
    b[n..].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn every_truncation_is_rejected() {
    let kv = fixture();
    for level in Level::ALL {
        let b = encode(&kv, &EncodeOptions::level(level)).unwrap();
        for cut in (0..b.len()).step_by(7) {
            assert!(decode(&b[..cut], None).is_err(), "{level:?} truncated to {cut} decoded");
        }
    }
}

#[test]
fn bit_flips_fail_the_checksum() {
    let kv = fixture();
    let b = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    for i in (0..b.len()).step_by(97) {
        let mut c = b.clone();
        c[i] ^= 0x10;
        let e = decode(&c, None).unwrap_err();
        assert!(matches!(e, Error::Checksum | Error::BadMagic), "byte {i}: {e}");
    }
}

#[test]
fn resealed_corruption_is_still_rejected_or_decodes_to_the_right_shape() {
    // With a valid checksum, a change must be caught by field validation or
    // the rANS end-state checks; payload changes that happen to decode
    // consistently must still give a chunk of the declared shape.
    let kv = fixture();
    let b = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    let layout = format::parse(&b, u64::MAX).unwrap();
    let mut payload_errors = 0;
    let mut header_errors = 0;
    for i in (0..b.len() - 8).step_by(13) {
        for flip in [0x01u8, 0x80] {
            let mut c = b.clone();
            c[i] ^= flip;
            reseal(&mut c);
            match decode(&c, None) {
                Err(_) => {
                    if i < HEADER_LEN {
                        header_errors += 1;
                    } else if i >= layout.segments[0].0 {
                        payload_errors += 1;
                    }
                }
                Ok(out) => {
                    assert_eq!(out.shape.elems(), out.tensors.iter().map(|t| t.len()).sum::<usize>() / out.dtype.size());
                }
            }
        }
    }
    assert!(header_errors > 0 && payload_errors > 0, "header {header_errors} payload {payload_errors}");
}

#[test]
fn hostile_header_cannot_force_a_huge_allocation() {
    let kv = fixture();
    let mut b = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    // Claim 2^32-1 tokens: the size check must refuse before allocating.
    b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    let e = decode_with_limits(&b, None, DecodeLimits { max_output_bytes: 1 << 30 }).unwrap_err();
    assert!(matches!(e, Error::TooLarge(..)), "{e}");
    // Within the limit but inconsistent with the sections: a format error.
    let e = decode(&b, None).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_) | Error::TooLarge(..)), "{e}");
}

#[test]
fn garbage_and_wrong_versions_are_named() {
    assert!(matches!(decode(b"", None), Err(Error::BadMagic)));
    assert!(matches!(decode(&[0u8; 100], None), Err(Error::BadMagic)));
    let kv = fixture();
    let mut b = encode(&kv, &EncodeOptions::level(Level::Compact)).unwrap();
    b[4] = 9;
    reseal(&mut b);
    assert!(matches!(decode(&b, None), Err(Error::Version(9))));
}

#[test]
fn non_finite_or_negative_scales_are_rejected() {
    let kv = fixture();
    let b = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    let layout = format::parse(&b, u64::MAX).unwrap();
    for bad in [0x7fc0u16, 0x7f80, 0xbf80] {
        // NaN, +infinity, -1.0 as the first plane's step.
        let mut c = b.clone();
        c[layout.scales.start..layout.scales.start + 2].copy_from_slice(&bad.to_le_bytes());
        reseal(&mut c);
        assert!(matches!(decode(&c, None), Err(Error::Corrupt(_))), "scale bits {bad:#x}");
    }
}

#[test]
fn the_gpu_host_checks_reject_what_the_cpu_parser_rejects() {
    // The GPU decoder checks containers without building their tables
    // (PreparedChunk::new; no GPU needed): every resealed change before the
    // payload that Container::parse rejects, it must reject too.
    use cachegen::codec::Container;
    use cachegen::gpu::PreparedChunk;
    let kv = fixture();
    for level in [Level::Compact, Level::Default, Level::Lossless] {
        let b = encode(&kv, &EncodeOptions::level(level)).unwrap();
        let ok = PreparedChunk::new(b.clone(), DecodeLimits::default()).unwrap();
        assert_eq!((ok.shape(), ok.dtype()), (kv.shape, kv.dtype));
        let layout = format::parse(&b, u64::MAX).unwrap();
        let mut rejected = 0;
        for i in 0..layout.segments[0].0 {
            for flip in [0x01u8, 0x10, 0x80] {
                let mut c = b.clone();
                c[i] ^= flip;
                reseal(&mut c);
                if let Err(e) = Container::parse(&c, None, DecodeLimits::default()) {
                    rejected += 1;
                    assert!(PreparedChunk::new(c, DecodeLimits::default()).is_err(), "{level:?} byte {i} flip {flip:#x}: the CPU parser says {e}, the GPU checks accept it");
                }
            }
        }
        assert!(rejected > 100, "{level:?}: only {rejected} changes rejected");
    }
}

#[test]
fn unknown_dtype_codes_are_rejected_and_a_relabelled_dtype_is_not_misread() {
    // Byte 8 is the dtype: 1 f16, 2 bf16, 3 f32, 4 f8e4m3; anything else is refused.
    let kv = fixture();
    for level in [Level::Default, Level::Lossless] {
        let b = encode(&kv, &EncodeOptions::level(level)).unwrap();
        assert_eq!(b[8], 1, "the fixture is f16");
        for code in [0u8, 5, 6, 0x80, 0xff] {
            let mut c = b.clone();
            c[8] = code;
            reseal(&mut c);
            let e = decode(&c, None).unwrap_err();
            assert!(matches!(e, Error::Corrupt("unknown dtype")), "code {code}: {e}");
        }
        // An f16 stream relabelled fp8 (1-byte elements) with a valid checksum:
        // a lossless one has two byte planes per tensor where fp8 has one and
        // is refused; a lossy one's planes do not depend on the element size,
        // so it may decode, but then to fp8 tensors of the declared shape.
        let mut c = b.clone();
        c[8] = 4;
        reseal(&mut c);
        match (level, decode(&c, None)) {
            (Level::Lossless, Ok(_)) => panic!("a lossless f16 stream relabelled fp8 decoded"),
            (_, Err(e)) => assert!(matches!(e, Error::Corrupt(_)), "{}: {e}", level.name()),
            (_, Ok(out)) => {
                assert_eq!((out.shape, out.dtype), (kv.shape, Dtype::F8E4M3));
                assert!(out.tensors.iter().all(|t| t.len() == kv.shape.tokens * kv.shape.channels()));
            }
        }
    }
}
