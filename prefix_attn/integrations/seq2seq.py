"""Encoder-decoders (BART and its family): which attention modules take a prefix, and the decoder's position shift.

Two layouts, chosen at ``enable(model, prefix, layout=...)``:

* ``"peft"`` (default): what PEFT's ``SEQ_2_SEQ_LM`` prefix tuning computes. A prefix per decoder self-attention
  layer; the decoder's positions start after it (PEFT's prefix sits in the self-attention cache, so the decoder
  counts it as past). PEFT also builds a cross-attention prefix but then replaces the cross-attention cache by an
  empty one, so its encoder and cross-attention run without a prefix; so do ours.
* ``"li_liang"``: Li & Liang's BART layout, a prefix in every attention: encoder self-attention (bidirectional,
  the encoder's positions unchanged), decoder self-attention (positions after the prefix, as above) and
  cross-attention (the prefix before the encoder's keys, always visible; the encoder's padding mask on the rest).
  The prefix has ``encoder_layers + 2 * decoder_layers`` layers in that order (``prefix_shape_from_config(config,
  layout="li_liang")``).

Attention modules without a prefix run PyTorch's ``scaled_dot_product_attention`` with the model's mask, as the
stock ``"sdpa"`` implementation does.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

# Decoders that number their positions with ``embed_positions(..., cache_length, position_ids=arange + cache)``:
# the shift by P is added to that position_ids argument.
_SHIFTABLE = {
    "BartLearnedPositionalEmbedding", "MBartLearnedPositionalEmbedding", "PLBartLearnedPositionalEmbedding",
    "MarianSinusoidalPositionalEmbedding", "PegasusSinusoidalPositionalEmbedding",
    "BlenderbotLearnedPositionalEmbedding", "BlenderbotSmallLearnedPositionalEmbedding",
}
_REASONS = {
    "t5": "T5's attention adds a relative position bias computed over the keys (under PEFT's prefix, over the "
          "prefix keys too), which prefix_attn's kernels do not apply",
    "mt5": "mT5's attention adds T5's relative position bias over the keys, which prefix_attn does not apply",
    "umt5": "UMT5's attention adds T5's relative position bias over the keys, which prefix_attn does not apply",
    "longt5": "LongT5's attention adds a relative position bias and local/global attention, not in prefix_attn",
    "switch_transformers": "its attention adds T5's relative position bias over the keys, not in prefix_attn",
}


def all_attention(model) -> list:
    """Every attention module of an encoder-decoder (``*Attention`` with a ``layer_idx`` attribute, which the
    encoder's may leave None), in module order: layer order within the encoder and the decoder."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def split_modules(model, modules) -> Tuple[list, list, list]:
    """(encoder self-attention, decoder self-attention, cross-attention) modules, each in layer order."""
    names = {id(m): n for n, m in model.named_modules()}
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    enc, dec, cross = [], [], []
    for m in modules:
        if id(m) in in_encoder:
            enc.append(m)
        elif names[id(m)].rsplit(".", 1)[-1] in ("encoder_attn", "crossattention", "cross_attn"):
            cross.append(m)
        else:
            dec.append(m)
    return enc, sorted(dec, key=lambda m: m.layer_idx), sorted(cross, key=lambda m: m.layer_idx)


def check_supported(model) -> None:
    """NotImplementedError naming the reason unless prefix_attn can run this encoder-decoder."""
    kind = getattr(model.config, "model_type", "")
    if kind in _REASONS:
        raise NotImplementedError(f"{type(model).__name__}: {_REASONS[kind]}; it is refused")
    if position_embedding(model) is None:
        raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder whose decoder positions prefix_attn "
                                  f"cannot shift past the prefix as PEFT does; supported: BART, mBART, PLBart, "
                                  f"Marian, Pegasus, Blenderbot")


def prefix_modules(model, modules, layout: str) -> List:
    """The attention modules that read a prefix, in the prefix's layer order."""
    config = model.config
    enc, dec, cross = split_modules(model, modules)
    expect = config.decoder_layers
    if [m.layer_idx for m in dec] != list(range(expect)) or [m.layer_idx for m in cross] != list(range(expect)):
        raise ValueError(f"expected one self-attention and one cross-attention per decoder layer 0..{expect - 1} "
                         f"in {type(model).__name__}")
    if layout == "li_liang":
        if len(enc) != config.encoder_layers:
            raise ValueError(f"expected one self-attention per encoder layer 0..{config.encoder_layers - 1} in "
                             f"{type(model).__name__}")
        return enc + dec + cross
    return dec


def position_embedding(model) -> Optional[object]:
    """The decoder's position embedding module, if its positions can be shifted (see ``_SHIFTABLE``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    embed = getattr(decoder, "embed_positions", None)
    return embed if type(embed).__name__ in _SHIFTABLE else None


class PositionShift:
    """Forward pre-hook of the decoder's position embedding: ``position_ids`` (``arange(T) + cache length``) plus
    the prefix length the decoder hook set for this forward; a module-level class so the model pickles."""

    def __init__(self, binding):
        self.binding = binding

    def __call__(self, module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError(f"{type(module).__name__} was called without position_ids; prefix_attn cannot shift "
                               f"the decoder's positions past the prefix (a transformers release that numbers them "
                               f"another way?)")
        kwargs["position_ids"] = position_ids + self.binding.position_shift
        return args, kwargs
