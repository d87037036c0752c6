"""The Triton decode launcher: split-KV decoding (FlashDecoding) with the prefix as one more set of splits (a
cascade, as Hydragen and FlashInfer): two launches per call.

    decode_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal, softmax_scale, softcap=0.0, prefix_ids=None,
               prefix_lengths=None) -> (out, lse)

Shapes as in ``prefix_attention``: q [B, Hq, Tq, D] with few queries (``decode.DECODE_MAX_LEN_Q``), k/v
[B, Hkv, Tk, D], the prefix [Hkv, P, D] or a bank [N, Hkv, P, D] with prefix_ids [B] (and prefix_lengths [N]).
Returns out like q (contiguous) and lse float32 [B, Hq, Tq] (natural log, +inf for a query that sees no key).

1. ``_prefix_attn_fwd_kernel`` with ``SPLIT_KV``, grid (work items, Hkv): the queries of a kv head are folded
   (row, query head of the GQA group, query) into tiles of ``block_m = max(16, next_pow2(group * Tq))`` rows (at
   most ``MAX_BLOCK_M``, less at large head dims); a text item is one row's tile against one split of its keys, a
   prefix item one tile of every row on a prefix entry (a shared prefix: every row) against one split of the
   prefix, so the prefix is read once per tile, not once per row. Each item writes float32 partials (out, base-2
   lse) to a scratch.
2. ``_prefix_attn_combine_kernel`` merges each query's splits by log-sum-exp and writes out in q's dtype and lse.

The split sizes fill the GPU: about ``PROGRAMS_PER_SM`` text programs per SM, each at least ``MIN_KEYS_PER_SPLIT``
keys, and the prefix sized on its own by the same rule over its tiles (a short text must not cut a long prefix into
hundreds of splits: the scratch grows with the splits, and the combine reads them all); at most ``MAX_SPLITS``
splits per query in all, the keys per split grown to fit. Everything is computed from shapes (no host read), so a
step with a shared prefix can be captured by a CUDA graph; a bank groups its rows by entry with one host read per
prefix_ids tensor (memoised, ``checks.group_rows``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import checks
from . import kernels, launch, tuning
from .fastlaunch import FastKernel
from .kernels import LOG2E

_prefix_attn_combine_kernel = FastKernel(kernels._prefix_attn_combine_kernel)
_cdiv = launch._cdiv

# Not yet timed on a GPU: about 4 programs per SM (FlashDecoding's rule of a few waves), at least 128 keys (two
# 64-key blocks) per split so that a program's fixed cost (its query tile, its partial's store) stays small.
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 128
# Query rows per tile, at most: 64 at head dims <= 64, halved per doubling above (sm_90 compile report, triton 3.6,
# 4 warps: a bank's 64 x 64 x 128 tile spills 16 B and 64 x 32 x 256 464 B; 32 x 64 x 128 and 16 x 32 x 256 none).
# float32 keeps the table's smaller tile.
MAX_BLOCK_M = 64
# Partials per query (text and prefix splits), at most: the scratch is splits * B * Hq * Tq * (D + 1) float32 and the
# combine reads every split of a query. The rule above stays far below it at real sizes; a guard for many SMs.
MAX_SPLITS = 64
COMBINE_ROWS = 4  # queries per program of the combine kernel
INTERPRETER_SMS = 2  # the SM count the split rule assumes under TRITON_INTERPRET (small tests get several splits)


class Plan(NamedTuple):
    """Tiles and work of one decode call (shapes only): ``grid`` (items, Hkv) of the split kernel, ``splits``
    (prefix splits first) the partials per query."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    keys_per_split: int  # text keys per split
    prefix_keys_per_split: int
    prefix_splits: int
    text_splits: int
    prefix_items: int  # per kv head
    text_items: int  # per kv head

    @property
    def splits(self) -> int:
        return self.prefix_splits + self.text_splits

    def grid(self, heads_kv: int):
        return (self.prefix_items + self.text_items, heads_kv)


def _sms(device: torch.device) -> int:
    if device.type == "cpu" and tuning.interpreting():
        return INTERPRETER_SMS
    return launch._num_sms(device.index or 0)


def plan(batch: int, heads_kv: int, group: int, len_q: int, len_k: int, num_prefix: int, dtype: torch.dtype,
         head_dim: int, sms: int, used: int = 1, prefix_rows: int = -1) -> Plan:
    """The decode plan: ``used`` prefix entries in use, ``prefix_rows`` the most rows on one entry (default: every
    row, a shared prefix)."""
    prefix_rows = batch if prefix_rows < 0 else prefix_rows
    cfg = tuning.default("fwd", dtype, head_dim)
    per_row = group * len_q
    cap = max(16, MAX_BLOCK_M * 64 // max(64, tuning.block_d(head_dim)))
    block_m = min(max(16, 1 << (per_row - 1).bit_length()), min(cap, cfg.block_m))
    block_n = cfg.block_n
    if dtype in (torch.float32, torch.float64) and tuning.block_d(head_dim) >= 128:
        block_n = min(block_n, 16)  # sm_90 compile report, float32 D = 128: 16 x 32 tiles spill 312 B, 16 x 16 none
    tiles = _cdiv(per_row, block_m)
    p_tiles = _cdiv(prefix_rows * per_row, block_m)
    min_blocks = max(1, MIN_KEYS_PER_SPLIT // block_n)
    programs = PROGRAMS_PER_SM * sms
    # splits wanted: about `programs` programs each, every split at least min_blocks key blocks
    text_blocks, prefix_blocks = _cdiv(len_k, block_n), _cdiv(num_prefix, block_n) if used else 0
    text_want = max(1, min(programs // max(1, batch * heads_kv * tiles), text_blocks // min_blocks))
    prefix_want = max(1, min(programs // max(1, used * heads_kv * p_tiles), prefix_blocks // min_blocks))
    if text_want + prefix_want > MAX_SPLITS:  # fewer, longer splits, shared in proportion
        text_want = max(1, min(MAX_SPLITS - 1, text_want * MAX_SPLITS // (text_want + prefix_want)))
        prefix_want = MAX_SPLITS - text_want
    keys_per_split = max(_cdiv(text_blocks, text_want), min_blocks) * block_n
    prefix_keys_per_split = max(_cdiv(prefix_blocks, prefix_want), min_blocks) * block_n
    prefix_splits = _cdiv(num_prefix, prefix_keys_per_split) if used else 0
    text_splits = _cdiv(len_k, keys_per_split)
    prefix_items = used * prefix_splits * p_tiles
    return Plan(block_m, block_n, min(cfg.num_warps, 4), cfg.num_stages, keys_per_split, prefix_keys_per_split,
                prefix_splits, text_splits, prefix_items, batch * text_splits * tiles)


@functools.lru_cache(maxsize=1024)
def _cached_plan(args: tuple, constants: tuple) -> Plan:
    return plan(*args)


def _plan(*args) -> Plan:
    """``plan(*args)``, once per shape and setting (the module's constants and the tile table's state are part of
    the key: tests change them)."""
    return _cached_plan(args, (PROGRAMS_PER_SM, MIN_KEYS_PER_SPLIT, MAX_BLOCK_M, MAX_SPLITS, tuning.interpreting(),
                               tuning.gpu_tiles()))


def _row_plan(bank: launch._Bank):
    """(ROW_PLAN int32 [3 U + B], U, the most rows on one entry) of a bank, once per prefix_ids tensor."""
    def build():
        entry, first, count, rows, most = bank.used_entries()
        return torch.cat([entry, first, count, rows]), entry.numel(), most

    return checks.memo(bank.source_ids, "decode_row_plan", build)


def decode_fwd(q, k, v, prefix_k, prefix_v, attention_mask, causal: bool, softmax_scale: float, softcap: float = 0.0,
               prefix_ids=None, prefix_lengths=None):
    """-> (out [B, Hq, Tq, D] like q, lse float32 [B, Hq, Tq]); see the module docstring."""
    q, softmax_scale, _ = launch.positive_scale(q, softmax_scale)  # the kernels need softmax_scale > 0
    with launch._on_device(q):
        batch, heads_q, len_q, head_dim = q.shape
        heads_kv, len_k = k.shape[1], k.shape[2]
        bank = launch._Bank(prefix_k, prefix_v, prefix_ids, prefix_lengths, q)
        dummy = launch._dummy(q)  # the pointer of a switched-off input
        row_plan, used, prefix_rows = dummy, 1, batch  # no plan: a shared prefix
        # P = 0: no prefix items, no bank switches
        flags = dict(HAS_IDS=False, HAS_LENS=False) if bank.num_prefix == 0 else bank.flags()
        if flags["HAS_IDS"]:
            row_plan, used, prefix_rows = _row_plan(bank)
        p = _plan(batch, heads_kv, heads_q // heads_kv, len_q, len_k, bank.num_prefix, q.dtype, head_dim,
                  _sms(q.device), used, prefix_rows)
        out = torch.empty_like(q, memory_format=launch._CONTIGUOUS)
        lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
        n_queries = batch * heads_q * len_q
        if n_queries == 0:
            return out, lse.fill_(float("inf"))
        # one scratch: the partial outputs [splits, B, Hq, Tq, D], then their lse [splits, B, Hq, Tq], contiguous
        part_o = torch.empty(p.splits * n_queries * (head_dim + 1), dtype=torch.float32, device=q.device)
        part_l = part_o[p.splits * n_queries * head_dim:]
        mask, mask_strides, has_mask = launch._mask_args(attention_mask, q)
        cap_in, cap_out, has_cap = launch._softcap_args(softmax_scale, softcap)
        block_d = tuning.block_d(head_dim)
        if p.prefix_items + p.text_items:
            launch._prefix_attn_fwd_kernel.run(p.grid(heads_kv),  # the launcher's (fast launch) path
                q, k, v, bank.k, bank.v, mask, bank.ids_arg, bank.lengths_arg, dummy, dummy, dummy, part_o, part_l,
                *q.stride(), *k.stride(), *v.stride(), *bank.strides(), *mask_strides,
                heads_q * len_q * head_dim, len_q * head_dim, head_dim, 1, heads_q * len_q, len_q,  # the scratch
                heads_q, heads_q // heads_kv, len_q, len_k, bank.num_prefix, softmax_scale * LOG2E, cap_in, cap_out,
                0, 1.0,
                CAUSAL=bool(causal), HAS_MASK=has_mask, PRECISION=launch._precision(q.dtype), SOFTCAP=has_cap,
                **flags, VARLEN=False, DROPOUT=False, HEAD_DIM=head_dim, BLOCK_M=p.block_m,
                BLOCK_N=p.block_n, BLOCK_D=block_d, SPLIT_KV=True, ROW_PLAN=row_plan, BATCH=batch, USED=used,
                PREFIX_ROWS=prefix_rows, KEYS_PER_SPLIT=p.keys_per_split, PREFIX_KEYS_PER_SPLIT=p.prefix_keys_per_split,
                num_warps=p.num_warps, num_stages=p.num_stages,
            )
        _prefix_attn_combine_kernel.run((_cdiv(n_queries, COMBINE_ROWS),),
            part_o, part_l, out, lse, n_queries, p.splits,
            HEAD_DIM=head_dim, BLOCK_R=COMBINE_ROWS, BLOCK_D=block_d, num_warps=2,
        )
        return out, lse
