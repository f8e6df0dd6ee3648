#!/usr/bin/env python3
"""TTFT vs bandwidth from cachegen-stream-bench's --json output.

One panel per context size, log-log: raw fp16 fetch, int8, the fixed default
level, adaptive, and recompute only (the adaptive SLO is drawn as a dotted
line). A benchmark artefact, not part of the test suite.

    cargo build --release --bin cachegen-stream-bench
    ./target/release/cachegen-stream-bench --json out/stream-bench.json
    .venv/bin/python scripts/plot_streaming.py out/stream-bench.json docs/plots/ttft_vs_bandwidth.svg

Needs matplotlib (python3 -m venv .venv && .venv/bin/pip install matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = [
    ("raw_s", "raw fp16", "tab:gray", "o"),
    ("int8_s", "int8", "tab:brown", "s"),
    ("default_s", "fixed default level", "tab:blue", "^"),
    ("adaptive_s", "adaptive", "tab:red", "D"),
    ("recompute_s", "recompute only", "tab:green", None),
]


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
    rows = data["ttft"]
    contexts = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(3.3 * len(contexts), 3.6), sharey=True)
    if len(contexts) == 1:
        axes = [axes]
    for ax, ctx in zip(axes, contexts):
        rs = sorted((r for r in rows if r["tokens"] == ctx), key=lambda r: r["gbps"])
        g = [r["gbps"] for r in rs]
        for key, label, color, marker in METHODS:
            ax.plot(g, [r[key] * 1e3 for r in rs], label=label, color=color, marker=marker, markersize=4,
                    linestyle="--" if marker is None else "-", linewidth=1.8 if key == "adaptive_s" else 1.2)
        ax.axhline(rs[0]["slo_s"] * 1e3, color="tab:red", linestyle=":", linewidth=0.9, label="adaptive SLO")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{ctx // 1024}K tokens")
        ax.set_xlabel("bandwidth (Gbit/s)")
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    axes[0].set_ylabel("time to first token (ms)")
    prefill = data.get("prefill_tps")
    prefill = f"{prefill:.0f} tokens/s" if prefill else "H100 anchors"
    fig.suptitle(f"Llama-3-8B-shaped KV, 256-token chunks (modelled transfer and GPU decode; prefill: {prefill})", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(dst, metadata={"Date": None})
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot_streaming.py BENCH_JSON OUT.svg")
    main(sys.argv[1], sys.argv[2])
