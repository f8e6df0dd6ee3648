//! The encoder's output is pinned byte for byte: the GPU encoder must match
//! the CPU encoder exactly and deployed decoders must keep decoding, so a
//! speed change to the codec must not change a single byte. Each case pins
//! the stream length and its trailing XXH3-64 checksum (a hash of every
//! other byte), recorded with the encoder of commit 1b6ffb8 (before the
//! speed work of issue 2) via `cachegen encode`.

use cachegen::codec::{encode, EncodeOptions, KvShape, KvTensors, Level};

const FIXTURE: &str = "fixtures/smollm2-kernel-doc-320.safetensors";
const PROFILE: &str = "profiles/smollm2-135m-instruct.json";

fn load() -> (KvTensors, Vec<f32>) {
    let root = env!("CARGO_MANIFEST_DIR");
    let bytes = std::fs::read(format!("{root}/{FIXTURE}")).unwrap();
    let kv = cachegen::interchange::from_safetensors(&bytes).unwrap().kv;
    let text = std::fs::read_to_string(format!("{root}/{PROFILE}")).unwrap();
    let profile = cachegen::profile::Profile::from_json(&text).unwrap().multipliers(&kv.shape).unwrap();
    (kv, profile)
}

fn tokens(kv: &KvTensors, t0: usize, t1: usize) -> KvTensors {
    let row = kv.shape.channels() * kv.dtype.size();
    KvTensors { shape: KvShape { tokens: t1 - t0, ..kv.shape }, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[t0 * row..t1 * row].to_vec()).collect() }
}

fn pin(bytes: &[u8]) -> (usize, u64) {
    (bytes.len(), u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap()))
}

#[test]
fn encoded_fixture_is_byte_identical_at_every_level() {
    let (kv, profile) = load();
    // (level, no profile, with the SmolLM2 profile)
    let want: [(Level, (usize, u64), (usize, u64)); 4] = [
        (Level::Compact, (1152110, 0x1de0edb80cb1a176), (1170518, 0xc9ec3f9e1e4faf41)),
        (Level::Default, (1840389, 0xd251af8a46d12c37), (1864219, 0x66f75ea109564ec1)),
        (Level::High, (2880335, 0xcfc298890d94cee4), (2624779, 0xc78146629927db0d)),
        (Level::Lossless, (7102881, 0x3fb72129d436f3b1), (7102881, 0x3fb72129d436f3b1)),
    ];
    for (level, plain, profiled) in want {
        let got = pin(&encode(&kv, &EncodeOptions::level(level)).unwrap());
        assert_eq!(got, plain, "{level:?} without profile: {got:x?}");
        let opts = EncodeOptions { level: Some(level), profile: Some(profile.clone()), ..Default::default() };
        let got = pin(&encode(&kv, &opts).unwrap());
        assert_eq!(got, profiled, "{level:?} with profile: {got:x?}");
    }
}

#[test]
fn encoded_256_token_chunks_are_byte_identical_at_every_level() {
    // The connector's chunking: tokens [0, 256) and [256, 320), with the profile.
    let (kv, profile) = load();
    let chunks = [tokens(&kv, 0, 256), tokens(&kv, 256, 320)];
    let want: [(Level, [(usize, u64); 2]); 4] = [
        (Level::Compact, [(954456, 0x9ba5173bd4451a6a), (273243, 0x100c5343b32ced98)]),
        (Level::Default, [(1521347, 0x4bffc7785d1f4c3b), (447492, 0x7ecc65b67ae2de58)]),
        (Level::High, [(2165717, 0x280a3f18cdd2d715), (690312, 0xef8f30502ef3286d)]),
        (Level::Lossless, [(5864307, 0x4edcb015d2476c57), (2047971, 0xecd7c899ca2a2190)]),
    ];
    for (level, pins) in want {
        let opts = EncodeOptions { level: Some(level), profile: Some(profile.clone()), ..Default::default() };
        for (c, want) in chunks.iter().zip(pins) {
            let got = pin(&encode(c, &opts).unwrap());
            assert_eq!(got, want, "{level:?} chunk of {} tokens: {got:x?}", c.shape.tokens);
        }
    }
}
