"""Hidden-state prefixes: per-layer rows ``[P, hidden_size]`` turned into that layer's prefix K/V by the model's own
frozen key/value projections (``P_k = P_theta @ W_k + b_k``, ``P_v = P_theta @ W_v + b_v``; no rotary embedding and
no key norm, as PEFT's prefix keys get none).

Supported attention modules: GPT-2's fused ``c_attn`` (a ``Conv1D`` ``[hidden, 3 * hidden]``: query | key | value) and
separate ``k_proj`` / ``v_proj`` linear layers (Llama, Mistral, Qwen2 with their biases, Gemma, Phi, OPT, ...).
The projection weights are read detached: they are frozen by definition of this parameterisation, so the
gradient reaches ``P_theta`` only.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["check_projectable", "project_kv"]


def check_projectable(module) -> None:
    """NotImplementedError naming the module unless its key/value projections are ones this module reads."""
    if _is_gpt2(module) or _has_kv_proj(module):
        return
    raise NotImplementedError(
        f"parameterization='hidden' needs an attention module with GPT-2's c_attn or separate k_proj / v_proj "
        f"layers; {type(module).__name__} has neither (materialize() a trained prefix elsewhere, or use the "
        f"direct or MLP parameterisation)")


def _is_gpt2(module) -> bool:
    return hasattr(module, "c_attn") and hasattr(module, "embed_dim") and not getattr(module, "is_cross_attention",
                                                                                        False)


def _has_kv_proj(module) -> bool:
    return all(hasattr(getattr(module, name, None), "weight") for name in ("k_proj", "v_proj"))


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
        w = module.c_attn.weight.detach().to(device=rows.device, dtype=dtype)  # Conv1D: [in, 3 * E]
        b = _bias(module.c_attn, dtype)
        k = rows @ w[:, E:2 * E]
        v = rows @ w[:, 2 * E:3 * E]
        if b is not None:
            b = b.to(rows.device)
            k, v = k + b[E:2 * E], v + b[2 * E:3 * E]
    elif _has_kv_proj(module):
        kp, vp = module.k_proj, module.v_proj
        k = F.linear(rows, kp.weight.detach().to(device=rows.device, dtype=dtype),
                     None if kp.bias is None else _bias(kp, dtype).to(rows.device))
        v = F.linear(rows, vp.weight.detach().to(device=rows.device, dtype=dtype),
                     None if vp.bias is None else _bias(vp, dtype).to(rows.device))
    else:
        check_projectable(module)
        raise AssertionError("unreachable")
    return (k.view(P, num_kv_heads, head_dim).transpose(0, 1), v.view(P, num_kv_heads, head_dim).transpose(0, 1))
