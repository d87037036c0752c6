"""prefix_attn: fused prefix attention (prefix tuning) for PyTorch.

``prefix_attention(q, k, v, prefix_k, prefix_v)`` attends every text query to a shared prefix K/V block
``[heads_kv, P, head_dim]`` read in place, plus the (causal) text keys, with a fused backward that sums the
prefix gradients over the batch. Importing this package never touches a GPU and never compiles anything.
"""

from .dropout import dropout_mask
from .ops import BACKENDS, PrefixAttentionFunction, available_backends, prefix_attention
from .reference import prefix_attention_reference
from .varlen import prefix_attention_varlen

__version__ = "0.1.0"

__all__ = [
    "prefix_attention",
    "prefix_attention_varlen",
    "PrefixAttentionFunction",
    "prefix_attention_reference",
    "dropout_mask",
    "available_backends",
    "BACKENDS",
    "PrefixTuning",
    "PrefixShape",
    "prefix_shape_from_config",
    "PrefixBank",
    "enable",
    "disable",
    "load_pretrained",
    "grouped_forward",
    "enable_grouped",
    "disable_grouped",
]

_LAZY = {
    "PrefixTuning": ("prefix_attn.prefix", "PrefixTuning"),
    "PrefixShape": ("prefix_attn.prefix", "PrefixShape"),
    "prefix_shape_from_config": ("prefix_attn.prefix_shape", "prefix_shape_from_config"),
    "PrefixBank": ("prefix_attn.bank", "PrefixBank"),
    "enable": ("prefix_attn.integrations.transformers", "enable"),
    "disable": ("prefix_attn.integrations.transformers", "disable"),
    "load_pretrained": ("prefix_attn.integrations.transformers", "load_pretrained"),
    "grouped_forward": ("prefix_attn.integrations.grouped", "grouped_forward"),
    "enable_grouped": ("prefix_attn.integrations.grouped", "enable_grouped"),
    "disable_grouped": ("prefix_attn.integrations.grouped", "disable_grouped"),
}


def __dir__():  # the lazily loaded names too
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name):  # PEP 562: the Hugging Face pieces load only when asked for
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'prefix_attn' has no attribute {name!r}")
