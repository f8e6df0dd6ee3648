/*
 * libcachegen from C, minimal: a vLLM-style paged KV cache in host memory
 * (one tensor per layer, (2, num_blocks, block_size, heads, head_dim), f16)
 * holding random values; store a request's tokens, look them up, wipe the
 * cache, load them back into other blocks layer by layer, and check the bytes.
 * The level is "lossless", so the loaded bytes must equal the stored ones
 * exactly (with "default" they are close, at about a quarter of the size).
 *
 * Build and run: see README.md in this directory.
 */
#include <cachegen.h>

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAYERS 4
#define HEADS 2
#define HEAD_DIM 64
#define BLOCK_SIZE 16
#define NUM_BLOCKS 16  /* blocks per layer in the engine's pool */
#define N_TOKENS 100   /* the request: 3 full chunks of 32 tokens + 4 tokens */
#define N_BLOCKS ((N_TOKENS + BLOCK_SIZE - 1) / BLOCK_SIZE)

/* Stops on any failed call, printing the library's message. */
static void ok(int32_t rc, const char *what) {
    if (rc != CG_OK) {
        fprintf(stderr, "%s failed: status %d: %s\n", what, rc, cg_last_error_message());
        exit(1);
    }
}

/* xorshift64*, then a float in [-4, 4) rounded to IEEE half (normal range, no NaN). */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint16_t random_f16(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
    float f = ((float)(r >> 40) / (float)(1u << 24)) * 8.0f - 4.0f;
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    if (exp <= 0) return sign; /* tiny: flush to zero */
    return (uint16_t)(sign | (uint16_t)(exp << 10) | (uint16_t)((x >> 13) & 0x3ff));
}

int main(void) {
    printf("libcachegen %s\n", cg_version());

    /* 1. A context: namespace (model id, KV dtype, engine block size), chunk
     *    size, compression level, tiers. */
    const char *config =
        "{\"namespace\": {\"model\": \"example-model@0000\", \"kv_dtype\": \"f16\", \"block_size\": 16},"
        " \"chunk_tokens\": 32, \"level\": \"lossless\","
        " \"tiers\": {\"memory\": {\"bytes\": 67108864}}}";
    cg_context *ctx = NULL;
    ok(cg_context_new(config, &ctx), "cg_context_new");

    /* 2. The engine's KV memory and its layout description: element (layer l,
     *    stream s (0 key, 1 value), block b, token t, head h, dim d) is at
     *    layer_base[l] + b*stride_block + s*stride_kv + t*stride_token + h*stride_head + 2*d. */
    const size_t head_bytes = HEAD_DIM * sizeof(uint16_t);
    const size_t layer_bytes = 2 * (size_t)NUM_BLOCKS * BLOCK_SIZE * HEADS * head_bytes;
    uint16_t *layer[LAYERS];
    uint64_t layer_base[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        layer[l] = (uint16_t *)malloc(layer_bytes);
        for (size_t i = 0; i < layer_bytes / 2; i++) layer[l][i] = random_f16();
        layer_base[l] = (uint64_t)(uintptr_t)layer[l];
    }
    cg_layout_desc desc = {
        .kind = CG_KIND_KEY_VALUE,
        .dtype = CG_DTYPE_F16,
        .memory = CG_MEMORY_HOST,
        .layers = LAYERS,
        .num_blocks = NUM_BLOCKS,
        .block_size = BLOCK_SIZE,
        .heads = HEADS,
        .head_dim = HEAD_DIM,
        .layer_base = layer_base,
        .stride_block = (int64_t)(BLOCK_SIZE * HEADS * head_bytes),
        .stride_kv = (int64_t)(NUM_BLOCKS * BLOCK_SIZE * HEADS * head_bytes),
        .stride_token = (int64_t)(HEADS * head_bytes),
        .stride_head = (int64_t)head_bytes,
        .stride_layer = 0,
    };
    cg_layout *layout = NULL;
    ok(cg_layout_new(&desc, &layout), "cg_layout_new");

    /* 3. A request: token ids, and the blocks holding them (token i is in
     *    block_ids[i / block_size]). */
    uint32_t tokens[N_TOKENS];
    for (int i = 0; i < N_TOKENS; i++) tokens[i] = (uint32_t)(1000 + 7 * i);
    uint32_t src_blocks[N_BLOCKS] = {9, 2, 14, 5, 11, 0, 7};

    /* 4. Store: the blocks may be reused once the job is REUSABLE; DONE when written. */
    cg_job *job = NULL;
    ok(cg_store(ctx, layout, tokens, N_TOKENS, src_blocks, N_BLOCKS, NULL, 0, &job), "cg_store");
    ok(cg_job_wait(job, CG_STAGE_REUSABLE, 30000), "cg_job_wait(REUSABLE)");
    /* Keep a copy of what was stored (the first 96 tokens, per layer and stream). */
    enum { STORED = 96 };
    uint16_t *want = (uint16_t *)malloc((size_t)LAYERS * 2 * STORED * HEADS * head_bytes);
    size_t k = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++)
            for (int i = 0; i < STORED; i++) {
                const uint8_t *p = (const uint8_t *)layer[l] + src_blocks[i / BLOCK_SIZE] * desc.stride_block + s * desc.stride_kv +
                                   (i % BLOCK_SIZE) * desc.stride_token;
                memcpy((uint8_t *)want + k, p, HEADS * head_bytes);
                k += HEADS * head_bytes;
            }
    ok(cg_job_wait(job, CG_STAGE_DONE, 30000), "cg_job_wait(DONE)");
    cg_job_progress info;
    ok(cg_job_info(job, &info), "cg_job_info");
    printf("store: %" PRIu64 " chunks written, %" PRIu64 " failed (the 4 tokens after the last full chunk are not stored)\n",
           info.chunks_ok, info.chunks_failed);
    cg_job_free(job);

    /* 5. Lookup, with a lease that keeps the entries from being evicted until the load. */
    uint64_t matched = 0, lease = 0;
    ok(cg_lookup(ctx, tokens, N_TOKENS, NULL, 0, 10000, &matched, &lease), "cg_lookup");
    printf("lookup: %" PRIu64 " of %d tokens can be loaded (lease %" PRIu64 ")\n", matched, N_TOKENS, lease);

    /* 6. Wipe the engine's memory and load into other blocks, layer by layer. */
    for (int l = 0; l < LAYERS; l++) memset(layer[l], 0, layer_bytes);
    uint32_t dst_blocks[N_BLOCKS] = {1, 3, 4, 6, 8, 10, 12};
    ok(cg_load(ctx, layout, tokens, (size_t)matched, dst_blocks, N_BLOCKS, 0, NULL, 0, lease, &job), "cg_load");
    for (uint32_t l = 0; l < LAYERS; l++) {
        ok(cg_job_wait_layer(job, l, 30000), "cg_job_wait_layer");
        /* An engine would run layer l's attention here while later layers load. */
    }
    ok(cg_job_wait(job, CG_STAGE_DONE, 30000), "cg_job_wait(DONE)");
    size_t n_failed = 0;
    ok(cg_job_failed_blocks(job, NULL, 0, &n_failed), "cg_job_failed_blocks");
    ok(cg_job_info(job, &info), "cg_job_info");
    printf("load: %" PRIu64 " chunks loaded into %d layers, %zu failed blocks\n", info.chunks_ok, info.layers_done, n_failed);
    cg_job_free(job);

    /* 7. Check: lossless, so the bytes are exactly the stored ones. */
    k = 0;
    size_t differ = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++)
            for (int i = 0; i < STORED; i++) {
                const uint8_t *p = (const uint8_t *)layer[l] + dst_blocks[i / BLOCK_SIZE] * desc.stride_block + s * desc.stride_kv +
                                   (i % BLOCK_SIZE) * desc.stride_token;
                if (memcmp((uint8_t *)want + k, p, HEADS * head_bytes) != 0) differ++;
                k += HEADS * head_bytes;
            }
    printf("check: %d tokens x %d layers x K/V, %zu token rows differ\n", STORED, LAYERS, differ);

    /* 8. Statistics (JSON). The first call asks for the size. */
    size_t len = 0;
    if (cg_stats_json(ctx, NULL, 0, &len) == CG_ERR_BUFFER_TOO_SMALL) {
        char *stats = (char *)malloc(len + 1);
        ok(cg_stats_json(ctx, stats, len + 1, &len), "cg_stats_json");
        const char *ratio = strstr(stats, "\"compression_ratio\"");
        printf("stats: %zu bytes of JSON, %.32s\n", len, ratio ? ratio : "(no compression_ratio)");
        free(stats);
    }

    free(want);
    cg_layout_free(layout);
    cg_context_free(ctx);
    for (int l = 0; l < LAYERS; l++) free(layer[l]);
    int good = matched == STORED && n_failed == 0 && differ == 0;
    printf("%s\n", good ? "example: OK" : "example: FAILED");
    return good ? 0 : 1;
}
