"""Per-layer prefix K/V for prefix tuning (Li & Liang, 2021), sized from a Hugging Face model config.

Layout, one tensor for the whole model::

    key_value():   [num_layers, 2, heads_kv, P, head_dim]      [:, 0] keys, [:, 1] values
    key(layer):    [heads_kv, P, head_dim]                     what ``prefix_attention`` reads, in place

Parameterisations:

* direct (default): ``prefix_kv`` is the trainable parameter itself.
* ``projection=True``: Li & Liang's reparameterisation, a ``[P, projection_dim]`` embedding through a
  two-layer tanh MLP to ``[P, num_layers * 2 * heads_kv * head_dim]``. Module and parameter names
  (``embedding``, ``transform.0``, ``transform.2``) and the output layout are PEFT's ``PrefixEncoder``, so
  weights move both ways unchanged. After training, ``materialize()`` evaluates the MLP once and drops it.

Initialisation: ``init="normal"`` (small random, ``init_std``), ``"zeros"``, or :meth:`PrefixTuning.from_text`
(the K/V activations of real words, Li & Liang's "initialise with real words" trick).

PEFT stores prefix tuning as one ``[P, num_layers * 2 * token_dim]`` matrix (``token_dim = heads_kv *
head_dim``) that it views as ``[P, 2 * num_layers, heads_kv, head_dim]`` with layer ``l``'s keys at ``2l``
and values at ``2l + 1``; :meth:`PrefixTuning.from_peft`, :meth:`PrefixTuning.from_peft_adapter` and
:meth:`PrefixTuning.to_peft_embeddings` convert between that and the layout above.

This module needs only torch (and ``safetensors`` to save/load); it never imports transformers or peft
unless a ``from_*`` constructor is called.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["PrefixTuning", "PrefixShape", "prefix_shape_from_config"]

_FORMAT = "prefix_attn.PrefixTuning/1"
_DEFAULT_FILENAME = "prefix.safetensors"


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


def prefix_shape_from_config(config) -> PrefixShape:
    """Layers, kv heads and head dim of a decoder from its Hugging Face config (GPT-2 and Llama-style names).

    Follows the model code, not PEFT's config guessing: GPT-2 has ``hidden_size // num_heads`` per head and no
    GQA; Llama/Mistral/Qwen2 read ``head_dim`` when set and ``num_key_value_heads`` for GQA.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    if num_layers is None or num_heads is None or hidden is None:
        raise ValueError("cannot read num_layers / num_attention_heads / hidden_size from the model config "
                         f"{type(config).__name__}; build the prefix with PrefixTuning.from_shape(...)")
    num_kv = _get(config, "num_key_value_heads", default=num_heads)
    head_dim = _get(config, "head_dim", default=hidden // num_heads)
    return PrefixShape(int(num_layers), int(num_kv), int(head_dim))


class PrefixTuning(nn.Module):
    """Trainable prefix K/V for every attention layer of one decoder.

    Args:
        config:              the model's config (``model.config``), or a :class:`PrefixShape`
        num_virtual_tokens:  ``P``, prefix slots per layer
        projection:          Li & Liang's MLP reparameterisation (PEFT ``prefix_projection=True``)
        projection_dim:      embedding width fed to the MLP (default ``heads_kv * head_dim``, as PEFT)
        projection_hidden:   MLP hidden width (default ``heads_kv * head_dim``, PEFT's
                             ``encoder_hidden_size``)
        init:                ``"normal"`` (N(0, init_std)) or ``"zeros"``; for ``projection=True`` this is
                             the embedding init and ``"zeros"`` zeroes the MLP's last layer (PEFT
                             ``init_weights="zero"``)
        init_std:            standard deviation of ``"normal"``
        dtype, device:       of the parameters (float32 recommended for training even for a half-precision
                             model: the attention function casts the prefix to the query dtype)
    """

    def __init__(
        self,
        config: Union[Any, PrefixShape],
        num_virtual_tokens: int = 20,
        *,
        projection: bool = False,
        projection_dim: Optional[int] = None,
        projection_hidden: Optional[int] = None,
        init: str = "normal",
        init_std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        shape = config if isinstance(config, PrefixShape) else prefix_shape_from_config(config)
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if init not in ("normal", "zeros"):
            raise ValueError(f"init must be 'normal' or 'zeros', got {init!r} (use PrefixTuning.from_text "
                             f"for initialisation from real words)")
        self.shape = shape
        self.num_virtual_tokens = int(num_virtual_tokens)
        self.projection = bool(projection)
        token_dim = shape.num_kv_heads * shape.head_dim
        self.projection_dim = int(projection_dim or token_dim) if projection else None
        self.projection_hidden = int(projection_hidden or token_dim) if projection else None
        factory = {"dtype": dtype, "device": device}
        if projection:
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.projection_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(self.projection_dim, self.projection_hidden, **factory),
                nn.Tanh(),
                nn.Linear(self.projection_hidden, shape.num_layers * 2 * token_dim, **factory),
            )
            with torch.no_grad():
                self.embedding.weight.normal_(0.0, 1.0)  # nn.Embedding's default, as PEFT
                if init == "zeros":
                    self.transform[-1].weight.zero_()
                    self.transform[-1].bias.zero_()
        else:
            kv = torch.empty(shape.num_layers, 2, shape.num_kv_heads, self.num_virtual_tokens, shape.head_dim,
                             **factory)
            with torch.no_grad():
                kv.normal_(0.0, init_std) if init == "normal" else kv.zero_()
            self.prefix_kv = nn.Parameter(kv)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.shape.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    def extra_repr(self) -> str:
        mode = f"projection({self.projection_dim}->{self.projection_hidden})" if self.projection else "direct"
        return f"{self.shape.describe()}, num_virtual_tokens={self.num_virtual_tokens}, {mode}"

    def check_compatible(self, config_or_shape) -> None:
        """Raise ValueError unless this prefix fits the model (layers, kv heads, head dim)."""
        other = (config_or_shape if isinstance(config_or_shape, PrefixShape)
                 else prefix_shape_from_config(config_or_shape))
        if other != self.shape:
            diffs = [f"{name}: prefix {getattr(self.shape, name)} vs model {getattr(other, name)}"
                     for name in ("num_layers", "num_kv_heads", "head_dim")
                     if getattr(self.shape, name) != getattr(other, name)]
            raise ValueError(f"this prefix was built for another model shape ({self.shape.describe()}), the "
                             f"model has {other.describe()}; mismatched: " + "; ".join(diffs))

    # ------------------------------------------------------------------ values
    def key_value(self) -> torch.Tensor:
        """All layers at once: ``[num_layers, 2, heads_kv, P, head_dim]``, differentiable.

        Direct mode returns the parameter itself (no copy); projection mode runs the MLP once.
        """
        if not self.projection:
            return self.prefix_kv
        flat = self.transform(self.embedding.weight)  # [P, L * 2 * Hkv * D], PEFT's layout
        s = self.shape
        kv = flat.view(self.num_virtual_tokens, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        return kv.permute(1, 2, 3, 0, 4).contiguous()

    def key(self, layer_idx: int) -> torch.Tensor:
        """``[heads_kv, P, head_dim]`` keys of one layer (a view in direct mode)."""
        return self.key_value()[layer_idx, 0]

    def value(self, layer_idx: int) -> torch.Tensor:
        """``[heads_kv, P, head_dim]`` values of one layer (a view in direct mode)."""
        return self.key_value()[layer_idx, 1]

    @torch.no_grad()
    def materialize(self) -> "PrefixTuning":
        """Evaluate the reparameterisation once and keep only the resulting K/V (in place; returns self).

        Li & Liang train through the MLP and drop it afterwards: inference then reads the prefix directly.
        """
        if not self.projection:
            return self
        kv = self.key_value().detach().clone()
        del self.embedding
        del self.transform
        self.projection = False
        self.projection_dim = self.projection_hidden = None
        self.prefix_kv = nn.Parameter(kv)
        return self

    # ------------------------------------------------------------------ PEFT layout
    def to_peft_embeddings(self) -> torch.Tensor:
        """The prefix as PEFT stores it: ``[P, num_layers * 2 * heads_kv * head_dim]``
        (``prompt_embeddings``)."""
        kv = self.key_value()
        return kv.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1)

    @staticmethod
    def _kv_from_peft_embeddings(flat: torch.Tensor, shape: PrefixShape,
                                 num_virtual_tokens: int) -> torch.Tensor:
        expected = (num_virtual_tokens, shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim)
        if tuple(flat.shape) != expected:
            raise ValueError(f"PEFT prefix embeddings have shape {tuple(flat.shape)}, expected {expected} "
                             f"for {shape.describe()} and num_virtual_tokens={num_virtual_tokens}")
        kv = flat.reshape(num_virtual_tokens, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
        return kv.permute(1, 2, 3, 0, 4).contiguous()

    @staticmethod
    def _peft_shape(peft_config, model_config) -> PrefixShape:
        """The shape PEFT gave the prefix, checked against the model's own."""
        num_layers = peft_config.num_layers
        heads = peft_config.num_attention_heads
        token_dim = peft_config.token_dim
        if getattr(peft_config, "num_transformer_submodules", 1) not in (None, 1):
            raise ValueError("only decoder-only PEFT prefix tuning (num_transformer_submodules=1) is "
                             "supported")
        if token_dim % heads:
            raise ValueError(f"PEFT config token_dim={token_dim} is not a multiple of "
                             f"num_attention_heads={heads}")
        shape = PrefixShape(int(num_layers), int(heads), int(token_dim // heads))
        if model_config is not None:
            model_shape = prefix_shape_from_config(model_config)
            if model_shape != shape:
                raise ValueError(f"the PEFT prefix has {shape.describe()} but the model has "
                                 f"{model_shape.describe()}")
        return shape

    @classmethod
    def from_peft(cls, peft_model, adapter_name: Optional[str] = None) -> "PrefixTuning":
        """Same values as a PEFT ``PrefixTuningConfig`` model (trained or fresh), as a new, independent
        module.

        With ``prefix_projection=True`` (and not ``inference_mode``) the embedding and MLP are copied, so
        training can go on through the same reparameterisation; otherwise the K/V matrix is copied.
        """
        name = adapter_name or peft_model.active_adapter
        peft_config = peft_model.peft_config[name]
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        if peft_type != "PREFIX_TUNING":
            raise ValueError(f"adapter {name!r} is {peft_type}, not PREFIX_TUNING")
        shape = cls._peft_shape(peft_config, peft_model.get_base_model().config)
        encoder = peft_model.prompt_encoder[name]
        weight = encoder.embedding.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        P = peft_config.num_virtual_tokens
        if getattr(encoder, "prefix_projection", False) and hasattr(encoder, "transform"):
            prefix = cls(shape, P, projection=True, projection_dim=weight.shape[1],
                         projection_hidden=encoder.transform[0].out_features, **factory)
            prefix.embedding.load_state_dict(encoder.embedding.state_dict())
            prefix.transform.load_state_dict(encoder.transform.state_dict())
            return prefix
        prefix = cls(shape, P, init="zeros", **factory)
        with torch.no_grad():
            prefix.prefix_kv.copy_(cls._kv_from_peft_embeddings(weight.detach(), shape, P))
        return prefix

    @classmethod
    def from_peft_adapter(cls, path: str, config=None, *, dtype: torch.dtype = torch.float32,
                          device=None) -> "PrefixTuning":
        """Load a saved PEFT prefix-tuning adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors`` or ``adapter_model.bin``) as a direct prefix. ``config``: the model
        config, checked against the adapter."""
        with open(os.path.join(path, "adapter_config.json")) as f:
            adapter_config = json.load(f)
        if adapter_config.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"{path} holds a {adapter_config.get('peft_type')} adapter, not PREFIX_TUNING")

        class _Cfg:  # the few fields _peft_shape reads
            num_layers = adapter_config["num_layers"]
            num_attention_heads = adapter_config["num_attention_heads"]
            token_dim = adapter_config["token_dim"]
            num_transformer_submodules = adapter_config.get("num_transformer_submodules", 1)

        shape = cls._peft_shape(_Cfg, config)
        st_path = os.path.join(path, "adapter_model.safetensors")
        if os.path.exists(st_path):
            from safetensors.torch import load_file

            state = load_file(st_path)
        else:
            state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
        P = adapter_config["num_virtual_tokens"]
        prefix = cls(shape, P, init="zeros", dtype=dtype, device=device)
        with torch.no_grad():
            prefix.prefix_kv.copy_(cls._kv_from_peft_embeddings(state["prompt_embeddings"], shape, P))
        return prefix

    # ------------------------------------------------------------------ real-word init
    @classmethod
    @torch.no_grad()
    def from_text(cls, model, token_ids: Union[Sequence[int], torch.Tensor], *, projection: bool = False,
                  projection_hidden: Optional[int] = None,
                  dtype: torch.dtype = torch.float32) -> "PrefixTuning":
        """Initialise from real words: ``P = len(token_ids)``.

        Direct mode: run the (stock, not prefix-enabled) model on the tokens and take every layer's K/V
        activations (Li & Liang, section 7.2). Projection mode: the MLP input embedding starts as the model's
        word embeddings of the tokens (needs ``projection_dim == hidden_size``) with a zero last MLP layer.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        P = int(ids.numel())
        if P == 0:
            raise ValueError("token_ids is empty")
        device = next(model.parameters()).device
        ids = ids.to(device)
        if projection:
            emb = model.get_input_embeddings().weight[ids].to(dtype)
            prefix = cls(model.config, P, projection=True, projection_dim=emb.shape[1],
                         projection_hidden=projection_hidden, init="zeros", dtype=dtype, device=device)
            prefix.embedding.weight.copy_(emb)
            return prefix
        if getattr(model, "_prefix_attn_binding", None) is not None:
            raise RuntimeError("from_text needs the stock model: call prefix_attn.disable(model) first")
        was_training = model.training
        model.eval()
        try:
            out = model(input_ids=ids[None], use_cache=True)
        finally:
            model.train(was_training)
        cache = out.past_key_values
        prefix = cls(model.config, P, init="zeros", dtype=dtype, device=device)
        for layer in range(prefix.num_layers):
            keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [1, Hkv, P, D]
            prefix.prefix_kv[layer, 0].copy_(keys[0])
            prefix.prefix_kv[layer, 1].copy_(values[0])
        return prefix

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, **asdict(self.shape), "num_virtual_tokens": self.num_virtual_tokens,
                "projection": self.projection, "projection_dim": self.projection_dim,
                "projection_hidden": self.projection_hidden}

    def save(self, path: str) -> str:
        """Write the weights and the config to one safetensors file (``path`` or ``path/prefix.safetensors``
        for a directory). Returns the file written."""
        from safetensors.torch import save_file

        if os.path.isdir(path) or path.endswith(os.sep):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, _DEFAULT_FILENAME)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={"prefix_attn": json.dumps(self.config_dict())})
        return path

    @classmethod
    def load(cls, path: str, *, device=None, dtype: Optional[torch.dtype] = None) -> "PrefixTuning":
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        if os.path.isdir(path):
            path = os.path.join(path, _DEFAULT_FILENAME)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "prefix_attn" not in meta:
                raise ValueError(f"{path} is not a prefix_attn prefix file (no 'prefix_attn' metadata)")
            cfg = json.loads(meta["prefix_attn"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"{path}: unknown prefix format {cfg.get('format')!r}, expected {_FORMAT!r}")
        shape = PrefixShape(cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"])
        first = next(iter(state.values()))
        prefix = cls(shape, cfg["num_virtual_tokens"], projection=cfg["projection"],
                     projection_dim=cfg["projection_dim"], projection_hidden=cfg["projection_hidden"],
                     dtype=dtype or first.dtype, device=device)
        prefix.load_state_dict(state)
        return prefix
