//! Paged KV layouts: gather/scatter against independent index arithmetic
//! from each engine's tensor shape, conversions between layouts, and errors.

use cachegen::codec::{Dtype, KvKind, KvShape, KvTensors};
use cachegen::layout::{KvLayout, LayoutError};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn random_chunk(rng: &mut Rng, kind: KvKind, layers: usize, tokens: usize, heads: usize, head_dim: usize, dtype: Dtype) -> KvTensors {
    let shape = KvShape { kind, layers, tokens, heads, head_dim };
    let bytes = shape.plane_elems() * dtype.size();
    KvTensors { shape, dtype, tensors: (0..shape.tensors()).map(|_| rng.bytes(bytes)).collect() }
}

/// Row-major element index of `idx` in a tensor of `shape`.
fn flat(shape: &[usize], idx: &[usize]) -> usize {
    assert_eq!(shape.len(), idx.len());
    shape.iter().zip(idx).fold(0, |acc, (&n, &i)| {
        assert!(i < n);
        acc * n + i
    })
}

/// Geometry shared by the cases.
#[derive(Clone, Copy)]
struct Geo {
    layers: usize,
    blocks: usize,
    bs: usize,
    heads: usize,
    hd: usize,
    dtype: Dtype,
}

/// One engine layout under test: the layout, the arena size it needs, and an
/// independent function from (layer, stream, block, token, head, dim) to the
/// element's byte offset in the arena, written from the engine's tensor shape.
struct Case {
    name: &'static str,
    layout: KvLayout,
    arena: usize,
    offset: OffsetFn,
}

/// (layer, stream, block, token, head, dim) -> byte offset in the arena.
type OffsetFn = Box<dyn Fn(usize, usize, usize, usize, usize, usize) -> usize>;

/// Per-layer bases with padding between tensors, in a shuffled order.
fn per_layer_bases(rng: &mut Rng, layers: usize, tensor_bytes: usize) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..layers).collect();
    rng.shuffle(&mut order);
    let mut base = vec![0; layers];
    let mut at = 64; // leading padding
    for &l in &order {
        base[l] = at;
        at += tensor_bytes + 64 + (rng.next() % 4) as usize * 2;
    }
    (base, at + 64)
}

fn cases(rng: &mut Rng, g: Geo) -> Vec<Case> {
    let Geo { layers, blocks, bs, heads, hd, dtype } = g;
    let es = dtype.size();
    let mut out = Vec::new();
    for hnd in [false, true] {
        // vLLM FlashAttention: per layer (2, N, B, H, D), HND physical (2, N, H, B, D).
        let (base, arena) = per_layer_bases(rng, layers, 2 * blocks * bs * heads * hd * es);
        let b2 = base.clone();
        out.push(Case {
            name: if hnd { "vllm_flash_attn HND" } else { "vllm_flash_attn NHD" },
            layout: KvLayout::vllm_flash_attn(base, blocks, bs, heads, hd, dtype, hnd).unwrap(),
            arena,
            offset: Box::new(move |l, s, b, t, h, d| {
                let e = if hnd {
                    flat(&[2, blocks, heads, bs, hd], &[s, b, h, t, d])
                } else {
                    flat(&[2, blocks, bs, heads, hd], &[s, b, t, h, d])
                };
                b2[l] + e * es
            }),
        });
        // FlashInfer: per layer (N, 2, B, H, D), HND (N, 2, H, B, D).
        let (base, arena) = per_layer_bases(rng, layers, 2 * blocks * bs * heads * hd * es);
        let b2 = base.clone();
        out.push(Case {
            name: if hnd { "flashinfer HND" } else { "flashinfer NHD" },
            layout: KvLayout::flashinfer(base, blocks, bs, heads, hd, dtype, hnd).unwrap(),
            arena,
            offset: Box::new(move |l, s, b, t, h, d| {
                let e = if hnd {
                    flat(&[blocks, 2, heads, bs, hd], &[b, s, h, t, d])
                } else {
                    flat(&[blocks, 2, bs, heads, hd], &[b, s, t, h, d])
                };
                b2[l] + e * es
            }),
        });
        // vLLM cross-layer: (N, L, 2, B, H, D), HND (N, H, L, 2, B, D).
        let base = 96;
        out.push(Case {
            name: if hnd { "vllm_cross_layer HND" } else { "vllm_cross_layer NHD" },
            layout: KvLayout::vllm_cross_layer(base, layers, blocks, bs, heads, hd, dtype, hnd).unwrap(),
            arena: base + layers * 2 * blocks * bs * heads * hd * es + 32,
            offset: Box::new(move |l, s, b, t, h, d| {
                let e = if hnd {
                    flat(&[blocks, heads, layers, 2, bs, hd], &[b, h, l, s, t, d])
                } else {
                    flat(&[blocks, layers, 2, bs, heads, hd], &[b, l, s, t, h, d])
                };
                base + e * es
            }),
        });
        // TensorRT-LLM pool: [N, L, 2, B, H, D], HND [N, L, 2, H, B, D].
        let base = 40;
        out.push(Case {
            name: if hnd { "trtllm_pool HND" } else { "trtllm_pool NHD" },
            layout: KvLayout::trtllm_pool(base, layers, blocks, bs, heads, hd, dtype, hnd).unwrap(),
            arena: base + layers * 2 * blocks * bs * heads * hd * es + 8,
            offset: Box::new(move |l, s, b, t, h, d| {
                let e = if hnd {
                    flat(&[blocks, layers, 2, heads, bs, hd], &[b, l, s, h, t, d])
                } else {
                    flat(&[blocks, layers, 2, bs, heads, hd], &[b, l, s, t, h, d])
                };
                base + e * es
            }),
        });
    }
    out
}

fn mla_case(rng: &mut Rng, layers: usize, blocks: usize, bs: usize, width: usize, dtype: Dtype) -> Case {
    let es = dtype.size();
    let (base, arena) = per_layer_bases(rng, layers, blocks * bs * width * es);
    let b2 = base.clone();
    Case {
        name: "mla",
        layout: KvLayout::mla(base, blocks, bs, width, dtype).unwrap(),
        arena,
        offset: Box::new(move |l, s, b, t, h, d| {
            assert_eq!((s, h), (0, 0));
            b2[l] + flat(&[blocks, bs, width], &[b, t, d]) * es
        }),
    }
}

/// Scatter a random chunk into shuffled blocks of a random arena; check every
/// element's bytes against the case's independent offset, that nothing else
/// changed, and that gather returns the chunk (also through the raw API).
fn check_case(rng: &mut Rng, case: &Case, tokens: usize) {
    let lay = &case.layout;
    let es = lay.dtype.size();
    let mut ids: Vec<u32> = (0..lay.num_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let used = tokens.div_ceil(lay.block_size);
    // Give one block more than needed when possible: unused ids are ignored.
    ids.truncate((used + 1).min(lay.num_blocks));

    let original = rng.bytes(case.arena);
    let mut arena = original.clone();
    let chunk = random_chunk(rng, lay.kind, lay.layers, tokens, lay.heads, lay.head_dim, lay.dtype);
    lay.scatter(&mut arena, &ids, &chunk).unwrap_or_else(|e| panic!("{}: {e}", case.name));

    let mut written = vec![false; arena.len()];
    let streams = lay.kind.streams();
    for l in 0..lay.layers {
        for s in 0..streams {
            let tensor = &chunk.tensors[l * streams + s];
            for i in 0..tokens {
                let (b, t) = (ids[i / lay.block_size] as usize, i % lay.block_size);
                for h in 0..lay.heads {
                    for d in 0..lay.head_dim {
                        let at = (case.offset)(l, s, b, t, h, d);
                        let co = ((i * lay.heads + h) * lay.head_dim + d) * es;
                        assert_eq!(&arena[at..at + es], &tensor[co..co + es], "{}: l{l} s{s} token {i} h{h} d{d}", case.name);
                        for w in &mut written[at..at + es] {
                            assert!(!*w, "{}: two elements at byte {at}", case.name);
                            *w = true;
                        }
                    }
                }
            }
        }
    }
    let n_written = written.iter().filter(|&&w| w).count();
    assert_eq!(n_written, lay.layers * streams * tokens * lay.heads * lay.head_dim * es);
    for (i, (&a, &o)) in arena.iter().zip(&original).enumerate() {
        if !written[i] {
            assert_eq!(a, o, "{}: byte {i} outside the written slots changed", case.name);
        }
    }

    let back = lay.gather(&arena, &ids, tokens).unwrap();
    assert_eq!(back, chunk, "{}: gather after scatter", case.name);

    // The raw-pointer API on the same memory, with absolute addresses.
    let mut raw_layout = lay.clone();
    let mut mem = original.clone();
    let origin = mem.as_mut_ptr() as usize;
    for b in &mut raw_layout.layer_base {
        *b += origin;
    }
    unsafe { raw_layout.scatter_raw(&ids, &chunk).unwrap() };
    assert_eq!(mem, arena, "{}: scatter_raw", case.name);
    assert_eq!(unsafe { raw_layout.gather_raw(&ids, tokens).unwrap() }, chunk, "{}: gather_raw", case.name);
}

#[test]
fn every_constructor_places_bytes_where_the_engine_shape_says() {
    let mut rng = Rng(1);
    let geos = [
        Geo { layers: 3, blocks: 7, bs: 4, heads: 3, hd: 8, dtype: Dtype::F16 },
        Geo { layers: 2, blocks: 5, bs: 16, heads: 2, hd: 4, dtype: Dtype::Bf16 },
        Geo { layers: 1, blocks: 3, bs: 2, heads: 1, hd: 5, dtype: Dtype::F32 },
        Geo { layers: 2, blocks: 4, bs: 1, heads: 4, hd: 2, dtype: Dtype::F16 },
    ];
    for g in geos {
        let cap = g.blocks * g.bs;
        for case in cases(&mut rng, g) {
            // full blocks, a partial last block, a single token, everything
            for tokens in [g.bs * 2, g.bs + g.bs.div_ceil(2), 1, cap] {
                check_case(&mut rng, &case, tokens.min(cap));
            }
        }
        let case = mla_case(&mut rng, g.layers, g.blocks, g.bs, g.heads * g.hd, g.dtype);
        for tokens in [g.bs * 2, g.bs + g.bs.div_ceil(2), 1, cap] {
            check_case(&mut rng, &case, tokens.min(cap));
        }
    }
}

#[test]
fn constructors_compute_engine_strides() {
    // vLLM FA NHD, f16, 16-token blocks, 8 heads of 128: (2, N, 16, 8, 128).
    let l = KvLayout::vllm_flash_attn(vec![0, 1 << 30], 100, 16, 8, 128, Dtype::F16, false).unwrap();
    assert_eq!((l.stride_kv, l.stride_block, l.stride_token, l.stride_head, l.stride_layer), (100 * 32768, 32768, 2048, 256, 0));
    assert_eq!(l.span_bytes_per_layer(), 2 * 100 * 32768);
    let l = KvLayout::flashinfer(vec![0], 100, 16, 8, 128, Dtype::F16, true).unwrap();
    assert_eq!((l.stride_block, l.stride_kv, l.stride_head, l.stride_token), (65536, 32768, 4096, 256));
    let l = KvLayout::trtllm_pool(0, 4, 10, 32, 8, 128, Dtype::Bf16, false).unwrap();
    assert_eq!((l.stride_block, l.stride_layer, l.stride_kv, l.stride_token, l.stride_head), (4 * 2 * 65536, 2 * 65536, 65536, 2048, 256));
    assert_eq!(l.layer_base, vec![0; 4]);
    // One layer of the pool stretches over all blocks but the last layers' parts.
    assert_eq!(l.span_bytes_per_layer(), 9 * 4 * 2 * 65536 + 2 * 65536);
    let l = KvLayout::mla(vec![0], 10, 64, 576, Dtype::Bf16).unwrap();
    assert_eq!((l.kind, l.heads, l.head_dim, l.stride_block, l.stride_token), (KvKind::Latent, 1, 576, 64 * 1152, 1152));
}

#[test]
fn a_chunk_moves_between_engine_layouts() {
    let mut rng = Rng(2);
    let (layers, blocks, heads, hd, dtype) = (3, 9, 2, 16, Dtype::Bf16);
    let tokens = 37;
    let (base_a, arena_a) = per_layer_bases(&mut rng, layers, 2 * blocks * 16 * heads * hd * 2);
    let a = KvLayout::vllm_flash_attn(base_a, blocks, 16, heads, hd, dtype, false).unwrap();
    let (base_b, arena_b) = per_layer_bases(&mut rng, layers, 2 * blocks * 8 * heads * hd * 2);
    // Different block size too: 8-token blocks.
    let b = KvLayout::flashinfer(base_b, blocks, 8, heads, hd, dtype, true).unwrap();
    let c = KvLayout::trtllm_pool(0, layers, blocks, 32, heads, hd, dtype, false).unwrap();
    let arena_c = layers * 2 * blocks * 32 * heads * hd * 2;

    let mut mem_a = rng.bytes(arena_a);
    let ids_a = [4u32, 0, 7];
    let original = random_chunk(&mut rng, KvKind::KeyValue, layers, tokens, heads, hd, dtype);
    a.scatter(&mut mem_a, &ids_a, &original).unwrap();

    let from_a = a.gather(&mem_a, &ids_a, tokens).unwrap();
    assert_eq!(from_a, original);
    let mut mem_b = rng.bytes(arena_b);
    let ids_b = [8u32, 2, 5, 1, 3];
    b.scatter(&mut mem_b, &ids_b, &from_a).unwrap();
    let from_b = b.gather(&mem_b, &ids_b, tokens).unwrap();
    assert_eq!(from_b, original);
    let mut mem_c = rng.bytes(arena_c);
    let ids_c = [6u32, 1];
    c.scatter(&mut mem_c, &ids_c, &from_b).unwrap();
    assert_eq!(c.gather(&mem_c, &ids_c, tokens).unwrap(), original);
    // And back into A's other blocks.
    let ids_a2 = [1u32, 2, 3];
    a.scatter(&mut mem_a, &ids_a2, &c.gather(&mem_c, &ids_c, tokens).unwrap()).unwrap();
    assert_eq!(a.gather(&mem_a, &ids_a2, tokens).unwrap(), original);
    assert_eq!(a.gather(&mem_a, &ids_a, tokens).unwrap(), original);
}

/// Scatter must fail with an error matching `want` and leave the arena as it was.
fn scatter_fails(lay: &KvLayout, arena: &mut [u8], ids: &[u32], chunk: &KvTensors, want: fn(&LayoutError) -> bool) {
    let before = arena.to_vec();
    let err = lay.scatter(arena, ids, chunk).expect_err("scatter should fail");
    assert!(want(&err), "unexpected error: {err}");
    assert_eq!(arena, &before[..], "arena changed by a failed scatter ({err})");
}

#[test]
fn bad_requests_are_errors_and_write_nothing() {
    let mut rng = Rng(3);
    let (layers, blocks, bs, heads, hd) = (2, 6, 4, 2, 8);
    let size = 2 * blocks * bs * heads * hd * 2;
    let lay = KvLayout::vllm_flash_attn(vec![0, size], blocks, bs, heads, hd, Dtype::F16, false).unwrap();
    let mut arena = rng.bytes(2 * size);
    let good = random_chunk(&mut rng, KvKind::KeyValue, layers, 10, heads, hd, Dtype::F16);
    let ids = [3u32, 1, 5];
    lay.scatter(&mut arena.clone(), &ids, &good).unwrap();

    // Wrong dtype.
    let mut c = good.clone();
    c.dtype = Dtype::Bf16;
    scatter_fails(&lay, &mut arena, &ids, &c, |e| matches!(e, LayoutError::Mismatch(_)));
    // Wrong shape: heads, head_dim, layers, kind.
    for (h, d, l) in [(1, 16, layers), (heads, hd * 2, layers), (heads, hd, layers + 1)] {
        let c = random_chunk(&mut rng, KvKind::KeyValue, l, 10, h, d, Dtype::F16);
        scatter_fails(&lay, &mut arena, &ids, &c, |e| matches!(e, LayoutError::Mismatch(_)));
    }
    let c = random_chunk(&mut rng, KvKind::Latent, layers, 10, 1, heads * hd, Dtype::F16);
    scatter_fails(&lay, &mut arena, &ids, &c, |e| matches!(e, LayoutError::Mismatch(_)));
    // Malformed chunk: a short tensor.
    let mut c = good.clone();
    c.tensors[3].pop();
    scatter_fails(&lay, &mut arena, &ids, &c, |e| matches!(e, LayoutError::Mismatch(_)));
    // Block id out of range, after valid ones; also in an unused position.
    scatter_fails(&lay, &mut arena, &[3, 1, 6], &good, |e| matches!(e, LayoutError::BlockOutOfRange { id: 6, .. }));
    scatter_fails(&lay, &mut arena, &[3, 1, 5, u32::MAX], &good, |e| matches!(e, LayoutError::BlockOutOfRange { .. }));
    // Duplicate block among those written.
    scatter_fails(&lay, &mut arena, &[3, 1, 3], &good, |e| matches!(e, LayoutError::DuplicateBlock(3)));
    // More tokens than the blocks hold.
    scatter_fails(&lay, &mut arena, &[3, 1], &good, |e| matches!(e, LayoutError::Tokens { tokens: 10, .. }));
    // Arena too small: the second layer does not fit.
    let mut small = arena[..2 * size - 1].to_vec();
    scatter_fails(&lay, &mut small, &ids, &good, |e| matches!(e, LayoutError::OutOfBounds { layer: 1, .. }));
    // An invalid layout.
    let mut bad = lay.clone();
    bad.stride_token = 2; // tokens overlap heads
    scatter_fails(&bad, &mut arena, &ids, &good, |e| matches!(e, LayoutError::Aliasing(_)));

    // Gather errors.
    assert!(matches!(lay.gather(&arena, &ids, 13), Err(LayoutError::Tokens { .. })));
    assert!(matches!(lay.gather(&arena, &ids, 0), Err(LayoutError::Tokens { .. })));
    assert!(matches!(lay.gather(&arena, &[0, 9], 5), Err(LayoutError::BlockOutOfRange { id: 9, .. })));
    assert!(matches!(lay.gather(&arena[..size], &ids, 5), Err(LayoutError::OutOfBounds { layer: 1, .. })));
    // Gathering the same block twice is allowed (nothing is written).
    let g = lay.gather(&arena, &[2, 2], 8).unwrap();
    assert_eq!(g.tensors[0][..bs * heads * hd * 2], g.tensors[0][bs * heads * hd * 2..]);
}

#[test]
fn validate_checks_dimensions_and_aliasing() {
    let ok = KvLayout::flashinfer(vec![0, 4096], 4, 4, 2, 8, Dtype::F16, false).unwrap();
    ok.validate().unwrap();
    let inval = |f: &dyn Fn(&mut KvLayout)| {
        let mut l = ok.clone();
        f(&mut l);
        l.validate().unwrap_err()
    };
    assert!(matches!(inval(&|l| l.heads = 0), LayoutError::Invalid(_)));
    assert!(matches!(inval(&|l| l.num_blocks = 0), LayoutError::Invalid(_)));
    assert!(matches!(inval(&|l| l.layer_base.push(8192)), LayoutError::Invalid(_)));
    assert!(matches!(inval(&|l| l.kind = KvKind::Latent), LayoutError::Invalid(_)));
    assert!(matches!(inval(&|l| l.stride_head = 8), LayoutError::Aliasing(_))); // < head_dim bytes
    assert!(matches!(inval(&|l| l.stride_kv = 0), LayoutError::Aliasing(_)));
    assert!(matches!(inval(&|l| l.stride_block = l.stride_kv), LayoutError::Aliasing(_)));
    assert!(matches!(inval(&|l| l.layer_base[1] = 0), LayoutError::Aliasing(_)));
    assert!(matches!(inval(&|l| l.layer_base[0] = usize::MAX - 10), LayoutError::Invalid(_)));
    assert!(matches!(inval(&|l| l.stride_block = isize::MAX), LayoutError::Invalid(_)));
    // A pool whose layer stride collides with the block stride.
    let mut p = KvLayout::trtllm_pool(0, 3, 4, 4, 2, 8, Dtype::F16, false).unwrap();
    p.stride_layer = p.stride_kv;
    assert!(matches!(p.validate(), Err(LayoutError::Aliasing(_))));
    // Extent-1 dimensions do not need a valid stride; negative strides are fine.
    let mut l = KvLayout::mla(vec![0], 4, 4, 16, Dtype::F32).unwrap();
    l.stride_head = 0;
    l.stride_kv = 0;
    l.validate().unwrap();
    let mut neg = ok.clone();
    neg.layer_base = vec![3 * neg.stride_block as usize, 4096 + 3 * neg.stride_block as usize];
    neg.stride_block = -neg.stride_block; // blocks stored in reverse order
    neg.validate().unwrap();
    assert_eq!(neg.span_bytes_per_layer(), ok.span_bytes_per_layer());
}

#[test]
fn negative_block_stride_round_trips() {
    let mut rng = Rng(4);
    let fwd = KvLayout::flashinfer(vec![0], 5, 4, 2, 8, Dtype::F16, false).unwrap();
    let mut rev = fwd.clone();
    rev.layer_base = vec![4 * fwd.stride_block as usize];
    rev.stride_block = -fwd.stride_block;
    let mut mem = rng.bytes(fwd.span_bytes_per_layer());
    let chunk = random_chunk(&mut rng, KvKind::KeyValue, 1, 10, 2, 8, Dtype::F16);
    rev.scatter(&mut mem, &[0, 1, 2], &chunk).unwrap();
    // Block b of `rev` is block 4 - b of `fwd`.
    assert_eq!(fwd.gather(&mem, &[4, 3, 2], 10).unwrap(), chunk);
}
