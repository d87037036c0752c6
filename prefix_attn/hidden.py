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

__all__ = ["check_projectable", "project_kv"]


def check_projectable(module, hidden_size=None) -> None:
    """NotImplementedError naming the module unless its key/value projections are ones this module reads (and, with
    ``hidden_size``, ValueError unless they take rows that wide)."""
    if _is_gpt2(module) or _has_kv_proj(module):
        width = (module.c_attn.weight.shape[0] if _is_gpt2(module) else module.k_proj.weight.shape[1])
        if hidden_size is not None and width != hidden_size:
            raise ValueError(f"{type(module).__name__}'s key/value projections take {width} features but the "
                             f"hidden-state prefix rows have {hidden_size}")
        return
    raise NotImplementedError(
        f"parameterization='hidden' needs an attention module with GPT-2's c_attn or separate k_proj / v_proj "
        f"layers; {type(module).__name__} has neither (materialize() a trained prefix elsewhere, or use the "
        f"direct or MLP parameterisation)")


def _is_gpt2(module) -> bool:
    """GPT-2's attention: a transformers ``Conv1D`` c_attn (weight ``[in, 3 * embed_dim]``, attribute ``nf``)."""
    c_attn = getattr(module, "c_attn", None)
    return (c_attn is not None and hasattr(c_attn, "nf") and hasattr(module, "embed_dim")
            and not getattr(module, "is_cross_attention", False))


def _has_kv_proj(module) -> bool:
    return all(hasattr(getattr(module, name, None), "weight") for name in ("k_proj", "v_proj"))


def _weight(layer, rows):
    w = layer.weight
    if type(w).__name__ == "DTensor" or w.is_meta or not w.dtype.is_floating_point:
        kind = "sharded (DTensor)" if type(w).__name__ == "DTensor" else ("on the meta device" if w.is_meta
                                                                          else f"{w.dtype}")
        raise NotImplementedError(f"a hidden-state prefix reads the key/value projection weights directly; they are "
                                  f"{kind} here. materialize() the prefix on an unsharded model, or use a direct "
                                  f"prefix")
    return w.detach()


def _bias(layer, dtype):
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().to(dtype)


def project_kv(module, rows: torch.Tensor, num_kv_heads: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """rows ``[P, hidden_size]`` -> (keys, values) ``[num_kv_heads, P, head_dim]`` through ``module``'s frozen
    projections, computed in the dtype of ``rows``, on its device."""
    P = rows.shape[0]
    dtype = rows.dtype
    if _is_gpt2(module):
        E = module.embed_dim
        w = _weight(module.c_attn, rows)[:, E:3 * E].to(device=rows.device, dtype=dtype)  # Conv1D: [in, 3 * E]
        b = _bias(module.c_attn, dtype)
        k = rows @ w[:, :E]
        v = rows @ w[:, E:]
        if b is not None:
            b = b.to(rows.device)
            k, v = k + b[E:2 * E], v + b[2 * E:3 * E]
    elif _has_kv_proj(module):
        kp, vp = module.k_proj, module.v_proj
        k = F.linear(rows, _weight(kp, rows).to(device=rows.device, dtype=dtype),
                     None if kp.bias is None else _bias(kp, dtype).to(rows.device))
        v = F.linear(rows, _weight(vp, rows).to(device=rows.device, dtype=dtype),
                     None if vp.bias is None else _bias(vp, dtype).to(rows.device))
    else:
        check_projectable(module)
        raise AssertionError("unreachable")
    return (k.view(P, num_kv_heads, head_dim).transpose(0, 1), v.view(P, num_kv_heads, head_dim).transpose(0, 1))
