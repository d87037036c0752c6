"""Tile configurations for the Triton kernels: the default table, the autotuning space and its cache.

    config(kernel, dtype, head_dim, dims, run) -> Blocks

``kernel`` is one of ``"fwd"``, ``"dkdv"``, ``"dq"``, ``"dprefix"``. ``Blocks.block_m`` always counts query
rows and ``block_n`` key rows. ``dims`` holds what the timing depends on (lengths, causal, ...); ``run(cfg)``
launches the kernel with a candidate (used only when tuning).

By default the table below is used (and under ``TRITON_INTERPRET=1`` one small tile, unless
``gpu_tiles(True)`` asks for the GPU table so that tests can run the real tile shapes on the CPU). With
``PREFIX_ATTN_AUTOTUNE=1`` on a CUDA device every candidate of :func:`candidates` is timed once per key
(device, kernel, dtype, head_dim, causal, mask, softcap, lengths bucketed to powers of two) and the fastest is
kept in memory and in a JSON file (``PREFIX_ATTN_AUTOTUNE_CACHE``, default
``~/.cache/prefix_attn/autotune.json``), so later processes start tuned.

``config`` runs at every launch, so its answer is memoised: the table's per (kernel, dtype, head_dim), the tuned
one per (kernel, dtype, head_dim, dims, device). ``TRITON_INTERPRET`` is read once, at import (as Triton reads it
when the kernels are decorated); ``PREFIX_ATTN_AUTOTUNE`` once, at import or by :func:`set_autotune`.
:func:`gpu_tiles`, :func:`override`, :func:`set_autotune` and :func:`clear_cache` drop the memos.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

KERNELS = ("fwd", "dkdv", "dq", "dprefix")


class Blocks(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


_INTERPRETER_BLOCKS = Blocks(16, 16, 4, 1)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_MEMO = 4096  # tuned choices memoised per exact dims; past it the memo is emptied (the JSON cache stays)


def _env_autotune() -> bool:
    return os.environ.get("PREFIX_ATTN_AUTOTUNE", "0") == "1"


_state = {"gpu_tiles": False, "override": None, "autotune": _env_autotune()}
_cache: Dict[str, Blocks] = {}
_cache_loaded = False
_table: Dict[tuple, Blocks] = {}  # (kernel, dtype, head_dim) -> the table's choice, override applied
_tuned: Dict[tuple, Blocks] = {}  # (kernel, dtype, head_dim, dims, device) -> the tuned choice
_lock = threading.Lock()


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


def _forget() -> None:
    _table.clear()
    _tuned.clear()


def gpu_tiles(enabled: Optional[bool] = None) -> bool:
    """Get or set whether the interpreter runs the GPU table's tiles (slow; for tests)."""
    if enabled is not None:
        _state["gpu_tiles"] = bool(enabled)
        _forget()
    return _state["gpu_tiles"]


def override(transform: Optional[Callable[[str, Blocks], Blocks]]) -> None:
    """Pass every tile choice through ``transform(kernel, blocks)`` (triage of a GPU failure: other tiles, stages,
    warps, benchmarks/gpu_triage.py); ``None`` restores the normal choice."""
    _state["override"] = transform
    _forget()


def set_autotune(enabled: Optional[bool]) -> bool:
    """Turn autotuning on or off; None: back to ``PREFIX_ATTN_AUTOTUNE`` (read again now). Returns the setting."""
    _state["autotune"] = _env_autotune() if enabled is None else bool(enabled)
    _forget()
    return _state["autotune"]


def _overridden(kernel: str, cfg: Blocks) -> Blocks:
    transform = _state["override"]
    return cfg if transform is None else Blocks(*transform(kernel, cfg))


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())  # tl.dot needs K >= 16; a power of two for tl.arange


def default(kernel: str, dtype: torch.dtype, head_dim: int) -> Blocks:
    """The untuned table (sm_90 compile report, benchmarks/TUNING.md)."""
    if interpreting() and not gpu_tiles():
        return _INTERPRETER_BLOCKS
    bd = block_d(head_dim)
    if dtype in (torch.float32, torch.float64):
        # ieee float32 dots run on FMA with both operands in registers: larger tiles spill when compiled
        if kernel == "fwd":
            return Blocks(32, 32, 4, 1) if bd <= 64 else (Blocks(16, 32, 4, 1) if bd <= 128 else Blocks(16, 16, 4, 1))
        if kernel == "dq":
            return Blocks(32, 16, 4, 1) if bd <= 64 else Blocks(16, 16, 4, 1)
        return Blocks(16, 32, 4, 1) if bd <= 64 else Blocks(16, 16, 4, 1)
    if bd > 128:
        return {"fwd": Blocks(64, 32, 4, 2), "dq": Blocks(32, 16, 4, 1)}.get(kernel, Blocks(16, 32, 4, 1))
    if kernel == "fwd":
        return Blocks(128, 64, 8, 3)  # 8 warps: two warpgroups split the 128 query rows, no spills at D <= 128
    if kernel == "dq":
        return Blocks(64, 32, 4, 2) if bd <= 64 else Blocks(128, 32, 8, 3)
    # dK/dV and the prefix kernel: few query rows against many keys, so that 8 warps split the key rows
    return Blocks(32, 64, 4, 2) if bd <= 64 else Blocks(32, 128, 8, 2)


def candidates(kernel: str, dtype: torch.dtype, head_dim: int) -> List[Blocks]:
    """The autotuning space: block sizes, warps and stages, pruned by a shared-memory estimate."""
    base = default(kernel, dtype, head_dim)
    if dtype in (torch.float32, torch.float64):
        return [base]
    bd = block_d(head_dim)
    if kernel == "fwd":
        ms, ns = (64, 128), (32, 64, 128)
    elif kernel == "dq":
        ms, ns = (64, 128), (16, 32, 64)
    else:
        ms, ns = (16, 32, 64), (32, 64, 128)
    out = [base]
    for m, n, w, s in itertools.product(ms, ns, (4, 8), (2, 3, 4)):
        tiles = (m + 2 * n) * bd * 2 * (s if kernel == "fwd" else 1) + (2 * m * bd * 2 * s if kernel != "fwd" else 0)
        if tiles > 200 * 1024 or (w == 8 and m * n < 64 * 64):
            continue
        cfg = Blocks(m, n, w, s)
        if cfg not in out:
            out.append(cfg)
    return out


def _bucket(n: int) -> int:
    return 1 << max(4, (max(1, int(n)) - 1).bit_length())


def _cache_path() -> str:
    return os.environ.get("PREFIX_ATTN_AUTOTUNE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "prefix_attn", "autotune.json"))


def _load_cache() -> None:
    global _cache_loaded
    if _cache_loaded:
        return
    _cache_loaded = True
    try:
        with open(_cache_path()) as f:
            _cache.update({k: Blocks(*v) for k, v in json.load(f).items()})
    except (OSError, ValueError, TypeError):
        pass


def _save_cache() -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({k: list(v) for k, v in sorted(_cache.items())}, f, indent=0)
        os.replace(tmp, path)
    except OSError:
        pass


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing  # noqa: PLC0415

    return triton.testing.do_bench(fn, warmup=5, rep=25)


def key(kernel: str, dtype: torch.dtype, head_dim: int, dims: Tuple, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    lengths = tuple(_bucket(d) if isinstance(d, int) and not isinstance(d, bool) else d for d in dims)
    return f"{name}|{kernel}|{str(dtype).replace('torch.', '')}|D{head_dim}|{lengths}"


def config(kernel: str, dtype: torch.dtype, head_dim: int, dims: Tuple, device: torch.device,
           run: Optional[Callable[[Blocks], object]] = None) -> Blocks:
    """The tile configuration for one launch: tuned when autotuning is on (``PREFIX_ATTN_AUTOTUNE=1``,
    :func:`set_autotune`) on CUDA, else the table. Memoised (see the module docstring)."""
    if run is None or not _state["autotune"] or device.type != "cuda":
        try:
            return _table[kernel, dtype, head_dim]
        except KeyError:
            cfg = _table[kernel, dtype, head_dim] = _overridden(kernel, default(kernel, dtype, head_dim))
            return cfg
    try:
        memo = (kernel, dtype, head_dim, dims, device)
        return _tuned[memo]
    except KeyError:
        pass
    except TypeError:  # an unhashable device stand-in (tests): no memo
        memo = None
    best = _tune(kernel, dtype, head_dim, dims, device, run)
    if memo is not None:
        with _lock:
            if len(_tuned) >= MAX_MEMO:
                _tuned.clear()
            _tuned[memo] = best
    return best


def _tune(kernel: str, dtype: torch.dtype, head_dim: int, dims: Tuple, device: torch.device,
          run: Callable[[Blocks], object]) -> Blocks:
    """The tuned choice of one key: from the cache (memory, then the JSON file), else timed now and saved."""
    k = key(kernel, dtype, head_dim, dims, device)
    with _lock:
        _load_cache()
        if k in _cache:
            return _cache[k]
    timings = []
    for cfg in candidates(kernel, dtype, head_dim):
        try:
            timings.append((_bench(lambda cfg=cfg: run(cfg)), cfg))
        except Exception:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
            continue
    best = min(timings)[1] if timings else default(kernel, dtype, head_dim)
    with _lock:
        _cache[k] = best
        _save_cache()
    return best


def clear_cache() -> None:
    """Forget tuned configurations (in memory; the JSON file is left alone)."""
    global _cache_loaded
    with _lock:
        _cache.clear()
        _tuned.clear()
        _cache_loaded = True
