"""The shape a prefix must match in a model (layers, key/value heads, head size), read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrefixShape", "prefix_shape_from_config", "hidden_size_from_config"]


@dataclass(frozen=True)
class PrefixShape:
    """What a prefix must match in the model: layers, key/value heads and head size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def describe(self) -> str:
        return f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"


def _get(config, *names, default=None):
    for name in names:
        try:
            value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        except Exception as exc:  # e.g. transformers' AmbiguousGlobalPerLayerAttributeError (Gemma 4)
            raise ValueError(f"{type(config).__name__}.{name} differs per layer ({type(exc).__name__}); prefix_attn "
                             f"needs one key/value shape for every layer") from exc
        if value is not None:
            return value
    return default


LAYOUTS = ("peft", "li_liang")


def prefix_shape_from_config(config, layout: str = "peft") -> PrefixShape:
    """Layers, kv heads and head dim of a decoder from its Hugging Face config (GPT-2 and Llama-style names).

    Follows the model code, not PEFT's config guessing: GPT-2 has ``hidden_size // num_heads`` per head and no
    GQA; Llama/Mistral/Qwen2 read ``head_dim`` when set and ``num_key_value_heads`` for GQA.

    An encoder-decoder (BART-style config: ``is_encoder_decoder``, ``decoder_layers``) has a prefix per decoder
    self-attention layer with ``layout="peft"`` (PEFT's SEQ_2_SEQ_LM), and with ``layout="li_liang"`` one per
    encoder self-attention, decoder self-attention and cross-attention layer, in that order
    (``encoder_layers + 2 * decoder_layers``). ``layout`` means nothing for other models.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if _get(config, "is_encoder_decoder", default=False) and _get(config, "decoder_layers") is not None:
        return _encoder_decoder_shape(config, layout)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    if num_layers is None or num_heads is None or hidden is None:
        raise ValueError("cannot read num_layers / num_attention_heads / hidden_size from the model config "
                         f"{type(config).__name__}; build the prefix from its shape: prefix_attn.PrefixTuning("
                         f"prefix_attn.PrefixShape(num_layers, num_kv_heads, head_dim), num_virtual_tokens)")
    num_kv = _get(config, "num_key_value_heads", default=num_heads)
    head_dim = _get(config, "head_dim", default=hidden // num_heads)
    return PrefixShape(int(num_layers), int(num_kv), int(head_dim))


def _encoder_decoder_shape(config, layout: str) -> PrefixShape:
    hidden = _get(config, "d_model", "hidden_size")
    dec_layers, dec_heads = _get(config, "decoder_layers"), _get(config, "decoder_attention_heads")
    if hidden is None or dec_heads is None:
        raise ValueError(f"cannot read d_model / decoder_attention_heads from {type(config).__name__}")
    num_layers = int(dec_layers)
    if layout == "li_liang":
        enc_layers, enc_heads = _get(config, "encoder_layers"), _get(config, "encoder_attention_heads")
        if enc_heads != dec_heads:
            raise ValueError(f"layout='li_liang' needs one head shape in the encoder and the decoder; "
                             f"{type(config).__name__} has encoder_attention_heads={enc_heads}, "
                             f"decoder_attention_heads={dec_heads}")
        num_layers = int(enc_layers) + 2 * num_layers
    return PrefixShape(num_layers, int(dec_heads), int(hidden) // int(dec_heads))


def hidden_size_from_config(config) -> int:
    """The model width (``hidden_size`` / ``n_embd``): what a hidden-state prefix row holds."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise ValueError(f"cannot read hidden_size from the model config {type(config).__name__}")
    return int(hidden)
