"""Launchers for the native CPU kernel (csrc/prefix_attn_cpu.cpp).

The compiled module is found lazily, once, on the first call to ``is_available()`` or a launcher:

1. ``prefix_attn._C``, built by ``pip install --no-build-isolation -e .`` (setup.py), unless a file in
   ``csrc/`` is newer than it (an edited source checkout: rebuild, or let step 2 compile the edit);
2. otherwise a JIT build of ``csrc/*.cpp`` (``build_config.py``: the source checkout's ``csrc/``, or the copy a
   wheel ships in ``prefix_attn/_csrc/``) with ``torch.utils.cpp_extension.load`` (ninja), cached in
   torch's extensions directory (``TORCH_EXTENSIONS_DIR``, file-locked by torch, so concurrent first
   imports build it once). Set ``PREFIX_ATTN_NO_JIT=1`` to skip this step.

Importing this module compiles nothing. If neither step works, ``is_available()`` says why and
``prefix_attn.ops`` falls back to the PyTorch reference with one warning.

Shapes and conventions are those of ``prefix_attn/ops.py``; packed inputs (``cu_seqlens_q/k``) go to the same
kernel, which walks the sequences through a per-row descriptor. float16/bfloat16 inputs run a float32 softmax and
float32 accumulation, their tile products either in 16-bit (on CPUs with AMX for the dtype) or in float32 on
per-thread float copies of the rows (docs/cpu.md, "Dtypes"); float64 runs in float64 and then returns its ``lse``
in float64 too.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Optional, Tuple

import torch

from . import build_config

__all__ = ["is_available", "source", "prefix_attn_fwd", "prefix_attn_bwd"]

_CSRC = build_config.source_dir()


def _prebuilt_is_stale() -> str:
    """In a source checkout, the csrc/ file edited after prefix_attn._C was built ("" if none)."""
    built = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*"))
    if not built:
        return ""
    built_at = min(os.path.getmtime(p) for p in built)
    if not _CSRC:
        return ""
    for src in build_config.sources(_CSRC) + build_config.headers(_CSRC):
        if os.path.getmtime(src) > built_at:
            return os.path.relpath(src, os.path.dirname(_CSRC))
    return ""


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, reason, source)."""
    stale = _prebuilt_is_stale()
    if stale:
        prebuilt = f"prefix_attn._C is older than {stale}, not used"
    else:
        try:
            from . import _C  # noqa: PLC0415 - built by setup.py

            return _C, "ok", "prebuilt prefix_attn._C"
        except ImportError as exc:
            prebuilt = f"no prebuilt prefix_attn._C ({exc})"
    if os.environ.get("PREFIX_ATTN_NO_JIT", "0") == "1":
        return None, f"{prebuilt}; JIT build disabled by PREFIX_ATTN_NO_JIT=1", ""
    sources = build_config.sources(_CSRC) if _CSRC else []
    if not sources:
        where = " or ".join(build_config.CANDIDATE_DIRS)
        return None, f"{prebuilt}; no C++ sources at {where} to JIT-compile", ""
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415

        cflags, ldflags = build_config.flags()
        # the torch version is part of the name: a module built against another torch is never reused
        name = "prefix_attn_cpu_" + re.sub(r"[^0-9a-zA-Z]+", "_", torch.__version__)
        verbose = os.environ.get("PREFIX_ATTN_VERBOSE_BUILD") == "1"
        mod = cpp_extension.load(name=name, sources=sources, extra_include_paths=[_CSRC], extra_cflags=cflags,
                                 extra_ldflags=ldflags, verbose=verbose)
    except Exception as exc:  # compiler missing, ninja missing, build error: report, never raise
        msg = str(exc).strip().splitlines()
        return None, f"{prebuilt}; JIT build failed: {type(exc).__name__}: {msg[-1] if msg else ''}", ""
    return mod, "ok", f"JIT-compiled {name} under {cpp_extension.get_default_build_root()}"


def is_available() -> Tuple[bool, str]:
    """(True, "ok") when the native kernel loaded, else (False, why not). Never raises."""
    try:
        mod, reason, _ = _load()
    except Exception as exc:  # noqa: BLE001 - never raise from here
        return False, f"{type(exc).__name__}: {exc}"
    return mod is not None, reason


def source() -> str:
    """Where the loaded kernel came from ("" when none loaded)."""
    return _load()[2]


def _module():
    mod, reason, _ = _load()
    if mod is None:
        raise RuntimeError(f"prefix_attn native CPU kernel unavailable: {reason}")
    return mod


def _dropout_args(dropout_p, dropout_seed, batch_offset) -> dict:
    if dropout_p <= 0:
        return {}
    if dropout_seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed (an int64 one-element tensor)")
    return dict(dropout_p=float(dropout_p), dropout_seed=int(dropout_seed), dropout_batch_offset=int(batch_offset))


def _packed(cu_seqlens_q, cu_seqlens_k) -> dict:
    return {} if cu_seqlens_q is None else dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask: Optional[torch.Tensor], causal: bool,
                    softmax_scale: float, softcap: float = 0.0, prefix_ids: Optional[torch.Tensor] = None,
                    prefix_lengths: Optional[torch.Tensor] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q: int = 0, max_seqlen_k: int = 0, dropout_p: float = 0.0,
                    dropout_seed: Optional[torch.Tensor] = None, dropout_batch_offset: int = 0):
    """-> (out in q's shape and dtype, lse [B, Hq, Tq] or packed [Hq, total_q]; float32, or float64 for float64
    inputs). dropout_seed: an int64 0-d tensor (needed when dropout_p > 0); rows are numbered from
    dropout_batch_offset. max_seqlen_q/k are not needed here (the kernel reads the offsets)."""
    out, lse = _module().fwd(q, k, v, prefix_k, prefix_v, attention_mask, bool(causal), float(softmax_scale),
                             float(softcap), prefix_ids=prefix_ids, prefix_lengths=prefix_lengths,
                             **_dropout_args(dropout_p, dropout_seed, dropout_batch_offset),
                             **_packed(cu_seqlens_q, cu_seqlens_k))
    return out, lse


def prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask: Optional[torch.Tensor], out, lse,
                    causal: bool, softmax_scale: float, softcap: float = 0.0, need_dq: bool = True,
                    need_dkv: bool = True, need_dprefix: bool = True, prefix_ids: Optional[torch.Tensor] = None,
                    prefix_lengths: Optional[torch.Tensor] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q: int = 0, max_seqlen_k: int = 0, dropout_p: float = 0.0,
                    dropout_seed: Optional[torch.Tensor] = None, dropout_batch_offset: int = 0):
    """-> (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' dtype; None for the ones not asked for."""
    dq, dk, dv, dpk, dpv = _module().bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse,
                                         bool(causal), float(softmax_scale), float(softcap), bool(need_dq),
                                         bool(need_dkv), bool(need_dprefix), prefix_ids=prefix_ids,
                                         prefix_lengths=prefix_lengths,
                                         **_dropout_args(dropout_p, dropout_seed, dropout_batch_offset),
                                         **_packed(cu_seqlens_q, cu_seqlens_k))
    return dq, dk, dv, dpk, dpv
