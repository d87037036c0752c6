"""Run a stock Hugging Face decoder (GPT-2, Llama, Mistral, Qwen2, ...) with its attention through
``prefix_attention``, the prefix K/V read in place by layer index.

    prefix = prefix_attn.PrefixTuning(model.config, num_virtual_tokens=20)
    model = prefix_attn.enable(model, prefix)       # same object back
    model(input_ids, attention_mask=mask, labels=labels)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=20)
    prefix_attn.disable(model)                      # the stock model again

How, without copying any model code:

* an attention function ``"prefix_attn"`` in transformers' ``AttentionInterface``; ``enable`` switches the
  model to it with ``set_attn_implementation`` and ``disable`` switches back to what it was;
* a mask function ``"prefix_attn"`` in ``AttentionMaskInterface``: transformers builds no mask at all for an
  attention name it has no mask function for, so padding would be lost; this one hands the attention function
  a ``[batch, len_k]`` bool key mask (or None when nothing is padded);
* a forward pre-hook on the decoder (``model.base_model``) that shifts ``position_ids`` by ``P`` exactly as
  PEFT does (PEFT's prefix occupies cache positions ``0..P-1``, so the text starts at ``P``) and materialises
  the prefix once per forward (outside any gradient-checkpointed layer);
* a plain (non-Module) binding object on the model and on each attention layer, through which the attention
  function finds ``prefix.key_value()[layer_idx]``. The prefix is never written to the KV cache, never
  expanded over the batch and never concatenated with the text.

The two registrations are made by the first ``enable`` call, never at import; they do nothing for models that
do not ask for ``"prefix_attn"``. See docs/huggingface.md for the PEFT conventions mirrored and the limits.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..ops import prefix_attention
from ..prefix import PrefixShape, PrefixTuning, prefix_shape_from_config

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "prefix_attn.integrations.transformers needs transformers>=5: pip install 'prefix_attn[hf]'"
    ) from exc

__all__ = ["ATTN_IMPLEMENTATION", "enable", "disable", "is_enabled", "prefix_attention_forward",
           "prefix_attention_mask", "register"]

ATTN_IMPLEMENTATION = "prefix_attn"


class _Binding:
    """What ``enable`` attaches to a model. A plain object on purpose: attributes that are nn.Modules or
    tensors would become submodules/buffers and leak into ``model.state_dict()``."""

    def __init__(self, prefix: PrefixTuning, previous_attn, frozen, ignore_attention_dropout: bool):
        self.prefix = prefix
        self.previous_attn = previous_attn
        self.frozen = frozen  # [(param, previous requires_grad)]
        self.ignore_attention_dropout = ignore_attention_dropout
        self.kv: Optional[torch.Tensor] = None  # [L, 2, Hkv, P, D], refreshed by the decoder pre-hook
        self.hook = None
        self.attention_modules = []

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens

    def key_value(self, layer_idx: int):
        if self.kv is None:  # an attention layer called outside the decoder's forward
            self.kv = self.prefix.key_value()
        kv = self.kv[layer_idx]
        return kv[0], kv[1]


# ---------------------------------------------------------------------------------------------- masks
def _key_mask_from_4d(mask: torch.Tensor, len_q: int, len_k: int) -> Optional[torch.Tensor]:
    """``[batch, heads or 1, len_q, len_k]`` bool (True = attend) or additive float mask -> ``[batch,
    len_k]`` bool key mask, if the 4-D mask is exactly "bottom-right causal AND key padding"; otherwise
    ValueError."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        if not mask.dtype.is_floating_point:
            allowed = mask != 0
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
            if (mask[allowed] != 0).any():
                raise ValueError("prefix_attn cannot apply an additive attention bias (a float mask with "
                                 "values other than 0 and -inf)")
    if allowed.dim() != 4 or allowed.shape[-2:] != (len_q, len_k):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match len_q={len_q}, "
                         f"len_k={len_k}")
    if allowed.shape[1] != 1 and not (allowed == allowed[:, :1]).all():
        raise ValueError("prefix_attn takes one key mask for all heads; got a per-head attention mask")
    allowed = allowed[:, 0]
    # the last query sits at the last position: under causal it sees every unpadded key
    keys = allowed[:, -1, :]
    qpos = torch.arange(len_q, device=mask.device) + (len_k - len_q)
    causal = torch.arange(len_k, device=mask.device)[None, :] <= qpos[:, None]
    if not torch.equal(allowed, causal[None] & keys[:, None, :]):
        raise ValueError("prefix_attn supports causal attention with a key padding mask only; this mask has "
                         "another pattern (packed sequences restarting position_ids inside a row, a custom "
                         "4-D mask, a sliding window shorter than the sequence, ...)")
    return None if bool(keys.all()) else keys


def prefix_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                          mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """Mask function registered for ``"prefix_attn"``: returns a ``[batch, kv_length]`` bool key mask, or
    None.

    transformers calls it once per forward with the 2-D padding mask it was given (already bool), the cache
    sizes and the mask pattern. Plain causal takes a fast path (no ``[len_q, len_k]`` tensor is built); any
    other pattern is evaluated and accepted only if it is causal + padding in the end (e.g. a sliding window
    longer than the sequence).
    """
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    if q_offset + q_length != kv_offset + kv_length:
        raise ValueError(f"prefix_attn needs the queries to be the last keys (a DynamicCache or no cache); "
                         f"got q_offset={q_offset}, q_length={q_length}, kv_offset={kv_offset}, "
                         f"kv_length={kv_length} (a StaticCache or another preallocated cache?)")
    if mask_function is causal_mask_function:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        return None if bool(padding.all()) else padding
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False),
                     device=kwargs.get("device", "cpu"))
    return _key_mask_from_4d(full.expand(batch_size, -1, -1, -1), q_length, kv_length)


# ---------------------------------------------------------------------------------------------- attention
def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [B, Hq, Tq, D]``, ``key/value [B, Hkv, Tk, D]`` (text only,
    from the cache when decoding) -> ``([B, Tq, Hq, D], None)``. The prefix of ``module.layer_idx`` is added
    inside ``prefix_attention``; GQA K/V are passed with their own head count, never repeated."""
    binding = getattr(module, "_prefix_attn_binding", None)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} runs attn_implementation='{ATTN_IMPLEMENTATION}' but "
                           f"has no prefix; call prefix_attn.enable(model, prefix)")
    if dropout and dropout > 0 and not binding.ignore_attention_dropout:
        raise NotImplementedError(
            f"prefix_attn has no attention dropout, but {type(module).__name__} asks for dropout={dropout} "
            f"in training mode. Build the model with attention dropout 0 (GPT-2: attn_pdrop=0.0, Llama: "
            f"attention_dropout=0.0), or pass ignore_attention_dropout=True to prefix_attn.enable to train "
            f"without it (other dropouts are unaffected); eval mode is never affected.")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("prefix_attn supports causal self-attention only (no cross-attention)")
    pk, pv = binding.key_value(module.layer_idx)
    if pk.dtype != query.dtype or pk.device != query.device:
        # half-precision models: the prefix is kept in its own (float32) dtype and cast here, differentiably
        pk, pv = pk.to(device=query.device, dtype=query.dtype), pv.to(device=query.device, dtype=query.dtype)
    len_q, len_k = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and binding.num_virtual_tokens + len_k > window:
        raise NotImplementedError(f"sliding_window={window} is shorter than prefix + keys "
                                  f"({binding.num_virtual_tokens} + {len_k}); prefix_attn has no sliding "
                                  "window")
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4:
            mask = _key_mask_from_4d(mask, len_q, len_k)
        elif mask.dim() != 2 or tuple(mask.shape) != (query.shape[0], len_k):
            raise ValueError(f"prefix_attn got an attention mask of shape {tuple(mask.shape)}; expected "
                             f"[batch={query.shape[0]}, len_k={len_k}]")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(torch.bool)
    out = prefix_attention(query, key, value, pk, pv, causal=True, softmax_scale=scaling, attention_mask=mask)
    return out.transpose(1, 2), None


def register() -> None:
    """Register the attention and mask functions under ``"prefix_attn"`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)


# ---------------------------------------------------------------------------------------------- enable /
# disable
def _attention_modules(model):
    mods = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention") or not isinstance(getattr(m, "layer_idx", None), int):
            continue
        if getattr(m, "is_cross_attention", False):
            raise NotImplementedError(f"{name}: cross-attention layers are not supported by prefix_attn")
        mods.append(m)
    return mods


def _decoder_pre_hook(binding: _Binding):
    signature_cache = {}

    def hook(module, args, kwargs):
        if args:  # bind positionals by name so position_ids can be read and replaced
            names = signature_cache.get(type(module))
            if names is None:
                names = list(inspect.signature(module.forward).parameters)
                signature_cache[type(module)] = names
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            tokens = kwargs.get("input_ids")
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            # what the stock model does when position_ids is None, before PEFT's cache holds the prefix
            position_ids = (torch.arange(tokens.shape[1], device=tokens.device) + past).unsqueeze(0)
        # PEFT: the prefix occupies positions 0..P-1, so the text is shifted by P (given or default
        # position_ids)
        kwargs["position_ids"] = position_ids + binding.num_virtual_tokens
        binding.kv = binding.prefix.key_value()  # once per forward, outside any checkpointed layer
        return args, kwargs

    return hook


def is_enabled(model) -> bool:
    return getattr(model, "_prefix_attn_binding", None) is not None


def enable(model, prefix: PrefixTuning, *, freeze_model: bool = True, ignore_attention_dropout: bool = False):
    """Run ``model``'s attention through ``prefix_attention`` with ``prefix``; returns the same model object.

    Args:
        model:   a stock transformers decoder (``GPT2LMHeadModel``, ``LlamaForCausalLM``, their base models,
        ...) prefix:  a :class:`PrefixTuning` of the model's shape (refused otherwise); moved to the model's
                 device, dtype kept (cast to the activations' dtype inside attention)
        freeze_model: set ``requires_grad=False`` on every model weight (restored by ``disable``), so only the
                 prefix trains
        ignore_attention_dropout: train without attention dropout instead of refusing (see the error message)

    Calling ``enable`` on an enabled model replaces its prefix.
    """
    if not isinstance(prefix, PrefixTuning):
        raise TypeError(f"prefix must be a prefix_attn.PrefixTuning, got {type(prefix).__name__}")
    if is_enabled(model):
        disable(model)
    config = model.config
    prefix.check_compatible(config)
    modules = _attention_modules(model)
    shape = prefix_shape_from_config(config)
    found = sorted(m.layer_idx for m in modules)
    if found != list(range(shape.num_layers)):
        raise ValueError(f"expected one attention layer per index 0..{shape.num_layers - 1} in "
                         f"{type(model).__name__}, found layer_idx {found}")
    for m in modules:  # the config can say one thing and the weights another
        kv_out = _kv_out_features(m)
        if kv_out is not None and kv_out != shape.num_kv_heads * shape.head_dim:
            raise ValueError(f"{type(m).__name__} {m.layer_idx} projects keys to {kv_out} features but the "
                             f"prefix has {PrefixShape.describe(prefix.shape)}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")

    register()
    try:
        device = next(model.parameters()).device
        if any(p.device != device for p in prefix.parameters()):
            prefix.to(device)
    except StopIteration:
        pass
    previous = config._attn_implementation
    frozen = []
    if freeze_model:
        for p in model.parameters():
            frozen.append((p, p.requires_grad))
            p.requires_grad_(False)
    binding = _Binding(prefix, previous, frozen, ignore_attention_dropout)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if config._attn_implementation != ATTN_IMPLEMENTATION:
        _restore(model, binding)
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation='{ATTN_IMPLEMENTATION}' "
                           f"(its attention does not go through transformers' AttentionInterface)")
    for m in modules:
        m._prefix_attn_binding = binding
    binding.attention_modules = modules
    decoder = model.base_model
    binding.hook = decoder.register_forward_pre_hook(_decoder_pre_hook(binding), with_kwargs=True)
    model._prefix_attn_binding = binding
    return model


def _kv_out_features(module) -> Optional[int]:
    k_proj = getattr(module, "k_proj", None)
    if k_proj is not None and hasattr(k_proj, "out_features"):
        return k_proj.out_features
    c_attn = getattr(module, "c_attn", None)  # GPT-2: fused q|k|v Conv1D
    if c_attn is not None and hasattr(c_attn, "nf"):
        return c_attn.nf // 3
    return None


def _restore(model, binding: _Binding) -> None:
    for p, flag in binding.frozen:
        p.requires_grad_(flag)
    binding.frozen = []
    if model.config._attn_implementation != binding.previous_attn:
        model.set_attn_implementation(binding.previous_attn)


def disable(model):
    """Undo :func:`enable`: the previous attention implementation, the model's ``requires_grad`` flags, no
    hook and no prefix reference left on the model. Returns the model; a no-op on a model that is not
    enabled."""
    binding = getattr(model, "_prefix_attn_binding", None)
    if binding is None:
        return model
    if binding.hook is not None:
        binding.hook.remove()
    for m in binding.attention_modules:
        if getattr(m, "_prefix_attn_binding", None) is binding:
            del m._prefix_attn_binding
    _restore(model, binding)
    del model._prefix_attn_binding
    binding.kv = None
    return model
