/*
 * A minimal, header-only safetensors reader for the C and C++ ABI tests:
 * an 8-byte little-endian header length, a JSON header
 * {"name": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, ...},
 * then the data. Only what the tests need: find a tensor by name, check its
 * dtype and shape, return a pointer to its bytes. Not a general JSON parser
 * (it relies on tensor names being quoted keys and on the per-tensor objects
 * having no nested objects, which the format guarantees).
 *
 * Compiles as C11 and C++17.
 */
#ifndef CACHEGEN_TESTS_SAFETENSORS_MIN_H
#define CACHEGEN_TESTS_SAFETENSORS_MIN_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct st_file {
    uint8_t *bytes; /* the whole file */
    size_t size;
    const char *header; /* points into bytes (not NUL-terminated) */
    size_t header_len;
    const uint8_t *data; /* start of the data section */
    size_t data_len;
} st_file;

typedef struct st_tensor {
    char dtype[16];
    size_t ndim;
    uint64_t shape[8];
    const uint8_t *data;
    size_t nbytes;
} st_tensor;

/* Reads `path`; returns 0 on success, -1 (with a message on stderr) otherwise. */
static int st_open(const char *path, st_file *f) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "safetensors: cannot open %s\n", path);
        return -1;
    }
    if (fseek(fp, 0, SEEK_END) != 0) {
        fclose(fp);
        return -1;
    }
    long size = ftell(fp);
    rewind(fp);
    if (size < 8) {
        fprintf(stderr, "safetensors: %s is too short\n", path);
        fclose(fp);
        return -1;
    }
    f->bytes = (uint8_t *)malloc((size_t)size);
    if (!f->bytes || fread(f->bytes, 1, (size_t)size, fp) != (size_t)size) {
        fprintf(stderr, "safetensors: cannot read %s\n", path);
        fclose(fp);
        free(f->bytes);
        f->bytes = NULL;
        return -1;
    }
    fclose(fp);
    f->size = (size_t)size;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | f->bytes[i];
    if (n > f->size - 8) {
        fprintf(stderr, "safetensors: %s: header length %llu exceeds the file\n", path, (unsigned long long)n);
        free(f->bytes);
        f->bytes = NULL;
        return -1;
    }
    f->header = (const char *)f->bytes + 8;
    f->header_len = (size_t)n;
    f->data = f->bytes + 8 + n;
    f->data_len = f->size - 8 - (size_t)n;
    return 0;
}

static void st_close(st_file *f) {
    free(f->bytes);
    memset(f, 0, sizeof *f);
}

/* First occurrence of `needle` in [hay, hay + len), or NULL. */
static const char *st_find(const char *hay, size_t len, const char *needle) {
    size_t n = strlen(needle);
    if (n == 0 || n > len) return NULL;
    for (size_t i = 0; i + n <= len; i++)
        if (memcmp(hay + i, needle, n) == 0) return hay + i;
    return NULL;
}

/* Parses up to `max` unsigned integers of a JSON array starting at `p` ('[').
 * Returns the count, or -1 if malformed. */
static int st_parse_u64s(const char *p, const char *end, uint64_t *out, int max) {
    if (p >= end || *p != '[') return -1;
    p++;
    int n = 0;
    for (;;) {
        while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) p++;
        if (p < end && *p == ']') return n;
        if (p >= end || *p < '0' || *p > '9' || n >= max) return -1;
        uint64_t v = 0;
        while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (uint64_t)(*p++ - '0');
        out[n++] = v;
        while (p < end && (*p == ' ' || *p == '\n')) p++;
        if (p < end && *p == ',') p++;
    }
}

/* The value of key `"key"` inside [obj, end): pointer to the first
 * non-space character after the colon, or NULL. */
static const char *st_value(const char *obj, const char *end, const char *key) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *k = st_find(obj, (size_t)(end - obj), quoted);
    if (!k) return NULL;
    const char *p = k + strlen(quoted);
    while (p < end && (*p == ' ' || *p == ':')) p++;
    return p < end ? p : NULL;
}

/* Finds tensor `name`; returns 0 on success, -1 if absent or malformed. */
static int st_get(const st_file *f, const char *name, st_tensor *t) {
    memset(t, 0, sizeof *t);
    char quoted[256];
    snprintf(quoted, sizeof quoted, "\"%s\"", name);
    const char *hend = f->header + f->header_len;
    const char *k = st_find(f->header, f->header_len, quoted);
    if (!k) return -1;
    const char *obj = (const char *)memchr(k, '{', (size_t)(hend - k));
    if (!obj) return -1;
    const char *oend = (const char *)memchr(obj, '}', (size_t)(hend - obj));
    if (!oend) return -1;

    const char *dt = st_value(obj, oend, "dtype");
    if (!dt || *dt != '"') return -1;
    dt++;
    const char *dte = (const char *)memchr(dt, '"', (size_t)(oend - dt));
    if (!dte || (size_t)(dte - dt) >= sizeof t->dtype) return -1;
    memcpy(t->dtype, dt, (size_t)(dte - dt));

    const char *sh = st_value(obj, oend, "shape");
    int nd = sh ? st_parse_u64s(sh, oend, t->shape, 8) : -1;
    if (nd < 0) return -1;
    t->ndim = (size_t)nd;

    uint64_t off[2];
    const char *of = st_value(obj, oend, "data_offsets");
    if (!of || st_parse_u64s(of, oend, off, 2) != 2 || off[0] > off[1] || off[1] > f->data_len) return -1;
    t->data = f->data + off[0];
    t->nbytes = (size_t)(off[1] - off[0]);
    return 0;
}

/* st_get, and checks dtype "F16" and shape [d0, d1, d2]. */
static int st_get_f16_3d(const st_file *f, const char *name, uint64_t d0, uint64_t d1, uint64_t d2, st_tensor *t) {
    if (st_get(f, name, t) != 0) {
        fprintf(stderr, "safetensors: tensor %s not found or malformed\n", name);
        return -1;
    }
    if (strcmp(t->dtype, "F16") != 0 || t->ndim != 3 || t->shape[0] != d0 || t->shape[1] != d1 || t->shape[2] != d2 ||
        t->nbytes != d0 * d1 * d2 * 2) {
        fprintf(stderr, "safetensors: tensor %s is %s with %zu dims [%llu, %llu, %llu], expected F16 [%llu, %llu, %llu]\n",
                name, t->dtype, t->ndim, (unsigned long long)t->shape[0], (unsigned long long)t->shape[1],
                (unsigned long long)t->shape[2], (unsigned long long)d0, (unsigned long long)d1, (unsigned long long)d2);
        return -1;
    }
    return 0;
}

#endif /* CACHEGEN_TESTS_SAFETENSORS_MIN_H */
