"""Hidden-state prefixes: per-layer rows ``[P, hidden_size]`` turned into that layer's prefix K/V by the model's own
frozen key/value projections (``P_k = P_theta @ W_k + b_k``, ``P_v = P_theta @ W_v + b_v``; no rotary embedding and
no key norm, as PEFT's prefix keys get none).

Supported attention modules: GPT-2's fused ``c_attn`` (a ``Conv1D`` ``[hidden, 3 * hidden]``: query | key | value) and
separate ``k_proj`` / ``v_proj`` linear layers (Llama, Mistral, Qwen2 with their biases, Gemma, Phi, OPT, ...).
The projection weights are read detached: they are frozen by definition of this parameterisation, so the
gradient reaches ``P_theta`` only. They are read once per forward, before the decoder layers run: sharded
(FSDP2 ``DTensor``), offloaded (``meta``) or quantised weights are refused; ``materialize()`` such a prefix on an
unsharded copy, or train a direct prefix.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["attention_modules", "check_projectable", "project_kv"]


def attention_modules(model) -> list:
    """The self-attention modules of a model (modules named ``*Attention`` with an int ``layer_idx``, as
    transformers' are), in layer order."""
    mods = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention") or not isinstance(getattr(m, "layer_idx", None), int):
            continue
        if getattr(m, "is_cross_attention", False):
            raise NotImplementedError(f"{name}: cross-attention layers are not supported by prefix_attn")
        mods.append(m)
    return sorted(mods, key=lambda m: m.layer_idx)


def check_projectable(module, hidden_size=None) -> None:
    """NotImplementedError naming the module unless its key/value projections are ones this module reads (and, with
    ``hidden_size``, ValueError unless they take rows that wide)."""
    if _is_gpt2(module) or _kv_layers(module):
        width = (module.c_attn.weight.shape[0] if _is_gpt2(module) else _kv_layers(module)[0].weight.shape[1])
        if hidden_size is not None and width != hidden_size:
            raise ValueError(f"{type(module).__name__}'s key/value projections take {width} features but the "
                             f"hidden-state prefix rows have {hidden_size}")
        return
    raise NotImplementedError(
        f"parameterization='hidden' needs an attention module with GPT-2's c_attn or separate k_proj / v_proj "
        f"(BERT: key / value) layers; {type(module).__name__} has none (materialize() a trained prefix elsewhere, "
        f"or use the direct or MLP parameterisation)")


def _is_gpt2(module) -> bool:
    """GPT-2's attention: a transformers ``Conv1D`` c_attn (weight ``[in, 3 * embed_dim]``, attribute ``nf``)."""
    c_attn = getattr(module, "c_attn", None)
    return (c_attn is not None and hasattr(c_attn, "nf") and hasattr(module, "embed_dim")
            and not getattr(module, "is_cross_attention", False))


def _kv_layers(module):
    """The separate key and value projections (``k_proj`` / ``v_proj``, BERT's ``key`` / ``value``), or None."""
    for names in (("k_proj", "v_proj"), ("key", "value")):
        layers = tuple(getattr(module, name, None) for name in names)
        if all(isinstance(getattr(layer, "weight", None), torch.Tensor) for layer in layers):
            return layers
    return None


def _weight(layer, rows, columns=slice(None)):
    """The layer's weight (those columns of it), detached, on the device and in the dtype of ``rows``."""
    w = layer.weight
    if type(w).__name__ == "DTensor" or w.is_meta or not w.dtype.is_floating_point:
        kind = "sharded (DTensor)" if type(w).__name__ == "DTensor" else ("on the meta device" if w.is_meta
                                                                          else f"{w.dtype}")
        raise NotImplementedError(f"a hidden-state prefix reads the key/value projection weights directly; they are "
                                  f"{kind} here. materialize() the prefix on an unsharded model, or use a direct "
                                  f"prefix")
    return w.detach()[:, columns].to(device=rows.device, dtype=rows.dtype)


def _bias(layer, rows):
    """The layer's bias (None if it has none), detached, on the device and in the dtype of ``rows``."""
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().to(device=rows.device, dtype=rows.dtype)


def project_kv(module, rows: torch.Tensor, num_kv_heads: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """rows ``[P, hidden_size]`` -> (keys, values) ``[num_kv_heads, P, head_dim]`` through ``module``'s frozen
    projections, computed in the dtype of ``rows``, on its device."""
    P = rows.shape[0]
    if _is_gpt2(module):
        E = module.embed_dim
        w = _weight(module.c_attn, rows, slice(E, 3 * E))  # Conv1D [in, 3 * E]: query | key | value
        b = _bias(module.c_attn, rows)
        k = rows @ w[:, :E]
        v = rows @ w[:, E:]
        if b is not None:
            k, v = k + b[E:2 * E], v + b[2 * E:3 * E]
    elif _kv_layers(module):
        key, value = _kv_layers(module)
        k = F.linear(rows, _weight(key, rows), _bias(key, rows))
        v = F.linear(rows, _weight(value, rows), _bias(value, rows))
    else:
        check_projectable(module)
        raise AssertionError("unreachable")
    return (k.view(P, num_kv_heads, head_dim).transpose(0, 1), v.view(P, num_kv_heads, head_dim).transpose(0, 1))
