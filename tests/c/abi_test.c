/*
 * The C ABI (include/cachegen.h) end to end, from C11, with the real KV
 * fixture: store from vLLM flash-attn NHD per-layer buffers, lookup (with
 * and without a lease), load into a different block order and a different
 * layout (vLLM HND per-layer; a TensorRT-LLM-style single pool with
 * stride_layer, skipping the first tokens), per-layer waits, job info and
 * failed blocks, and the bytes compared with the CLI's decode of each chunk
 * (`cachegen encode --level default` + `cachegen decode`). Then the error
 * paths. Built with ASan/UBSan by scripts/c_tests.sh; everything is freed.
 *
 *   abi_test FIXTURE WORK_DIR
 *
 * WORK_DIR holds tokens.u32 and decoded_{c}.safetensors (c = 0..4), made by
 * tests/c/split_chunks.py and the CLI.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */

#include <cachegen.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "safetensors_min.h"

#define LAYERS 30
#define TOKENS 320
#define HEADS 3
#define HEAD_DIM 64
#define BS 16 /* block_size */
#define CHUNK 64
#define N_CHUNKS (TOKENS / CHUNK)
#define N_REQ_BLOCKS (TOKENS / BS) /* 20 blocks hold the request */
#define ES 2                       /* f16 */
#define WAIT_MS 60000

static _Atomic int failures = 0; /* CHECKs also run on the loader threads */
static _Atomic int checks = 0;

#define CHECK(cond)                                                                                  \
    do {                                                                                             \
        checks++;                                                                                    \
        if (!(cond)) {                                                                               \
            failures++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s (last error: \"%s\")\n", __FILE__, __LINE__, #cond,      \
                    cg_last_error_message());                                                        \
        }                                                                                            \
    } while (0)

#define CHECK_EQ(a, b)                                                                               \
    do {                                                                                             \
        long long va_ = (long long)(a), vb_ = (long long)(b);                                        \
        checks++;                                                                                    \
        if (va_ != vb_) {                                                                            \
            failures++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s == %s (%lld != %lld; last error: \"%s\")\n", __FILE__,   \
                    __LINE__, #a, #b, va_, vb_, cg_last_error_message());                            \
        }                                                                                            \
    } while (0)

/* A call that must fail with `code` and leave a non-empty message. */
#define CHECK_ERR(call, code)                                                                        \
    do {                                                                                             \
        int32_t rc_ = (call);                                                                        \
        checks++;                                                                                    \
        const char *m_ = cg_last_error_message();                                                    \
        if (rc_ != (code) || m_ == NULL || m_[0] == '\0') {                                          \
            failures++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s returned %d (want %s = %d), message \"%s\"\n", __FILE__,  \
                    __LINE__, #call, rc_, #code, (code), m_ ? m_ : "(null)");                        \
        } else {                                                                                     \
            printf("  ok  %-8s %s\n", #code + 7, m_);                                                \
        }                                                                                            \
    } while (0)

/* ---------------------------------------------------------------- data */

/* The fixture: per layer and stream a [TOKENS, HEADS, HEAD_DIM] f16 tensor. */
typedef struct kv {
    const uint8_t *t[LAYERS][2];
} kv;

/* The expected load result, per layer and stream, all TOKENS tokens. */
static uint8_t *expected[LAYERS][2];

static const size_t ROW = (size_t)HEADS * HEAD_DIM * ES; /* bytes per token per stream */

static int load_kv(const st_file *f, uint64_t tokens, kv *out) {
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++) {
            char name[64];
            snprintf(name, sizeof name, "layers.%d.%s", l, s ? "value" : "key");
            st_tensor t;
            if (st_get_f16_3d(f, name, tokens, HEADS, HEAD_DIM, &t) != 0) return -1;
            out->t[l][s] = t.data;
        }
    return 0;
}

static int load_expected(const char *dir) {
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++) expected[l][s] = (uint8_t *)malloc(TOKENS * ROW);
    for (int c = 0; c < N_CHUNKS; c++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/decoded_%d.safetensors", dir, c);
        st_file f;
        if (st_open(path, &f) != 0) return -1;
        kv part;
        if (load_kv(&f, CHUNK, &part) != 0) {
            st_close(&f);
            return -1;
        }
        for (int l = 0; l < LAYERS; l++)
            for (int s = 0; s < 2; s++) memcpy(expected[l][s] + (size_t)c * CHUNK * ROW, part.t[l][s], CHUNK * ROW);
        st_close(&f);
    }
    return 0;
}

static void free_expected(void) {
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++) free(expected[l][s]);
}

static int read_tokens(const char *dir, uint32_t *tokens) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokens.u32", dir);
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    uint8_t raw[TOKENS * 4];
    size_t n = fread(raw, 1, sizeof raw, fp);
    fclose(fp);
    if (n != sizeof raw) return -1;
    for (int i = 0; i < TOKENS; i++)
        tokens[i] = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 | (uint32_t)raw[4 * i + 2] << 16 |
                    (uint32_t)raw[4 * i + 3] << 24;
    return 0;
}

/* -------------------------------------------------------------- engines */

/* Host memory of an engine's paged KV cache and its cg_layout_desc. */
typedef struct engine {
    const char *name;
    uint8_t *bufs[LAYERS]; /* per-layer tensors, or bufs[0] = the pool */
    int n_bufs;
    size_t buf_bytes;
    uint64_t base[LAYERS];
    cg_layout_desc desc;
} engine;

/* Engine buffers have guard zones on both sides: the library's writes are
 * not instrumented by ASan (only its calls into libc are), so stray writes
 * just outside a buffer are caught by checking the guards on free. */
#define GUARD 4096
#define GUARD_BYTE 0x5C

static uint8_t *guarded_alloc(size_t n) {
    uint8_t *p = (uint8_t *)malloc(n + 2 * GUARD);
    memset(p, GUARD_BYTE, GUARD);
    memset(p + GUARD + n, GUARD_BYTE, GUARD);
    return p + GUARD;
}

static void guarded_free(uint8_t *q, size_t n) {
    if (!q) return;
    uint8_t *p = q - GUARD;
    int bad = 0;
    for (size_t i = 0; i < GUARD; i++) bad += (p[i] != GUARD_BYTE) + (q[n + i] != GUARD_BYTE);
    CHECK_EQ(bad, 0);
    free(p);
}

static cg_layout_desc desc_common(uint32_t num_blocks, const uint64_t *base) {
    cg_layout_desc d;
    memset(&d, 0, sizeof d);
    d.kind = CG_KIND_KEY_VALUE;
    d.dtype = CG_DTYPE_F16;
    d.memory = CG_MEMORY_HOST;
    d.layers = LAYERS;
    d.num_blocks = num_blocks;
    d.block_size = BS;
    d.heads = HEADS;
    d.head_dim = HEAD_DIM;
    d.layer_base = base;
    return d;
}

/* vLLM FlashAttention, one tensor per layer: (2, num_blocks, block_size,
 * heads, head_dim) for NHD, (2, num_blocks, heads, block_size, head_dim) for HND. */
static void engine_vllm(engine *e, uint32_t num_blocks, bool hnd, uint8_t fill) {
    memset(e, 0, sizeof *e);
    e->name = hnd ? "vLLM flash-attn HND" : "vLLM flash-attn NHD";
    e->n_bufs = LAYERS;
    e->buf_bytes = 2ull * num_blocks * BS * HEADS * HEAD_DIM * ES;
    for (int l = 0; l < LAYERS; l++) {
        e->bufs[l] = guarded_alloc(e->buf_bytes);
        memset(e->bufs[l], fill, e->buf_bytes);
        e->base[l] = (uint64_t)(uintptr_t)e->bufs[l];
    }
    e->desc = desc_common(num_blocks, e->base);
    int64_t d = HEAD_DIM * ES;
    e->desc.stride_kv = (int64_t)num_blocks * BS * HEADS * d;
    e->desc.stride_block = (int64_t)BS * HEADS * d;
    e->desc.stride_token = hnd ? d : HEADS * d;
    e->desc.stride_head = hnd ? BS * d : d;
    e->desc.stride_layer = 0;
}

/* TensorRT-LLM primary pool, one buffer for all layers:
 * [num_blocks, layers, 2, heads, tokens_per_block, head_dim]. */
static void engine_trtllm(engine *e, uint32_t num_blocks, uint8_t fill) {
    memset(e, 0, sizeof *e);
    e->name = "TRT-LLM pool (HND, stride_layer)";
    e->n_bufs = 1;
    e->buf_bytes = (size_t)num_blocks * LAYERS * 2 * HEADS * BS * HEAD_DIM * ES;
    e->bufs[0] = guarded_alloc(e->buf_bytes);
    memset(e->bufs[0], fill, e->buf_bytes);
    for (int l = 0; l < LAYERS; l++) e->base[l] = (uint64_t)(uintptr_t)e->bufs[0];
    e->desc = desc_common(num_blocks, e->base);
    int64_t d = HEAD_DIM * ES;
    e->desc.stride_token = d;
    e->desc.stride_head = BS * d;
    e->desc.stride_kv = HEADS * BS * d;
    e->desc.stride_layer = 2 * HEADS * BS * d;
    e->desc.stride_block = LAYERS * 2 * HEADS * BS * d;
}

static void engine_free(engine *e) {
    for (int i = 0; i < e->n_bufs; i++) guarded_free(e->bufs[i], e->buf_bytes);
    memset(e, 0, sizeof *e);
}

/* The bytes of (layer, stream, block, token-in-block, head), from the ABI's
 * address formula. */
static uint8_t *elem(const engine *e, int l, int s, uint32_t b, int t, int h) {
    const cg_layout_desc *d = &e->desc;
    intptr_t a = (intptr_t)d->layer_base[l] + (intptr_t)l * d->stride_layer + (intptr_t)b * d->stride_block +
                 (intptr_t)s * d->stride_kv + (intptr_t)t * d->stride_token + (intptr_t)h * d->stride_head;
    return (uint8_t *)a;
}

/* Writes the first `tokens` tokens of `src` (per layer/stream [TOKENS, HEADS, HEAD_DIM]) into `blocks`. */
static void engine_fill(engine *e, const kv *src, const uint32_t *blocks, int tokens) {
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++)
            for (int i = 0; i < tokens; i++)
                for (int h = 0; h < HEADS; h++)
                    memcpy(elem(e, l, s, blocks[i / BS], i % BS, h), src->t[l][s] + (size_t)i * ROW + (size_t)h * HEAD_DIM * ES,
                           HEAD_DIM * ES);
}

/* Counts tokens of layer `l` in [from, to) whose bytes differ from `expected`. */
static int engine_diff_layer(const engine *e, int l, const uint32_t *blocks, int from, int to) {
    int bad = 0;
    for (int s = 0; s < 2; s++)
        for (int i = from; i < to; i++)
            for (int h = 0; h < HEADS; h++)
                if (memcmp(elem(e, l, s, blocks[i / BS], i % BS, h), expected[l][s] + (size_t)i * ROW + (size_t)h * HEAD_DIM * ES,
                           HEAD_DIM * ES) != 0) {
                    bad++;
                    break;
                }
    return bad;
}

/* Whether every byte of block `b` (all layers, streams) equals `fill`. */
static bool engine_block_is(const engine *e, uint32_t b, uint8_t fill) {
    for (int l = 0; l < LAYERS; l++)
        for (int s = 0; s < 2; s++)
            for (int t = 0; t < BS; t++)
                for (int h = 0; h < HEADS; h++) {
                    const uint8_t *p = elem(e, l, s, b, t, h);
                    for (int k = 0; k < HEAD_DIM * ES; k++)
                        if (p[k] != fill) return false;
                }
    return true;
}

/* ----------------------------------------------------------------- misc */

static void *thread_last_error(void *arg) {
    const char **out = (const char **)arg;
    const char *m = cg_last_error_message();
    *out = (m && m[0] == '\0') ? "" : "non-empty";
    return NULL;
}

/* cg_stats_json into a malloc'd buffer (also checks the size protocol). */
static char *stats_json(const cg_context *ctx) {
    size_t need = 0;
    char tiny[4];
    CHECK_ERR(cg_stats_json(ctx, tiny, sizeof tiny, &need), CG_ERR_BUFFER_TOO_SMALL);
    CHECK(need > sizeof tiny);
    CHECK_ERR(cg_stats_json(ctx, NULL, 0, &need), CG_ERR_BUFFER_TOO_SMALL);
    /* cap == len: no room for the NUL. (The size can change between calls
     * if counters change; nothing runs now.) */
    char *buf = (char *)malloc(need + 64);
    size_t len2 = 0;
    CHECK_ERR(cg_stats_json(ctx, buf, need, &len2), CG_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(len2, need);
    size_t len = 0;
    CHECK_EQ(cg_stats_json(ctx, buf, need + 64, &len), CG_OK);
    CHECK_EQ(len, strlen(buf));
    return buf;
}

static uint64_t json_u64(const char *json, const char *key) {
    char q[128];
    snprintf(q, sizeof q, "\"%s\":", key);
    const char *p = strstr(json, q);
    return p ? strtoull(p + strlen(q), NULL, 10) : UINT64_MAX;
}

static void check_info(const cg_job *job, uint32_t kind, uint64_t ok, uint64_t failed, uint64_t skipped, uint64_t failed_blocks) {
    cg_job_progress info;
    memset(&info, 0xEE, sizeof info);
    CHECK_EQ(cg_job_info(job, &info), CG_OK);
    CHECK_EQ(info.kind, kind);
    CHECK_EQ(info.reusable, 1);
    CHECK_EQ(info.done, 1);
    CHECK_EQ(info.layers, LAYERS);
    if (kind == CG_JOB_LOAD) CHECK_EQ(info.layers_done, LAYERS);
    CHECK_EQ(info.chunks_ok, ok);
    CHECK_EQ(info.chunks_failed, failed);
    CHECK_EQ(info.chunks_skipped, skipped);
    CHECK_EQ(info.failed_blocks, failed_blocks);
}

static void check_no_errors(const cg_job *job) {
    char buf[1024];
    size_t len = 99;
    CHECK_EQ(cg_job_errors(job, buf, sizeof buf, &len), CG_OK);
    CHECK_EQ(len, 0);
    CHECK_EQ(buf[0], '\0');
}

/* Loads the request into `dst` (blocks `dst_blocks`, from `first_token`)
 * and checks it: every layer after its cg_job_wait_layer, then job info,
 * no failed blocks, blocks outside the request (and before first_token)
 * untouched. `free_layout_early`: release the layout handle right after
 * cg_load (the job keeps its own reference). */
static void load_and_check(cg_context *ctx, engine *dst, const uint32_t *tokens, const uint32_t *dst_blocks,
                           int first_token, uint64_t lease, bool free_layout_early, uint8_t fill) {
    printf("load into %s, %u blocks, first_token %d, lease %" PRIu64 "\n", dst->name, dst->desc.num_blocks, first_token, lease);
    cg_layout *layout = NULL;
    CHECK_EQ(cg_layout_new(&dst->desc, &layout), CG_OK);
    cg_job *job = NULL;
    CHECK_EQ(cg_load(ctx, layout, tokens, TOKENS, dst_blocks, N_REQ_BLOCKS, (size_t)first_token, NULL, 0, lease, &job), CG_OK);
    CHECK(job != NULL);
    if (!job) {
        cg_layout_free(layout);
        return;
    }
    if (free_layout_early) {
        cg_layout_free(layout);
        layout = NULL;
    }
    int bad_layers = 0;
    for (uint32_t l = 0; l < LAYERS; l++) {
        CHECK_EQ(cg_job_wait_layer(job, l, WAIT_MS), CG_OK);
        /* Layer l is final now, whatever the later layers are doing. */
        int bad = engine_diff_layer(dst, (int)l, dst_blocks, first_token, TOKENS);
        if (bad) {
            bad_layers++;
            fprintf(stderr, "FAIL: %s layer %u: %d token rows differ from the CLI's decoded output\n", dst->name, l, bad);
        }
    }
    CHECK_EQ(bad_layers, 0);
    CHECK_EQ(cg_job_wait(job, CG_STAGE_DONE, WAIT_MS), CG_OK);
    CHECK_EQ(cg_job_wait(job, CG_STAGE_REUSABLE, 0), CG_OK);
    check_info(job, CG_JOB_LOAD, N_CHUNKS, 0, 0, 0);
    size_t count = 99;
    uint32_t failed[N_REQ_BLOCKS];
    CHECK_EQ(cg_job_failed_blocks(job, failed, N_REQ_BLOCKS, &count), CG_OK);
    CHECK_EQ(count, 0);
    CHECK_EQ(cg_job_failed_blocks(job, NULL, 0, &count), CG_OK);
    CHECK_EQ(count, 0);
    check_no_errors(job);
    /* Everything again, now that the job is done. */
    int bad = 0;
    for (int l = 0; l < LAYERS; l++) bad += engine_diff_layer(dst, l, dst_blocks, first_token, TOKENS);
    CHECK_EQ(bad, 0);
    /* Untouched: blocks not in the request, and blocks before first_token. */
    bool used[1024] = {false};
    for (int i = 0; i < N_REQ_BLOCKS; i++) used[dst_blocks[i]] = true;
    int touched = 0;
    for (uint32_t b = 0; b < dst->desc.num_blocks; b++)
        if (!used[b] && !engine_block_is(dst, b, fill)) touched++;
    for (int i = 0; i < first_token / BS; i++)
        if (!engine_block_is(dst, dst_blocks[i], fill)) touched++;
    CHECK_EQ(touched, 0);
    CHECK_EQ(cg_job_cancel(job), CG_OK); /* cancelling a finished job is harmless */
    cg_job_free(job);
    cg_layout_free(layout);
    printf("  %d layers x %d tokens equal the CLI's decoded chunks\n", LAYERS, TOKENS - first_token);
}


/* ----------------------------------------------------------- threads */

/* One of several threads loading the request at once, each into its own
 * engine: checks the bytes, and that error messages are per thread. */
typedef struct loader {
    cg_context *ctx;
    const uint32_t *tokens;
    int index;
    int bad;       /* token rows that differ, or -1 if a call failed */
    char msg[160]; /* this thread's message after its own failing call */
} loader;

static void *loader_main(void *arg) {
    loader *t = (loader *)arg;
    engine e;
    engine_vllm(&e, N_REQ_BLOCKS + 4, t->index % 2 == 1, 0);
    uint32_t blocks[N_REQ_BLOCKS];
    for (int i = 0; i < N_REQ_BLOCKS; i++) blocks[i] = (uint32_t)((i * 5 + t->index) % (N_REQ_BLOCKS + 4)); /* 5 is coprime with 24 */
    cg_layout *layout = NULL;
    cg_job *job = NULL;
    t->bad = -1;
    if (cg_layout_new(&e.desc, &layout) == CG_OK &&
        cg_load(t->ctx, layout, t->tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job) == CG_OK) {
        /* A failing call of this thread: its message is this thread's. */
        char stage_msg[64];
        snprintf(stage_msg, sizeof stage_msg, "stage %d is not", 100 + t->index);
        if (cg_job_wait(job, (uint32_t)(100 + t->index), 0) == CG_ERR_INVALID_ARGUMENT)
            snprintf(t->msg, sizeof t->msg, "%s", cg_last_error_message());
        if (strstr(t->msg, stage_msg) == NULL) t->msg[0] = '\0';
        if (cg_job_wait(job, CG_STAGE_DONE, WAIT_MS) == CG_OK) {
            t->bad = 0;
            for (int l = 0; l < LAYERS; l++) t->bad += engine_diff_layer(&e, l, blocks, 0, TOKENS);
        }
    }
    cg_job_free(job);
    cg_layout_free(layout);
    engine_free(&e);
    return NULL;
}

static void concurrent_loads(cg_context *ctx, const uint32_t *tokens) {
    enum { N = 4 };
    printf("%d threads load at once\n", N);
    pthread_t th[N];
    loader t[N];
    for (int i = 0; i < N; i++) {
        memset(&t[i], 0, sizeof t[i]);
        t[i].ctx = ctx;
        t[i].tokens = tokens;
        t[i].index = i;
        CHECK_EQ(pthread_create(&th[i], NULL, loader_main, &t[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(t[i].bad, 0);
        CHECK(t[i].msg[0] != '\0'); /* its own message, naming its own stage */
    }
}

/* --------------------------------------------------------------- errors */

static const char *CONFIG =
    "{\"namespace\": {\"model\": \"smollm2-c-abi-test\", \"kv_dtype\": \"f16\", \"block_size\": 16},"
    " \"chunk_tokens\": 64, \"level\": \"default\", \"tiers\": {\"memory\": {\"bytes\": 268435456}},"
    " \"io_threads\": 2, \"decode_threads\": 2, \"load_timeout_ms\": 30000}";

static void error_paths(const uint32_t *tokens) {
    printf("error paths\n");
    cg_context *ctx = (cg_context *)(uintptr_t)1; /* must be overwritten with NULL */
    CHECK_ERR(cg_context_new(NULL, &ctx), CG_ERR_INVALID_ARGUMENT);
    CHECK(ctx == NULL);
    CHECK_ERR(cg_context_new(CONFIG, NULL), CG_ERR_INVALID_ARGUMENT);
    ctx = (cg_context *)(uintptr_t)1;
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": ", &ctx), CG_ERR_CONFIG);
    CHECK(ctx == NULL);
    CHECK_ERR(cg_context_new("not json", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\"}, \"chunk_tokns\": 64}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\", \"block_size\": 16}, \"chunk_tokens\": 40}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\", \"kv_dtype\": \"fp8_e5m2\"}}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\"}, \"level\": \"ultra\"}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\"}, \"tiers\": {}}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\"}, \"profile\": \"/nonexistent/profile.json\"}", &ctx), CG_ERR_CONFIG);
    CHECK_ERR(cg_context_new("{\"namespace\": {\"model\": \"m\", \"tp_world_size\": 2, \"tp_rank\": 2}}", &ctx), CG_ERR_CONFIG);
    {
        /* Invalid UTF-8 in the configuration. */
        const char bad_utf8[] = {'{', '"', (char)0xff, '"', '}', 0};
        CHECK_ERR(cg_context_new(bad_utf8, &ctx), CG_ERR_CONFIG);
    }
    CHECK(ctx == NULL);

    /* The message is per thread: a fresh thread sees "". */
    {
        const char *seen = NULL;
        pthread_t th;
        CHECK_EQ(pthread_create(&th, NULL, thread_last_error, &seen), 0);
        pthread_join(th, NULL);
        CHECK(seen != NULL && strcmp(seen, "") == 0);
    }

    CHECK_EQ(cg_context_new(CONFIG, &ctx), CG_OK);
    CHECK(ctx != NULL);

    /* Layouts. */
    engine e;
    engine_vllm(&e, 24, false, 0);
    cg_layout *layout = (cg_layout *)(uintptr_t)1;
    CHECK_ERR(cg_layout_new(NULL, &layout), CG_ERR_INVALID_ARGUMENT);
    CHECK(layout == NULL);
    CHECK_ERR(cg_layout_new(&e.desc, NULL), CG_ERR_INVALID_ARGUMENT);
    cg_layout_desc d = e.desc;
    d.layer_base = NULL;
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_INVALID_ARGUMENT);
    d = e.desc;
    d.memory = CG_MEMORY_CUDA;
    {
        /* Host memory labelled as device memory: refused, as "no GPU" on a
         * machine without one, as not device memory on a GPU machine. */
        int32_t rc = cg_layout_new(&d, &layout);
        checks++;
        if ((rc != CG_ERR_NO_GPU && rc != CG_ERR_INVALID_ARGUMENT) || layout != NULL || cg_last_error_message()[0] == '\0') {
            failures++;
            fprintf(stderr, "FAIL %s:%d: CG_MEMORY_CUDA on host memory returned %d (%s)\n", __FILE__, __LINE__, rc, cg_last_error_message());
        }
    }
    d = e.desc;
    d.memory = 7;
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_INVALID_ARGUMENT);
    d = e.desc;
    d.dtype = 0;
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_INVALID_ARGUMENT);
    d = e.desc;
    d.kind = 9;
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_INVALID_ARGUMENT);
    d = e.desc;
    d.stride_token = HEAD_DIM * ES; /* tokens overlap heads */
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_LAYOUT);
    d = e.desc;
    d.stride_kv = d.stride_block; /* K and V share bytes */
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_LAYOUT);
    {
        uint64_t same[LAYERS];
        for (int l = 0; l < LAYERS; l++) same[l] = e.base[0];
        d = e.desc;
        d.layer_base = same; /* every layer at one address, no stride_layer */
        CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_LAYOUT);
    }
    {
        /* A null layer_base entry is refused (a store through it would crash). */
        uint64_t zero[LAYERS] = {0};
        for (int l = 0; l < LAYERS; l++) zero[l] = l ? e.base[l] : 0;
        d = e.desc;
        d.layer_base = zero;
        cg_layout *null_base = NULL;
        CHECK_ERR(cg_layout_new(&d, &null_base), CG_ERR_INVALID_ARGUMENT);
        CHECK_EQ(null_base == NULL, 1);
        cg_layout_free(null_base);
    }
    d = e.desc;
    d.heads = 0;
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_LAYOUT);
    d = e.desc;
    d.kind = CG_KIND_LATENT; /* latent with 3 heads */
    CHECK_ERR(cg_layout_new(&d, &layout), CG_ERR_LAYOUT);
    CHECK(layout == NULL);

    /* A layout the context cannot serve: block size 8 or bf16. */
    cg_layout *bs8 = NULL, *bf16 = NULL;
    d = e.desc;
    d.block_size = 8;
    CHECK_EQ(cg_layout_new(&d, &bs8), CG_OK);
    d = e.desc;
    d.dtype = CG_DTYPE_BF16;
    CHECK_EQ(cg_layout_new(&d, &bf16), CG_OK);

    CHECK_EQ(cg_layout_new(&e.desc, &layout), CG_OK);
    uint32_t blocks[N_REQ_BLOCKS];
    for (int i = 0; i < N_REQ_BLOCKS; i++) blocks[i] = (uint32_t)i;
    uint64_t matched = 7, lease = 7;

    /* Lookup. */
    CHECK_ERR(cg_lookup(NULL, tokens, TOKENS, NULL, 0, 0, &matched, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 0, NULL, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_lookup(ctx, NULL, TOKENS, NULL, 0, 0, &matched, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_lookup(ctx, tokens, TOKENS, NULL, 3, 0, &matched, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 1000, &matched, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_EQ(cg_lookup(ctx, NULL, 0, NULL, 0, 0, &matched, NULL), CG_OK);
    CHECK_EQ(matched, 0);
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 1000, &matched, &lease), CG_OK);
    CHECK_EQ(matched, 0);
    CHECK_EQ(lease, 0); /* nothing found, no lease */
    CHECK_ERR(cg_lease_release(NULL, 1), CG_ERR_INVALID_ARGUMENT);
    CHECK_EQ(cg_lease_release(ctx, 0), CG_OK);
    CHECK_EQ(cg_lease_release(ctx, 123456), CG_OK);

    /* Store and load arguments. */
    cg_job *job = (cg_job *)(uintptr_t)1;
    CHECK_ERR(cg_store(NULL, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK(job == NULL);
    CHECK_ERR(cg_store(ctx, NULL, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, layout, NULL, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, layout, tokens, TOKENS, NULL, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS - 1, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, bs8, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_store(ctx, bf16, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    blocks[5] = 24; /* num_blocks is 24 */
    CHECK_ERR(cg_store(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_LAYOUT);
    blocks[5] = 3; /* duplicate */
    CHECK_ERR(cg_store(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    blocks[5] = 5;
    CHECK_ERR(cg_load(NULL, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, NULL, tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, layout, tokens, TOKENS, blocks, N_REQ_BLOCKS, 40, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, layout, tokens, TOKENS, blocks, 10, 0, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_load(ctx, bs8, tokens, TOKENS, blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job), CG_ERR_INVALID_ARGUMENT);
    CHECK(job == NULL);

    /* A load of tokens never stored: it finishes, and every block of the
     * request is reported failed (sorted, distinct). */
    {
        uint32_t other[TOKENS];
        for (int i = 0; i < TOKENS; i++) other[i] = tokens[i] ^ 0x5a5a;
        uint32_t shuffled[N_REQ_BLOCKS];
        for (int i = 0; i < N_REQ_BLOCKS; i++) shuffled[i] = (uint32_t)((i * 7 + 3) % N_REQ_BLOCKS);
        CHECK_EQ(cg_load(ctx, layout, other, TOKENS, shuffled, N_REQ_BLOCKS, 0, (const uint8_t *)"s", 1, 0, &job), CG_OK);
        CHECK(job != NULL);
        for (uint32_t l = 0; l < LAYERS; l++) CHECK_EQ(cg_job_wait_layer(job, l, WAIT_MS), CG_OK);
        CHECK_EQ(cg_job_wait(job, CG_STAGE_DONE, WAIT_MS), CG_OK);
        check_info(job, CG_JOB_LOAD, 0, N_CHUNKS, 0, N_REQ_BLOCKS);
        size_t count = 0;
        CHECK_EQ(cg_job_failed_blocks(job, NULL, 0, &count), CG_OK);
        CHECK_EQ(count, N_REQ_BLOCKS);
        uint32_t failed[N_REQ_BLOCKS + 4];
        memset(failed, 0xff, sizeof failed);
        CHECK_EQ(cg_job_failed_blocks(job, failed, 5, &count), CG_OK); /* partial copy */
        CHECK_EQ(count, N_REQ_BLOCKS);
        CHECK_EQ(failed[5], 0xffffffffu);
        CHECK_EQ(cg_job_failed_blocks(job, failed, N_REQ_BLOCKS + 4, &count), CG_OK);
        CHECK_EQ(count, N_REQ_BLOCKS);
        for (int i = 0; i < N_REQ_BLOCKS; i++) CHECK_EQ(failed[i], i); /* blocks 0..19, sorted */
        CHECK_ERR(cg_job_failed_blocks(job, NULL, 3, &count), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_failed_blocks(job, failed, 3, NULL), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_failed_blocks(NULL, failed, 3, &count), CG_ERR_INVALID_ARGUMENT);
        /* The reasons, with the size protocol. */
        size_t len = 0;
        CHECK_ERR(cg_job_errors(job, NULL, 0, &len), CG_ERR_BUFFER_TOO_SMALL);
        CHECK(len > 0);
        char *buf = (char *)malloc(len + 1);
        CHECK_EQ(cg_job_errors(job, buf, len + 1, &len), CG_OK);
        CHECK_EQ(strlen(buf), len);
        printf("  never-stored load: %d failed blocks; errors: %.*s%s\n", (int)count, 120, buf, strlen(buf) > 120 ? "..." : "");
        free(buf);
        CHECK_ERR(cg_job_errors(job, NULL, 0, NULL), CG_ERR_INVALID_ARGUMENT);
        /* Waits and info. */
        CHECK_ERR(cg_job_wait(job, 0, 0), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_wait(job, 3, 0), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_wait(NULL, CG_STAGE_DONE, 0), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_wait_layer(job, LAYERS, 0), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_wait_layer(NULL, 0, 0), CG_ERR_INVALID_ARGUMENT);
        cg_job_progress info;
        CHECK_ERR(cg_job_info(job, NULL), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_info(NULL, &info), CG_ERR_INVALID_ARGUMENT);
        CHECK_ERR(cg_job_cancel(NULL), CG_ERR_INVALID_ARGUMENT);
        cg_job_free(job);
        job = NULL;
    }

    /* Stats. */
    size_t len = 0;
    char small[8];
    CHECK_ERR(cg_stats_json(NULL, small, sizeof small, &len), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_stats_json(ctx, small, sizeof small, NULL), CG_ERR_INVALID_ARGUMENT);
    CHECK_ERR(cg_stats_json(ctx, small, sizeof small, &len), CG_ERR_BUFFER_TOO_SMALL);
    CHECK(len > sizeof small);
    char *stats = stats_json(ctx);
    CHECK(stats[0] == '{' && stats[strlen(stats) - 1] == '}');
    CHECK(strstr(stats, "\"counters\"") != NULL);
    CHECK_EQ(json_u64(stats, "load_chunks_failed"), N_CHUNKS);
    free(stats);

    /* Null handles are ignored by the frees. */
    cg_job_free(NULL);
    cg_layout_free(NULL);
    cg_context_free(NULL);

    cg_layout_free(bs8);
    cg_layout_free(bf16);
    cg_layout_free(layout);
    cg_context_free(ctx);
    engine_free(&e);
}

/* ----------------------------------------------------------------- main */

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FIXTURE WORK_DIR\n", argv[0]);
        return 2;
    }
    const char *version = cg_version();
    CHECK(version != NULL && version[0] != '\0');
    printf("libcachegen %s\n", version ? version : "?");
    CHECK(cg_last_error_message() != NULL && cg_last_error_message()[0] == '\0');

    st_file fixture;
    if (st_open(argv[1], &fixture) != 0) return 2;
    kv src;
    if (load_kv(&fixture, TOKENS, &src) != 0 || load_expected(argv[2]) != 0) {
        fprintf(stderr, "cannot read the fixture or the expected chunks\n");
        return 2;
    }
    uint32_t tokens[TOKENS];
    if (read_tokens(argv[2], tokens) != 0) {
        fprintf(stderr, "cannot read %s/tokens.u32\n", argv[2]);
        return 2;
    }
    /* Sanity: the codec is lossy, so the expected bytes are close to, not
     * equal to, the fixture; equal everywhere would mean the wrong files. */
    CHECK(memcmp(expected[0][0], src.t[0][0], TOKENS * ROW) != 0);

    error_paths(tokens);

    cg_context *ctx = NULL;
    CHECK_EQ(cg_context_new(CONFIG, &ctx), CG_OK);
    if (!ctx) return 1;

    /* Source: vLLM flash-attn NHD, 40 blocks, the request in blocks 39, 37, ..., 1. */
    engine srce;
    engine_vllm(&srce, 40, false, 0);
    uint32_t src_blocks[N_REQ_BLOCKS];
    for (int i = 0; i < N_REQ_BLOCKS; i++) src_blocks[i] = (uint32_t)(39 - 2 * i);
    engine_fill(&srce, &src, src_blocks, TOKENS);
    cg_layout *src_layout = NULL;
    CHECK_EQ(cg_layout_new(&srce.desc, &src_layout), CG_OK);

    uint64_t matched = 99, lease = 99;
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 0, &matched, NULL), CG_OK);
    CHECK_EQ(matched, 0);

    printf("store from %s (%d tokens, %d chunks)\n", srce.name, TOKENS, N_CHUNKS);
    cg_job *job = NULL;
    CHECK_EQ(cg_store(ctx, src_layout, tokens, TOKENS, src_blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_OK);
    CHECK(job != NULL);
    CHECK_EQ(cg_job_wait(job, CG_STAGE_REUSABLE, WAIT_MS), CG_OK);
    /* REUSABLE: the engine may overwrite the source blocks now; what is
     * stored must not change. */
    for (int l = 0; l < LAYERS; l++) memset(srce.bufs[l], 0x7f, srce.buf_bytes);
    CHECK_EQ(cg_job_wait(job, CG_STAGE_DONE, WAIT_MS), CG_OK);
    CHECK_EQ(cg_job_wait_layer(job, 0, 0), CG_OK); /* a store: waits for DONE */
    check_info(job, CG_JOB_STORE, N_CHUNKS, 0, 0, 0);
    check_no_errors(job);
    cg_job_free(job);
    job = NULL;
    /* Refill and store again: every chunk is already there. */
    engine_fill(&srce, &src, src_blocks, TOKENS);
    CHECK_EQ(cg_store(ctx, src_layout, tokens, TOKENS, src_blocks, N_REQ_BLOCKS, NULL, 0, &job), CG_OK);
    CHECK_EQ(cg_job_wait(job, CG_STAGE_DONE, WAIT_MS), CG_OK);
    check_info(job, CG_JOB_STORE, 0, 0, N_CHUNKS, 0);
    cg_job_free(job);
    job = NULL;

    /* Lookup: the whole request; a prefix (whole chunks only); another salt; a changed token. */
    printf("lookup\n");
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 0, &matched, NULL), CG_OK);
    CHECK_EQ(matched, TOKENS);
    CHECK_EQ(cg_lookup(ctx, tokens, 100, NULL, 0, 0, &matched, NULL), CG_OK);
    CHECK_EQ(matched, 64);
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, (const uint8_t *)"lora-7", 6, 0, &matched, NULL), CG_OK);
    CHECK_EQ(matched, 0);
    {
        uint32_t changed[TOKENS];
        memcpy(changed, tokens, sizeof changed);
        changed[130] ^= 1;
        CHECK_EQ(cg_lookup(ctx, changed, TOKENS, NULL, 0, 0, &matched, NULL), CG_OK);
        CHECK_EQ(matched, 128);
    }
    /* With a lease, released early (twice: the second is a no-op). */
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 60000, &matched, &lease), CG_OK);
    CHECK_EQ(matched, TOKENS);
    CHECK(lease != 0);
    char *stats = stats_json(ctx);
    CHECK_EQ(json_u64(stats, "leases_active"), 1);
    free(stats);
    CHECK_EQ(cg_lease_release(ctx, lease), CG_OK);
    CHECK_EQ(cg_lease_release(ctx, lease), CG_OK);
    stats = stats_json(ctx);
    CHECK_EQ(json_u64(stats, "leases_active"), 0);
    free(stats);
    /* Lookup with a lease of 0 ms and a lease_id pointer: no lease. */
    lease = 99;
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 0, &matched, &lease), CG_OK);
    CHECK_EQ(lease, 0);

    /* Load 1: vLLM HND, 32 blocks, shuffled block order, given a lease that
     * the load consumes. */
    engine hnd;
    engine_vllm(&hnd, 32, true, 0xAB);
    uint32_t dst_blocks[N_REQ_BLOCKS];
    for (int i = 0; i < N_REQ_BLOCKS; i++) dst_blocks[i] = (uint32_t)((i * 7 + 3) % 32);
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 60000, &matched, &lease), CG_OK);
    CHECK_EQ(matched, TOKENS);
    CHECK(lease != 0);
    load_and_check(ctx, &hnd, tokens, dst_blocks, 0, lease, false, 0xAB);
    stats = stats_json(ctx);
    CHECK_EQ(json_u64(stats, "leases_active"), 0); /* consumed by the load */
    free(stats);
    CHECK_EQ(cg_lease_release(ctx, lease), CG_OK); /* already ended: fine */
    engine_free(&hnd);

    /* Load 2: a TensorRT-LLM-style pool (all layer_base equal, stride_layer),
     * reversed block order, the engine already has the first 32 tokens; the
     * layout handle is freed while the job runs. */
    engine pool;
    engine_trtllm(&pool, 24, 0xCD);
    for (int i = 0; i < N_REQ_BLOCKS; i++) dst_blocks[i] = (uint32_t)(23 - i);
    load_and_check(ctx, &pool, tokens, dst_blocks, 32, 0, true, 0xCD);
    engine_free(&pool);

    concurrent_loads(ctx, tokens);

    /* A lease expires by itself. */
    CHECK_EQ(cg_lookup(ctx, tokens, TOKENS, NULL, 0, 1, &matched, &lease), CG_OK);
    CHECK(lease != 0);
    {
        struct timespec ts = {0, 30 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    stats = stats_json(ctx);
    CHECK_EQ(json_u64(stats, "leases_active"), 0);
    free(stats);
    CHECK_EQ(cg_lease_release(ctx, lease), CG_OK); /* expired: fine */

    /* Stats after all that. */
    stats = stats_json(ctx);
    CHECK(strstr(stats, "\"counters\"") != NULL);
    CHECK_EQ(json_u64(stats, "store_chunks_written"), N_CHUNKS);
    CHECK_EQ(json_u64(stats, "load_chunks_ok"), 6 * N_CHUNKS); /* 2 loads + 4 threads */
    printf("stats: %.300s...\n", stats);
    free(stats);

    /* A job handle outlives its context: free the context first (it waits
     * for the job), then the job is still a valid handle. */
    engine late;
    engine_vllm(&late, 20, false, 0);
    cg_layout *late_layout = NULL;
    CHECK_EQ(cg_layout_new(&late.desc, &late_layout), CG_OK);
    for (int i = 0; i < N_REQ_BLOCKS; i++) dst_blocks[i] = (uint32_t)i;
    CHECK_EQ(cg_load(ctx, late_layout, tokens, TOKENS, dst_blocks, N_REQ_BLOCKS, 0, NULL, 0, 0, &job), CG_OK);
    cg_context_free(ctx);
    ctx = NULL;
    CHECK_EQ(cg_job_wait(job, CG_STAGE_DONE, WAIT_MS), CG_OK);
    cg_job_progress info;
    CHECK_EQ(cg_job_info(job, &info), CG_OK);
    CHECK_EQ(info.done, 1);
    CHECK_EQ(info.chunks_ok + info.chunks_failed, N_CHUNKS);
    printf("job after cg_context_free: done, %" PRIu64 " ok, %" PRIu64 " failed\n", info.chunks_ok, info.chunks_failed);
    cg_job_free(job);
    cg_layout_free(late_layout);
    engine_free(&late);

    cg_layout_free(src_layout);
    engine_free(&srce);
    free_expected();
    st_close(&fixture);

    printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "OK", checks, failures);
    return failures ? 1 : 0;
}
