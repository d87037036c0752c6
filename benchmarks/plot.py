"""PNG plots (and the printed summary) from the benchmarks' JSON files.

    python benchmarks/plot.py                               # newest attention_*.json and train_step_*.json
    python benchmarks/plot.py benchmarks/results/attention_NVIDIA-H100-80GB-HBM3_20250101-120000.json
    python benchmarks/plot.py --summary-only                # print the summaries, draw nothing

Attention: one PNG per dtype, rows fwd / bwd / fwd+bwd TFLOP/s and peak memory, one column per shape, one bar
per method at each prefix length P. Training step: tokens/s and peak memory per model and path.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))


def newest(folder: str, pattern: str):
    files = sorted(glob.glob(os.path.join(folder, pattern)), key=os.path.getmtime)
    return files[-1] if files else None


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"plotting needs matplotlib: pip install 'prefix_attn[bench]' ({exc})") from None
    return plt


def plot_attention(results: dict, out_prefix: str) -> List[str]:
    plt = _plt()
    rows = [r for r in results["rows"] if r.get("ms") is not None and r.get("status") == "ok"]
    meta = results["meta"]
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype]
        shapes = [s["name"] for s in meta.get("shapes", [])] or sorted({r["shape"] for r in sel})
        shapes = [s for s in shapes if any(r["shape"] == s for r in sel)]
        modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in sel)]
        panels = [(m, "tflops") for m in modes]
        if any(r["peak_mib"] is not None for r in sel):
            panels.append(("fwdbwd" if "fwdbwd" in modes else modes[-1], "peak_mib"))
        methods = [m for m in meta.get("methods", []) if any(r["method"] == m for r in sel)]
        fig, axes = plt.subplots(
            len(panels), len(shapes), figsize=(4.2 * len(shapes), 3.0 * len(panels)), squeeze=False
        )
        for j, shape in enumerate(shapes):
            prefixes = sorted({r["prefix"] for r in sel if r["shape"] == shape})
            for i, (mode, field) in enumerate(panels):
                ax = axes[i][j]
                width = 0.8 / max(1, len(methods))
                for k, method in enumerate(methods):
                    vals = []
                    for p in prefixes:
                        hit = [
                            r[field]
                            for r in sel
                            if (r["shape"], r["prefix"], r["mode"], r["method"]) == (shape, p, mode, method)
                            and r[field] is not None
                        ]
                        vals.append(hit[0] if hit else 0.0)
                    xs = [x + (k - (len(methods) - 1) / 2) * width for x in range(len(prefixes))]
                    ax.bar(xs, vals, width, label=method)
                ax.set_xticks(range(len(prefixes)))
                ax.set_xticklabels([f"P={p}" for p in prefixes])
                label = {"fwd": "forward", "bwd": "backward", "fwdbwd": "fwd+bwd"}[mode]
                ax.set_ylabel(f"{label} TFLOP/s" if field == "tflops" else f"{label} peak MiB")
                if i == 0:
                    ax.set_title(shape)
                ax.grid(axis="y", alpha=0.3)
        height = fig.get_size_inches()[1]
        top = 1 - 0.8 / height  # room for the title and the legend
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="lower center",
            bbox_to_anchor=(0.5, top),
            ncol=min(len(labels), 5),
            fontsize=8,
        )
        scaled = " (SCALED-DOWN CPU shapes)" if meta.get("scaled_down") else ""
        fig.suptitle(
            f"prefix attention, {dtype}, {meta['device_name']}{scaled}\n"
            f"torch {meta['torch']}, triton {meta['triton']}, {meta['date'][:10]}",
            y=0.998,
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0, 1, top))
        path = f"{out_prefix}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_train_step(results: dict, out_prefix: str) -> List[str]:
    plt = _plt()
    rows = [r for r in results["rows"] if r.get("tokens_per_s")]
    if not rows:
        return []
    meta = results["meta"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fields = [("tokens_per_s", "tokens/s")] + (
        [("peak_mib", "peak MiB")] if any(r["peak_mib"] for r in rows) else []
    )
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 3.6), squeeze=False)
    width = 0.8 / len(paths)
    for i, (field, label) in enumerate(fields):
        ax = axes[0][i]
        for k, path in enumerate(paths):
            vals = [
                next((r[field] or 0.0 for r in rows if r["model"] == m and r["path"] == path), 0.0)
                for m in models
            ]
            ax.bar(
                [x + (k - (len(paths) - 1) / 2) * width for x in range(len(models))], vals, width, label=path
            )
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    tiny = " (TINY configs)" if meta.get("tiny") else ""
    fig.suptitle(
        f"prefix-tuning training step, {meta['dtype']}, P={meta['prefix']}, {meta['device_name']}{tiny}",
        fontsize=9,
    )
    fig.tight_layout()
    path = f"{out_prefix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> List[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "files", nargs="*", help="attention_*.json / train_step_*.json (default: the newest of each)"
    )
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="folder to look in")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    files = args.files or [
        f for f in (newest(args.results, "train_step_*.json"), newest(args.results, "attention_*.json")) if f
    ]
    if not files:
        raise SystemExit(f"no results in {args.results}; run benchmarks/bench_attention.py first")
    sys.path.insert(0, HERE)
    import bench_attention
    import bench_train_step

    written = []
    for path in files:
        with open(path) as f:
            results = json.load(f)
        stem = path[:-5]
        is_attention = os.path.basename(path).startswith("attention") or "matmul" in results
        if not args.summary_only:
            written += (plot_attention if is_attention else plot_train_step)(results, stem)
        print(bench_attention.summary(results) if is_attention else bench_train_step.table(results))
    for w in written:
        print(f"wrote {w}")
    return written


if __name__ == "__main__":
    main()
