//! Chunk keys are deterministic, prefix-stable and separated by namespace,
//! salt and rank.

use cachegen::keys::{chunk_chain, shard_key, Namespace};
use cachegen::store::key_hex;

fn ns() -> Namespace {
    Namespace { model: "SmolLM2-135M-Instruct@b179c952".into(), kv_dtype: "f16".into(), tp_world_size: 2, block_size: 16, chunk_tokens: 256, level: 2, tables: None }
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 49152).collect()
}

#[test]
fn keys_are_pinned_across_versions_and_processes() {
    // Golden values: any change to the hashing breaks every stored cache,
    // so it must be deliberate (and bump the "-v1" tags).
    let chain = chunk_chain(&ns(), b"", &tokens(600, 7));
    assert_eq!(chain.len(), 2, "two full 256-token chunks, the 88-token tail has no key");
    let golden = [key_hex(&chain[0]), key_hex(&chain[1]), key_hex(&shard_key(&chain[1], 1))];
    let again = chunk_chain(&ns(), b"", &tokens(600, 7));
    assert_eq!(chain, again);
    assert_eq!(golden, GOLDEN.map(String::from), "hash encoding changed");
}

// Cross-checked on 2026-11-27 with an independent Python implementation of
// the encoding documented in src/keys.rs (PyPI `xxhash`, xxh3_128).
const GOLDEN: [&str; 3] = ["8405ef025d6b55f7cd45071b8b0f8c86", "c507cce8fcb399301ae0fd7eb69ac05a", "1d13c40137a7f23e611aee184fc78a99"];

#[test]
fn a_prefix_has_the_same_keys_and_a_change_changes_every_later_key() {
    let t = tokens(1024, 3);
    let full = chunk_chain(&ns(), b"", &t);
    assert_eq!(chunk_chain(&ns(), b"", &t[..512]), full[..2]);
    let mut changed = t.clone();
    changed[300] ^= 1; // inside chunk 1
    let other = chunk_chain(&ns(), b"", &changed);
    assert_eq!(other[0], full[0]);
    assert!(other[1..].iter().zip(&full[1..]).all(|(a, b)| a != b));
}

#[test]
fn namespace_salt_and_rank_separate_entries() {
    let t = tokens(512, 9);
    let base = chunk_chain(&ns(), b"", &t);
    let variants = [
        Namespace { model: "other-model".into(), ..ns() },
        Namespace { kv_dtype: "bf16".into(), ..ns() },
        Namespace { tp_world_size: 4, ..ns() },
        Namespace { block_size: 32, ..ns() },
        Namespace { level: 3, ..ns() },
        Namespace { tables: Some(0x1234), ..ns() },
        Namespace { tables: Some(0), ..ns() },
    ];
    for v in &variants {
        assert_ne!(chunk_chain(v, b"", &t)[0], base[0], "{v:?}");
    }
    // Field boundaries are unambiguous.
    let a = Namespace { model: "ab".into(), kv_dtype: "c".into(), ..ns() };
    let b = Namespace { model: "a".into(), kv_dtype: "bc".into(), ..ns() };
    assert_ne!(a.id(), b.id());
    assert_ne!(chunk_chain(&ns(), b"lora-7", &t), base);
    assert_ne!(chunk_chain(&ns(), b"lora-7", &t), chunk_chain(&ns(), b"lora-8", &t));
    assert_ne!(shard_key(&base[0], 0), shard_key(&base[0], 1));
}
