"""Prefix attention benchmark: ``prefix_attn`` against the ways people run prefix tuning today.

One command, on a GPU or on a CPU::

    python benchmarks/bench_attention.py                      # full set (GPU) / scaled-down set (CPU)
    python benchmarks/bench_attention.py --quick              # one shape, P=64 (GPU) / two tiny shapes (CPU)
    python benchmarks/bench_attention.py --shapes llama-7b --dtypes bfloat16 --modes fwdbwd --prefix 64

Methods, all measured in the same run on the same inputs, each checked for correctness before it is timed:

    prefix_attn        the fused op (Triton on CUDA; the native CPU kernel, else the reference, on CPU)
    peft_eager         baseline 1: PEFT's path through the stock eager attention: prefix expanded over the
                       batch, concatenated with the text K/V, repeat_kv for GQA, q @ k^T * scale + additive
                       0/finfo.min mask, softmax in float32 cast back, @ v
    sdpa[auto|flash|efficient|cudnn]
                       baseline 2: expand + concat + F.scaled_dot_product_attention with
                       attn_mask=causal_lower_right(T, P + T), PyTorch's choice and each backend forced
    flex               baseline 3: expand + concat + torch.compile(flex_attention) with a block mask from
                       mask_mod ``kv < P or kv - P <= q + (Tk - Tq)``
    flex_packed        baseline 3, expansion-free: the batch packed into one sequence behind a single copy of
                       the prefix, a document mask keeping each batch row to its own text
    flash_attn         baseline 4: flash_attn_func(causal=True) on expand + concat (its causal mask is
                       bottom-right aligned), when flash-attn is importable

FLOPs (flash-attention's convention, so figures compare): fwd = 4 * B * Hq * T * D * (P + T / 2),
bwd = 2.5 * fwd, fwd+bwd = 3.5 * fwd (prefix_attn.reference.attention_flops). Times are medians
(triton.testing.do_bench on CUDA, torch.utils.benchmark on CPU). Peak memory (CUDA) is the peak allocated
above the inputs during one call: the forward for "fwd", forward + backward for "bwd" and "fwdbwd".

Results go to ``<out>/attention_<device>_<date>.json`` and ``.csv``; ``benchmarks/plot.py`` draws them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

try:
    import prefix_attn
    from prefix_attn.reference import attention_flops, prefix_attention_reference
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import prefix_attn
    from prefix_attn.reference import attention_flops, prefix_attention_reference

MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Baseline groups, as numbered in benchmarks/README.md.
GROUP = {
    "prefix_attn": "ours",
    "peft_eager": "1",
    "sdpa[auto]": "2",
    "sdpa[flash]": "2",
    "sdpa[efficient]": "2",
    "sdpa[cudnn]": "2",
    "flex": "3",
    "flex_packed": "3",
    "flash_attn": "4",
}
# Correctness: max |method - expected| <= TOL * max(1, max |expected|), for the output and every gradient.
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-8}
CHECK_SEQ = 96  # sequence length of the small correctness check against the float32 reference


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq: int
    head_dim: int

    def __str__(self) -> str:
        return f"B{self.batch} Hq{self.heads_q} Hkv{self.heads_kv} T{self.seq} D{self.head_dim}"


GPU_SHAPES = [
    Shape("llama-7b", 4, 32, 32, 2048, 128),
    Shape("gpt2-small", 8, 12, 12, 1024, 64),
    Shape("gpt2-medium", 8, 16, 16, 1024, 64),
    Shape("llama3-8b-gqa", 4, 32, 8, 4096, 128),
]
# Same heads and head_dim, batch and length cut down so that a 2-core CPU finishes.
CPU_SHAPES = [
    Shape("llama-7b", 1, 32, 32, 256, 128),
    Shape("gpt2-small", 1, 12, 12, 256, 64),
    Shape("gpt2-medium", 1, 16, 16, 256, 64),
    Shape("llama3-8b-gqa", 1, 32, 8, 512, 128),
]
EXTRA_SHAPES = [Shape("tiny", 1, 4, 2, 32, 16)]  # for smoke tests
PREFIX_LENS = (64, 200, 10)  # P=64 first: the matmul-rate target is stated there
TARGET_SHAPE, TARGET_P = "llama-7b", 64


# ----------------------------------------------------------------------------------------- the methods
class Unavailable(Exception):
    """A method that cannot run here; the message is the reason, recorded in the results."""


def expand_concat(prefix: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[Hkv, P, D] + [B, Hkv, T, D] -> [B, Hkv, P + T, D]: the prefix copied into every batch row."""
    return torch.cat([prefix.unsqueeze(0).expand(text.shape[0], -1, -1, -1), text], dim=2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def additive_prefix_mask(len_q: int, len_k: int, num_prefix: int, dtype, device) -> torch.Tensor:
    """[1, 1, Tq, P + Tk] float mask as transformers builds it for eager attention: 0 where visible,
    finfo.min elsewhere; the P prefix columns visible to every query. Built once per model forward in
    transformers, so built once here, outside the timed region."""
    qpos = torch.arange(len_q, device=device) + (len_k - len_q)
    visible = torch.arange(len_k, device=device)[None, :] <= qpos[:, None]
    visible = torch.cat([torch.ones(len_q, num_prefix, dtype=torch.bool, device=device), visible], dim=1)
    mask = torch.zeros(len_q, num_prefix + len_k, dtype=dtype, device=device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def peft_eager_attention(q, k, v, prefix_k, prefix_v, add_mask, scale, softmax_dtype=torch.float32):
    """Baseline 1: what PEFT prefix tuning runs through transformers' eager_attention_forward
    (``softmax_dtype`` is float32 there; the tests pass float64 to check the rest of the math exactly)."""
    group = q.shape[1] // k.shape[1]
    key = repeat_kv(expand_concat(prefix_k, k), group)
    value = repeat_kv(expand_concat(prefix_v, v), group)
    weights = torch.matmul(q, key.transpose(2, 3)) * scale
    weights = weights + add_mask
    weights = F.softmax(weights, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return torch.matmul(weights, value)  # dropout 0


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


def make_sdpa(which: str, shape_q, len_k: int, num_prefix: int, scale: float, group: int):
    """Baseline 2: expand + concat + SDPA with a bottom-right causal bias. GQA through repeat_kv, as
    transformers' sdpa path does whenever an attention mask is passed."""
    from torch.nn.attention.bias import causal_lower_right

    len_q = shape_q[2]
    bias = causal_lower_right(len_q, num_prefix + len_k)

    def run(q, k, v, prefix_k, prefix_v):
        key = repeat_kv(expand_concat(prefix_k, k), group)
        value = repeat_kv(expand_concat(prefix_v, v), group)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=bias, scale=scale)

    if which == "auto":
        return run
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(which)

    def forced(q, k, v, prefix_k, prefix_v):
        with sdpa_kernel([backend]):
            return run(q, k, v, prefix_k, prefix_v)

    return forced


def _dynamo_allow_many_shapes() -> None:
    """Every (shape, P, dtype) compiles its own FlexAttention kernel; the default recompile limit (8) would
    silently send the later ones to the slow eager path."""
    import torch._dynamo

    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))


_FLEX = {}


def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "compiled" not in _FLEX:
        _dynamo_allow_many_shapes()
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


def make_flex(
    packed: bool,
    shape_q,
    batch: int,
    len_k: int,
    num_prefix: int,
    scale: float,
    group: int,
    device,
    compiled: bool,
):
    """Baseline 3. Expanded: expand + concat, mask_mod ``kv < P or kv - P <= q + (Tk - Tq)``. Packed
    (expansion-free): queries of all batch rows in one sequence of length B*Tq, keys ``[prefix | text of
    row 0 | text of row 1 | ...]``, and a mask_mod that keeps each row to the prefix and its own text."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _flex_fn(compiled)
    len_q, heads_q, head_dim = shape_q[2], shape_q[1], shape_q[3]
    P, Tq, Tk, off = num_prefix, len_q, len_k, len_k - len_q
    gqa = group > 1
    if not packed:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx + off)

        block_mask = create_block_mask(mask_mod, None, None, Tq, P + Tk, device=device)

        def run(q, k, v, prefix_k, prefix_v):
            return flex(
                q,
                expand_concat(prefix_k, k),
                expand_concat(prefix_v, v),
                block_mask=block_mask,
                scale=scale,
                enable_gqa=gqa,
            )

        return run

    def packed_mask_mod(b, h, q_idx, kv_idx):
        t = kv_idx - P
        same_row = (t // Tk) == (q_idx // Tq)
        return (kv_idx < P) | (same_row & (t % Tk <= q_idx % Tq + off))

    block_mask = create_block_mask(packed_mask_mod, None, None, batch * Tq, P + batch * Tk, device=device)

    def run_packed(q, k, v, prefix_k, prefix_v):
        hkv = k.shape[1]
        qp = q.transpose(0, 1).reshape(1, heads_q, batch * Tq, head_dim)
        kp = torch.cat([prefix_k, k.transpose(0, 1).reshape(hkv, batch * Tk, head_dim)], dim=1)[None]
        vp = torch.cat([prefix_v, v.transpose(0, 1).reshape(hkv, batch * Tk, head_dim)], dim=1)[None]
        out = flex(qp, kp, vp, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        return out.reshape(heads_q, batch, Tq, head_dim).transpose(0, 1)

    return run_packed


def make_flash_attn(scale: float):
    """Baseline 4: flash-attn on expand + concat; its causal=True is bottom-right aligned when
    seqlen_q < seqlen_k, which is exactly the prefix mask. Inputs are transposed views, no copies."""
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken build
        raise Unavailable(f"flash-attn not importable: {type(exc).__name__}: {exc}") from None

    def run(q, k, v, prefix_k, prefix_v):
        out = flash_attn_func(
            q.transpose(1, 2),
            expand_concat(prefix_k, k).transpose(1, 2),
            expand_concat(prefix_v, v).transpose(1, 2),
            causal=True,
            softmax_scale=scale,
        )
        return out.transpose(1, 2)

    return run


def prefix_attn_backend(device: torch.device) -> tuple:
    """(backend passed to prefix_attention, note for the output)."""
    if device.type == "cuda":
        return "triton", "Triton kernels"
    reason = prefix_attn.available_backends().get("cpu", "unknown")
    if reason == "ok":
        return "cpu", "native CPU kernel"
    return "torch", f"native CPU kernel unavailable ({reason}); timing the PyTorch reference instead"


def build_methods(
    args,
    shape_q,
    batch,
    len_k,
    num_prefix,
    dtype,
    device,
    scale,
    group,
    backend,
    names: List[str],
    compile_flex: bool = True,
) -> Dict[str, object]:
    """{name: callable(q, k, v, prefix_k, prefix_v) -> out, or the reason it is unavailable (str)}."""
    methods: Dict[str, object] = {}
    for name in names:
        try:
            if name == "prefix_attn":

                def ours(q, k, v, pk, pv, _b=backend):
                    return prefix_attn.prefix_attention(
                        q, k, v, pk, pv, causal=True, softmax_scale=scale, backend=_b
                    )

                methods[name] = ours
            elif name == "peft_eager":
                mask = additive_prefix_mask(shape_q[2], len_k, num_prefix, dtype, device)

                def peft(q, k, v, pk, pv, _m=mask):
                    return peft_eager_attention(q, k, v, pk, pv, _m, scale)

                methods[name] = peft
            elif name.startswith("sdpa["):
                which = name[5:-1]
                if which != "auto" and device.type != "cuda":
                    raise Unavailable(f"SDPA backend '{which}' is CUDA-only")
                methods[name] = make_sdpa(which, shape_q, len_k, num_prefix, scale, group)
            elif name in ("flex", "flex_packed"):
                compiled = compile_flex and not (device.type == "cpu" and args.quick)
                methods[name] = make_flex(
                    name == "flex_packed", shape_q, batch, len_k, num_prefix, scale, group, device, compiled
                )
            elif name == "flash_attn":
                if device.type != "cuda":
                    raise Unavailable("flash-attn is CUDA-only")
                if dtype not in (torch.float16, torch.bfloat16):
                    raise Unavailable("flash-attn takes float16 / bfloat16 only")
                methods[name] = make_flash_attn(scale)
            else:
                raise Unavailable(f"unknown method {name!r}")
        except Unavailable as exc:
            methods[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - record why, keep going
            methods[name] = f"setup failed: {type(exc).__name__}: {_short(exc)}"
    return methods


# ----------------------------------------------------------------------------------------- measuring
def _short(exc: BaseException, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + " ..."


def make_inputs(batch, heads_q, heads_kv, len_q, len_k, num_prefix, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = rnd(batch, heads_q, len_q, head_dim)
    k = rnd(batch, heads_kv, len_k, head_dim)
    v = rnd(batch, heads_kv, len_k, head_dim)
    pk = rnd(heads_kv, num_prefix, head_dim)
    pv = rnd(heads_kv, num_prefix, head_dim)
    dout = rnd(batch, heads_q, len_q, head_dim)
    leaves = [t.requires_grad_(True) for t in (q, k, v, pk, pv)]
    return leaves, dout


def forward_backward(fn, leaves, dout):
    """(out, grads) with every leaf's gradient (None where the method gave none)."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def max_rel_error(got, want) -> float:
    """max |got - want| / max(1, max |want|), over the output and each gradient; inf on a missing one."""
    worst = 0.0
    for a, b in zip(got, want):
        if b is None or b.numel() == 0:
            continue
        if a is None:
            return float("inf")
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, (a - b).abs().max().item() / max(1.0, b.abs().max().item()))
    return worst


def timer(fn: Callable[[], object], device: torch.device, grad_to_none, args) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        try:
            return float(
                do_bench(
                    fn,
                    warmup=args.warmup_ms,
                    rep=args.rep_ms,
                    grad_to_none=grad_to_none,
                    return_mode="median",
                )
            )
        except TypeError:  # older Triton: no return_mode
            return float(
                do_bench(
                    fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, quantiles=[0.5]
                )[0]
            )
    import torch.utils.benchmark as tbench

    def run():
        for t in grad_to_none or ():
            t.grad = None
        fn()

    run()  # warm-up (and first-call compilation)
    t = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=args.cpu_min_run_time).median * 1e3


def peak_memory_mib(fn: Callable[[], object], device: torch.device, leaves) -> Optional[float]:
    """Peak allocated above what exists before the call (the inputs), during one call. CUDA only."""
    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    for t in leaves:
        t.grad = None
    return peak / 2**20


def matmul_rate(dtype, device, args) -> dict:
    """Dense matmul TFLOP/s of this device in this dtype (the yardstick of the matmul-rate targets)."""
    n = 8192 if device.type == "cuda" else (512 if args.quick else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: torch.matmul(a, b), device, None, args)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------- the run
def run_config(args, shape: Shape, num_prefix: int, dtype, device, method_names, backend, record):
    """Check then time every method at one (shape, P, dtype); rows go to record(row)."""
    B, Hq, Hkv, T, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.head_dim
    group = Hq // Hkv
    scale = D**-0.5
    fwd_flops, bwd_flops = attention_flops(B, Hq, T, T, num_prefix, D, causal=True)
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "fwdbwd": fwd_flops + bwd_flops}
    base = {
        "shape": shape.name,
        "batch": B,
        "heads_q": Hq,
        "heads_kv": Hkv,
        "seq": T,
        "head_dim": D,
        "prefix": num_prefix,
        "dtype": str(dtype).replace("torch.", ""),
    }

    # 1. small size: every method against the float32 reference on the same low-precision inputs.
    ts = min(T, CHECK_SEQ)
    small_leaves, small_dout = make_inputs(min(B, 2), Hq, Hkv, ts, ts, num_prefix, D, dtype, device, seed=1)
    # FlexAttention uncompiled here: this checks its mask_mod; the compiled kernel is checked at full size
    # against prefix_attn (and one compilation per config is enough).
    small_methods = build_methods(
        args,
        (min(B, 2), Hq, ts, D),
        min(B, 2),
        ts,
        num_prefix,
        dtype,
        device,
        scale,
        group,
        backend,
        method_names,
        compile_flex=False,
    )

    def reference(q, k, v, pk, pv):
        return prefix_attention_reference(q, k, v, pk, pv, causal=True, softmax_scale=scale)

    ref_small = forward_backward(reference, small_leaves, small_dout)
    small_err: Dict[str, object] = {}
    fwd_only: Dict[str, str] = {}  # methods whose backward fails here (FlexAttention on the CPU): why
    for name, fn in small_methods.items():
        if isinstance(fn, str):
            small_err[name] = fn
            continue
        try:
            got = forward_backward(fn, small_leaves, small_dout)
            small_err[name] = max_rel_error([got[0]] + got[1], [ref_small[0]] + ref_small[1])
        except Exception as exc:  # noqa: BLE001
            small_err[name] = f"error: {type(exc).__name__}: {_short(exc)}"
            try:  # a method without a backward is still worth a forward timing
                with torch.no_grad():
                    out = fn(*[t.detach() for t in small_leaves])
                small_err[name] = max_rel_error([out], [ref_small[0]])
                fwd_only[name] = f"no backward here: {type(exc).__name__}: {_short(exc, 160)}"
            except Exception:  # noqa: BLE001
                pass
    del small_leaves, small_dout, ref_small, small_methods

    # 2. full size: every baseline against prefix_attn, then time.
    leaves, dout = make_inputs(B, Hq, Hkv, T, T, num_prefix, D, dtype, device)
    methods = build_methods(
        args, (B, Hq, T, D), B, T, num_prefix, dtype, device, scale, group, backend, method_names
    )
    tol = TOL[dtype]
    ours_full = None
    ours_ok = isinstance(small_err.get("prefix_attn"), float) and small_err["prefix_attn"] <= tol
    for name, fn in methods.items():
        status, err_full, expected_note = "ok", None, ""
        serr = small_err.get(name)
        if isinstance(fn, str):
            status = f"unavailable: {fn}"
        elif isinstance(serr, str):
            status = serr
        elif serr > tol:
            status = f"wrong vs reference: err {serr:.2e} > tol {tol:.0e}"
        else:
            try:
                if name in fwd_only:
                    with torch.no_grad():
                        got = (fn(*[t.detach() for t in leaves]), [])
                else:
                    got = forward_backward(fn, leaves, dout)
                if name == "prefix_attn":
                    ours_full = got
                elif ours_full is not None and ours_ok:
                    err_full = max_rel_error([got[0]] + got[1], [ours_full[0]] + ours_full[1])
                    if err_full > tol:
                        status = f"mismatch vs prefix_attn: err {err_full:.2e} > tol {tol:.0e}"
                else:
                    expected_note = " (not compared at full size: prefix_attn failed)"
                del got
            except Exception as exc:  # noqa: BLE001
                status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {_short(exc)}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for mode in args.modes:
            row = dict(
                base,
                mode=mode,
                method=name,
                baseline=GROUP.get(name, "?"),
                status=status + expected_note,
                ms=None,
                tflops=None,
                peak_mib=None,
                flops=flops[mode],
                err_vs_reference_small=serr if isinstance(serr, float) else None,
                err_vs_prefix_attn=err_full,
            )
            if status == "ok" and name in fwd_only and mode != "fwd":
                row["status"] = f"unavailable: {fwd_only[name]}"
            elif status == "ok":
                if name in fwd_only:
                    row["note"] = "forward under no_grad: this method has no backward here"
                try:
                    row.update(time_mode(mode, fn, leaves, dout, device, args, grad=name not in fwd_only))
                    row["tflops"] = flops[mode] / (row["ms"] * 1e-3) / 1e12
                except Exception as exc:  # noqa: BLE001
                    row["status"] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {_short(exc)}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            record(row)
    del ours_full, leaves, dout, methods
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_mode(mode, fn, leaves, dout, device, args, grad=True) -> dict:
    if not grad:
        xs = [t.detach() for t in leaves]
        with torch.no_grad():
            ms = timer(lambda: fn(*xs), device, None, args)
            return {"ms": ms, "peak_mib": peak_memory_mib(lambda: fn(*xs), device, xs)}
    if mode == "fwd":
        ms = timer(lambda: fn(*leaves), device, None, args)
        return {"ms": ms, "peak_mib": peak_memory_mib(lambda: fn(*leaves), device, leaves)}
    if mode == "bwd":
        out = fn(*leaves)
        ms = timer(lambda: out.backward(dout, retain_graph=True), device, leaves, args)
        del out
    else:
        ms = timer(lambda: fn(*leaves).backward(dout), device, leaves, args)
    peak = peak_memory_mib(lambda: fn(*leaves).backward(dout), device, leaves)
    for t in leaves:
        t.grad = None
    return {"ms": ms, "peak_mib": peak}


def memory_at_p0(args, shape: Shape, dtype, device, backend) -> dict:
    """prefix_attn's own peak at P=0 (forward and forward+backward): the memory target's yardstick."""
    B, Hq, Hkv, T, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.head_dim
    leaves, dout = make_inputs(B, Hq, Hkv, T, T, 0, D, dtype, device)

    def ours(*xs):
        return prefix_attn.prefix_attention(*xs, causal=True, backend=backend)

    out = {"shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "prefix": 0}
    try:
        out["fwd_peak_mib"] = peak_memory_mib(lambda: ours(*leaves), device, leaves)
        out["fwdbwd_peak_mib"] = peak_memory_mib(lambda: ours(*leaves).backward(dout), device, leaves)
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        out["status"] = f"error: {type(exc).__name__}: {_short(exc)}"
    return out


# ----------------------------------------------------------------------------------------- targets
def evaluate_targets(results: dict) -> List[dict]:
    """The issue's targets (stated for an H100 in bfloat16), each met / missed / no data, with numbers."""
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    dtypes = [r["dtype"] for r in rows]
    dtype = "bfloat16" if "bfloat16" in dtypes else (dtypes[0] if dtypes else "bfloat16")
    meta = results["meta"]
    note = f"measured on {meta['device_name']} in {dtype}"
    if "H100" not in meta["device_name"] or dtype != "bfloat16":
        note += "; the targets are stated for an H100 in bfloat16, so this is not the real test"
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
            "fwd+bwd >= 1.3x faster than the best of baselines 2-4",
            1.3,
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
    for mode, wanted in (("fwd", 0.45), ("bwd", 0.30)):
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
        elem = torch.finfo(DTYPES[dtype]).bits // 8
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
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, json_path)
    fields = [
        "shape",
        "batch",
        "heads_q",
        "heads_kv",
        "seq",
        "head_dim",
        "prefix",
        "dtype",
        "mode",
        "method",
        "baseline",
        "ms",
        "tflops",
        "peak_mib",
        "flops",
        "err_vs_reference_small",
        "err_vs_prefix_attn",
        "status",
        "note",
    ]
    meta = results["meta"]
    with open(csv_path, "w", newline="") as f:
        f.write(
            f"# device={meta['device_name']}; torch={meta['torch']}; triton={meta['triton']}; "
            f"date={meta['date']}; commit={meta['git_commit']}; scaled_down={meta['scaled_down']}\n"
        )
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(results["rows"])


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (
            out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else "unknown"
        )
    except Exception:  # noqa: BLE001
        return "unknown"


def metadata(args, device, backend, backend_note) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not importable"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "prefix_attn": prefix_attn.__version__,
        "prefix_attn_backend": f"{backend} ({backend_note})",
        "backends": prefix_attn.available_backends(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "argv": sys.argv[1:],
        "modes": list(args.modes),
        "scaled_down": device.type == "cpu" and not args.full_shapes_on_cpu,
        "flops": "fwd = 4*B*Hq*T*D*(P + T/2), bwd = 2.5*fwd, fwdbwd = 3.5*fwd (flash-attention convention)",
        "peak_memory": "peak allocated above the inputs during one call (fwd: forward; bwd, fwdbwd: "
        "forward + backward)",
        "timing": "triton.testing.do_bench median"
        if device.type == "cuda"
        else "torch.utils.benchmark blocked_autorange median",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="GPU: llama-7b, P=64, bfloat16 only. CPU: two small shapes, P=64, flex uncompiled",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of shape names (default: all); "
        + ", ".join(s.name for s in GPU_SHAPES + EXTRA_SHAPES),
    )
    p.add_argument("--prefix", default=None, help="comma list of prefix lengths P (default 64,200,10)")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list: bfloat16,float16,float32 (default: bfloat16,float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma list of fwd,bwd,fwdbwd")
    p.add_argument("--methods", default=None, help="comma list (default: all): " + ", ".join(GROUP))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--full-shapes-on-cpu", action="store_true", help="use the GPU shapes on the CPU too")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; configs not started by then are skipped (and listed)",
    )
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--cpu-min-run-time", type=float, default=None, help="seconds per CPU measurement")
    p.add_argument("--no-table", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    if args.cpu_min_run_time is None:
        args.cpu_min_run_time = 0.05 if args.quick else 0.3
    shapes = CPU_SHAPES if (on_cpu and not args.full_shapes_on_cpu) else GPU_SHAPES
    by_name = {s.name: s for s in EXTRA_SHAPES + shapes}
    if args.shapes:
        unknown = [n for n in args.shapes.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(by_name)}")
        shapes = [by_name[n] for n in args.shapes.split(",")]
    elif args.quick:
        shapes = [by_name["gpt2-small"], by_name["llama3-8b-gqa"]] if on_cpu else [by_name[TARGET_SHAPE]]
    if args.prefix:
        prefixes = [int(x) for x in args.prefix.split(",")]
    else:
        prefixes = [64] if args.quick else list(PREFIX_LENS)
    if args.dtypes:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    else:
        dtypes = (
            [torch.float32]
            if on_cpu
            else ([torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16])
        )
    names = args.methods.split(",") if args.methods else list(GROUP)

    backend, backend_note = prefix_attn_backend(device)
    print(f"prefix_attn: backend {backend!r}: {backend_note}")
    if on_cpu:
        print(
            f"no CUDA: CPU run, {'SCALED-DOWN shapes' if not args.full_shapes_on_cpu else 'GPU shapes'}, "
            f"{torch.get_num_threads()} threads; peak memory is not measured on the CPU"
        )
        if args.quick and any(n.startswith("flex") for n in names):
            print(
                "flex: --quick on the CPU runs FlexAttention uncompiled (compiling takes ~20 s a shape here)"
            )
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", metadata(args, device, backend, backend_note)["device_name"]).strip(
        "-"
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"attention_{slug[:40]}_{stamp}.json")
    csv_path = json_path[:-5] + ".csv"
    results = {
        "meta": metadata(args, device, backend, backend_note),
        "matmul": {},
        "rows": [],
        "memory_p0": [],
        "skipped": [],
        "targets": [],
    }
    results["meta"].update(
        shapes=[dataclasses.asdict(s) for s in shapes],
        prefixes=prefixes,
        dtypes=[str(d).replace("torch.", "") for d in dtypes],
        methods=names,
    )

    for dt in dtypes:
        results["matmul"][str(dt).replace("torch.", "")] = matmul_rate(dt, device, args)

    def record(row):
        results["rows"].append(row)
        print(
            f"  {row['shape']} {row['dtype']} P={row['prefix']} {row['mode']:6s} {row['method']:16s} "
            f"{fmt(row['ms'], '.3f')} ms  {row['status'][:100]}",
            flush=True,
        )

    # Priority order, so that a time budget cuts the least important configs: dtype, then shape, then P.
    for dt in dtypes:
        for shape in shapes:
            for p in prefixes:
                if args.time_budget is not None and time.time() - t_start > args.time_budget:
                    results["skipped"].append(f"{shape.name} {str(dt)[6:]} P={p}")
                    continue
                try:
                    run_config(args, shape, p, dt, device, names, backend, record)
                except Exception as exc:  # noqa: BLE001 - keep the rest of the run
                    traceback.print_exc()
                    results["rows"].append(
                        {
                            "shape": shape.name,
                            "dtype": str(dt)[6:],
                            "prefix": p,
                            "mode": "-",
                            "method": "-",
                            "baseline": "-",
                            "ms": None,
                            "tflops": None,
                            "peak_mib": None,
                            "status": f"config failed: {type(exc).__name__}: {_short(exc)}",
                        }
                    )
                write(results, json_path, csv_path)
            if (
                200 in prefixes
                and not on_cpu
                and "prefix_attn" in names
                and not (args.time_budget is not None and time.time() - t_start > args.time_budget)
            ):
                results["memory_p0"].append(memory_at_p0(args, shape, dt, device, backend))
    results["targets"] = evaluate_targets(results)
    results["meta"]["wall_s"] = round(time.time() - t_start, 1)
    write(results, json_path, csv_path)
    if not args.no_table:
        print()
        print(table(results))
    print()
    print(f"wrote {json_path}\n      {csv_path}")
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
