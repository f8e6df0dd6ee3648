// Gather: an engine's paged KV blocks to dense chunk tensors, the inverse of
// the decoder's scatter (src/layout.rs `KvLayout::gather` on the device).
// Used by stores from device memory: one launch packs every chunk, then one
// copy brings them to the host encoder. src/gpu/gather.rs mirrors `Src`.
//
// Compiled at run time with NVRTC, no includes (cuda/README.md).

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

struct Src {
    u64 layer_base;       // device address of u64[layers]: each layer's base
    u64 block_ids;        // device address of u32[chunks * blocks_per_chunk]
    i64 stride_block, stride_kv, stride_token, stride_head, stride_layer;
    u32 block_size, blocks_per_chunk;
    u32 tokens, heads, head_dim, streams;
    u32 layers, elem, unit, chunks;  // element bytes; bytes moved per thread step (divides head_dim * elem)
};

// Output: chunk-major, then tensor (layer * streams + stream), then
// [tokens, heads, head_dim] row-major: KvTensors' layout, chunks back to back.
template <typename T>
__device__ void gather_units(const Src& s, u8* __restrict__ out)
{
    const u32 per_row = s.head_dim * s.elem / sizeof(T);
    const u64 rows_per_tensor = (u64)s.tokens * s.heads;
    const u64 tensors = (u64)s.layers * s.streams;
    const u64 total = (u64)s.chunks * tensors * rows_per_tensor * per_row;
    const u64* bases = (const u64*)s.layer_base;
    const u32* ids = (const u32*)s.block_ids;
    for (u64 w = (u64)blockIdx.x * blockDim.x + threadIdx.x; w < total; w += (u64)gridDim.x * blockDim.x) {
        const u32 u = (u32)(w % per_row);
        u64 r = w / per_row;
        const u32 h = (u32)(r % s.heads); r /= s.heads;
        const u32 t = (u32)(r % s.tokens); r /= s.tokens;
        const u32 tensor = (u32)(r % tensors);
        const u32 c = (u32)(r / tensors);
        const u32 layer = tensor / s.streams, stream = tensor - layer * s.streams;
        const u32 blk = ids[(u64)c * s.blocks_per_chunk + t / s.block_size];
        const u32 slot = t % s.block_size;
        const u8* src = (const u8*)bases[layer] + (i64)layer * s.stride_layer + (i64)stream * s.stride_kv
                      + (i64)blk * s.stride_block + (i64)slot * s.stride_token + (i64)h * s.stride_head;
        ((T*)out)[w] = ((const T*)src)[u];
    }
}

struct V16 { u64 a, b; };

extern "C" __global__ void cg_gather(Src s, u8* __restrict__ out)
{
    switch (s.unit) {
    case 16: gather_units<V16>(s, out); break;
    case 8: gather_units<u64>(s, out); break;
    case 4: gather_units<u32>(s, out); break;
    case 2: gather_units<unsigned short>(s, out); break;
    default: gather_units<u8>(s, out); break;
    }
}
