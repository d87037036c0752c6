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
* ``enable`` (``hf_model.py``) registers the prefix as the submodule ``model.prefix_attn`` and hooks the
  decoder (``model.base_model``) to shift ``position_ids`` by ``P`` exactly as PEFT does (PEFT's prefix occupies
  cache positions ``0..P-1``, so the text starts at ``P``) and to compute the prefix K/V once per forward;
  each attention layer finds it by ``layer_idx``. The prefix is never written to the KV cache, never expanded
  over the batch and never concatenated with the text.

The package, by role (every import points down the list)::

    attention.py     the attention and mask functions registered under "prefix_attn", the release check
    binding.py       Binding: the settings of one enable call and the values resolved once per forward
    hooks.py         the model's and the decoder's forward hooks (positions, packing, prefix K/V per forward)
    checkpoints.py   save_pretrained of an enabled model and the checkpoint format
    hf_model.py      enable, disable, load_pretrained, generate with a bank
    transformers.py  this front door (re-exports)

The two registrations are made by the first ``enable`` call, never at import; they do nothing for models that
do not ask for ``"prefix_attn"``. See docs/huggingface.md for the PEFT conventions mirrored and the limits.
"""

from __future__ import annotations

from .attention import (  # noqa: F401  (re-exported)
    ATTN_IMPLEMENTATION,
    TESTED_TRANSFORMERS,
    check_seq_idx,
    check_version,
    prefix_attention_forward,
    prefix_attention_mask,
    register,
)
from .hf_model import disable, enable, is_enabled, load_pretrained  # noqa: F401  (re-exported)

__all__ = ["ATTN_IMPLEMENTATION", "TESTED_TRANSFORMERS", "check_version", "enable", "disable", "is_enabled",
           "load_pretrained", "prefix_attention_forward", "prefix_attention_mask", "register"]
