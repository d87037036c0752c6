"""Every argument check of the two public ops, in one place, and the memo that keeps value checks off the host.

Shape and type checks read only ``tensor.shape`` / ``dtype`` / ``device`` (free). Value checks (the ids of a bank
in range, prefix lengths, packed offsets) must read tensor values on the host, which on a GPU is a
synchronisation; they are memoised per tensor: a tensor is read once, and again only after it is changed in
place (its version counter moved). A model that passes the same ids / lengths / offsets tensors to every layer
thus pays one read per forward, not one per layer. :func:`trust` marks a tensor the package made itself as
checked for good (inference tensors have no version counter, so only trusted ones are memoised).

Shape and type checks are memoised per signature: they read only each argument's type, shape, dtype and device
(and the scalars' types and values), so arguments that agree in all of those with a call that passed pass too. The
signatures that passed are kept (a bounded set; a failure is never kept), and a model's layers, which share one,
pay for the checks once per new shape, not once per layer.

The C++ kernel repeats the checks that protect memory (it reads CPU tensors, where that is free).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, List, Optional

import torch

__all__ = ["check_padded", "check_packed", "check_softcap", "bank_values", "mask_values", "group_rows", "host_list",
           "memo", "known", "trust", "from_host"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MEMO_SIZE = 256


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# ---------------------------------------------------------------------------------------------- the memo
class _Memo:
    """(tensor, what) -> value, valid while the tensor lives and is unchanged; least recently used dropped."""

    def __init__(self):
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.trusted: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()

    def version(self, t: torch.Tensor):
        if t.is_inference():
            return "trusted" if self.trusted.get(id(t)) is t else None
        return t._version

    def get(self, t: torch.Tensor, what: str, compute: Callable):
        version = self.version(t)
        if version is None:  # an inference tensor the package did not make: nothing to compare with later
            return compute()
        key = (id(t), what)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is t and hit[1] == version:
            self.entries.move_to_end(key)
            return hit[2]
        value = compute()
        self.entries[key] = (weakref.ref(t), version, value)
        self.entries.move_to_end(key)
        while len(self.entries) > _MEMO_SIZE:
            self.entries.popitem(last=False)
        return value


_MEMO = _Memo()


def memo(t: torch.Tensor, what: str, compute: Callable):
    """``compute()``, once per (tensor, what) while ``t`` is alive and unchanged in place."""
    if torch.compiler.is_compiling():
        return compute()
    return _MEMO.get(t, what, compute)


def known(t: torch.Tensor, what: str, value) -> None:
    """Record what :func:`memo` would compute for (t, what), when the caller has it already (a host list it built
    the tensor from, say)."""
    if not torch.compiler.is_compiling():
        _MEMO.get(t, what, lambda: value)


def trust(t: torch.Tensor) -> torch.Tensor:
    """Mark a tensor the package made (and nobody else writes) as memoisable also in inference mode; returns it."""
    _MEMO.trusted[id(t)] = t
    return t


def from_host(values: List[int], device, *, row_groups: bool = False) -> torch.Tensor:
    """An int32 tensor on ``device`` made from host ``values`` (prefix ids, entry lengths), with what the checks
    would read from it recorded (its range, its values; with ``row_groups``, the backward's grouping of the rows by
    entry, when autograd is on): no host read of it later."""
    t = trust(torch.tensor(values, dtype=torch.int32, device=device))
    if values:
        known(t, "min_max", (min(values), max(values)))
    known(t, "list", values)
    if row_groups and torch.is_grad_enabled():  # the grouping serves the backward only
        known(t, "used_entries", group_rows_host(values, device))
    return t


# ---------------------------------------------------------------------------------------------- values
def min_max(t: torch.Tensor):
    both = torch.stack([t.min(), t.max()]).tolist()  # one host read for both
    return int(both[0]), int(both[1])


def group_rows(ids: torch.Tensor):
    """A bank's batch rows grouped by entry, for the prefix-gradient kernels: (entry [U], row_start [U], row_count
    [U], rows [B], the largest count), int32 tensors on the ids' device of the entries some row chose, ascending,
    each entry's rows in batch order. Reads the ids on the host once (memoise it per ids tensor)."""
    return group_rows_host(ids.tolist(), ids.device)


def group_rows_host(values: List[int], device):
    """:func:`group_rows` of ids known on the host (no read)."""
    entries = sorted(set(values))
    rows = sorted(range(len(values)), key=lambda b: values[b])  # stable: batch order within an entry
    count = [values.count(e) for e in entries]
    start = [sum(count[:i]) for i in range(len(count))]

    def make(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return make(entries), make(start), make(count), make(rows), max(count) if count else 0


def mask_values(attention_mask: Optional[torch.Tensor]) -> None:
    """A non-bool attention_mask holds only 0 and 1 (a bool one is not read): one host read per mask tensor,
    memoised; none under torch.compile (the mask is then taken as it is: nonzero = visible)."""
    m = attention_mask
    if m is None or m.dtype == torch.bool or m.numel() == 0 or torch.compiler.is_compiling():
        return
    if memo(m, "zeros_and_ones", lambda: not bool(((m != 0) & (m != 1)).any())):
        return
    bad = torch.unique(m[(m != 0) & (m != 1)])
    shown = ", ".join(str(x) for x in bad[:4].tolist()) + (", ..." if bad.numel() > 4 else "")
    raise ValueError(f"attention_mask must be bool or hold only 0 and 1, got {shown}")


def bank_values(prefix_k: torch.Tensor, prefix_ids: Optional[torch.Tensor],
                prefix_lengths: Optional[torch.Tensor]) -> None:
    """prefix_ids in [0, num_entries), prefix_lengths in [0, num_prefix]: one host read per tensor, memoised."""
    if prefix_ids is None:
        return
    entries, num_prefix = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_ids.numel():
        lo, hi = memo(prefix_ids, "min_max", lambda: min_max(prefix_ids))
        if lo < 0 or hi >= entries:
            raise ValueError(f"prefix_ids must be in [0, num_entries={entries}) (prefix_k.shape[0]), got values "
                             f"from {lo} to {hi}")
    if prefix_lengths is not None and prefix_lengths.numel():
        lo, hi = memo(prefix_lengths, "min_max", lambda: min_max(prefix_lengths))
        if lo < 0 or hi > num_prefix:
            raise ValueError(f"prefix_lengths must be in [0, num_prefix={num_prefix}] (prefix_k.shape[2]), got "
                             f"values from {lo} to {hi}")


def host_list(t: torch.Tensor) -> List[int]:
    """The values of an int tensor (``cu_seqlens``, ``prefix_ids``) as a host list (memoised: one read per
    tensor)."""
    return memo(t, "list", t.tolist)


def check_offsets(q, k, cu_q, cu_k, max_q: int, max_k: int) -> None:
    """Values of cu_seqlens_q/k (memoised host reads): 0 first, non-decreasing, the totals, the maxima, and
    len_q <= len_k per sequence."""
    lists = []
    for name, cu, total, mx, of in (("cu_seqlens_q", cu_q, q.shape[0], max_q, "q"),
                                    ("cu_seqlens_k", cu_k, k.shape[0], max_k, "k")):
        c = host_list(cu)
        lists.append(c)
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c[0]}")
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
        if any(n < 0 for n in lens):
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        if c[-1] != total:
            raise ValueError(f"{name}[-1] = {c[-1]} must be the total length {total} ({of}.shape[0])")
        if lens and max(lens) > mx:
            raise ValueError(f"max_seqlen_{of} = {mx} is smaller than the longest sequence ({max(lens)})")
    cq, ck = lists
    for s in range(len(cq) - 1):
        if cq[s + 1] - cq[s] > ck[s + 1] - ck[s]:
            raise ValueError(f"sequence {s} has len_q = {cq[s + 1] - cq[s]} > len_k = {ck[s + 1] - ck[s]}: queries "
                             f"are the last len_q positions of their sequence")


# ---------------------------------------------------------------------------------------------- shapes
def check_softcap(softcap) -> None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 = no capping), got {type(softcap).__name__}")
    if not (softcap >= 0 and softcap < float("inf")):
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = no capping), got {softcap}")


def _check_tensors(named) -> None:
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_prefix(q, prefix_k, prefix_v, prefix_ids, prefix_lengths, batch, heads_kv, head_dim, rows="batch"):
    bank = prefix_ids is not None
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if bank and t.dim() != 4:
            raise ValueError(f"with prefix_ids, {name} must be a bank [num_entries, heads_kv, num_prefix, head_dim] "
                             f"(rank 4), got shape {shape_str(t)}")
        if not bank and t.dim() == 4:
            raise ValueError(f"{name} has rank 4 (a bank [num_entries, heads_kv, num_prefix, head_dim], shape "
                             f"{shape_str(t)}): pass prefix_ids [{rows}] to say which entry each row uses")
        if not bank and t.dim() != 3:
            raise ValueError(f"{name} must be [heads_kv, num_prefix, head_dim] (rank 3, shared by every batch row), "
                             f"got shape {shape_str(t)}")
    if prefix_lengths is not None and not bank:
        raise ValueError("prefix_lengths needs prefix_ids and a bank prefix [num_entries, heads_kv, num_prefix, "
                         "head_dim]")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape [heads_kv, num_prefix, head_dim], "
                         f"got prefix_k {shape_str(prefix_k)} and prefix_v {shape_str(prefix_v)}")
    if prefix_k.shape[-3] != heads_kv or prefix_k.shape[-1] != head_dim:
        lead = "num_entries, " if bank else ""
        raise ValueError(f"prefix_k must be [{lead}heads_kv={heads_kv}, num_prefix, head_dim={head_dim}], "
                         f"got shape {shape_str(prefix_k)}")
    if bank:
        entries = prefix_k.shape[0]
        for name, t, want, shape in (("prefix_ids", prefix_ids, batch, f"[{rows}={batch}]"),
                                     ("prefix_lengths", prefix_lengths, entries, f"[num_entries={entries}]")):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be an integer torch.Tensor {shape}, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be an int32 or int64 tensor {shape}, got dtype {t.dtype}")
            if tuple(t.shape) != (want,):
                raise ValueError(f"{name} must be {shape}, got shape {shape_str(t)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_heads(heads_q, heads_kv, head_dim, q_axis="q.shape[1]", k_axis="k.shape[1]", d_axis="q.shape[3]"):
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"heads_q={heads_q} ({q_axis}) must be a multiple of heads_kv={heads_kv} "
                         f"({k_axis}) for grouped-query attention")
    if head_dim == 0:
        raise ValueError(f"head_dim ({d_axis}) must be >= 1")


def _check_dtypes(q, named) -> None:
    for name, t in named:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k, v, prefix_k, "
                            f"prefix_v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share a device")


# ---------------------------------------------------------------------------------------------- signatures
_SIGNATURE_LIMIT = 64  # a model has a few (training, evaluation, each decode length): kept until this many
_passed: dict = {}


def _passed_before(key) -> bool:
    """Whether the signature ``key`` passed the checks before (False for None, or one that cannot be hashed)."""
    try:
        return key is not None and key in _passed
    except TypeError:  # unhashable: symbolic sizes (a SymInt), a list for softcap, ...
        return False


def _remember(key) -> None:
    """Keep a signature that passed (after the checks, never before: a failure is not kept)."""
    if key is None:
        return
    if len(_passed) >= _SIGNATURE_LIMIT:
        _passed.clear()
    try:
        _passed[key] = True
    except TypeError:  # unhashable: not kept
        pass


def _tensors_key(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths) -> tuple:
    """Type, shape, dtype and device of the tensors both front doors check (the optional ones None when absent)."""
    i, n = prefix_ids, prefix_lengths
    return (type(q), q.shape, q.dtype, q.device, type(k), k.shape, k.dtype, k.device,
            type(v), v.shape, v.dtype, v.device, type(prefix_k), prefix_k.shape, prefix_k.dtype, prefix_k.device,
            type(prefix_v), prefix_v.shape, prefix_v.dtype, prefix_v.device,
            None if i is None else (type(i), i.shape, i.dtype, i.device),
            None if n is None else (type(n), n.shape, n.dtype, n.device))


def _padded_key(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids, prefix_lengths,
                causal):
    """What ``check_padded`` reads of its arguments, as a tuple (None under torch.compile, whose tracer sees the
    checks, or for an argument without a tensor's attributes, which the checks refuse)."""
    if torch.compiler.is_compiling():
        return None
    m = attention_mask
    try:
        return ("padded", _tensors_key(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths),
                None if m is None else (type(m), m.shape, m.dtype, m.device),
                type(softmax_scale), type(softcap), softcap, causal)
    except AttributeError:
        return None


def check_padded(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap=0.0, prefix_ids=None,
                 prefix_lengths=None, causal=True) -> None:
    """prefix_attention's arguments: TypeError/ValueError naming the argument and the expected shape (once per
    signature that passes, see the module docstring)."""
    key = _padded_key(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids,
                      prefix_lengths, causal)
    if _passed_before(key):
        return
    _check_padded(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids, prefix_lengths,
                  causal)
    _remember(key)


def _check_padded(q, k, v, prefix_k, prefix_v, attention_mask, softmax_scale, softcap, prefix_ids, prefix_lengths,
                  causal) -> None:
    named = (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v))
    _check_tensors(named)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads_q, len_q, head_dim] (rank 4), got shape {shape_str(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads_kv, len_k, head_dim] (rank 4), got shape {shape_str(t)}")
    batch, heads_q, len_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [batch, heads_kv, len_k, head_dim], "
                         f"got k {shape_str(k)} and v {shape_str(v)}")
    kb, heads_kv, len_k, kd = k.shape
    if kb != batch:
        raise ValueError(f"k must be [batch={batch}, heads_kv, len_k, head_dim] like q, got shape {shape_str(k)}")
    if kd != head_dim:
        raise ValueError(f"k must be [batch, heads_kv, len_k, head_dim={head_dim}] like q, got shape {shape_str(k)}")
    _check_heads(heads_q, heads_kv, head_dim)
    if causal and len_q > len_k:
        raise ValueError(f"len_q={len_q} (q.shape[2]) must be <= len_k={len_k} (k.shape[2]) with causal=True: "
                         f"queries are the last len_q text positions (causal=False takes any len_q)")
    _check_prefix(q, prefix_k, prefix_v, prefix_ids, prefix_lengths, batch, heads_kv, head_dim)
    _check_dtypes(q, named)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or 0/1 integers [batch={batch}, len_k={len_k}], "
                            f"got dtype {attention_mask.dtype} (additive float masks are not accepted)")
        if tuple(attention_mask.shape) != (batch, len_k):
            raise ValueError(f"attention_mask must be [batch={batch}, len_k={len_k}] (1 = text key visible), "
                             f"got shape {shape_str(attention_mask)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    check_softcap(softcap)


def _packed_key(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, softmax_scale, softcap, prefix_ids,
                prefix_lengths):
    """What ``check_packed`` reads of its arguments, as a tuple (None as in ``_padded_key``)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return ("packed", _tensors_key(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths),
                type(cu_q), cu_q.shape, cu_q.dtype, cu_q.device, type(cu_k), cu_k.shape, cu_k.dtype, cu_k.device,
                type(max_q), max_q, type(max_k), max_k, type(softmax_scale), type(softcap), softcap)
    except AttributeError:
        return None


def check_packed(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, softmax_scale, softcap=0.0,
                 prefix_ids=None, prefix_lengths=None) -> None:
    """prefix_attention_varlen's arguments (shapes and types, once per signature that passes; the offsets' values
    in :func:`check_offsets`)."""
    key = _packed_key(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, softmax_scale, softcap, prefix_ids,
                      prefix_lengths)
    if _passed_before(key):
        return
    _check_packed(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, softmax_scale, softcap, prefix_ids,
                  prefix_lengths)
    _remember(key)


def _check_packed(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, softmax_scale, softcap, prefix_ids,
                  prefix_lengths) -> None:
    named = (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v))
    _check_tensors(named)
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, heads_q, head_dim] (rank 3, packed), got shape {shape_str(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_k, heads_kv, head_dim] (rank 3, packed), got shape "
                             f"{shape_str(t)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [total_k, heads_kv, head_dim], got k {shape_str(k)} "
                         f"and v {shape_str(v)}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32/int64 torch.Tensor [num_sequences + 1], got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got dtype {t.dtype}")
        if t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"{name} must be [num_sequences + 1], got shape {shape_str(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (num_sequences + 1), got "
                         f"{cu_q.numel()} and {cu_k.numel()}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be an int >= 0, got {m!r}")
    heads_q, head_dim, heads_kv = q.shape[1], q.shape[2], k.shape[1]
    if k.shape[2] != head_dim:
        raise ValueError(f"k must be [total_k, heads_kv, head_dim={head_dim}] like q, got shape {shape_str(k)}")
    _check_heads(heads_q, heads_kv, head_dim, "q.shape[1]", "k.shape[1]", "q.shape[2]")
    _check_prefix(q, prefix_k, prefix_v, prefix_ids, prefix_lengths, cu_q.numel() - 1, heads_kv, head_dim,
                  rows="num_sequences")
    _check_dtypes(q, named)
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    check_softcap(softcap)
