"""Which backend runs an op: ``triton`` (CUDA; the CPU under ``TRITON_INTERPRET=1``), ``cpu`` (the native C++
kernel) or ``torch`` (the reference).

``backend=None`` picks triton for CUDA tensors and cpu for CPU tensors (the reference, with one warning, when
the C++ kernel cannot be loaded). ``PREFIX_ATTN_BACKEND=triton|cpu|torch`` in the environment overrides that
automatic choice (read at each call; for debugging: e.g. ``PREFIX_ATTN_BACKEND=torch`` runs every op, a model's
attention layers included, on the reference). An explicit ``backend=`` argument always wins.

Every backend module exposes the same two launchers::

    prefix_attn_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap, **extras)
        -> (out, lse)
    prefix_attn_bwd(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, softmax_scale, softcap,
                    need_dq, need_dkv, need_dprefix, **extras) -> (dq, dk, dv, dprefix_k, dprefix_v)

extras: ``prefix_ids`` / ``prefix_lengths`` (a bank), ``cu_seqlens_q`` / ``cu_seqlens_k`` / ``max_seqlen_q`` /
``max_seqlen_k`` (packed sequences), ``dropout_p`` / ``dropout_seed`` (an int64 0-d tensor on q's device).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

__all__ = ["BACKENDS", "available_backends", "resolve", "module", "ENV_VAR"]

BACKENDS = ("triton", "cpu", "torch")
ENV_VAR = "PREFIX_ATTN_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status():
    """(module or None, reason)."""
    try:
        from . import triton as triton_backend  # noqa: PLC0415 - lazy: importing triton is slow
    except Exception as exc:  # ImportError, or a broken Triton install
        return None, f"Triton could not be imported: {type(exc).__name__}: {exc}"
    return triton_backend, "ok"


@functools.lru_cache(maxsize=None)
def cpu_status():
    """(module or None, reason): the native C++ extension, built by setup.py or JIT-compiled on first use."""
    try:
        from . import cpu as cpu_backend  # noqa: PLC0415
    except ImportError as exc:
        return None, f"no native CPU backend module: {exc}"
    ok, reason = cpu_backend.is_available()
    return (cpu_backend if ok else None), reason


def available_backends() -> dict:
    """{backend: reason}, "ok" when usable on this machine (the Triton entry says whether a GPU is there)."""
    tri, tri_reason = triton_status()
    if tri is not None and not torch.cuda.is_available():
        tri_reason = ("ok (interpreter: TRITON_INTERPRET=1)" if triton_interpreting()
                      else "importable, but no CUDA GPU (set TRITON_INTERPRET=1 to run it on the CPU)")
    _, cpu_reason = cpu_status()
    return {"triton": tri_reason, "cpu": cpu_reason, "torch": "ok"}


_warned_fallback = []


def _env_backend() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r}: must be one of {BACKENDS} (or unset)")
    return name


def resolve(device_type: str, backend: Optional[str]) -> str:
    """The backend for tensors on ``device_type``: ``backend`` checked, or the automatic choice (see the module
    docstring). Under torch.compile the choice is made once, at trace time."""
    return _resolve(device_type, backend, _env_backend() if backend is None else None)


@torch.compiler.assume_constant_result
def _resolve(device_type: str, backend: Optional[str], env: Optional[str]) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend is None and env is not None:
        return _resolve(device_type, env, None)
    if backend is None:
        if device_type == "cuda":
            return "triton"
        if device_type != "cpu":
            raise ValueError(f"prefix_attention supports CUDA and CPU tensors, got device {device_type}; "
                             f"pass backend='torch' to run the reference on it")
        mod, reason = cpu_status()
        if mod is not None:
            return "cpu"
        if not _warned_fallback:
            warnings.warn(f"prefix_attn: native CPU kernel unavailable ({reason}); using the PyTorch "
                          f"reference for CPU tensors", RuntimeWarning, stacklevel=4)
            _warned_fallback.append(reason)
        return "torch"
    if backend == "triton":
        mod, reason = triton_status()
        if mod is None:
            raise RuntimeError(f"backend='triton' requested but {reason}")
        if device_type != "cuda" and not (device_type == "cpu" and triton_interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device_type}); on the CPU set "
                             f"TRITON_INTERPRET=1 before importing triton to run the kernels interpreted")
    elif backend == "cpu":
        if device_type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device_type}")
        mod, reason = cpu_status()
        if mod is None:
            raise RuntimeError(f"backend='cpu' requested but the native CPU kernel is unavailable: {reason}")
    return backend


def module(name: str):
    """The launcher module of backend ``name`` ("triton" or "cpu")."""
    return (triton_status if name == "triton" else cpu_status)()[0]
