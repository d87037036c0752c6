"""The ways prefix attention is run without ``prefix_attn``, as benchmark baselines, and ``prefix_attn`` itself.

Every method is a callable ``(q, k, v, prefix_k, prefix_v) -> out`` on ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``
and ``prefix_k, prefix_v [Hkv, P, D]``, causal with the queries bottom-right aligned and the prefix visible to every
query. Groups (``GROUP``), as numbered in benchmarks/README.md:

    prefix_attn        ours: the fused op
    peft_eager         1: PEFT's path through transformers' eager attention
    sdpa[...]          2: expand + concat + F.scaled_dot_product_attention, PyTorch's choice or a forced backend
    sdpa_flash,        2: expand + concat, the queries padded with zero rows to a square, is_causal=True, SDPA's
    sdpa_cudnn            flash or cuDNN kernel forced (``sdpa_square``)
    flex, flex_packed  3: FlexAttention on expand + concat, or with the batch packed behind one copy of the prefix
    flash_attn         4: flash_attn_func(causal=True) on expand + concat

``build_methods`` builds them by name for one shape; one that cannot run here is given as the reason (a str).
``eager_softcap_attention`` is the eager path with Gemma 2's logit softcapping.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, List

import torch
import torch.nn.functional as F
from common import short

import prefix_attn

GROUP = {
    "prefix_attn": "ours",
    "peft_eager": "1",
    "sdpa[auto]": "2",
    "sdpa[flash]": "2",
    "sdpa[efficient]": "2",
    "sdpa[cudnn]": "2",
    "sdpa_flash": "2",
    "sdpa_cudnn": "2",
    "flex": "3",
    "flex_packed": "3",
    "flash_attn": "4",
}


class Unavailable(Exception):
    """A method that cannot run here; the message is the reason, recorded in the results."""


def expand_concat(prefix: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[Hkv, P, D] + [B, Hkv, T, D] -> [B, Hkv, P + T, D]: the prefix copied into every batch row."""
    return torch.cat([prefix.unsqueeze(0).expand(text.shape[0], -1, -1, -1), text], dim=2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def additive_prefix_mask(len_q: int, len_k: int, num_prefix: int, dtype, device) -> torch.Tensor:
    """[1, 1, Tq, P + Tk] float mask as transformers builds it for eager attention: 0 where visible,
    finfo.min elsewhere; the P prefix columns visible to every query. Built once per model forward in
    transformers, so built once here, outside the timed region."""
    qpos = torch.arange(len_q, device=device) + (len_k - len_q)
    visible = torch.arange(len_k, device=device)[None, :] <= qpos[:, None]
    visible = torch.cat([torch.ones(len_q, num_prefix, dtype=torch.bool, device=device), visible], dim=1)
    mask = torch.zeros(len_q, num_prefix + len_k, dtype=dtype, device=device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def peft_eager_attention(q, k, v, prefix_k, prefix_v, add_mask, scale, softmax_dtype=torch.float32):
    """Baseline 1: what PEFT prefix tuning runs through transformers' eager_attention_forward
    (``softmax_dtype`` is float32 there; the tests pass float64 to check the rest of the math exactly)."""
    group = q.shape[1] // k.shape[1]
    key = repeat_kv(expand_concat(prefix_k, k), group)
    value = repeat_kv(expand_concat(prefix_v, v), group)
    weights = torch.matmul(q, key.transpose(2, 3)) * scale
    weights = weights + add_mask
    weights = F.softmax(weights, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return torch.matmul(weights, value)  # dropout 0


def eager_softcap_attention(q, k, v, prefix_k, prefix_v, softcap):
    """What PEFT runs on Gemma 2 (eager attention, Hq == Hkv, Tq == Tk, CPU): expand + concat,
    ``q @ k^T * D**-0.5``, ``softcap * tanh(s / softcap)``, masked softmax, ``@ v``."""
    length, dim = q.shape[2], q.shape[3]
    keys, values = expand_concat(prefix_k, k), expand_concat(prefix_v, v)
    s = torch.matmul(q, keys.transpose(-1, -2)) * dim**-0.5
    s = torch.tanh(s / softcap) * softcap
    num_prefix = prefix_k.shape[1]
    visible = torch.ones(length, num_prefix + length, dtype=torch.bool).tril(num_prefix)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), values)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


def make_sdpa(which: str, shape_q, len_k: int, num_prefix: int, scale: float, group: int):
    """Baseline 2: expand + concat + SDPA with a bottom-right causal bias. GQA through repeat_kv, as
    transformers' sdpa path does whenever an attention mask is passed."""
    from torch.nn.attention.bias import causal_lower_right

    len_q = shape_q[2]
    bias = causal_lower_right(len_q, num_prefix + len_k)

    def run(q, k, v, prefix_k, prefix_v):
        key = repeat_kv(expand_concat(prefix_k, k), group)
        value = repeat_kv(expand_concat(prefix_v, v), group)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=bias, scale=scale)

    if which == "auto":
        return run
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(which)

    def forced(q, k, v, prefix_k, prefix_v):
        with sdpa_kernel([backend]):
            return run(q, k, v, prefix_k, prefix_v)

    return forced


def sdpa_square(q, k, v, prefix_k, prefix_v, backends=None, scale=None, gqa=True):
    """Prefix attention through SDPA's causal kernels, which take a top-left causal mask only.

    Keys ``[prefix | text]`` (expand + concat) have length ``P + Tk``; the queries get ``P + Tk - Tq`` zero rows
    in front, so that the square ``is_causal=True`` mask puts real query ``i`` at row ``P + Tk - Tq + i``: it sees
    every prefix slot and the text keys ``j <= Tk - Tq + i``, the bottom-right mask of ``prefix_attention``. The
    padded rows are dropped from the output; they get a zero ``dout``, so they add nothing to any gradient and the
    real rows' gradients are exact. Supports causal attention with ``Tq <= Tk`` (``Tq < Tk``: decoding-like,
    at the cost of ``P + Tk - Tq`` computed rows that are thrown away), any ``P >= 0`` and GQA; no key-padding mask.

    ``backends``: SDPBackend list forced with ``sdpa_kernel`` (None: PyTorch's choice). ``gqa``: GQA through
    ``enable_gqa`` (the backend must take it), else K/V repeated per query head with ``repeat_kv``.
    """
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k, num_prefix = k.shape[1], k.shape[2], prefix_k.shape[1]
    if len_q > len_k:
        raise ValueError(f"sdpa_square: len_q {len_q} > len_k {len_k}; the queries must be the last len_q rows")
    pad = num_prefix + len_k - len_q
    q_square = torch.cat([q.new_zeros(batch, heads_q, pad, head_dim), q], dim=2)
    key, value = expand_concat(prefix_k, k), expand_concat(prefix_v, v)
    group = heads_q // heads_kv
    if group > 1 and not gqa:
        key, value = repeat_kv(key, group), repeat_kv(value, group)
    with contextlib.nullcontext() if backends is None else _sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q_square, key, value, is_causal=True, scale=scale,
                                             enable_gqa=gqa and group > 1)
    return out[:, :, pad:]


def _sdpa_kernel(backends):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


@functools.lru_cache(maxsize=None)
def sdpa_takes_gqa(backend, heads_q: int, heads_kv: int, head_dim: int, dtype, device: str) -> bool:
    """Whether the forced SDPA backend runs forward and backward with ``enable_gqa`` at these heads (a tiny probe,
    once per key; which backends take it changes between PyTorch versions)."""
    x = [torch.zeros(1, h, 16, head_dim, dtype=dtype, device=device, requires_grad=True)
         for h in (heads_q, heads_kv, heads_kv)]
    try:
        with _sdpa_kernel([backend]):
            F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True).sum().backward()
        return True
    except RuntimeError:
        return False


def make_sdpa_square(backend, shape_q, len_k: int, heads_kv: int, scale: float, dtype, device, gqa=None):
    """Baselines ``sdpa_flash`` / ``sdpa_cudnn``: ``sdpa_square`` with one SDPBackend forced. ``gqa=None`` probes
    whether the backend takes ``enable_gqa`` here (``sdpa_takes_gqa``), else K/V go through ``repeat_kv``."""
    heads_q, len_q, head_dim = shape_q[1], shape_q[2], shape_q[3]
    if len_q > len_k:
        raise ValueError(f"sdpa_square: len_q {len_q} > len_k {len_k}; the queries must be the last len_q rows")
    if gqa is None:
        gqa = heads_q > heads_kv and sdpa_takes_gqa(backend, heads_q, heads_kv, head_dim, dtype,
                                                    torch.device(device).type)

    def run(q, k, v, prefix_k, prefix_v):
        return sdpa_square(q, k, v, prefix_k, prefix_v, backends=[backend], scale=scale, gqa=gqa)

    return run


def _dynamo_allow_many_shapes() -> None:
    """Every (shape, P, dtype) compiles its own FlexAttention kernel; the default recompile limit (8) would
    silently send the later ones to the slow eager path."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))


_FLEX = {}


def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "compiled" not in _FLEX:
        _dynamo_allow_many_shapes()
        import torch._functorch.config

        # the "bwd" mode replays backward(retain_graph=True) on one saved forward; donated buffers (freed by
        # the first backward) would forbid it
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


def make_flex(packed: bool, shape_q, batch: int, len_k: int, num_prefix: int, scale: float, group: int, device,
              compiled: bool):
    """Baseline 3. Expanded: expand + concat, mask_mod ``kv < P or kv - P <= q + (Tk - Tq)``. Packed
    (expansion-free): queries of all batch rows in one sequence of length B*Tq, keys ``[prefix | text of
    row 0 | text of row 1 | ...]``, and a mask_mod that keeps each row to the prefix and its own text."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _flex_fn(compiled)
    len_q, heads_q, head_dim = shape_q[2], shape_q[1], shape_q[3]
    P, Tq, Tk, off = num_prefix, len_q, len_k, len_k - len_q
    gqa = group > 1
    if not packed:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx + off)

        block_mask = create_block_mask(mask_mod, None, None, Tq, P + Tk, device=device)

        def run(q, k, v, prefix_k, prefix_v):
            key, value = expand_concat(prefix_k, k), expand_concat(prefix_v, v)
            return flex(q, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return run

    def packed_mask_mod(b, h, q_idx, kv_idx):
        t = kv_idx - P
        same_row = (t // Tk) == (q_idx // Tq)
        return (kv_idx < P) | (same_row & (t % Tk <= q_idx % Tq + off))

    block_mask = create_block_mask(packed_mask_mod, None, None, batch * Tq, P + batch * Tk, device=device)

    def run_packed(q, k, v, prefix_k, prefix_v):
        hkv = k.shape[1]
        qp = q.transpose(0, 1).reshape(1, heads_q, batch * Tq, head_dim)
        kp = torch.cat([prefix_k, k.transpose(0, 1).reshape(hkv, batch * Tk, head_dim)], dim=1)[None]
        vp = torch.cat([prefix_v, v.transpose(0, 1).reshape(hkv, batch * Tk, head_dim)], dim=1)[None]
        out = flex(qp, kp, vp, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        return out.reshape(heads_q, batch, Tq, head_dim).transpose(0, 1)

    return run_packed


def make_flash_attn(scale: float):
    """Baseline 4: flash-attn on expand + concat; its causal=True is bottom-right aligned when
    seqlen_q < seqlen_k, which is exactly the prefix mask. Inputs are transposed views, no copies."""
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken build
        raise Unavailable(f"flash-attn not importable: {type(exc).__name__}: {exc}") from None

    def run(q, k, v, prefix_k, prefix_v):
        out = flash_attn_func(
            q.transpose(1, 2),
            expand_concat(prefix_k, k).transpose(1, 2),
            expand_concat(prefix_v, v).transpose(1, 2),
            causal=True,
            softmax_scale=scale,
        )
        return out.transpose(1, 2)

    return run


def prefix_attn_backend(device: torch.device) -> tuple:
    """(backend passed to prefix_attention, note for the output)."""
    if device.type == "cuda":
        return "triton", "Triton kernels"
    reason = prefix_attn.available_backends().get("cpu", "unknown")
    if reason == "ok":
        return "cpu", "native CPU kernel"
    return "torch", f"native CPU kernel unavailable ({reason}); timing the PyTorch reference instead"


def build_methods(args, shape_q, batch, len_k, num_prefix, dtype, device, scale, group, backend, names: List[str],
                  compile_flex: bool = True) -> Dict[str, object]:
    """{name: callable(q, k, v, prefix_k, prefix_v) -> out, or the reason it is unavailable (str)}. FlexAttention
    runs uncompiled when compile_flex is False or on the CPU with args.quick."""
    methods: Dict[str, object] = {}
    for name in names:
        try:
            if name == "prefix_attn":

                def ours(q, k, v, pk, pv, _b=backend):
                    return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, softmax_scale=scale, backend=_b)

                methods[name] = ours
            elif name == "peft_eager":
                mask = additive_prefix_mask(shape_q[2], len_k, num_prefix, dtype, device)

                def peft(q, k, v, pk, pv, _m=mask):
                    return peft_eager_attention(q, k, v, pk, pv, _m, scale)

                methods[name] = peft
            elif name.startswith("sdpa["):
                which = name[5:-1]
                if which != "auto" and device.type != "cuda":
                    raise Unavailable(f"SDPA backend '{which}' is CUDA-only")
                methods[name] = make_sdpa(which, shape_q, len_k, num_prefix, scale, group)
            elif name in ("sdpa_flash", "sdpa_cudnn"):
                which = name[5:]
                if device.type != "cuda":
                    raise Unavailable(f"SDPA's {which} kernel is CUDA-only (the padding is tested on the CPU's SDPA)")
                methods[name] = make_sdpa_square(_sdpa_backend(which), shape_q, len_k, shape_q[1] // group, scale,
                                                 dtype, device)
            elif name in ("flex", "flex_packed"):
                compiled = compile_flex and not (device.type == "cpu" and args.quick)
                methods[name] = make_flex(
                    name == "flex_packed", shape_q, batch, len_k, num_prefix, scale, group, device, compiled
                )
            elif name == "flash_attn":
                if device.type != "cuda":
                    raise Unavailable("flash-attn is CUDA-only")
                if dtype not in (torch.float16, torch.bfloat16):
                    raise Unavailable("flash-attn takes float16 / bfloat16 only")
                methods[name] = make_flash_attn(scale)
            else:
                raise Unavailable(f"unknown method {name!r}")
        except Unavailable as exc:
            methods[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - record why, keep going
            methods[name] = f"setup failed: {type(exc).__name__}: {short(exc)}"
    return methods
