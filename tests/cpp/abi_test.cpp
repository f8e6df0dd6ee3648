// The C ABI from C++17 through a small RAII wrapper (unique_ptr with custom
// deleters for cg_context, cg_layout, cg_job; errors as exceptions): store
// the real KV fixture from a FlashInfer NHD layout, lookup, load it into a
// vLLM cross-layer pool (one tensor for all layers, block-major, stride_layer)
// and a vLLM flash-attn NHD per-layer layout in shuffled block orders, and
// check that both hold exactly the CLI's decoded chunks. Built with ASan/UBSan
// by scripts/c_tests.sh.
//
//   abi_test_cpp FIXTURE WORK_DIR     (as tests/c/abi_test.c)

#include <cachegen.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../c/safetensors_min.h"

namespace cg {

// A failed call: the status and cg_last_error_message().
struct error : std::runtime_error {
    int32_t code;
    error(int32_t c, const std::string &what) : std::runtime_error(what), code(c) {}
};

inline void check(int32_t rc, const char *call) {
    if (rc != CG_OK) throw error(rc, std::string(call) + " -> " + std::to_string(rc) + ": " + cg_last_error_message());
}

struct context_deleter {
    void operator()(cg_context *p) const noexcept { cg_context_free(p); }
};
struct layout_deleter {
    void operator()(cg_layout *p) const noexcept { cg_layout_free(p); }
};
struct job_deleter {
    void operator()(cg_job *p) const noexcept { cg_job_free(p); }
};
using context = std::unique_ptr<cg_context, context_deleter>;
using layout = std::unique_ptr<cg_layout, layout_deleter>;

inline context make_context(const std::string &json) {
    cg_context *p = nullptr;
    check(cg_context_new(json.c_str(), &p), "cg_context_new");
    return context(p);
}

inline layout make_layout(const cg_layout_desc &d) {
    cg_layout *p = nullptr;
    check(cg_layout_new(&d, &p), "cg_layout_new");
    return layout(p);
}

// A store or load; the handle is freed (and engine memory released) by the destructor.
class job {
  public:
    explicit job(cg_job *p) : p_(p) {}
    void wait(uint32_t stage, int64_t timeout_ms = 60000) const {
        int32_t rc = cg_job_wait(p_.get(), stage, timeout_ms);
        if (rc == CG_PENDING) throw error(rc, "cg_job_wait: timed out");
        check(rc, "cg_job_wait");
    }
    void wait_layer(uint32_t l, int64_t timeout_ms = 60000) const {
        int32_t rc = cg_job_wait_layer(p_.get(), l, timeout_ms);
        if (rc == CG_PENDING) throw error(rc, "cg_job_wait_layer: timed out");
        check(rc, "cg_job_wait_layer");
    }
    cg_job_progress info() const {
        cg_job_progress i{};
        check(cg_job_info(p_.get(), &i), "cg_job_info");
        return i;
    }
    std::vector<uint32_t> failed_blocks() const {
        size_t n = 0;
        check(cg_job_failed_blocks(p_.get(), nullptr, 0, &n), "cg_job_failed_blocks");
        std::vector<uint32_t> out(n);
        check(cg_job_failed_blocks(p_.get(), out.data(), out.size(), &n), "cg_job_failed_blocks");
        out.resize(std::min(n, out.size()));
        return out;
    }

  private:
    std::unique_ptr<cg_job, job_deleter> p_;
};

inline job store(const context &c, const layout &l, const std::vector<uint32_t> &tokens, const std::vector<uint32_t> &blocks,
                 const std::string &salt = "") {
    cg_job *p = nullptr;
    check(cg_store(c.get(), l.get(), tokens.data(), tokens.size(), blocks.data(), blocks.size(),
                   reinterpret_cast<const uint8_t *>(salt.data()), salt.size(), &p),
          "cg_store");
    return job(p);
}

inline job load(const context &c, const layout &l, const std::vector<uint32_t> &tokens, const std::vector<uint32_t> &blocks,
                size_t first_token = 0, uint64_t lease = 0, const std::string &salt = "") {
    cg_job *p = nullptr;
    check(cg_load(c.get(), l.get(), tokens.data(), tokens.size(), blocks.data(), blocks.size(), first_token,
                  reinterpret_cast<const uint8_t *>(salt.data()), salt.size(), lease, &p),
          "cg_load");
    return job(p);
}

inline uint64_t lookup(const context &c, const std::vector<uint32_t> &tokens) {
    uint64_t matched = 0;
    check(cg_lookup(c.get(), tokens.data(), tokens.size(), nullptr, 0, 0, &matched, nullptr), "cg_lookup");
    return matched;
}

inline std::string stats_json(const context &c) {
    size_t len = 0;
    int32_t rc = cg_stats_json(c.get(), nullptr, 0, &len);
    if (rc != CG_ERR_BUFFER_TOO_SMALL) check(rc, "cg_stats_json");
    std::string s(len + 1, '\0');
    check(cg_stats_json(c.get(), &s[0], s.size(), &len), "cg_stats_json");
    s.resize(len);
    return s;
}

}  // namespace cg

namespace {

constexpr uint32_t LAYERS = 30, TOKENS = 320, HEADS = 3, HEAD_DIM = 64, BS = 16, CHUNK = 64, ES = 2;
constexpr uint32_t N_BLOCKS = TOKENS / BS;
constexpr size_t ROW = size_t{HEADS} * HEAD_DIM * ES;

int failures = 0;
#define EXPECT(cond)                                                                            \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            failures++;                                                                         \
            std::cerr << "FAIL " << __FILE__ << ":" << __LINE__ << ": " #cond << std::endl;    \
        }                                                                                       \
    } while (0)

// One engine's paged memory: byte buffers plus the layout description.
struct engine {
    std::string name;
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<uint64_t> base;
    cg_layout_desc desc{};

    uint8_t *at(uint32_t l, uint32_t s, uint32_t b, uint32_t t, uint32_t h) const {
        intptr_t a = static_cast<intptr_t>(desc.layer_base[l]) + intptr_t(l) * desc.stride_layer + intptr_t(b) * desc.stride_block +
                     intptr_t(s) * desc.stride_kv + intptr_t(t) * desc.stride_token + intptr_t(h) * desc.stride_head;
        return reinterpret_cast<uint8_t *>(a);
    }
};

cg_layout_desc common(uint32_t num_blocks) {
    cg_layout_desc d{};
    d.kind = CG_KIND_KEY_VALUE;
    d.dtype = CG_DTYPE_F16;
    d.memory = CG_MEMORY_HOST;
    d.layers = LAYERS;
    d.num_blocks = num_blocks;
    d.block_size = BS;
    d.heads = HEADS;
    d.head_dim = HEAD_DIM;
    return d;
}

// Per-layer tensors; `block_major`: FlashInfer (num_blocks, 2, bs, heads, dim),
// else vLLM flash-attn (2, num_blocks, bs, heads, dim). NHD in both.
engine per_layer(bool block_major, uint32_t num_blocks) {
    engine e;
    e.name = block_major ? "FlashInfer NHD" : "vLLM flash-attn NHD";
    const int64_t d = HEAD_DIM * ES, tok = HEADS * d, blk = BS * tok;
    for (uint32_t l = 0; l < LAYERS; l++) e.bufs.emplace_back(size_t(2) * num_blocks * blk, 0);
    for (auto &b : e.bufs) e.base.push_back(reinterpret_cast<uintptr_t>(b.data()));
    e.desc = common(num_blocks);
    e.desc.layer_base = e.base.data();
    e.desc.stride_head = d;
    e.desc.stride_token = tok;
    e.desc.stride_block = block_major ? 2 * blk : blk;
    e.desc.stride_kv = block_major ? blk : int64_t(num_blocks) * blk;
    return e;
}

// vLLM cross-layer cache: one tensor (num_blocks, layers, 2, bs, heads, dim).
engine cross_layer(uint32_t num_blocks) {
    engine e;
    e.name = "vLLM cross-layer pool NHD";
    const int64_t d = HEAD_DIM * ES, tok = HEADS * d, kv = BS * tok, layer = 2 * kv, blk = LAYERS * layer;
    e.bufs.emplace_back(size_t(num_blocks) * blk, 0);
    e.base.assign(LAYERS, reinterpret_cast<uintptr_t>(e.bufs[0].data()));
    e.desc = common(num_blocks);
    e.desc.layer_base = e.base.data();
    e.desc.stride_head = d;
    e.desc.stride_token = tok;
    e.desc.stride_kv = kv;
    e.desc.stride_layer = layer;
    e.desc.stride_block = blk;
    return e;
}

// Per layer and stream, [tokens, heads, dim] f16 bytes.
using tensors = std::vector<std::vector<uint8_t>>;  // index l * 2 + s

tensors read_kv(const std::string &path, uint32_t tokens) {
    st_file f;
    if (st_open(path.c_str(), &f) != 0) throw std::runtime_error("cannot read " + path);
    tensors out;
    for (uint32_t l = 0; l < LAYERS; l++)
        for (const char *s : {"key", "value"}) {
            st_tensor t;
            std::string name = "layers." + std::to_string(l) + "." + s;
            if (st_get_f16_3d(&f, name.c_str(), tokens, HEADS, HEAD_DIM, &t) != 0) {
                st_close(&f);
                throw std::runtime_error(path + ": bad tensor " + name);
            }
            out.emplace_back(t.data, t.data + t.nbytes);
        }
    st_close(&f);
    return out;
}

void fill(engine &e, const tensors &kv, const std::vector<uint32_t> &blocks) {
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t s = 0; s < 2; s++)
            for (uint32_t i = 0; i < TOKENS; i++)
                for (uint32_t h = 0; h < HEADS; h++)
                    std::memcpy(e.at(l, s, blocks[i / BS], i % BS, h), kv[l * 2 + s].data() + i * ROW + h * HEAD_DIM * ES, HEAD_DIM * ES);
}

tensors gather(const engine &e, const std::vector<uint32_t> &blocks) {
    tensors out(LAYERS * 2, std::vector<uint8_t>(TOKENS * ROW));
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t s = 0; s < 2; s++)
            for (uint32_t i = 0; i < TOKENS; i++)
                for (uint32_t h = 0; h < HEADS; h++)
                    std::memcpy(out[l * 2 + s].data() + i * ROW + h * HEAD_DIM * ES, e.at(l, s, blocks[i / BS], i % BS, h), HEAD_DIM * ES);
    return out;
}

std::vector<uint32_t> read_tokens(const std::string &dir) {
    std::ifstream in(dir + "/tokens.u32", std::ios::binary);
    std::vector<uint8_t> raw(TOKENS * 4);
    if (!in.read(reinterpret_cast<char *>(raw.data()), raw.size())) throw std::runtime_error("cannot read tokens.u32");
    std::vector<uint32_t> t(TOKENS);
    for (uint32_t i = 0; i < TOKENS; i++)
        t[i] = uint32_t(raw[4 * i]) | uint32_t(raw[4 * i + 1]) << 8 | uint32_t(raw[4 * i + 2]) << 16 | uint32_t(raw[4 * i + 3]) << 24;
    return t;
}

}  // namespace

int main(int argc, char **argv) try {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " FIXTURE WORK_DIR\n";
        return 2;
    }
    const std::string dir = argv[2];
    const tensors kv = read_kv(argv[1], TOKENS);
    const std::vector<uint32_t> tokens = read_tokens(dir);
    // Expected: the CLI's decode of each 64-token chunk, concatenated.
    tensors expected(LAYERS * 2);
    for (uint32_t c = 0; c < TOKENS / CHUNK; c++) {
        tensors part = read_kv(dir + "/decoded_" + std::to_string(c) + ".safetensors", CHUNK);
        for (size_t i = 0; i < part.size(); i++) expected[i].insert(expected[i].end(), part[i].begin(), part[i].end());
    }

    // Errors come back as exceptions with the status and message.
    try {
        cg::make_context("{\"namespace\": {}}");
        EXPECT(false);
    } catch (const cg::error &e) {
        EXPECT(e.code == CG_ERR_CONFIG);
        std::cout << "bad config: " << e.what() << "\n";
    }

    cg::context ctx = cg::make_context(
        R"({"namespace": {"model": "smollm2-cpp-abi-test", "kv_dtype": "f16", "block_size": 16},
            "chunk_tokens": 64, "level": "default", "io_threads": 2, "decode_threads": 2})");

    std::vector<uint32_t> src_blocks(N_BLOCKS);
    std::iota(src_blocks.begin(), src_blocks.end(), 0u);
    engine src = per_layer(true, N_BLOCKS);
    fill(src, kv, src_blocks);
    {
        cg::layout src_layout = cg::make_layout(src.desc);
        cg::job st = cg::store(ctx, src_layout, tokens, src_blocks);
        st.wait(CG_STAGE_REUSABLE);
        st.wait(CG_STAGE_DONE);
        cg_job_progress i = st.info();
        EXPECT(i.kind == CG_JOB_STORE && i.done == 1 && i.chunks_ok == TOKENS / CHUNK && i.chunks_failed == 0);
    }  // layout and job freed here
    std::cout << "stored " << TOKENS << " tokens from " << src.name << "\n";
    EXPECT(cg::lookup(ctx, tokens) == TOKENS);

    std::mt19937 rng(12345);
    std::vector<tensors> loaded;
    for (int which = 0; which < 2; which++) {
        const uint32_t num_blocks = 29;
        engine dst = which == 0 ? cross_layer(num_blocks) : per_layer(false, num_blocks);
        std::vector<uint32_t> all(num_blocks);
        std::iota(all.begin(), all.end(), 0u);
        std::shuffle(all.begin(), all.end(), rng);
        std::vector<uint32_t> blocks(all.begin(), all.begin() + N_BLOCKS);
        cg::layout l = cg::make_layout(dst.desc);
        cg::job ld = cg::load(ctx, l, tokens, blocks);
        for (uint32_t layer = 0; layer < LAYERS; layer++) ld.wait_layer(layer);
        ld.wait(CG_STAGE_DONE);
        cg_job_progress i = ld.info();
        EXPECT(i.kind == CG_JOB_LOAD && i.layers_done == LAYERS && i.chunks_ok == TOKENS / CHUNK && i.chunks_failed == 0);
        EXPECT(ld.failed_blocks().empty());
        loaded.push_back(gather(dst, blocks));
        EXPECT(loaded.back() == expected);
        std::cout << "loaded into " << dst.name << " (shuffled blocks): " << (loaded.back() == expected ? "equal" : "DIFFERENT")
                  << " to the CLI's decoded chunks\n";
    }
    EXPECT(loaded[0] == loaded[1]);
    EXPECT(loaded[0] != kv);  // lossy: the expected bytes are the decoded ones, not the originals

    // A load of unknown tokens fails every block, and the job outlives its layout handle.
    {
        engine dst = per_layer(false, N_BLOCKS);
        std::vector<uint32_t> other(tokens);
        for (auto &t : other) t += 1;
        cg::job ld = [&] {
            cg::layout l = cg::make_layout(dst.desc);
            return cg::load(ctx, l, other, src_blocks);
        }();
        ld.wait(CG_STAGE_DONE);
        EXPECT(ld.failed_blocks() == src_blocks);
    }

    const std::string stats = cg::stats_json(ctx);
    EXPECT(stats.find("\"counters\"") != std::string::npos);
    EXPECT(stats.find("\"load_chunks_ok\":10") != std::string::npos);
    std::cout << (failures ? "FAILED" : "OK") << ": C++ RAII round trip, " << failures << " failures\n";
    return failures ? 1 : 0;
} catch (const std::exception &e) {
    std::cerr << "FAIL: exception: " << e.what() << "\n";
    return 1;
}
