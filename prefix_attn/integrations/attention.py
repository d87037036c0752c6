"""The attention and mask functions registered under ``"prefix_attn"`` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface``, and the check of the transformers release.

* ``prefix_attention_forward`` runs one attention layer through ``prefix_attention`` (padded) or
  ``prefix_attention_varlen`` (a packed row), the prefix K/V of ``module.layer_idx`` read in place from the
  per-model binding (``binding.py``) with the values the decoder hook resolved once for this forward;
* ``prefix_attention_mask``: transformers builds no mask at all for an attention name it has no mask function for,
  so padding would be lost; this one hands the attention function a ``[batch, len_k]`` bool key mask (or None when
  nothing is padded), once per forward.

Masks the model builds itself (4-D) are reduced to a key mask or checked against the packing once per mask tensor
(``checks.memo``), not in every layer. The registrations are made by the first ``enable`` call, never at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Optional

import torch
from packaging.version import Version

from .. import checks
from ..ops import prefix_attention
from ..varlen import prefix_attention_varlen

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
    from transformers.utils.generic import TransformersKwargs
    from transformers.utils.import_utils import is_tracing
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "prefix_attn.integrations.transformers needs transformers>=5.23 and peft: pip install 'transformers>=5.23' peft"
        " (or, from a clone, pip install --no-build-isolation -e '.[hf]')"
    ) from exc

__all__ = ["ATTN_IMPLEMENTATION", "GROUPS_KWARG", "TESTED_TRANSFORMERS", "check_version", "check_seq_idx",
           "grouped_call", "prefix_attention_forward", "prefix_attention_mask", "register"]

ATTN_IMPLEMENTATION = "prefix_attn"
# the kwarg a grouped_forward call passes through the model to every attention layer (grouped.Groups)
GROUPS_KWARG = "prefix_attn_groups"
# The transformers releases the test suite runs on (oldest, newest). Each release renames or moves something
# (5.24: past_key_values -> cache); enable() warns once on a release outside this range.
TESTED_TRANSFORMERS = ("5.23", "5.25")
_warned_version = []

# True while a grouped_forward call runs the model: its layers split the row themselves, so no mask is built
_GROUPED_CALL = contextvars.ContextVar("prefix_attn_grouped_call", default=False)


@contextlib.contextmanager
def grouped_call():
    """While a grouped_forward call runs the model: the mask function returns None at once (the split is the
    Groups'), so no ``[T, T]`` mask of the whole packed row is built for a sliding-window model."""
    token = _GROUPED_CALL.set(True)
    try:
        yield
    finally:
        _GROUPED_CALL.reset(token)


def _minor(version: str):
    return Version(version).release[:2]  # "5.24.0.dev0" -> (5, 24)


def check_version(version: Optional[str] = None) -> bool:
    """True if transformers (``version``, default the installed one) is within TESTED_TRANSFORMERS; else warn
    once per process, naming the tested range, and return False."""
    version = transformers.__version__ if version is None else version
    oldest, newest = (_minor(v) for v in TESTED_TRANSFORMERS)
    if oldest <= _minor(version) <= newest:
        return True
    if not _warned_version:
        _warned_version.append(version)
        warnings.warn(f"prefix_attn is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"
                      f" (inclusive); this is {version}. Releases rename model arguments (5.24 renamed "
                      f"past_key_values to cache): check the results, or install a tested release", UserWarning,
                      stacklevel=3)
    return False


# ---------------------------------------------------------------------------------------------- masks
def _require(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the bool tensor ``ok`` is True. Traced (torch.compile): no
    data-dependent Python branch, a runtime assert inside the graph instead."""
    if is_tracing(ok):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def _key_mask_from_4d(mask: torch.Tensor, len_q: int, len_k: int) -> Optional[torch.Tensor]:
    """``[batch, heads or 1, len_q, len_k]`` bool (True = attend) or additive float mask -> ``[batch,
    len_k]`` bool key mask, if the 4-D mask is exactly "bottom-right causal AND key padding"; otherwise
    ValueError."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif not mask.dtype.is_floating_point:
        allowed = mask != 0
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        _require(~(allowed & (mask != 0)).any(), "prefix_attn cannot apply an additive attention bias (a float "
                 "mask with values other than 0 and -inf)")
    if allowed.dim() != 4 or allowed.shape[-2:] != (len_q, len_k):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match len_q={len_q}, "
                         f"len_k={len_k}")
    if allowed.shape[1] != 1:
        _require((allowed == allowed[:, :1]).all(), "prefix_attn takes one key mask for all heads; got a "
                 "per-head attention mask")
    allowed = allowed[:, 0]
    # the last query sits at the last position: under causal it sees every unpadded key
    keys = allowed[:, -1, :]
    qpos = torch.arange(len_q, device=mask.device) + (len_k - len_q)
    causal = torch.arange(len_k, device=mask.device)[None, :] <= qpos[:, None]
    _require((allowed == (causal[None] & keys[:, None, :])).all(),
             "prefix_attn supports causal attention with a key padding mask only; this mask has another pattern "
             "(packed sequences restarting position_ids inside a row, a custom 4-D mask, a sliding window shorter "
             "than the sequence, ...)")
    if not is_tracing(keys) and bool(keys.all()):
        return None
    return keys


def prefix_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                          mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """Mask function registered for ``"prefix_attn"``: returns a ``[batch, kv_length]`` bool key mask, or
    None.

    transformers calls it once per forward with the 2-D padding mask it was given (already bool), the cache
    sizes and the mask pattern. Plain causal takes a fast path (no ``[len_q, len_k]`` tensor is built); any
    other pattern is evaluated and accepted only if it is causal + padding in the end (e.g. a sliding window
    longer than the sequence).
    """
    if not torch.compiler.is_compiling() and _GROUPED_CALL.get():  # (a ContextVar read would break a graph)
        return None
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    # a bidirectional mask may be a cross-attention's (queries of the decoder, keys of the encoder)
    if mask_function is not bidirectional_mask_function and q_offset + q_length != kv_offset + kv_length:
        raise ValueError(f"prefix_attn needs the queries to be the last keys (a DynamicCache or no cache); "
                         f"got q_offset={q_offset}, q_length={q_length}, kv_offset={kv_offset}, "
                         f"kv_length={kv_length} (a StaticCache or another preallocated cache?)")
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        # eager: skip an all-visible mask (no per-key reads in the kernel); traced (torch.compile): no
        # data-dependent branch, the mask is passed as it is
        if not is_tracing(padding) and bool(padding.all()):
            return None
        return padding
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False),
                     device=kwargs.get("device", "cpu"))
    full = full.expand(batch_size, -1, -1, -1)
    if is_tracing(full):
        return _key_mask_from_4d(full, q_length, kv_length)
    try:  # reduced once per forward, not in every layer
        return _key_mask_from_4d(full, q_length, kv_length)
    except ValueError:  # not causal + padding: a packed row (checked against its examples) or refused, in attention
        return full


# ---------------------------------------------------------------------------------------------- attention
# kwargs a model may pass to its attention function. Honoured: softcap (in the kernels), sliding_window (while
# P + keys fit in it), is_causal=True, dropout (in the kernels, unless enable(..., ignore_attention_dropout=True)),
# scaling. Carried along by the
# model and meaningless here: the _INERT ones. Anything else with a value other than None / False is refused
# by name: an op that ignored an attention sink, a bias or packed-sequence boundaries would be silently wrong.
_NAMED_REFUSALS = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "attention_bias": "an additive attention bias",
    "alibi": "ALiBi position biases",
}
# transformers' own pass-through kwargs (TransformersKwargs: num_items_in_batch from Trainer, output_* flags, ...)
# plus what decoder layers forward; the packed-sequence ones among them are refused above when they carry a value
_INERT = frozenset(set(getattr(TransformersKwargs, "__optional_keys__", ())) | {
    "position_ids", "cache_position", "output_attentions", "use_cache", "past_key_values", "past_key_value", "cache",
    "layer_idx", "position_embeddings", "return_dict", "output_hidden_states", "token_type_ids", "prefix_ids",
}) - set(_NAMED_REFUSALS) - {"is_causal"}


def _refuse_unhandled(module, kwargs) -> None:
    for name, value in kwargs.items():
        if name in _INERT or name in ("softcap", "sliding_window", "is_causal") or value is None or value is False:
            continue
        what = _NAMED_REFUSALS.get(name, f"the attention argument {name!r}")
        raise NotImplementedError(f"{type(module).__name__} passes {what} to its attention function; prefix_attn "
                                  f"does not implement it and will not ignore it")
    if kwargs.get("is_causal") is False and getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__} asks for non-causal (bidirectional) attention "
                                  f"(is_causal=False) in a causal model; prefix_attn does not implement that mix")


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [B, Hq, Tq, D]``, ``key/value [B, Hkv, Tk, D]`` (text only,
    from the cache when decoding) -> ``([B, Tq, Hq, D], None)``. The prefix of ``module.layer_idx`` is added
    inside ``prefix_attention``; GQA K/V are passed with their own head count, never repeated."""
    groups = kwargs.pop(GROUPS_KWARG, None)  # grouped.Groups of a grouped_forward call
    binding = getattr(module, "_prefix_attn_binding", None)
    if binding is None and not getattr(module, "_prefix_attn_plain", False):
        raise RuntimeError(f"{type(module).__name__} runs attn_implementation='{ATTN_IMPLEMENTATION}' but "
                           f"has no prefix; call prefix_attn.enable(model, prefix)")
    # the model's own attention dropout (GPT-2 attn_pdrop, Llama-family attention_dropout; 0 in eval mode),
    # applied in the kernels to the whole row, prefix columns included, as the stock attention does
    dropout_p = 0.0 if binding is not None and binding.ignore_attention_dropout else float(dropout or 0.0)
    # an encoder's self-attention (BERT-style, module.is_causal False): bidirectional, every key of its row
    causal = bool(getattr(module, "is_causal", True))
    if groups is not None or binding is None:
        return _grouped_or_plain(module, groups, binding, query, key, value, attention_mask, causal, scaling,
                                 dropout_p, kwargs), None
    packed = _flash_packing(kwargs, binding.packed)  # consumes cu_seq_lens_q/k, max_length_q/k
    seq_idx = kwargs.pop("seq_idx", None)
    if seq_idx is not None and seq_idx is not binding.seq_idx:  # checked once per forward by the decoder hook
        check_seq_idx(seq_idx, packed, query.shape[0], query.shape[2])
    _refuse_unhandled(module, kwargs)
    softcap = kwargs.get("softcap") or 0.0
    slot = getattr(module, "_prefix_attn_slot", module.layer_idx)
    if slot is None:  # an encoder-decoder's attention without a prefix (seq2seq.py)
        return _plain_attention(query, key, value, attention_mask, causal, scaling, dropout_p), None
    pk, pv = binding.key_value(slot)
    if pk.dtype != query.dtype or pk.device != query.device:
        # half-precision models: the prefix is kept in its own (float32) dtype and cast here, differentiably
        pk, pv = pk.to(device=query.device, dtype=query.dtype), pv.to(device=query.device, dtype=query.dtype)
    len_q, len_k = query.shape[2], key.shape[2]
    _check_window(kwargs.get("sliding_window"), binding.num_virtual_tokens, len_k)
    if packed is not None:
        if not causal:
            raise NotImplementedError("packed sequences in a bidirectional encoder: not supported; pad the batch")
        return _packed_attention(query, key, value, pk, pv, attention_mask, packed, scaling, softcap,
                                 dropout_p), None
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4:  # the same mask tensor in every layer: reduced (and checked) once
            mask = checks.memo(mask, f"key_mask {len_q} {len_k}", lambda: _key_mask_from_4d(mask, len_q, len_k))
        elif mask.dim() != 2 or tuple(mask.shape) != (query.shape[0], len_k):
            raise ValueError(f"prefix_attn got an attention mask of shape {tuple(mask.shape)}; expected "
                             f"[batch={query.shape[0]}, len_k={len_k}]")
        if mask is not None and mask.dtype != torch.bool:
            # a 0/1 mask the model passed itself: the same tensor in every layer, cast once (the mask function's
            # masks are bool already, and nothing below casts a bool mask again); 0 and 1 only
            checks.mask_values(mask)
            mask = checks.memo(mask, "bool", lambda: mask.to(torch.bool))
    out = prefix_attention(query, key, value, pk, pv, causal=causal, softmax_scale=scaling, attention_mask=mask,
                           softcap=float(softcap), dropout_p=dropout_p,
                           **binding.bank_args(query.shape[0], query.device))
    return out.transpose(1, 2), None


def _check_window(window, num_prefix: int, len_k: int) -> None:
    """A model's sliding window is honoured while it covers all a query sees (prefix + keys); else refused."""
    if window is not None and num_prefix + len_k > window:
        raise NotImplementedError(f"sliding_window={window} is shorter than prefix + keys ({num_prefix} + {len_k}); "
                                  f"prefix_attn has no sliding window")


def _grouped_or_plain(module, groups, binding, query, key, value, mask, causal, scaling, dropout_p, kwargs):
    """A layer of a grouped_forward call (``groups.attention``: the prompts once, their completions reading them
    in place), or a plain call of a stock model that ``enable_grouped`` switched (no prefix, as ``"sdpa"``)."""
    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"packed sequences ({name}) in a grouped_forward call or in a model without a "
                                      f"prefix: not supported")
    _refuse_unhandled(module, kwargs)
    softcap = float(kwargs.get("softcap") or 0.0)
    pk = pv = None
    if binding is not None:
        pk, pv = binding.key_value(getattr(module, "_prefix_attn_slot", module.layer_idx))
    # the longest row of keys a query sees: a completion's prompt + completion (after the prefix)
    _check_window(kwargs.get("sliding_window"), 0 if pk is None else pk.shape[1],
                  key.shape[2] if groups is None else groups.lp + groups.lc)
    if groups is None:
        if softcap:
            raise NotImplementedError(f"{type(module).__name__} asks for softcap; the plain attention of a model "
                                      f"without a prefix does not implement it")
        return _plain_attention(query, key, value, mask, causal, scaling, dropout_p)
    return groups.attention(query, key, value, pk, pv, causal=causal, scaling=scaling, softcap=softcap,
                            dropout_p=dropout_p)


def _plain_attention(query, key, value, mask, causal, scaling, dropout_p):
    """Attention without a prefix, as the stock ``"sdpa"`` implementation runs it: ``[B, Tq, Hq, D]``. ``mask``: the
    ``[B, Tk]`` key mask of ``prefix_attention_mask`` (or None)."""
    len_q, len_k = query.shape[2], key.shape[2]
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"prefix_attn got an attention mask of shape {tuple(mask.shape)} for an attention "
                             f"without a prefix; expected [batch, len_k]")
        mask = mask.to(torch.bool)[:, None, None, :]
    if causal and (mask is not None or len_q != len_k):  # bottom-right causal, and the key mask
        tri = torch.ones(len_q, len_k, dtype=torch.bool, device=query.device).tril(len_k - len_q)
        mask = tri if mask is None else mask & tri
    gqa = query.shape[1] != key.shape[1]
    if gqa and mask is not None and query.device.type == "cuda":
        # SDPA's enable_gqa with a mask falls back to its math kernel on CUDA (transformers repeats K/V there too)
        rep = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), False
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None,
        scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def _flash_packing(kwargs, packed):
    """The packing of this forward: from the flash-attention kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``,
    popped from ``kwargs``) if the model passes them, else what the decoder hook found in ``position_ids``."""
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    if cu_q is None and cu_k is None:
        return packed
    if cu_q is None or cu_k is None:
        raise NotImplementedError("prefix_attn supports packed sequences in self-attention only: cu_seq_lens_q and "
                                  "cu_seq_lens_k must be equal")
    # the same tensors in every layer: read once
    return checks.memo(cu_q, f"flash {id(cu_k)} {max_q} {max_k} {id(packed)}",
                       lambda: _check_flash_packing(cu_q, cu_k, max_q, max_k, packed))


def _check_flash_packing(cu_q, cu_k, max_q, max_k, packed):
    if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k) or (max_q is not None and max_q != max_k):
        raise NotImplementedError("prefix_attn supports packed sequences in self-attention only: cu_seq_lens_q and "
                                  "cu_seq_lens_k must be equal")
    cu = cu_q.to(torch.int32)
    if packed is not None and not torch.equal(packed[0].to(cu.device), cu):
        raise ValueError("cu_seq_lens_q does not match the examples that position_ids mark")
    longest = int(max_q) if max_q is not None else int((cu[1:] - cu[:-1]).max())
    return cu, longest


def check_seq_idx(seq_idx: torch.Tensor, packed, batch: int, length: int) -> None:
    """``seq_idx [batch, length]`` (TRL's and ``DataCollatorWithFlattening(return_seq_idx=True)``'s example index
    of every token) must say what the packing says: 0, 1, ... S-1 over the examples that position_ids (or
    cu_seq_lens) mark in a packed row, one value per row otherwise. Raise ValueError naming seq_idx if not."""
    if seq_idx.dim() != 2 or tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"seq_idx must be [batch={batch}, length={length}], got shape {tuple(seq_idx.shape)}")
    if packed is not None:
        cu = packed[0].to(seq_idx.device).long()
        want = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=seq_idx.device), cu[1:] - cu[:-1])
        _require((seq_idx[0].long() == want).all(), "seq_idx does not match the packed examples that position_ids "
                 "(or cu_seq_lens) mark: prefix_attn follows the packing, and refuses a seq_idx that says otherwise")
    else:
        _require((seq_idx == seq_idx[:, :1]).all(), "seq_idx marks several sequences in a row, but position_ids "
                 "do not restart there: pass position_ids counting 0, 1, ... within each packed example")


def _packed_attention(query, key, value, pk, pv, mask, packed, scaling, softcap, dropout_p):
    """One row of packed examples -> prefix_attention_varlen; a 4-D mask, if the model built one, must be the
    block-diagonal causal mask of those examples (anything else is refused)."""
    cu, longest = packed
    cu = cu.to(query.device)
    total = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != total:
        raise ValueError("packed sequences need one row and no cache")
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"packed sequences with a {mask.dim()}-D attention mask are not supported")
        checks.memo(mask, "packed", lambda: _check_packed_mask(mask, cu, total))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, H, D] views
    out = prefix_attention_varlen(q, k, v, pk, pv, cu, cu, longest, longest, causal=True, softmax_scale=scaling,
                                  softcap=float(softcap), dropout_p=dropout_p)
    return out.unsqueeze(0)  # [1, total, Hq, D]


def _check_packed_mask(mask, cu, total) -> None:
    """The model's 4-D mask of a packed row must be the block-diagonal causal mask of its examples."""
    allowed = mask if mask.dtype == torch.bool else (mask > torch.finfo(mask.dtype).min / 2
                                                      if mask.dtype.is_floating_point else mask != 0)
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(total, device=cu.device)
    want = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    _require((allowed[0] == want).all(), "prefix_attn: the model's mask for this packed row is not the "
             "block-diagonal causal mask of its examples")


def register() -> None:
    """Register the attention and mask functions under ``"prefix_attn"`` (idempotent); warn once if this
    transformers release is outside the tested range."""
    check_version()
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)
