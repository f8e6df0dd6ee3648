// CacheGen encode on the GPU: gather from an engine's paged KV blocks,
// per-row statistics, exact (outlier) token selection, per-tensor steps,
// quantization + per-channel histograms + compact tables, rANS per segment
// (one warp, one lane per channel), and the container's sections compacted on
// the device. The host writes only the 64-byte header and the two XXH3
// hashes (table_id and the trailing checksum). src/gpu/encode.rs builds the
// descriptors (its #[repr(C)] structs mirror the ones here).
//
// Bit-exactness with src/codec (encode.rs, quant.rs, table.rs, rans.rs):
// every floating-point operation is an explicit round-to-nearest intrinsic
// (__fadd_rn, __dmul_rn, ...) so nothing is contracted into an FMA, and the
// reductions run in the CPU's order (see each kernel). No includes: NVRTC
// runs without the CUDA headers.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define FULL 0xffffffffu
#define RANS_L 65536u
#define TAB_STRIDE 132   // bytes per compact table slot: 2 + ceil(255 / 2) rounded up

// Error bits, OR-ed into info[chunk * 8 + 0].
#define ERR_NONFINITE 1u  // NaN or infinity in the input, or a step that overflows (codec::Error::NonFinite)
#define ERR_TABLE 2u      // normalisation did not converge (cannot happen for valid tables)
#define ERR_FALLBACK 4u   // a patch has too many symbols for the table set's precision:
                          // the CPU encoder codes such a chunk with embedded tables instead
#define SET_STRIDE 260    // u16 per table of an uploaded table set: lo, n, then n + 1 starts

// Same for every chunk of a call.
struct Geo {
    u32 layers, streams, heads, head_dim;
    u32 channels, tensors, groups, dtype;   // dtype: 0 f16, 1 bf16, 2 f32
    u32 es, block_size, protect, base_pb;
    u32 max, nchunks, vec16, ext;        // vec16: rows may be read 16 bytes at a time (host-checked alignment);
                                         // ext: code with the table set at `set` (base_pb is its precision)
    i64 stride_block, stride_kv, stride_token, stride_head, stride_layer;
    u64 layer_base;   // device u64[layers]
    u64 alpha;        // device f32[tensors]: the Rms rule's alpha per tensor
    u64 thresholds;   // device f64[14]: smallest q with round(2 log2 q) >= k (host libm)
    u64 set;          // device u16[tensors * channels * SET_STRIDE] when ext: the set's tables
};

// One chunk (one container).
struct EChunk {
    u64 block_ids;    // device u32[]: the chunk's blocks, in token order
    u64 out;          // byte offset of the chunk's output region in `out`
    u64 words;        // offset (in u16) of the chunk's word scratch
    u64 sym;          // byte offset of the chunk's symbols [plane][token][channel]
    u32 tokens, seg_tokens, seg_groups, token_blocks;
    u32 spp, seg_first, row_first, tok_first;
    u32 seg_words, segs, pad0, pad1;
};

struct SegDesc { u32 chunk, plane, k; };

struct Bufs {
    const EChunk* chunks;
    const SegDesc* segs;
    u32* info;        // 8 per chunk: err, max non-zero symbols, exact count, prob_bits, tables_len, payload_len, total, patches
    double* rowsq;    // per (tensor, token) row: the 8-lane f32 sum of squares, summed in f64 (quant::group_params_with)
    double* rownorm;  // per row: sqrt of the sequential f64 sum of squares (quant::outlier_tokens)
    float* rowabs;    // per row: max |v|
    double* score;    // per token
    u8* isx;          // per token: stored exactly
    u32* exact_idx;   // per token slot (tok_first + j)
    float* step;      // per (chunk, tensor)
    u8* sym;
    u8* codes;        // per table TAB_STRIDE bytes: the compact table
    u32* tablen;      // per table: its bytes in the table section (with a table set: 0 unless patched)
    u32* taboff;      // per table: offset in the table section
    u16* words;
    u32* states;      // per segment 32
    u32* seglen;      // per segment: bytes
    u32* segn;        // per segment: words
    u32* segoff;      // per segment: offset in the payload
    u8* out;
};

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float load_elem(const Geo& g, const u8* p) {
    if (g.es == 4) return *(const float*)p;
    u16 b = *(const u16*)p;
    if (g.dtype == 1) return __uint_as_float((u32)b << 16);
    return f16_to_f32(b);
}

__device__ __forceinline__ bool finite_f(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

// Address of element 0 of token t of tensor i (layout.rs's formula).
__device__ __forceinline__ const u8* row_addr(const Geo& g, const EChunk& ch, u32 i, u32 t) {
    u32 l = i / g.streams, s = i % g.streams;
    const u64* base = (const u64*)g.layer_base;
    const u32* blocks = (const u32*)ch.block_ids;
    u64 blk = blocks[t / g.block_size];
    u64 slot = t % g.block_size;
    i64 a = (i64)base[l] + (i64)l * g.stride_layer + (i64)blk * g.stride_block + (i64)s * g.stride_kv + (i64)slot * g.stride_token;
    return (const u8*)a;
}

__device__ __forceinline__ const u8* elem_addr(const Geo& g, const u8* row, u32 c) {
    u32 h = c / g.head_dim, d = c - h * g.head_dim;
    return row + (i64)h * g.stride_head + (i64)d * g.es;
}

// quant::det_ln, operation for operation.
__device__ double det_ln(double x) {
    u64 bits = (u64)__double_as_longlong(x);
    i64 e = 0;
    if (((bits >> 52) & 0x7ff) == 0) {
        bits = (u64)__double_as_longlong(__dmul_rn(x, 18014398509481984.0));
        e = -54;
    }
    e += (i64)((bits >> 52) & 0x7ff) - 1023;
    double m = __longlong_as_double((long long)((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull));
    if (m > 1.4142135623730951) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    double s = __ddiv_rn(__dadd_rn(m, -1.0), __dadd_rn(m, 1.0));
    double s2 = __dmul_rn(s, s);
    double p = __ddiv_rn(1.0, 25.0);
    for (int k = 11; k >= 0; k--) p = __dadd_rn(__dmul_rn(p, s2), __ddiv_rn(1.0, (double)(2 * k + 1)));
    return __dadd_rn(__dmul_rn((double)e, 0.6931471805599453), __dmul_rn(__dmul_rn(2.0, s), p));
}

// half::bf16::from_f32 (round to nearest even; NaN kept quiet).
__device__ __forceinline__ u32 bf16_bits(float v) {
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return ((x >> 16) | 0x40u) & 0xffffu;
    u32 r = x >> 16;
    if ((x & 0x8000u) != 0 && (x & (3u * 0x8000u - 1u)) != 0) r += 1;
    return r & 0xffffu;
}

// quant::bf16_round_up.
__device__ float bf16_round_up(float v) {
    u32 b = bf16_bits(v);
    float bv = __uint_as_float(b << 16);
    if (bv >= v) return bv;
    u32 up = (b & 0x8000u) == 0 ? b + 1 : (b == 0x8000u ? 1u : b - 1);
    return __uint_as_float((up & 0xffffu) << 16);
}

// 1. Per row (chunk, tensor, token): the two sums of squares the CPU makes
// and max |v|. One thread per row, elements in channel order.
extern "C" __global__ void cg_enc_rows(Geo g, Bufs b) {
    const EChunk ch = b.chunks[blockIdx.y];
    u32 r = blockIdx.x * blockDim.x + threadIdx.x;
    u32 T = ch.tokens;
    if (r >= g.tensors * T) return;
    u32 i = r / T, t = r % T;
    const u8* row = row_addr(g, ch, i, t);
    double acc = 0.0;
    float ln[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float amax = 0.f;
    bool bad = false;
    u32 C = g.channels;
    if (g.vec16) {
        // head_dim % 8 == 0 and 16-byte aligned rows: 8 elements per step,
        // element k of a step is lane c % 8 == k (same order as below).
        for (u32 h = 0; h < g.heads; h++) {
            const u8* hp = row + (i64)h * g.stride_head;
            for (u32 d0 = 0; d0 < g.head_dim; d0 += 8) {
                float v[8];
                if (g.es == 2) {
                    uint4 q = *(const uint4*)(hp + 2 * d0);
                    u32 wv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        u16 lo16 = (u16)(wv[k] & 0xffff), hi16 = (u16)(wv[k] >> 16);
                        if (g.dtype == 1) {
                            v[2 * k] = __uint_as_float((u32)lo16 << 16);
                            v[2 * k + 1] = __uint_as_float((u32)hi16 << 16);
                        } else {
                            v[2 * k] = f16_to_f32(lo16);
                            v[2 * k + 1] = f16_to_f32(hi16);
                        }
                    }
                } else {
                    float4 a = *(const float4*)(hp + 4 * d0);
                    float4 b2 = *(const float4*)(hp + 4 * d0 + 16);
                    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
                    v[4] = b2.x; v[5] = b2.y; v[6] = b2.z; v[7] = b2.w;
                }
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    bad |= !finite_f(v[k]);
                    double dv = (double)v[k];
                    acc = __dadd_rn(acc, __dmul_rn(dv, dv));
                    ln[k] = __fadd_rn(ln[k], __fmul_rn(v[k], v[k]));
                    amax = fmaxf(amax, fabsf(v[k]));
                }
            }
        }
    } else
    for (u32 c0 = 0; c0 < C; c0 += 8) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            u32 c = c0 + k;
            if (c < C) {
                float v = load_elem(g, elem_addr(g, row, c));
                bad |= !finite_f(v);
                double dv = (double)v;
                acc = __dadd_rn(acc, __dmul_rn(dv, dv));
                ln[k] = __fadd_rn(ln[k], __fmul_rn(v, v));
                amax = fmaxf(amax, fabsf(v));
            }
        }
    }
    double s8 = 0.0;
#pragma unroll
    for (int k = 0; k < 8; k++) s8 = __dadd_rn(s8, (double)ln[k]);
    u32 ri = ch.row_first + r;
    b.rowsq[ri] = s8;
    b.rownorm[ri] = __dsqrt_rn(acc);
    b.rowabs[ri] = amax;
    if (bad) atomicOr(&b.info[blockIdx.y * 8], ERR_NONFINITE);
}

// 2. Per (chunk, tensor), a block each: the median of the tensor's row
// norms, found by rank counting (O(tokens^2): meant for chunks of a few
// hundred to a few thousand tokens), then each token's outlier term
// |ln((norm + 1e-6) / (median + 1e-6))| written over its norm.
extern "C" __global__ void cg_enc_medians(Geo g, Bufs b) {
    const u32 i = blockIdx.x, ci = blockIdx.y;
    const EChunk ch = b.chunks[ci];
    const u32 T = ch.tokens;
    if (!g.protect || T < 8) return;
    double* nrm = b.rownorm + ch.row_first + (u64)i * T;
    __shared__ double med;
    const u32 kmed = T / 2;
    if (threadIdx.x == 0) med = 0.0;
    __syncthreads();
    for (u32 t = threadIdx.x; t < T; t += blockDim.x) {
        double x = nrm[t];
        u32 less = 0, eq = 0;
        for (u32 u = 0; u < T; u++) {
            double y = nrm[u];
            less += y < x;
            eq += y == x;
        }
        if (less <= kmed && kmed < less + eq) med = x;
    }
    __syncthreads();   // every norm is read before any is overwritten
    const double md = __dadd_rn(med, 1e-6);
    for (u32 t = threadIdx.x; t < T; t += blockDim.x)
        nrm[t] = fabs(det_ln(__ddiv_rn(__dadd_rn(nrm[t], 1e-6), md)));
}

// 3. Exact tokens of a chunk (quant::outlier_tokens), a block per chunk:
// each token's score is its terms summed in tensor order, then ranking.
extern "C" __global__ void cg_enc_outliers(Geo g, Bufs b) {
    const u32 ci = blockIdx.x;
    const EChunk ch = b.chunks[ci];
    const u32 T = ch.tokens;
    double* score = b.score + ch.tok_first;
    u8* isx = b.isx + ch.tok_first;
    if (!g.protect || T < 8) {
        for (u32 t = threadIdx.x; t < T; t += blockDim.x) isx[t] = 0;
        if (threadIdx.x == 0) b.info[ci * 8 + 2] = 0;
        return;
    }
    const double* term = b.rownorm + ch.row_first;
    for (u32 t = threadIdx.x; t < T; t += blockDim.x) {
        double sc = 0.0;
        for (u32 i = 0; i < g.tensors; i++) sc = __dadd_rn(sc, term[(u64)i * T + t]);
        score[t] = sc;
    }
    __syncthreads();
    const double nt = (double)g.tensors;
    const u32 limit = T / 64 > 1 ? T / 64 : 1;
    for (u32 t = threadIdx.x; t < T; t += blockDim.x) {
        double st = score[t];
        u8 pick = 0;
        if (__ddiv_rn(st, nt) > 1.0) {
            u32 rank = 0;
            for (u32 u = 0; u < T; u++) {
                double su = score[u];
                if (__ddiv_rn(su, nt) > 1.0 && (su > st || (su == st && u < t))) rank++;
            }
            pick = rank < limit;
        }
        isx[t] = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 n = 0;
        for (u32 t = 0; t < T; t++)
            if (isx[t]) b.exact_idx[ch.tok_first + n++] = t;
        b.info[ci * 8 + 2] = n;
    }
}

// 4. Step of each (chunk, tensor): StepRule::Rms over the tokens not stored
// exactly, sums in token order as quant::group_params_with.
extern "C" __global__ void cg_enc_steps(Geo g, Bufs b) {
    const u32 ci = blockIdx.y;
    const EChunk ch = b.chunks[ci];
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= g.tensors) return;
    const u32 T = ch.tokens;
    double sq = 0.0;
    float amax = 0.f;
    u64 cnt = 0;
    for (u32 t = 0; t < T; t++) {
        if (b.isx[ch.tok_first + t]) continue;
        u32 ri = ch.row_first + i * T + t;
        sq = __dadd_rn(sq, b.rowsq[ri]);
        amax = fmaxf(amax, b.rowabs[ri]);
        cnt += g.channels;
    }
    float st = 0.f;
    if (cnt != 0) {
        float rms = __double2float_rn(__dsqrt_rn(__ddiv_rn(sq, (double)cnt)));
        float a = __fmul_rn(((const float*)g.alpha)[i], rms);
        float m = fmaxf(a, __fdiv_rn(amax, (float)g.max));
        st = bf16_round_up(m);
        if (!finite_f(st)) atomicOr(&b.info[ci * 8], ERR_NONFINITE);
    }
    b.step[ci * g.tensors + i] = st;
}

// table::codes_from_histogram's 4-bit code of count x against the maximum
// mx: 15 - round(2 log2(mx / x)), clamped to 1..15. The rounding of the
// host's log2 is reproduced by comparing mx / x with the thresholds the host
// found with that very function.
__device__ __forceinline__ u32 code_of(u32 x, u32 mx, const double* th) {
    if (x == 0) return 0;
    double q = __ddiv_rn((double)mx, (double)x);
    u32 ho = 0;
#pragma unroll
    for (int k = 0; k < 14; k++) ho += q >= th[k];
    return 15 - ho;
}

// 5. Quantize (quant::quantize_value, symmetric), histogram per channel and
// compact table per (plane, channel). Block = (channel group, plane, chunk).
extern "C" __global__ void cg_enc_quant(Geo g, Bufs b) {
    __shared__ u32 hist[32 * 257];
    const u32 gi = blockIdx.x, i = blockIdx.y, ci = blockIdx.z;
    const EChunk ch = b.chunks[ci];
    const u32 T = ch.tokens, C = g.channels;
    for (u32 k = threadIdx.x; k < 32 * 257; k += blockDim.x) hist[k] = 0;
    __syncthreads();
    const u32 c0 = 32 * gi;
    const u32 active = C - c0 < 32 ? C - c0 : 32;
    const float st = b.step[ci * g.tensors + i];
    const float mx = (float)g.max, top = 2.f * (float)g.max;
    u8* sym = b.sym + ch.sym + (u64)i * T * C;
    // Each thread keeps one channel: its column offset and the tensor's
    // base are computed once; per token only the block lookup remains.
    const u32 lane = threadIdx.x & 31;
    const u32 c = c0 + lane;
    const u32 l = i / g.streams, sidx = i % g.streams;
    const i64 tbase = (i64)((const u64*)g.layer_base)[l] + (i64)l * g.stride_layer + (i64)sidx * g.stride_kv;
    const i64 col = (i64)(c / g.head_dim) * g.stride_head + (i64)(c % g.head_dim) * g.es;
    const u32* blocks = (const u32*)ch.block_ids;
    for (u32 t = threadIdx.x >> 5; t < T; t += blockDim.x >> 5) {
        if (lane >= active) break;
        u32 s;
        if (b.isx[ch.tok_first + t] || st == 0.f) {
            s = g.max;
        } else {
            const u8* p = (const u8*)(tbase + (i64)blocks[t / g.block_size] * g.stride_block + (i64)(t % g.block_size) * g.stride_token + col);
            float v = load_elem(g, p);
            float q = rintf(__fadd_rn(__fdiv_rn(v, st), mx));
            q = fminf(fmaxf(q, 0.f), top);
            s = (u32)q;
        }
        sym[(u64)t * C + c] = (u8)s;
        atomicAdd(&hist[lane * 257 + s], 1u);
    }
    __syncthreads();
    if (threadIdx.x < active) {
        const u32 lane = threadIdx.x;
        const u32* h = hist + lane * 257;
        const u32 nsym = 2 * g.max + 1;
        int first = -1, last = 0;
        u32 m = 0, nz = 0;
        for (u32 s = 0; s < nsym; s++) {
            u32 x = h[s];
            if (x) {
                if (first < 0) first = s;
                last = s;
                m = x > m ? x : m;
                nz++;
            }
        }
        const u32 tab = (ci * g.tensors + i) * C + c0 + lane;
        u8* dst = b.codes + (u64)tab * TAB_STRIDE;
        const double* th = (const double*)g.thresholds;
        // With a table set, a channel keeps the set's table unless a symbol it
        // uses has no frequency there; then its own compact table is a patch
        // (encode.rs, Tables::External).
        bool patched = true;
        if (g.ext) {
            const u16* st = (const u16*)g.set + (u64)(i * C + c0 + lane) * SET_STRIDE;
            const u32 slo = st[0], sn = st[1];
            // Symbols used lie in [first, last]: outside the set's support,
            // or inside it at frequency 0 (the start does not advance).
            patched = first >= 0 && ((u32)first < slo || (u32)last >= slo + sn);
            for (int s = first; s >= 0 && s <= last && !patched; s++)
                patched = h[s] && st[3 + s - slo] == st[2 + s - slo];
        }
        if (first < 0) {
            // Empty histogram (cannot happen: every channel has tokens): symbol 0, code 15.
            dst[0] = 0; dst[1] = 0; dst[2] = 15 << 4;
            b.tablen[tab] = 3;
            nz = 1;
        } else {
            u32 n = last - first + 1;
            dst[0] = (u8)first;
            dst[1] = (u8)(n - 1);
            for (u32 j = 0; j < n; j += 2) {
                u32 a = code_of(h[first + j], m, th);
                u32 c = j + 1 < n ? code_of(h[first + j + 1], m, th) : 0;
                dst[2 + j / 2] = (u8)(a << 4 | c);
            }
            b.tablen[tab] = 2 + (n + 1) / 2;
        }
        atomicMax(&b.info[ci * 8 + 1], nz);
        if (g.ext) {
            // A patch is its u32 table index, then the compact table.
            b.tablen[tab] = patched ? 4 + b.tablen[tab] : 0;
            if (patched) {
                atomicAdd(&b.info[ci * 8 + 7], 1u);
                if (nz > (1u << g.base_pb) / 2) atomicOr(&b.info[ci * 8], ERR_FALLBACK);
            }
        }
    }
}

__constant__ u32 WEIGHT_OF_CODE[16] = {0, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256};

// Chunk's precision: the level's, widened so every table fits (encode.rs).
__device__ __forceinline__ u32 chunk_prob_bits(const Geo& g, const Bufs& b, u32 ci) {
    if (g.ext) return g.base_pb;   // the table set's
    u32 nz = b.info[ci * 8 + 1];
    u32 pb = 8;
    while ((1u << pb) / 2 < nz && pb < 10) pb++;
    return pb > g.base_pb ? pb : g.base_pb;
}

// 6. rANS: one warp per segment, one lane per channel, the CPU's order
// (rans::encode_segment) backwards: groups, tokens, lanes descending. A
// round's flushed words go in descending lane order (ballot + popcount).
// Words are written from the end of the segment's scratch slot down, so
// they end up in decode order. Each lane's table (freq | start << 16 per
// symbol) is normalised from the compact codes exactly as table::normalize.
extern "C" __global__ void __launch_bounds__(32) cg_enc_rans(Geo g, Bufs b) {
    // Per lane: the start of each symbol (j = symbol - lo), and at j = n the
    // total, so freq = start[j + 1] - start[j]; u16, lane-interleaved.
    __shared__ u16 tab[257 * 32];
    const SegDesc sd = b.segs[blockIdx.x];
    const u32 ci = sd.chunk;
    const EChunk ch = b.chunks[ci];
    const u32 lane = threadIdx.x;
    const u32 pb = chunk_prob_bits(g, b, ci);
    if (blockIdx.x == ch.seg_first && lane == 0) b.info[ci * 8 + 3] = pb;
    const u32 T = ch.tokens, C = g.channels;
    const u32 gb = sd.k / ch.token_blocks, tk = sd.k % ch.token_blocks;
    const u32 g0 = gb * ch.seg_groups;
    const u32 g1 = g0 + ch.seg_groups < g.groups ? g0 + ch.seg_groups : g.groups;
    const u32 t0 = tk * ch.seg_tokens;
    const u32 t1 = t0 + ch.seg_tokens < T ? t0 + ch.seg_tokens : T;
    const u32 lanes = C - 32 * g0 < 32 ? C - 32 * g0 : 32;
    const u32 maxw = ch.seg_words;
    const u32 local = sd.plane * ch.spp + sd.k;
    u16* w = b.words + ch.words + (u64)local * maxw;
    const u8* sp = b.sym + ch.sym + (u64)sd.plane * T * C;
    const u32 total = 1u << pb;
    u32 x = RANS_L, n = 0;
    bool err = false;
    for (int gg = (int)g1 - 1; gg >= (int)g0; gg--) {
        const u32 c0 = 32 * (u32)gg;
        const u32 active = C - c0 < 32 ? C - c0 : 32;
        const u32 c = c0 + lane;
        u32 lo = 0;
        __syncwarp();
        const u64 ti = (u64)(ci * g.tensors + sd.plane) * C + c;
        if (lane < active && g.ext && b.tablen[ti] == 0) {
            // The set's table: its starts as uploaded.
            const u16* st = (const u16*)g.set + (u64)(sd.plane * C + c) * SET_STRIDE;
            lo = st[0];
            const u32 nn = st[1];
            for (u32 j = 0; j <= nn; j++) tab[j * 32 + lane] = st[2 + j];
        } else if (lane < active) {
            const u8* tb = b.codes + ti * TAB_STRIDE;
            lo = tb[0];
            const u32 nn = tb[1] + 1;
            u64 sum = 0;
            for (u32 j = 0; j < nn; j++) sum += WEIGHT_OF_CODE[(j & 1) ? tb[2 + j / 2] & 15 : tb[2 + j / 2] >> 4];
            u32 assigned = 0;
            for (u32 j = 0; j < nn; j++) {
                u32 wt = WEIGHT_OF_CODE[(j & 1) ? tb[2 + j / 2] & 15 : tb[2 + j / 2] >> 4];
                u32 f = 0;
                if (wt) {
                    f = (u32)(((u64)wt * total) / sum);
                    f = f > 1 ? f : 1;
                }
                tab[j * 32 + lane] = (u16)f;
                assigned += f;
            }
            for (int guard = 0; assigned != total; guard++) {
                if (guard > 600) { err = true; break; }
                u32 imax = 0, fmax = 0;
                for (u32 j = 0; j < nn; j++) {
                    u32 f = tab[j * 32 + lane];
                    if (f > fmax) { imax = j; fmax = f; }
                }
                if (assigned < total) {
                    tab[imax * 32 + lane] = (u16)(tab[imax * 32 + lane] + (total - assigned));
                    assigned = total;
                } else {
                    u32 take = assigned - total < fmax - 1 ? assigned - total : fmax - 1;
                    tab[imax * 32 + lane] = (u16)(tab[imax * 32 + lane] - take);
                    assigned -= take;
                }
            }
            u32 start = 0;
            for (u32 j = 0; j < nn; j++) {
                u32 f = tab[j * 32 + lane];
                tab[j * 32 + lane] = (u16)start;
                start += f;
            }
            tab[nn * 32 + lane] = (u16)start;
        }
        __syncwarp();
        // Symbols are loaded 8 tokens ahead of their use so the loads overlap.
        for (int tb8 = (int)t1 - 1; tb8 >= (int)t0; tb8 -= 8) {
            u32 sv[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                int t = tb8 - k;
                sv[k] = (lane < active && t >= (int)t0) ? sp[(u64)t * C + c] : lo;
            }
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (tb8 - k < (int)t0) break;   // warp-uniform
                u32 f = 1, st = 0;
                bool fl = false;
                if (lane < active) {
                    u32 j = (sv[k] - lo) & 255;
                    st = tab[j * 32 + lane];
                    f = (u32)tab[(j + 1) * 32 + lane] - st;
                    fl = (x >> (32 - pb)) >= f;
                }
                const u32 m = __ballot_sync(FULL, fl);
                if (fl) {
                    u32 idx = n + __popc(m & ~((2u << lane) - 1u));
                    w[maxw - 1 - idx] = (u16)x;
                    x >>= 16;
                }
                if (lane < active) x = ((x / f) << pb) + (x % f) + st;
                n += __popc(m);
            }
        }
    }
    b.states[(u64)blockIdx.x * 32 + lane] = x;
    if (__any_sync(FULL, err) && lane == 0) atomicOr(&b.info[ci * 8], ERR_TABLE);
    if (lane == 0) {
        b.seglen[blockIdx.x] = 4 * lanes + 2 * n;
        b.segn[blockIdx.x] = n;
    }
}

// Exclusive scan of n values into `off`, returning the total (one block;
// blockDim.x a multiple of 32). Warp w scans the w-th contiguous slice, 32
// values a step, so every load and store is coalesced (a contiguous range
// per thread made each warp load touch 32 lines: 0.15 ms per launch).
__device__ u32 block_scan(const u32* len, u32* off, u32 n) {
    __shared__ u32 wsum[32];
    __shared__ u32 total;
    const u32 lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const u32 slice = (n + nw * 32 - 1) / (nw * 32) * 32;
    const u32 a = w * slice < n ? w * slice : n;
    const u32 e = a + slice < n ? a + slice : n;
    u32 s = 0;
    for (u32 k = a + lane; k < e; k += 32) s += len[k];
    for (int d = 16; d; d >>= 1) s += __shfl_xor_sync(FULL, s, d);
    if (lane == 0) wsum[w] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 acc = 0;
        for (u32 k = 0; k < nw; k++) {
            u32 v = wsum[k];
            wsum[k] = acc;
            acc += v;
        }
        total = acc;
    }
    __syncthreads();
    u32 carry = wsum[w];
    for (u32 k0 = a; k0 < e; k0 += 32) {   // warp-uniform bounds
        const u32 k = k0 + lane;
        const u32 v = k < e ? len[k] : 0;
        u32 x = v;
        for (int d = 1; d < 32; d <<= 1) {
            u32 y = __shfl_up_sync(FULL, x, d);
            if (lane >= (u32)d) x += y;
        }
        if (k < e) off[k] = carry + x - v;
        carry += __shfl_sync(FULL, x, 31);
    }
    const u32 t = total;
    __syncthreads();
    return t;
}

struct Offs { u32 E, desc, scales, exact, rows, tables, ends, payload, total, tables_len, payload_len; };

__device__ __forceinline__ Offs offsets(const Geo& g, const Bufs& b, u32 ci, const EChunk& ch) {
    Offs o;
    o.E = b.info[ci * 8 + 2];
    o.tables_len = b.info[ci * 8 + 4];
    o.payload_len = b.info[ci * 8 + 5];
    o.desc = 64;
    o.scales = o.desc + 4 * g.tensors;
    o.exact = o.scales + 2 * g.tensors;
    o.rows = o.exact + 4 * o.E;
    o.tables = o.rows + o.E * g.tensors * g.channels * g.es;
    o.ends = o.tables + o.tables_len;
    o.payload = o.ends + 4 * ch.segs;
    o.total = o.payload + o.payload_len;
    return o;
}

// 7. Section sizes and offsets of each chunk (one block of 1024 per chunk).
extern "C" __global__ void cg_enc_sizes(Geo g, Bufs b) {
    const u32 ci = blockIdx.x;
    const EChunk ch = b.chunks[ci];
    const u32 nt = g.tensors * g.channels;
    u32 tl = block_scan(b.tablen + (u64)ci * nt, b.taboff + (u64)ci * nt, nt);
    if (g.ext) tl += 4;   // the patch count leads the section
    u32 pl = block_scan(b.seglen + ch.seg_first, b.segoff + ch.seg_first, ch.segs);
    if (threadIdx.x == 0) {
        b.info[ci * 8 + 4] = tl;
        b.info[ci * 8 + 5] = pl;
        Offs o = offsets(g, b, ci, ch);
        b.info[ci * 8 + 6] = o.total;
    }
}

// 8. Everything but the header and the payload: plane descriptors, scales,
// exact token indices and rows (raw input bytes), tables, segment ends.
extern "C" __global__ void cg_enc_sections(Geo g, Bufs b) {
    const u32 ci = blockIdx.y;
    const EChunk ch = b.chunks[ci];
    const Offs o = offsets(g, b, ci, ch);
    u8* out = b.out + ch.out;
    const u32 P = g.tensors, C = g.channels;
    const u32 stride = gridDim.x * blockDim.x;
    const u32 tid = blockIdx.x * blockDim.x + threadIdx.x;
    // Plane descriptors: quantized, per-tensor group (code 4), symmetric, nsym - 1.
    for (u32 k = tid; k < P; k += stride) {
        out[o.desc + 4 * k] = 1;
        out[o.desc + 4 * k + 1] = 4;
        out[o.desc + 4 * k + 2] = 0;
        out[o.desc + 4 * k + 3] = (u8)(2 * g.max);
        u32 bits = bf16_bits(b.step[ci * P + k]);
        out[o.scales + 2 * k] = (u8)bits;
        out[o.scales + 2 * k + 1] = (u8)(bits >> 8);
    }
    for (u32 k = tid; k < o.E; k += stride) {
        u32 t = b.exact_idx[ch.tok_first + k];
        for (int j = 0; j < 4; j++) out[o.exact + 4 * k + j] = (u8)(t >> (8 * j));
    }
    // Exact rows: for each tensor, for each exact token, the row's raw bytes.
    const u32 nel = o.E * P * C;
    for (u32 k = tid; k < nel; k += stride) {
        u32 c = k % C, j = (k / C) % o.E, i = k / (C * o.E);
        const u8* src = elem_addr(g, row_addr(g, ch, i, b.exact_idx[ch.tok_first + j]), c);
        u8* dst = out + o.rows + (u64)k * g.es;
        for (u32 e = 0; e < g.es; e++) dst[e] = src[e];
    }
    // Tables: every table's compact bytes; with a table set, the patch
    // count, then (table index, compact bytes) for each patched table, in
    // index order (k = plane * C + channel is the index).
    const u32 nt = P * C;
    const u32 lead = g.ext ? 4 : 0;
    if (g.ext && tid == 0) {
        const u32 count = b.info[ci * 8 + 7];
        for (int j = 0; j < 4; j++) out[o.tables + j] = (u8)(count >> (8 * j));
    }
    for (u32 k = tid; k < nt; k += stride) {
        u64 tab = (u64)ci * nt + k;
        const u8* src = b.codes + tab * TAB_STRIDE;
        u8* dst = out + o.tables + lead + b.taboff[tab];
        u32 len = b.tablen[tab];
        if (len && g.ext) {
            for (int j = 0; j < 4; j++) dst[j] = (u8)(k >> (8 * j));
            dst += 4;
            len -= 4;
        }
        for (u32 e = 0; e < len; e++) dst[e] = src[e];
    }
    for (u32 k = tid; k < ch.segs; k += stride) {
        u32 s = ch.seg_first + k;
        u32 end = b.segoff[s] + b.seglen[s];
        for (int j = 0; j < 4; j++) out[o.ends + 4 * k + j] = (u8)(end >> (8 * j));
    }
}

// 9. Payload: each segment's lane states, then its words, at its offset.
extern "C" __global__ void cg_enc_payload(Geo g, Bufs b) {
    const u32 s = blockIdx.x;
    const SegDesc sd = b.segs[s];
    const EChunk ch = b.chunks[sd.chunk];
    const Offs o = offsets(g, b, sd.chunk, ch);
    const u32 n = b.segn[s];
    const u32 len = b.seglen[s];
    const u32 sb = len - 2 * n;
    u8* dst = b.out + ch.out + o.payload + b.segoff[s];
    const u16* w = b.words + ch.words + (u64)(sd.plane * ch.spp + sd.k) * ch.seg_words + (ch.seg_words - n);
    const u32* st = b.states + (u64)s * 32;
    for (u32 k = threadIdx.x; k < len; k += blockDim.x) {
        u32 v;
        if (k < sb) v = st[k / 4] >> (8 * (k & 3));
        else {
            u32 j = k - sb;
            v = (u32)w[j / 2] >> (8 * (j & 1));
        }
        dst[k] = (u8)v;
    }
}
