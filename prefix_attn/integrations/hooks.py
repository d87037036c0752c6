"""The hooks ``enable`` puts on a model: one pair on the model itself (take ``prefix_ids`` out of the call) and one
pair on the decoder (the module that runs the layers).

Before the decoder's forward, once per forward: ``position_ids`` are shifted by ``P`` as PEFT does (OPT: counted
over the mask, as PEFT's longer mask does), a packed row is recognised from its ``position_ids`` (one host read),
the binding resolves this forward's per-row values (``Binding.resolve``) and the prefix K/V of all layers is
computed (one MLP evaluation in projection mode). After it (also when it raises), that K/V is dropped.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional

import torch

from .. import checks
from .attention import check_seq_idx
from .binding import Binding

_SIGNATURES: Dict[type, List[str]] = {}


class DecoderHooks:
    """Forward pre-hook and post-hook of the decoder; a module-level class so the model pickles."""

    def __init__(self, binding: Binding, position_rule: Optional[str] = None):
        self.binding = binding
        self.position_rule = position_rule  # None, "mask" (OPT), "token_ids" (RoBERTa), "embed_positions" (BART)

    def before(self, module, args, kwargs):
        if args:  # bind positionals by name so position_ids can be read and replaced
            names = _SIGNATURES.get(type(module))
            if names is None:
                names = _SIGNATURES.setdefault(type(module), list(inspect.signature(module.forward).parameters))
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        binding = self.binding
        position_ids = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # the user's padding mask, before transformers casts it to bool: 0 and 1 only (one memoised read)
            checks.mask_values(mask)
        tokens = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
                       if kwargs.get(k) is not None), None)
        if tokens is None:
            raise ValueError(f"{type(module).__name__} was called without input_ids or inputs_embeds")
        batch, device = tokens.shape[0], tokens.device
        if "prefix_ids" in kwargs or not binding.in_call:  # the decoder called directly
            binding.set_ids(kwargs.pop("prefix_ids", None), device)
        cache = cache_of(kwargs)
        binding.packed = packed_sequences(position_ids, mask, cache)
        seq_idx = kwargs.get("seq_idx")
        binding.seq_idx = None
        if seq_idx is not None:  # TRL packing: checked here once, not in every layer
            check_seq_idx(seq_idx, binding.packed, batch, tokens.shape[1])
            binding.seq_idx = seq_idx
        if binding.packed is not None and binding.is_bank:
            raise NotImplementedError("packed sequences (position_ids restarting inside a row) with a PrefixBank: "
                                      "not supported; pad the batch instead")
        binding.resolve(batch, device)
        # one prefix: P; a bank: each row's own entry length, [B, 1]
        num_prefix = binding.offsets(batch, device)
        if self.position_rule == "embed_positions":
            # an encoder-decoder: the decoder's position embedding adds this (seq2seq.PositionShift)
            binding.position_shift = num_prefix
        elif position_ids is not None:
            # PEFT: the prefix occupies positions 0..P-1, so given positions are shifted by P
            kwargs["position_ids"] = position_ids + num_prefix
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if self.position_rule == "token_ids":
                # RoBERTa counts the non-pad tokens from padding_idx + 1, after the cache length: under PEFT that
                # length includes P. From inputs_embeds it numbers 0, 1, ... from padding_idx + 1 with no offset,
                # under PEFT too: left to the model.
                if kwargs.get("input_ids") is not None:
                    pad = module.embeddings.padding_idx
                    real = kwargs["input_ids"].ne(pad).long()
                    kwargs["position_ids"] = (real.cumsum(-1) + past + num_prefix) * real + pad
            elif self.position_rule == "mask" and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                # OPT counts positions over its 2-D mask (cumsum(mask) * mask - 1); under PEFT that mask starts
                # with P ones and the cache with P slots: real tokens at P + cumsum - 1, pads at -1
                m = mask.long()
                kwargs["position_ids"] = ((m.cumsum(-1) + num_prefix) * m - 1)[:, past:]
            else:
                # what the stock model does when position_ids is None, plus PEFT's shift by P
                kwargs["position_ids"] = (torch.arange(tokens.shape[1], device=device) + past).unsqueeze(0) + num_prefix
        binding.begin_forward()  # once per forward, outside any checkpointed layer
        return args, kwargs

    def after(self, module, args, output):
        self.binding.end_forward()
        return None


class CallHooks:
    """Forward pre-hook and post-hook of the model itself: take ``prefix_ids`` out of the call's kwargs (the
    model's own forward never sees it), so it reaches the decoder hook and the attention layers."""

    def __init__(self, binding: Binding):
        self.binding = binding

    def before(self, module, args, kwargs):
        if self.binding.in_call:
            return None
        device = next(iter(module.parameters())).device
        self.binding.set_ids(kwargs.pop("prefix_ids", None), device)
        self.binding.in_call = True
        return args, kwargs

    def after(self, module, args, output):
        self.binding.in_call = False
        return None


def cache_of(kwargs):
    """The KV cache of a decoder call: ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before; still
    accepted, deprecated, by 5.24)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def packed_sequences(position_ids, mask, cache):
    """(cu_seqlens int32 [S + 1] on the positions' device, longest) when one row packs several examples
    (transformers' DataCollatorWithFlattening, TRL packing: position_ids restarting at 0, no attention mask, no
    cache), else None. One host read of the positions; the offsets' values are recorded for the op's checks."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or mask is not None:
        return None
    if cache is not None and cache.get_seq_length() > 0:
        return None
    pos = position_ids[0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    if len(starts) <= 1 and (not starts or starts[0] == 0):
        return None  # one example: the padded path is the same
    if starts[0] != 0:
        raise ValueError("packed position_ids must start at 0 for the first example")
    bounds = starts + [len(pos)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if pos[a:b] != list(range(b - a)):
            raise ValueError("packed position_ids must count 0, 1, 2, ... within each example")
    cu = checks.trust(torch.tensor(bounds, dtype=torch.int32, device=position_ids.device))
    checks.known(cu, "list", bounds)
    return cu, max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
