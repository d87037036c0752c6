"""Attention dropout shared by every backend: which probabilities are dropped, as a pure function of
``(seed, b, h, i, c)``.

For batch row (or packed sequence) ``b``, query head ``h``, query ``i`` (row of ``q``, ``0 <= i < len_q``) and
column ``c`` (prefix slots first, ``0 .. P-1``, then text keys ``P .. P+len_k-1``; ``P`` is the prefix tensor's
``num_prefix``, also with a bank whose entries are shorter)::

    r0, r1, r2, r3 = Philox-4x32-10(key = (seed mod 2**32, seed // 2**32), counter = (c, i // 8, h, b))
    field = (r[(i % 8) // 2] >> (16 * (i % 2))) & 0xFFFF          # 16 random bits per decision
    keep = field >= floor(dropout_p * 2**16)

One Philox call decides eight consecutive queries of a column (query blocks start at multiples of 8 in every
kernel, whatever P is). The kept fraction is ``1 - floor(p * 2**16) / 2**16``, within ``2**-16`` of ``1 - p``.

A kept probability is scaled by ``1 / (1 - dropout_p)``, a dropped one is zero: ``F.dropout(softmax(s)) @ V``
with this mask. Philox-4x32-10 is the generator ``tl.rand`` uses (``tl.philox`` in the Triton kernels); the C++
kernel (``csrc/rowops.h``) and :func:`philox4x32` below compute the same numbers, so all three backends drop the
same entries for the same seed, and the backward regenerates the forward's mask instead of storing it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["dropout_mask", "philox4x32"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
SEED_LIMIT = 2**63  # seeds are int64 tensors inside the ops


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a Python int a < 2**32 and an int64 tensor b of uint32 values,
    without int64 overflow (a is split into 16-bit halves)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b  # < 2**48
    hi_part = a_hi * b  # < 2**48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return high & _M32, low


def philox4x32(seed: int, c0: torch.Tensor, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 (Salmon et al. 2011) of int64 tensors holding uint32 counters (broadcast together), keyed by
    a 64-bit ``seed``: the four uint32 outputs, as int64 tensors."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def threshold(dropout_p: float) -> int:
    """The 16-bit integer threshold of the keep test: floor(dropout_p * 2**16)."""
    return int(dropout_p * 2**16)


def check_dropout(dropout_p, dropout_seed) -> None:
    """TypeError/ValueError naming the argument."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
            raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got {type(dropout_seed).__name__}")
        if not 0 <= dropout_seed < SEED_LIMIT:
            raise ValueError(f"dropout_seed must be in [0, 2**63), got {dropout_seed}")


def seed_tensor(dropout_seed: Optional[int], device: torch.device) -> torch.Tensor:
    """The seed as an int64 0-d tensor on ``device``: ``dropout_seed``, or drawn from torch's generator of that
    device (``torch.manual_seed`` makes it reproducible; no host synchronisation on a GPU)."""
    if dropout_seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    return torch.tensor(dropout_seed, dtype=torch.int64, device=device)


def prepare(dropout_p, dropout_seed, device) -> Tuple[float, Optional[torch.Tensor]]:
    """The ops' dropout arguments checked: (dropout_p as a float, the seed tensor or None when dropout_p is 0)."""
    check_dropout(dropout_p, dropout_seed)
    dropout_p = float(dropout_p)
    return dropout_p, (seed_tensor(dropout_seed, device) if dropout_p > 0 else None)


def keep_columns(seed: int, dropout_p: float, b, h, i, c) -> torch.Tensor:
    """The keep decision for broadcastable int64 index tensors b, h, i, c (see the module docstring)."""
    r = philox4x32(seed, c, i // 8, h, b)
    word = (i % 8) // 2
    out = torch.where(word == 0, r[0], torch.where(word == 1, r[1], torch.where(word == 2, r[2], r[3])))
    return ((out >> (16 * (i % 2))) & 0xFFFF) >= threshold(dropout_p)


def dropout_mask(batch: int, heads_q: int, len_q: int, num_prefix: int, len_k: int, dropout_p: float, seed: int, *,
                 device=None, batch_offset: int = 0) -> torch.Tensor:
    """The bool keep mask ``[batch, heads_q, len_q, num_prefix + len_k]`` the kernels use for ``seed``.

    Column ``c < num_prefix`` is prefix slot ``c``, column ``num_prefix + j`` text key ``j``; True = kept (scaled by
    ``1 / (1 - dropout_p)``). ``batch_offset`` numbers the rows from there (sequence ``batch_offset + b`` of a
    packed batch). Entries the attention masks hide anyway are included; they do not matter.
    """
    check_dropout(dropout_p, seed)
    for name, n in (("batch", batch), ("heads_q", heads_q), ("len_q", len_q), ("num_prefix", num_prefix),
                    ("len_k", len_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")

    def ar(n, dims):
        return torch.arange(n, dtype=torch.int64, device=device).view(*dims)

    return keep_columns(seed, dropout_p, ar(batch, (-1, 1, 1, 1)) + batch_offset, ar(heads_q, (1, -1, 1, 1)),
                        ar(len_q, (1, 1, -1, 1)), ar(num_prefix + len_k, (1, 1, 1, -1)))
