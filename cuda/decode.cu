// Fused CacheGen decode: rANS (one lane per thread, one segment per warp),
// table normalisation and lookup, dequantization and the scatter into an
// engine's paged KV blocks, in one kernel. docs/FORMAT.md is the bitstream;
// src/gpu/decode.rs builds the descriptors below (its #[repr(C)] structs
// mirror them field for field) and src/layout.rs defines the address formula.
//
// Compiled at run time with NVRTC (see cuda/README.md). No includes: NVRTC
// runs without the CUDA headers.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define LANES 32
template <int K> struct IC { static constexpr int value = K; };
#ifndef FAST
#define FAST 1
#endif
#ifndef STORE
#define STORE 1
#endif
#ifndef HWCVT
#define HWCVT 1
#endif
// Bytes of shared memory per warp after its lookups (the host adds the same
// amount: CACHEGEN_SMEM_EXTRA); the word ring below needs 256.
#ifndef SMEM_EXTRA
#define SMEM_EXTRA 256
#endif
#define RING_UNITS (SMEM_EXTRA / 4)   // u32 units in the word ring (64)
#define RING_GROUP 16                 // units per refill (32 words)
#define FULL 0xffffffffu
#define RANS_L 65536u

// A block id that means "do not write": tokens the engine already holds
// (a load that starts inside a chunk) map to it.
#define SKIP_BLOCK 0xFFFFFFFFu

// Error bits, OR-ed per chunk into `errors[chunk]`.
#define ERR_WORDS 1u   // a segment read more or fewer words than it holds (FORMAT.md 2.2 item 35)
#define ERR_STATE 2u   // a lane did not end in state 2^16 (item 36)
#define ERR_TABLE 4u   // a compact table is invalid (item 32; also checked on the host)

// One chunk (container) of the batch. Offsets are bytes from `region`.
struct Chunk {
    u64 bytes;          // offset of the container's first byte
    u32 tokens, heads, head_dim, channels;
    u32 seg_tokens, seg_groups, groups, token_blocks;
    u32 prob_bits, planes_per_tensor, streams, exact_n;
    u32 scales_off, exact_idx_off, exact_rows_off, plane_first; // container offsets; index into planes[]
    u32 tab_first, index, dtype_size, is_bf16;                  // index into tab_off[]; chunk index of the call
    u32 tensors, external, set_kmax, set_off;                   // layers * streams; 1: tables from a table set: its rows per block, its offset
};
static_assert(sizeof(Chunk) == 104, "Chunk mirrors ChunkDesc in src/gpu/decode.rs");

// tab_off entry of a channel whose table comes from the uploaded table set
// (a chunk with external tables and no patch for that channel).
#define FROM_SET 0xFFFFFFFFu

// One plane of a chunk.
struct Plane {
    u32 group;        // scale group code 1..4 for quantized planes, 0 for raw planes
    u32 asym;         // 1: asymmetric (offset, step) pairs
    u32 max;          // symmetric centre (nsym - 1) / 2
    u32 scale_start;  // index of the plane's first bf16 in the scale section
    u32 byte_shift;   // raw planes: byte of the little-endian element this plane writes
    u32 shared;       // raw planes: one table for every channel
};

// One segment: the unit of work of a warp.
struct Seg {
    u32 chunk, plane, k;  // chunk index, plane index within the chunk, segment index within the plane
    u32 off;              // offset of the segment's lane states, from the chunk's first byte
    u32 nwords;           // 16-bit words after the states
};

// Destination: KvLayout (src/layout.rs) with device addresses.
struct Dest {
    u64 layer_base;       // device address of a u64[layers] array of layer bases
    u64 block_ids;        // device address of the u32 block ids of every chunk
    u64 block_first;      // device address of u32[chunks]: where each chunk's block ids start
    i64 stride_block, stride_kv, stride_token, stride_head, stride_layer;
    u32 block_size, pad;
};

__device__ __forceinline__ u32 ld8(const u8* p) { return __ldg(p); }
__device__ __forceinline__ u32 ld16u(const u8* p) { return ld8(p) | (ld8(p + 1) << 8); }
__device__ __forceinline__ u32 ld32u(const u8* p) { return ld16u(p) | (ld16u(p + 2) << 16); }

// f32 -> f16 bits exactly as the `half` crate converts (round to nearest even,
// overflow to infinity, NaN: quiet bit set, top mantissa bits kept).
__device__ __forceinline__ u32 f32_to_f16_bits(u32 x) {
    u32 sign = x & 0x80000000u, exp = x & 0x7F800000u, man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (sign >> 16) | 0x7C00u | nan_bit | (man >> 13);
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return half_sign | 0x7C00u;
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return half_sign | half_man;
    }
    u32 he = ((u32)half_exp) << 10;
    u32 hm = man >> 13;
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) return (half_sign | he | hm) + 1u;
    return half_sign | he | hm;
}

// f32 -> bf16 bits exactly as the `half` crate converts.
__device__ __forceinline__ u32 f32_to_bf16_bits(u32 x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ((x >> 16) | 0x0040u) & 0xFFFFu;
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) return ((x >> 16) + 1u) & 0xFFFFu;
    return x >> 16;
}

// f32 -> FP8 E4M3 bits exactly as codec::fp8::f32_to_e4m3: round to nearest
// even, saturating to +-448; a NaN (only from inf - inf with absurd scales)
// gives 0xFF, what the CPU decoder's x86 default NaN (sign set) converts to.
__device__ __forceinline__ u32 f32_to_e4m3(float v) {
    if (v != v) return 0xFFu;
    const u32 bits = __float_as_uint(v);
    const u32 sign = (bits >> 24) & 0x80u;
    const float a = __uint_as_float(bits & 0x7FFFFFFFu);
    if (a >= 448.0f) return sign | 0x7Eu;
    if (a < 0.015625f) return sign | __float2uint_rn(a * 512.0f);   // subnormal grid, 2^-9
    u32 e = ((bits >> 23) & 0xFFu) - 120u;                          // exponent + 7, 1..15
    u32 r = (bits >> 20) & 7u;
    const u32 rem = bits & 0xFFFFFu;
    if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) {
        if (++r == 8u) { r = 0; e++; }
    }
    return sign | (e << 3) | r;
}

// The reconstruction of FORMAT.md 6.2, with the CPU decoder's exact
// operations: a multiply, then an add, each rounded (never fused). A NaN
// (only from inf - inf with absurd scales) is given the x86 default NaN the
// CPU decoder produces.
__device__ __forceinline__ u32 dequant_bits(u32 sym, float step, float base, u32 esize, u32 is_bf16) {
    float v = __fadd_rn(__fmul_rn((float)sym, step), base);
    u32 x = __float_as_uint(v);
    if (v != v) x = 0xFFC00000u;
    if (esize == 4) return x;
    if (esize == 1) return f32_to_e4m3(v);
#if HWCVT
    // cvt.rn is IEEE round-to-nearest-even with subnormals and overflow to
    // infinity, as the `half` crate; only NaNs differ (canonical NaN), so
    // they take the integer path.
    if (v == v) {
        unsigned short h;
        if (is_bf16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
        else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
    }
#endif
    return is_bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
}

__device__ __forceinline__ float bf16_at(const u8* scales, u32 i) {
    return __uint_as_float(ld16u(scales + 2 * i) << 16);
}

// (step, base) of scale group `g` of a quantized plane.
__device__ __forceinline__ void group_coef(const u8* scales, const Plane& pl, u32 g, float& step, float& base) {
    if (pl.asym) {
        base = bf16_at(scales, pl.scale_start + 2 * g);
        step = bf16_at(scales, pl.scale_start + 2 * g + 1);
    } else {
        step = bf16_at(scales, pl.scale_start + g);
        base = __fmul_rn(-(float)pl.max, step);
    }
}

// WEIGHT_OF_CODE (table.rs) without a memory lookup (a constant-bank load
// with a different index per lane is serialised): odd codes are powers of
// two, even codes come from a packed byte table.
__device__ __forceinline__ u32 weight_of_code(u32 q) {
    return (q & 1u) ? (1u << ((q + 1u) >> 1)) : (u32)((0xB55B2D170B060300ull >> (4u * q)) & 0xFFu);
}

// A symbol entry that carries the symbol's dequantized output bits
// (FORMAT.md 6.2, as dequant_bits), so that the hot loop needs no arithmetic
// to write a value: for 8-bit tables with 16-bit outputs (`vmode` 1: f16,
// 2: bf16) `out | (freq - 1) << 16 | cum << 24`; for fp8 e4m3 outputs
// (`vmode` 3, any prob_bits) the usual layout with the output byte in place
// of the symbol, `out | freq << 8 | cum << 19`.
__device__ __forceinline__ u32 packed_entry(u32 sym, u32 f, u32 cum, u32 vmode, float step, float base) {
    const u32 out = dequant_bits(sym, step, base, vmode == 3 ? 1u : 2u, vmode == 2);
    return vmode == 3 ? out | f << 8 | cum << 19 : out | ((f - 1u) & 0xFFu) << 16 | cum << 24;
}

// A classic entry (`symbol | freq << 8 | cum << 19`, as the table set's
// prebuilt rows) in the packed form.
__device__ __forceinline__ u32 pack_classic(u32 e, u32 vmode, float step, float base) {
    return packed_entry(e & 0xFFu, (e >> 8) & 0x7FFu, e >> 19, vmode, step, base);
}

// A table-set row below the shared ones, from global memory, packed. Kept
// out of line: the hot loop then only branches around a call, which few
// rounds take (the set orders rows by falling frequency).
__device__ __noinline__ u32 rare_entry(const u32* grows, u32 q, u32 vmode, float step, float base) {
    return pack_classic(__ldg(grows + q * LANES), vmode, step, base);
}

// Build this lane's lookup (FORMAT.md 7.3 and 7.5) from its compact table.
// Two parts, both lane-interleaved so that the 32 lanes never share a bank:
// - `lutw[w * 32]` (the caller offsets by the lane): 2^prob_bits / 4 words,
//   byte r of word w = index q of the symbol that owns slot 4w + r among
//   the table's non-zero symbols (at most 256 of them);
// - `symt[q * 32]`: per non-zero symbol `symbol | freq << 8 | cum << 19`,
//   or with `vmode` 1 to 3 the entry with the output above.
// The normalisation is table::normalize, step for step; its (index,
// frequency) pairs live in `symt` while it runs. Returns false for an
// invalid table, or one with more than `kmax` non-zero symbols (the host
// sizes `symt` to the batch's largest table, so that never happens for a
// table that passed the host checks).
__device__ __noinline__ bool build_lut(const u8* tab, u32* lutw, u32* symt, u32 prob_bits, u32 nsym, u32 kmax,
                                       u32 vmode, float step, float sbase) {
    const u32 M = 1u << prob_bits;
    const u32 lo = ld8(tab), n = ld8(tab + 1) + 1;
    if (lo + n > nsym) return false;
    if ((n & 1) && (ld8(tab + 2 + (n >> 1)) & 15u)) return false;
    // The weights, their sum, and the (index, weight) pairs of the non-zero
    // ones (in `symt`). Codes are read 8 at a time from aligned words (the
    // table starts at any byte; the host checked that its bytes are there).
    const u64 ca = (u64)(tab + 2);
    const u32* cw = (const u32*)(ca & ~3ull);
    const u32 csh = (u32)(ca & 3u) * 8u;
    u32 sum = 0, nz = 0;
    for (u32 j0 = 0; j0 < n; j0 += 8) {
        const u32 wi = j0 >> 3;
        const u32 w8 = csh ? __funnelshift_r(__ldg(cw + wi), __ldg(cw + wi + 1), csh) : __ldg(cw + wi);
#pragma unroll
        for (u32 i = 0; i < 8; i++) {
            // code j0 + i: high nibble first in each byte
            const u32 c = (w8 >> ((i >> 1) * 8u + ((i & 1u) ? 0u : 4u))) & 15u;
            const u32 w = j0 + i < n ? weight_of_code(c) : 0u;
            if (w) {
                if (nz < kmax) symt[nz * LANES] = (j0 + i) | (w << 16);
                nz++;
                sum += w;
            }
        }
    }
    if (nz == 0 || nz > M / 2 || nz > kmax) return false;
    const float rs = 1.0f / (float)sum;
    u32 assigned = 0, fmax = 0, kmx = 0;
    for (u32 k = 0; k < nz; k++) {
        const u32 e = symt[k * LANES];
        const u32 w = e >> 16;
        // floor(w * M / sum) through a float reciprocal, corrected to exact.
        const u32 wm = w * M;
        u32 f = (u32)((float)wm * rs);
        if (f * sum > wm) f--;
        else if ((f + 1) * sum <= wm) f++;
        if (f < 1) f = 1;
        assigned += f;
        if (f > fmax) { fmax = f; kmx = k; }
        symt[k * LANES] = (e & 0xFFFFu) | (f << 16);
    }
    while (assigned != M) {
        u32 e = symt[kmx * LANES];
        u32 f = e >> 16;
        if (assigned < M) {
            f += M - assigned;
            assigned = M;
        } else {
            u32 take = assigned - M;
            if (take > f - 1) take = f - 1;
            f -= take;
            assigned -= take;
        }
        symt[kmx * LANES] = (e & 0xFFFFu) | (f << 16);
        if (assigned != M) {
            fmax = 0; kmx = 0;
            for (u32 q = 0; q < nz; q++) {
                u32 fq = symt[q * LANES] >> 16;
                if (fq > fmax) { fmax = fq; kmx = q; }
            }
        }
    }
    // Slot bytes without a loop over slots: a bitmap of where each symbol
    // but the first starts (M / 32 words, kept in the last M / 32 slot
    // words: word i is read at slot word 8i, before slot word M/4 - M/32 + i
    // >= 8i is written), then slot s's symbol = the set bits at or below s.
    u32* bm = lutw + (M / 4 - M / 32) * LANES;
    for (u32 i = 0; i < M / 32; i++) bm[i * LANES] = 0;
    u32 cum = 0;
    for (u32 q = 0; q < nz; q++) {
        const u32 e = symt[q * LANES];
        const u32 sym = lo + (e & 0xFFFFu), f = e >> 16;
        if (q) bm[(cum >> 5) * LANES] |= 1u << (cum & 31u);
        symt[q * LANES] = vmode ? packed_entry(sym, f, cum, vmode, step, sbase) : (sym | (f << 8) | (cum << 19));
        cum += f;
    }
    u32 below = 0, bits = 0;
    for (u32 w = 0; w < M / 4; w++) {
        if ((w & 7u) == 0) bits = bm[(w >> 3) * LANES];
        const u32 nib = (bits >> ((w & 7u) * 4u)) & 15u;
        // nibble bit r -> byte r, then a prefix sum over the bytes.
        const u32 inc = ((nib * 0x00204081u) & 0x01010101u) * 0x01010101u;
        lutw[w * LANES] = below * 0x01010101u + inc;
        below += __popc(nib);
    }
    return true;
}

// Symbol entry (`symbol | freq << 8 | cum << 19`) of slot `s`. Rows below
// `rows` are in shared memory; a table-set lane's rarer rows (the set orders
// them by falling frequency) stay in global memory at `grows` (never read
// for tables built in shared memory: they have fewer than `rows` symbols).
__device__ __forceinline__ u32 lookup(const u32* lutw, const u32* symt, const u32* grows, u32 rows, u32 s) {
    const u32 q = (lutw[(s >> 2) * LANES] >> ((s & 3u) * 8u)) & 0xFFu;
    return q < rows ? symt[q * LANES] : __ldg(grows + q * LANES);
}

// One warp per segment. `geo` = max_prob_bits | kmax << 8: the batch's
// largest prob_bits and largest number of non-zero symbols in a table.
// Dynamic shared memory per warp: 32 * (2^max_prob_bits / 4 + kmax) u32 of
// lookups, then the word ring (RING_UNITS u32).
// A chunk whose `external` is set reads its table set's prebuilt lookups at
// `set_luts + set_off` (u32 words; one block per (plane, 32-channel group):
// the `lutw` words then `set_kmax` rows of `symt`, both lane-interleaved as
// in shared memory). `set_luts` is the lowest set address of the call (null
// when no chunk has a set); a call may mix sets (an adaptive load's levels).
extern "C" __global__ void cg_decode(
    const u8* __restrict__ region, const Chunk* __restrict__ chunks, const Plane* __restrict__ planes,
    const Seg* __restrict__ segs, const u32* __restrict__ tab_off, u32 nsegs, u32 geo,
    Dest dest, u32* __restrict__ errors, const u32* __restrict__ set_luts)
{
    extern __shared__ u32 smem[];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 si = blockIdx.x * (blockDim.x >> 5) + warp;
    if (si >= nsegs) return;
    const u32 max_prob_bits = geo & 0xFFu, kmax = geo >> 8;
    const u32 lut_words = (LANES << max_prob_bits) >> 2;
    u32* wbase_smem = smem + (size_t)warp * (lut_words + LANES * kmax + RING_UNITS);
    u32* lutw = wbase_smem + lane;
    u32* symt = wbase_smem + lut_words + lane;
    u32* ring = wbase_smem + lut_words + LANES * kmax;   // RING_UNITS u32: the segment's words, streamed in

    const Seg sg = segs[si];
    const Chunk ch = chunks[sg.chunk];
    const Plane pl = planes[ch.plane_first + sg.plane];
    const u8* base = region + ch.bytes;
    const u32 prob_bits = ch.prob_bits, mask = (1u << prob_bits) - 1u;
    const u32 C = ch.channels;

    const u32 gb = sg.k / ch.token_blocks, tb = sg.k - gb * ch.token_blocks;
    const u32 g0 = gb * ch.seg_groups;
    const u32 g1 = min(g0 + ch.seg_groups, ch.groups);
    const u32 t0 = tb * ch.seg_tokens;
    const u32 t1 = min(t0 + ch.seg_tokens, ch.tokens);
    const u32 L = min(32u, C - 32u * g0);

    const u16* seg16 = (const u16*)(base + sg.off);   // 2-byte aligned (host places the payload so)
    u32 x = RANS_L;
    if (lane < L) x = (u32)__ldg(seg16 + 2 * lane) | ((u32)__ldg(seg16 + 2 * lane + 1) << 16);
    const u16* words = seg16 + 2 * L;
    const u32 nwords = sg.nwords;

    // Words stream through a ring in shared memory, copied with cp.async
    // (no register waits on the loads) in groups of 32 words, 4 groups deep:
    // a group is requested about 64 words (8 rounds at 4 bits/symbol)
    // before it is read. Copies are 4-byte units from the 4-byte aligned
    // address at or below the words; `sh` is the words' offset in u16 from it.
    const u64 waddr = (u64)words;
    const u32 sh = (u32)(waddr & 2u) >> 1;
    const u32* units = (const u32*)(waddr - 2 * sh);
    const u64 wend = waddr + 2ull * nwords;          // first byte past the words
    const u16* ring16 = (const u16*)ring;
    u32 gnext = 0;
    auto refill = [&]() {
        if (lane < RING_GROUP) {
            const u32 u = gnext * RING_GROUP + lane;
            if ((u64)(units + u) < wend) {
                const unsigned dst = (unsigned)__cvta_generic_to_shared(ring + (u & (RING_UNITS - 1)));
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(dst), "l"(units + u));
            }
        }
        asm volatile("cp.async.commit_group;");
        gnext++;
    };
    refill(); refill(); refill(); refill();
    asm volatile("cp.async.wait_group 2;");
    __syncwarp();
    u32 pos = 0;
    const u32 lt_mask = (1u << lane) - 1u;

    const u32 tensor = sg.plane / ch.planes_per_tensor;
    const u32 layer = tensor / ch.streams, stream = tensor - layer * ch.streams;
    u8* layer_ptr = (u8*)(((const u64*)dest.layer_base)[layer]) + (i64)layer * dest.stride_layer + (i64)stream * dest.stride_kv;
    const u32* block_ids = (const u32*)dest.block_ids + ((const u32*)dest.block_first)[ch.index];
    const u32 esize = ch.dtype_size;
    const u32 nblk = (ch.tokens + dest.block_size - 1) / dest.block_size;
    const u32 raw = pl.group == 0;
    const u8* scales = base + ch.scales_off;
    const u32 nsym = raw ? 256u : 2u * pl.max + 1u;
    bool ok = true;

    // A lane's symbol rows in global memory (table-set chunks; any global
    // address otherwise: rows below `kmax` are never read from it).
    const u32* grows = (const u32*)region;
    float step = 0.f, sbase = 0.f;
    if (!raw && pl.group == 4) group_coef(scales, pl, 0, step, sbase);
    const bool fast = !raw && pl.group == 4;
    // Entries carrying the output value (packed_entry) where the plane has
    // one step for the tensor: 8-bit tables with 16-bit outputs, or fp8.
    const u32 vmode = !(FAST && fast) ? 0u : esize == 1 ? 3u : prob_bits == 8 && esize == 2 ? (ch.is_bf16 ? 2u : 1u) : 0u;

    for (u32 g = g0; g < g1; g++) {
        const u32 active = min(32u, C - 32u * g);
        const u32 c = 32u * g + lane;
        const bool on = lane < active;
        __syncwarp();
        if (ch.external) {
            // Copy the prebuilt lookups of this (plane, group) from the set
            // (16-byte cp.async: every block is 16-byte aligned): the slot
            // words and the first `kmax` symbol rows (rarer rows are read
            // from global memory), then let the lanes with a patched table
            // build their own column over them. All copies are in flight at
            // once and land in shared memory without passing through
            // registers (loads into registers, four at a time, left 21% of
            // the set chunks' stall samples on this copy).
            const u32 slw = (LANES << prob_bits) >> 2;
            const u32 set_kmax = ch.set_kmax;
            const u32* blk = set_luts + ch.set_off + (size_t)(sg.plane * ch.groups + g) * (slw + LANES * set_kmax);
            const u32 rows = LANES * min(kmax, set_kmax);
            for (u32 i = 4u * lane; i < slw; i += 128u) {
                const unsigned dst = (unsigned)__cvta_generic_to_shared(wbase_smem + i);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(blk + i));
            }
            for (u32 i = 4u * lane; i < rows; i += 128u) {
                const unsigned dst = (unsigned)__cvta_generic_to_shared(wbase_smem + lut_words + i);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(blk + slw + i));
            }
            asm volatile("cp.async.commit_group;");
            // Also completes the ring's groups in flight; its later waits
            // only ever need fewer pending.
            asm volatile("cp.async.wait_group 0;");
            __syncwarp();
            // Each lane packs its own column (row q of lane l is word q * 32 + l).
            if (vmode)
                for (u32 q = 0; q < rows / LANES; q++) symt[q * LANES] = pack_classic(symt[q * LANES], vmode, step, sbase);
            grows = blk + slw + lane;
            __syncwarp();
            // tab_off of a table-set chunk: per (plane, group), FROM_SET or
            // where the group's 32 lane entries (FROM_SET or a patch) start.
            const u32 hdr = tab_off[ch.tab_first + sg.plane * ch.groups + g];
            if (on && hdr != FROM_SET) {
                const u32 to = tab_off[ch.tab_first + hdr + lane];
                if (to != FROM_SET) ok &= build_lut(base + to, lutw, symt, prob_bits, nsym, kmax, vmode, step, sbase);
            }
        } else
#if BUILD_ONCE
        if (on && g == g0) {
#else
        if (on) {
#endif
            const u32 ti = raw && pl.shared ? 0u : c;
            ok &= build_lut(base + tab_off[ch.tab_first + sg.plane * C + ti], lutw, symt, prob_bits, nsym, kmax, vmode, step, sbase);
        } else {
            // Idle lanes still look up (the hot path has no branch): slot 0
            // must name a symbol entry inside the table.
            lutw[0] = 0;
        }
        if (!ch.external && g + 1 < g1 && c + 32u < C) {
            const u8* nt = base + tab_off[ch.tab_first + sg.plane * C + (raw && pl.shared ? 0u : c + 32u)];
            asm volatile("prefetch.global.L2 [%0];" :: "l"(nt));
        }
        __syncwarp();
        const u32 h = on ? c / ch.head_dim : 0u;
        const u32 d = on ? c - h * ch.head_dim : 0u;
        const i64 coff = (i64)h * dest.stride_head + (i64)d * esize + (raw ? (i64)pl.byte_shift : 0);
        if (!raw && pl.group == 3 && on) group_coef(scales, pl, c, step, sbase);
        u32 bi = t0 / dest.block_size, slot = t0 - bi * dest.block_size;
        // Block ids of 32 blocks from bw, one per lane (read with a shuffle).
        u32 bw = bi;
        u32 bwin = __ldg(block_ids + min(bi + lane, nblk - 1));
        if (FAST && fast) {
            // Hot path: a quantized plane with one step for the tensor. Per
            // round one slot byte and one symbol entry from shared memory,
            // the state update, the refill, the output; tokens a block at a
            // time, so the block test runs once per block. With packed
            // entries (V: 8-bit tables, 16-bit outputs) the entry's low half
            // is the output; otherwise it is dequantized here.
            auto rounds = [&](auto tv, auto tk, auto tx) {
                constexpr int V = decltype(tv)::value;   // 1: packed entries
                constexpr int K = decltype(tk)::value;   // 0 f16, 1 bf16, 2 f32, 3 fp8 e4m3 from the entry (V = 0); f16/bf16 alike with V
                constexpr int X = decltype(tx)::value;   // 1: table-set chunk (rare rows in global memory)
                const u8* slotb = (const u8*)wbase_smem + 4u * lane;
                const u8* ring8 = (const u8*)ring;
                u32 rb = 2u * (sh + pos);                 // ring position in bytes
                u32 rlim = (gnext - 3u) << 6;             // refill once rb reaches it
                u32 t = t0;
                while (t < t1) {
                    const u32 blk = __shfl_sync(FULL, bwin, bi - bw);
                    u8* p = layer_ptr + (i64)blk * dest.stride_block + (i64)slot * dest.stride_token + coff;
                    const bool wr = on && blk != SKIP_BLOCK;
                    const u32 nt = min(dest.block_size - slot, t1 - t);
                    for (u32 i = 0; i < nt; i++) {
                        const u32 xs = x & (V ? 0xFFu : mask);
                        // byte (xs & 3) of the lane's slot word xs >> 2
                        const u32 q = slotb[xs * 32u - (xs & 3u) * 31u];
                        u32 e;
                        if (X) {
                            if (q < kmax) e = symt[q * LANES];
                            else e = V || K == 3 ? rare_entry(grows, q, vmode, step, sbase) : __ldg(grows + q * LANES);
                        } else {
                            e = symt[q * LANES];
                        }
                        u32 xn;
                        if (V) {
                            const u32 xh = x >> 8;
                            xn = ((e >> 16) & 0xFFu) * xh + xh + xs - (e >> 24);
                        } else {
                            xn = ((e >> 8) & 0x7FFu) * (x >> prob_bits) + xs - (e >> 19);
                        }
                        const bool need = on && xn < RANS_L;
                        x = on ? xn : x;
                        const u32 bal = __ballot_sync(FULL, need);
                        if (need) x = (x << 16) | *(const u16*)(ring8 + ((rb + 2u * __popc(bal & lt_mask)) & (4 * RING_UNITS - 1)));
                        rb += 2u * __popc(bal);
                        if (rb >= rlim) {
                            refill();
                            rlim += 64u;
                            asm volatile("cp.async.wait_group 2;");
                            __syncwarp();
                        }
                        if (STORE && wr) {
                            if (V) {
                                *(u16*)p = (u16)e;
                            } else if (K == 3) {
                                *p = (u8)e;
                            } else {
                                const float v = __fadd_rn(__fmul_rn((float)(e & 0xFFu), step), sbase);
                                if (K == 2) {
                                    *(u32*)p = v == v ? __float_as_uint(v) : 0xFFC00000u;
                                } else {
                                    unsigned short hb;
                                    if (K == 1) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hb) : "f"(v));
                                    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hb) : "f"(v));
                                    *(u16*)p = v == v ? hb : (K == 1 ? 0xFFC0u : 0xFE00u);
                                }
                            }
                        }
                        p += dest.stride_token;
                    }
                    t += nt;
                    slot = 0;
                    bi++;
                    if (bi - bw >= 32u) {
                        bw = bi;
                        bwin = __ldg(block_ids + min(bi + lane, nblk - 1));
                    }
                }
                pos = rb / 2u - sh;
            };
            const bool ext = ch.external != 0;
            if (vmode == 3) {
                if (ext) rounds(IC<0>(), IC<3>(), IC<1>());
                else rounds(IC<0>(), IC<3>(), IC<0>());
            } else if (vmode) {
                if (ext) rounds(IC<1>(), IC<0>(), IC<1>());
                else rounds(IC<1>(), IC<0>(), IC<0>());
            } else if (esize == 4) {
                if (ext) rounds(IC<0>(), IC<2>(), IC<1>());
                else rounds(IC<0>(), IC<2>(), IC<0>());
            } else if (ch.is_bf16) {
                if (ext) rounds(IC<0>(), IC<1>(), IC<1>());
                else rounds(IC<0>(), IC<1>(), IC<0>());
            } else {
                if (ext) rounds(IC<0>(), IC<0>(), IC<1>());
                else rounds(IC<0>(), IC<0>(), IC<0>());
            }
            continue;
        }
        for (u32 t = t0; t < t1; t++) {
            if (bi - bw >= 32u) {
                bw = bi;
                bwin = __ldg(block_ids + min(bi + lane, nblk - 1));
            }
            const u32 blk = __shfl_sync(FULL, bwin, bi - bw);
            u32 sym = 0;
            bool need = false;
            if (on) {
                const u32 xs = x & mask;
                const u32 e = lookup(lutw, symt, grows, kmax, xs);
                sym = e & 0xFFu;
                x = ((e >> 8) & 0x7FFu) * (x >> prob_bits) + xs - (e >> 19);
                need = x < RANS_L;
            }
            const u32 bal = __ballot_sync(FULL, need);
            if (need) x = (x << 16) | ring16[(sh + pos + __popc(bal & lt_mask)) & (2 * RING_UNITS - 1)];
            pos += __popc(bal);
            // The oldest group is consumed: refill its slot 4 groups ahead.
            if (((sh + pos) >> 5) + 3 >= gnext) {
                refill();
                asm volatile("cp.async.wait_group 2;");
                __syncwarp();
            }
            if (on && STORE && blk != SKIP_BLOCK) {
                u8* p = layer_ptr + (i64)blk * dest.stride_block + (i64)slot * dest.stride_token + coff;
                if (raw) {
                    *p = (u8)sym;
                } else {
                    if (pl.group == 1) group_coef(scales, pl, t, step, sbase);
                    else if (pl.group == 2) group_coef(scales, pl, t * ch.heads + h, step, sbase);
                    const u32 bits = dequant_bits(sym, step, sbase, esize, ch.is_bf16);
                    if (esize == 4) *(u32*)p = bits;
                    else if (esize == 1) *p = (u8)bits;
                    else *(u16*)p = (u16)bits;
                }
            }
            if (++slot == dest.block_size) { slot = 0; bi++; }
        }
    }
    u32 err = ok ? 0u : ERR_TABLE;
    if (pos != nwords) err |= ERR_WORDS;
    if (lane < L && x != RANS_L) err |= ERR_STATE;
    err = __reduce_or_sync(FULL, err);
#if !NO_ERRORS
    if (lane == 0 && err) atomicOr(errors + ch.index, err);
#endif
}

// Exact tokens (FORMAT.md 6.3): copy the stored rows over the decoded ones.
// Launched after cg_decode on the same stream. grid.y = chunk; one thread per
// element of (tensor, exact token, channel), for tensors t_lo..t_hi (the
// host launches one layer at a time for per-layer events).
extern "C" __global__ void cg_exact(const u8* __restrict__ region, const Chunk* __restrict__ chunks, Dest dest, u32 t_lo, u32 t_hi)
{
    const Chunk ch = chunks[blockIdx.y];
    const u32 n = ch.exact_n;
    const u32 C = ch.channels;
    const u32 th = min(t_hi, ch.tensors);
    if (t_lo >= th) return;
    const u64 work = (u64)(th - t_lo) * n * C;
    const u8* base = region + ch.bytes;
    const u32 esize = ch.dtype_size;
    const u32* block_ids = (const u32*)dest.block_ids + ((const u32*)dest.block_first)[ch.index];
    for (u64 w = (u64)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += (u64)gridDim.x * blockDim.x) {
        const u32 c = (u32)(w % C);
        const u64 ikl = w / C;
        const u32 k = (u32)(ikl % n), i = t_lo + (u32)(ikl / n);
        const u64 ik = (u64)i * n + k;              // tensor * n + k: the row's index in the rows part
        const u32 t = ld32u(base + ch.exact_idx_off + 4 * k);
        const u32 layer = i / ch.streams, stream = i - layer * ch.streams;
        const u32 h = c / ch.head_dim, d = c - h * ch.head_dim;
        const u32 bi = t / dest.block_size, slot = t - bi * dest.block_size;
        const u32 blk = block_ids[bi];
        if (blk == SKIP_BLOCK) continue;
        u8* p = (u8*)(((const u64*)dest.layer_base)[layer]) + (i64)layer * dest.stride_layer + (i64)stream * dest.stride_kv
              + (i64)blk * dest.stride_block + (i64)slot * dest.stride_token + (i64)h * dest.stride_head + (i64)d * esize;
        const u8* src = base + ch.exact_rows_off + (ik * C + c) * esize;
        if (esize == 4) *(u32*)p = ld32u(src);
        else if (esize == 1) *p = (u8)ld8(src);
        else *(u16*)p = (u16)ld16u(src);
    }
}
