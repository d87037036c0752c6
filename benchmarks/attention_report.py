"""The attention suite's report: the targets of benchmarks/README.md evaluated on a result, the full table, the
summary printed last, and the JSON / CSV files.

``evaluate_targets(results)`` gives each target met / missed / no data with its numbers; ``table`` and ``summary``
format a result (``plot.py`` prints ``summary`` of a saved JSON); ``write`` saves a result as JSON and CSV.
"""

from __future__ import annotations

import math
from typing import List

import torch
from common import write_csv, write_json

TARGET_SHAPE, TARGET_P = "llama-7b", 64  # where the matmul-rate targets are stated
CSV_FIELDS = ["shape", "batch", "heads_q", "heads_kv", "seq", "head_dim", "prefix", "dtype", "mode", "method",
              "baseline", "ms", "tflops", "peak_mib", "flops", "err_vs_reference_small", "err_vs_prefix_attn",
              "status", "note"]


def evaluate_targets(results: dict) -> List[dict]:
    """The targets (stated for an H100 or H200 in bfloat16), each met / missed / no data, with numbers."""
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    dtypes = [r["dtype"] for r in rows]
    dtype = "bfloat16" if "bfloat16" in dtypes else (dtypes[0] if dtypes else "bfloat16")
    meta = results["meta"]
    note = f"measured on {meta['device_name']} in {dtype}"
    if not any(gpu in meta["device_name"] for gpu in ("H100", "H200")) or dtype != "bfloat16":
        note += "; the targets are stated for an H100 / H200 in bfloat16, so this is not the real test"
    if meta.get("scaled_down"):
        note += "; shapes scaled down for the CPU"
    rows = [r for r in rows if r["dtype"] == dtype]

    def ms(shape, p, mode, pred):
        return {
            r["method"]: r["ms"]
            for r in rows
            if r["shape"] == shape and r["prefix"] == p and r["mode"] == mode and pred(r)
        }

    configs = sorted(
        {(r["shape"], r["prefix"]) for r in rows if r["method"] == "prefix_attn" and r["mode"] == "fwdbwd"}
    )
    targets = []

    def speedup_target(name, wanted, group_pred, label):
        per, worst = [], None
        for shape, p in configs:
            ours = ms(shape, p, "fwdbwd", lambda r: r["method"] == "prefix_attn")
            others = ms(shape, p, "fwdbwd", group_pred)
            if not ours or not others:
                continue
            best = min(others, key=others.get)
            ratio = others[best] / ours["prefix_attn"]
            per.append({"shape": shape, "prefix": p, "vs": best, "speedup": ratio})
            worst = ratio if worst is None else min(worst, ratio)
        if not per:
            return {"target": name, "status": "no data", "detail": f"no fwd+bwd timings of {label}"}
        n_met = sum(x["speedup"] >= wanted for x in per)
        geo = math.exp(sum(math.log(x["speedup"]) for x in per) / len(per))
        status = "met" if n_met == len(per) else "missed"
        return {
            "target": name,
            "status": status,
            "wanted": wanted,
            "worst": worst,
            "geomean": geo,
            "detail": f"{n_met}/{len(per)} configs >= {wanted}x; worst {worst:.2f}x, geomean {geo:.2f}x",
            "per_config": per,
        }

    targets.append(
        speedup_target(
            "fwd+bwd >= 1.5x faster than the best of baselines 2-4",
            1.5,
            lambda r: r["baseline"] in ("2", "3", "4"),
            "baselines 2-4",
        )
    )
    targets.append(
        speedup_target(
            "fwd+bwd >= 3x faster than baseline 1 (PEFT eager)",
            3.0,
            lambda r: r["baseline"] == "1",
            "baseline 1",
        )
    )

    mm = results["matmul"].get(dtype)
    for mode, wanted in (("fwd", 0.55), ("bwd", 0.40)):
        name = f"{mode} >= {wanted:.0%} of the dense {dtype} matmul rate ({TARGET_SHAPE}, P={TARGET_P})"
        r = [
            x
            for x in rows
            if x["shape"] == TARGET_SHAPE
            and x["prefix"] == TARGET_P
            and x["mode"] == mode
            and x["method"] == "prefix_attn"
        ]
        if not r or not mm:
            targets.append({"target": name, "status": "no data", "detail": "shape/P/mode not in this run"})
            continue
        frac = r[0]["tflops"] / mm["tflops"]
        targets.append(
            {
                "target": name,
                "status": "met" if frac >= wanted else "missed",
                "wanted": wanted,
                "value": frac,
                "detail": f"{r[0]['tflops']:.1f} / {mm['tflops']:.1f} TFLOP/s = {frac:.1%}",
            }
        )

    name = "peak memory at P=200 <= peak at P=0 + prefix + log-sum-exp (fwd+bwd)"
    per = []
    for p0 in results.get("memory_p0", []):
        if p0["dtype"] != dtype or p0.get("fwdbwd_peak_mib") is None:
            continue
        r = [
            x
            for x in rows
            if x["shape"] == p0["shape"]
            and x["prefix"] == 200
            and x["method"] == "prefix_attn"
            and x["mode"] == "fwdbwd"
            and x["peak_mib"] is not None
        ]
        if not r:
            continue
        r = r[0]
        elem = torch.finfo(getattr(torch, dtype)).bits // 8
        prefix_mib = 2 * r["heads_kv"] * 200 * r["head_dim"] * elem / 2**20
        lse_mib = r["batch"] * r["heads_q"] * r["seq"] * 4 / 2**20
        allowed = p0["fwdbwd_peak_mib"] + prefix_mib + lse_mib
        per.append(
            {
                "shape": p0["shape"],
                "p200_mib": r["peak_mib"],
                "p0_mib": p0["fwdbwd_peak_mib"],
                "allowed_mib": allowed,
                "met": r["peak_mib"] <= allowed,
            }
        )
    if not per:
        targets.append(
            {
                "target": name,
                "status": "no data",
                "detail": "needs CUDA peak memory, P=200 and the P=0 measurement",
            }
        )
    else:
        n_met = sum(x["met"] for x in per)
        detail = "; ".join(
            f"{x['shape']}: {x['p200_mib']:.0f} vs <= {x['allowed_mib']:.0f} MiB (P=0 {x['p0_mib']:.0f})"
            for x in per
        )
        targets.append(
            {
                "target": name,
                "status": "met" if n_met == len(per) else "missed",
                "detail": f"{n_met}/{len(per)} shapes: {detail}",
                "per_config": per,
            }
        )
    for t in targets:
        t["note"] = note
    return targets


# ----------------------------------------------------------------------------------------- output
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    """Every row: ms, TFLOP/s, how many times faster prefix_attn is, peak MiB, status."""
    rows = results["rows"]
    ours = {
        (r["shape"], r["dtype"], r["prefix"], r["mode"]): r["ms"]
        for r in rows
        if r["method"] == "prefix_attn" and r["ms"] is not None
    }
    head = (
        f"{'shape':14s} {'dtype':8s} {'P':>4s} {'mode':6s} {'method':16s} {'ms':>9s} {'TFLOP/s':>8s} "
        f"{'ours x':>7s} {'peak MiB':>9s}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"].startswith("unavailable"):
            continue  # listed once under the summary
        o = ours.get((r["shape"], r["dtype"], r["prefix"], r["mode"]))
        ratio = r["ms"] / o if (o and r["ms"]) else None
        lines.append(
            f"{r['shape']:14s} {r['dtype']:8s} {r['prefix']:4d} {r['mode']:6s} {r['method']:16s} "
            f"{fmt(r['ms'], '9.3f')} {fmt(r['tflops'], '8.2f')} {fmt(ratio, '7.2f')} "
            f"{fmt(r['peak_mib'], '9.0f')}  {r['status']}{'; ' + r['note'] if r.get('note') else ''}"
        )
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Compact fwd+bwd view, one line per (shape, dtype, P), then the targets: printed last."""
    meta = results["meta"]
    lines = [
        f"== prefix attention, {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"prefix_attn backend: {meta['prefix_attn_backend']}"
    ]
    if meta.get("scaled_down"):
        lines.append("   CPU run: shapes SCALED DOWN (batch and length cut), not the GPU shapes")
    if meta.get("wall_s") is not None:
        lines.append(f"   {meta['wall_s']:.0f} s in all, commit {meta['git_commit']}, {meta['date']}")
    for dt, m in results["matmul"].items():
        lines.append(f"   dense {dt} matmul {m['n']}^3: {m['tflops']:.2f} TFLOP/s")
    rows = results["rows"]
    keys = []
    for r in rows:
        k = (r["shape"], r["dtype"], r["prefix"])
        if k not in keys:
            keys.append(k)
    mode = "fwdbwd" if "fwdbwd" in meta["modes"] else meta["modes"][0]
    lines.append(f"   {mode}: ms of prefix_attn; 'x' = how many times faster prefix_attn is")
    lines.append(
        f"   {'shape':14s} {'dtype':8s} {'P':>4s} {'ours ms':>9s} {'TFLOP/s':>8s} "
        f"{'best of 2-4':>24s} {'x':>6s} {'peft x':>7s} {'MiB ours/peft':>15s}"
    )
    for shape, dtype, p in keys:
        sel = {
            r["method"]: r
            for r in rows
            if (r["shape"], r["dtype"], r["prefix"]) == (shape, dtype, p) and r["mode"] == mode
        }
        ours = sel.get("prefix_attn")
        if not ours or ours["ms"] is None:
            lines.append(
                f"   {shape:14s} {dtype:8s} {p:4d}  prefix_attn: {ours['status'] if ours else 'absent'}"
            )
            continue
        others = {n: r for n, r in sel.items() if r["baseline"] in ("2", "3", "4") and r["ms"] is not None}
        best = min(others, key=lambda n: others[n]["ms"]) if others else None
        peft = sel.get("peft_eager")
        mem = f"{fmt(ours['peak_mib'], '.0f')}/{fmt(peft['peak_mib'] if peft else None, '.0f')}"
        lines.append(
            f"   {shape:14s} {dtype:8s} {p:4d} {ours['ms']:9.3f} {fmt(ours['tflops'], '8.2f')} "
            f"{(best or '-'):>16s} {fmt(others[best]['ms'] if best else None, '7.3f')} "
            f"{fmt(others[best]['ms'] / ours['ms'] if best else None, '6.2f')} "
            f"{fmt(peft['ms'] / ours['ms'] if peft and peft['ms'] else None, '7.2f')} {mem:>15s}"
        )
    unavailable = {}
    for r in rows:
        if r["status"] != "ok":
            unavailable.setdefault(r["method"], r["status"])
    for name, why in unavailable.items():
        lines.append(f"   not timed somewhere: {name}: {why[:160]}")
    skipped = results.get("skipped", [])
    if skipped:
        lines.append(f"   SKIPPED (time budget): {len(skipped)} configs, e.g. {skipped[0]}")
    lines.append("== targets")
    for t in results.get("targets", []):
        lines.append(f"   [{t['status'].upper():7s}] {t['target']}: {t['detail']}")
    if results.get("targets"):
        lines.append(f"   ({results['targets'][0]['note']})")
    return "\n".join(lines)



def write(results: dict, json_path: str, csv_path: str) -> None:
    """The whole result as JSON; the rows as CSV under a comment line with the device, versions and commit."""
    write_json(json_path, results)
    meta = results["meta"]
    comment = (
        f"device={meta['device_name']}; torch={meta['torch']}; triton={meta['triton']}; "
        f"date={meta['date']}; commit={meta['git_commit']}; scaled_down={meta['scaled_down']}"
    )
    write_csv(csv_path, results["rows"], CSV_FIELDS, comment)
