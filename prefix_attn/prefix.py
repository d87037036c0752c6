"""Per-layer prefix K/V for prefix tuning (Li & Liang, 2021), sized from a Hugging Face model config.

Layout, one tensor for the whole model::

    key_value():   [num_layers, 2, heads_kv, P, head_dim]      [:, 0] keys, [:, 1] values
    key(layer):    [heads_kv, P, head_dim]                     what ``prefix_attention`` reads, in place

Parameterisations:

* direct (default): ``prefix_kv`` is the trainable parameter itself.
* ``projection=True`` (``parameterization="mlp"``): Li & Liang's reparameterisation, a ``[P, projection_dim]``
  embedding through a two-layer tanh MLP to ``[P, num_layers * 2 * heads_kv * head_dim]``. Module and parameter
  names (``embedding``, ``transform.0``, ``transform.2``) and the output layout are PEFT's ``PrefixEncoder``, so
  weights move both ways unchanged. After training, ``materialize()`` evaluates the MLP once and drops it.
* ``parameterization="hidden"``: ``prefix_hidden [num_layers, P, hidden_size]``, one row of hidden states per slot
  and layer, projected by that layer's own frozen key/value projections (``prefix_attn/hidden.py``):
  ``P * hidden_size`` parameters per layer instead of ``2 * P * heads_kv * head_dim``. It needs the model's
  weights: ``enable`` binds it (or ``bind(model)``, or ``from_text(model, ...)``); ``key_value()`` unbound raises.
  ``materialize()`` turns it into a direct prefix with identical outputs.

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
from dataclasses import asdict
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from . import peft_format
from .prefix_shape import PrefixShape, hidden_size_from_config, prefix_shape_from_config

__all__ = ["PrefixTuning", "PrefixShape", "prefix_shape_from_config"]

_FORMAT = "prefix_attn.PrefixTuning/1"
_DEFAULT_FILENAME = "prefix.safetensors"


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
        parameterization:    ``"direct"``, ``"mlp"`` (same as ``projection=True``) or ``"hidden"``
        hidden_size:         rows of a ``"hidden"`` prefix (default: the config's ``hidden_size`` / ``n_embd``)
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
        parameterization: Optional[str] = None,
        hidden_size: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if parameterization is None:
            parameterization = "mlp" if projection else "direct"
        if parameterization not in ("direct", "mlp", "hidden"):
            raise ValueError(f"parameterization must be 'direct', 'mlp' or 'hidden', got {parameterization!r}")
        if projection and parameterization != "mlp":
            raise ValueError(f"projection=True is parameterization='mlp', not {parameterization!r}")
        projection = parameterization == "mlp"
        shape = config if isinstance(config, PrefixShape) else prefix_shape_from_config(config)
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if init not in ("normal", "zeros"):
            raise ValueError(f"init must be 'normal' or 'zeros', got {init!r} (use PrefixTuning.from_text "
                             f"for initialisation from real words)")
        self.shape = shape
        self.num_virtual_tokens = int(num_virtual_tokens)
        self.projection = bool(projection)
        self.parameterization = parameterization
        self.hidden_size = None
        self._bound_attention = None  # "hidden": the attention modules whose projections it uses, by layer
        token_dim = shape.num_kv_heads * shape.head_dim
        self.projection_dim = int(projection_dim or token_dim) if projection else None
        self.projection_hidden = int(projection_hidden or token_dim) if projection else None
        factory = {"dtype": dtype, "device": device}
        if parameterization == "hidden":
            if hidden_size is None and isinstance(config, PrefixShape):
                raise ValueError("parameterization='hidden' with a PrefixShape needs hidden_size=")
            self.hidden_size = int(hidden_size or hidden_size_from_config(config))
            rows = torch.empty(shape.num_layers, self.num_virtual_tokens, self.hidden_size, **factory)
            with torch.no_grad():
                rows.normal_(0.0, init_std) if init == "normal" else rows.zero_()
            self.prefix_hidden = nn.Parameter(rows)
        elif projection:
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
        if self.parameterization == "hidden":
            mode = f"hidden({self.hidden_size}, {'bound' if self._bound_attention else 'unbound'})"
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
    def key_value(self, attention_modules=None) -> torch.Tensor:
        """All layers at once: ``[num_layers, 2, heads_kv, P, head_dim]``, differentiable.

        Direct mode returns the parameter itself (no copy); projection mode runs the MLP once; hidden mode projects
        every layer's rows through the frozen key/value projections of ``attention_modules`` (one per layer, in
        order: what an enabled model passes, so that each model uses its own weights) or, when None, of the model
        it was last bound to. Other modes ignore ``attention_modules``.
        """
        if self.parameterization == "hidden":
            return self._project_hidden(attention_modules)
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

    # ------------------------------------------------------------------ hidden-state prefixes
    def bind(self, model_or_attention_modules) -> "PrefixTuning":
        """Give a ``"hidden"`` prefix the model whose frozen projections it uses: a transformers model, or its
        attention modules (one per layer, in layer order). ``enable`` does this; returns self."""
        from . import hidden  # noqa: PLC0415

        modules = model_or_attention_modules
        if isinstance(modules, nn.Module):
            if getattr(getattr(modules, "config", None), "is_encoder_decoder", False):
                raise ValueError("an encoder-decoder's attention modules follow its layout (enable(model, prefix, "
                                 "layout=...) binds them): pass them as a list in the prefix's layer order")
            modules = hidden.attention_modules(modules)
        modules = list(modules)
        if len(modules) != self.num_layers:
            raise ValueError(f"a hidden-state prefix of {self.num_layers} layers cannot bind {len(modules)} "
                             f"attention modules")
        for m in modules:
            hidden.check_projectable(m, self.hidden_size)
        self._bound_attention = modules
        return self

    def __getstate__(self):
        # a copy or pickle of the prefix alone must not carry the model's attention layers along: it comes unbound
        # (an enabled model's forward passes its own modules; bind() again for standalone key_value()/materialize())
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_bound_attention"] = None
        return state

    def unbind(self) -> None:
        self._bound_attention = None

    def _project_hidden(self, attention_modules=None) -> torch.Tensor:
        from . import hidden  # noqa: PLC0415

        modules = self._bound_attention if attention_modules is None else attention_modules
        if modules is None:
            raise RuntimeError("this parameterization='hidden' prefix is not bound to a model: its K/V come from the "
                               "model's key/value projections. Call prefix_attn.enable(model, prefix) or "
                               "prefix.bind(model) first")
        s = self.shape
        layers = []
        for layer, module in enumerate(modules):
            k, v = hidden.project_kv(module, self.prefix_hidden[layer], s.num_kv_heads, s.head_dim)
            layers.append(torch.stack([k, v]))
        return torch.stack(layers)  # [L, 2, Hkv, P, D]

    @torch.no_grad()
    def materialize(self) -> "PrefixTuning":
        """Evaluate the reparameterisation once and keep only the resulting K/V (in place; returns self).

        Li & Liang train through the MLP and drop it afterwards: inference then reads the prefix directly. A
        hidden-state prefix (bound) becomes the K/V its projections give now.
        """
        if self.parameterization == "hidden":
            kv = self.key_value().detach().clone()
            del self.prefix_hidden
            self.parameterization, self.hidden_size = "direct", None
            self.unbind()
            self.prefix_kv = nn.Parameter(kv)
            return self
        if not self.projection:
            return self
        kv = self.key_value().detach().clone()
        del self.embedding
        del self.transform
        self.parameterization = "direct"
        self.projection = False
        self.projection_dim = self.projection_hidden = None
        self.prefix_kv = nn.Parameter(kv)
        return self

    # ------------------------------------------------------------------ PEFT (prefix_attn/peft_format.py)
    def to_peft_embeddings(self) -> torch.Tensor:
        """The prefix as PEFT stores it: ``[P, num_layers * 2 * heads_kv * head_dim]`` (``prompt_embeddings``)."""
        return peft_format.to_peft_embeddings(self)

    @staticmethod
    def _kv_from_peft_embeddings(flat: torch.Tensor, shape: PrefixShape, num_virtual_tokens: int) -> torch.Tensor:
        return peft_format.kv_from_peft_embeddings(flat, shape, num_virtual_tokens)

    @classmethod
    def from_peft(cls, peft_model, adapter_name: Optional[str] = None) -> "PrefixTuning":
        """Same values as a PEFT ``PrefixTuningConfig`` model (trained or fresh), as a new, independent module.

        With ``prefix_projection=True`` (and not ``inference_mode``) the embedding and MLP are copied, so
        training can go on through the same reparameterisation; otherwise the K/V matrix is copied.
        """
        return peft_format.from_peft(cls, peft_model, adapter_name)

    @classmethod
    def from_peft_adapter(cls, path: str, config=None, *, dtype: torch.dtype = torch.float32,
                          device=None) -> "PrefixTuning":
        """Load a saved PEFT prefix-tuning adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors`` or ``adapter_model.bin``) as a direct prefix. ``config``: the model
        config, checked against the adapter."""
        return peft_format.from_peft_adapter(cls, path, config, dtype=dtype, device=device)

    def save_peft_adapter(self, path: str, base_model_name: Optional[str] = None,
                          task_type: str = "CAUSAL_LM") -> str:
        """Write this prefix as a PEFT prefix-tuning adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors`` with ``prompt_embeddings``) that ``peft.PeftModel.from_pretrained(base,
        path)`` loads. Any parameterisation: the current K/V values are written (a direct prefix in PEFT's
        ``inference_mode``), so an MLP or hidden-state prefix exports exactly what it computes now. Returns
        ``path``. ``task_type="SEQ_2_SEQ_LM"``: an encoder-decoder's prefix (``layout="peft"``) in PEFT's layout
        for it, which gives decoder layers ``j`` and ``j + L/2`` (L even) one prefix: they must be equal."""
        return peft_format.save_peft_adapter(self, path, base_model_name, task_type)

    # ------------------------------------------------------------------ real-word init
    @classmethod
    @torch.no_grad()
    def from_text(cls, model, token_ids: Union[Sequence[int], torch.Tensor], *, projection: bool = False,
                  projection_hidden: Optional[int] = None, parameterization: Optional[str] = None,
                  dtype: torch.dtype = torch.float32) -> "PrefixTuning":
        """Initialise from real words: ``P = len(token_ids)``.

        Direct mode: run the (stock, not prefix-enabled) model on the tokens and take every layer's K/V
        activations (Li & Liang, section 7.2). Projection mode: the MLP input embedding starts as the model's
        word embeddings of the tokens (needs ``projection_dim == hidden_size``) with a zero last MLP layer.
        Hidden mode (``parameterization="hidden"``): every layer's rows start as the word embeddings of the
        tokens, and the prefix is bound to ``model``.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        P = int(ids.numel())
        if P == 0:
            raise ValueError("token_ids is empty")
        device = next(model.parameters()).device
        ids = ids.to(device)
        if parameterization == "hidden":
            emb = model.get_input_embeddings().weight[ids].to(dtype)
            if emb.shape[1] != hidden_size_from_config(model.config):
                raise ValueError(f"the word embeddings are {emb.shape[1]} wide but the hidden states "
                                 f"{hidden_size_from_config(model.config)}: from_text(parameterization='hidden') "
                                 f"needs them equal")
            prefix = cls(model.config, P, parameterization="hidden", hidden_size=emb.shape[1], init="zeros",
                         dtype=dtype, device=device)
            prefix.prefix_hidden.copy_(emb.unsqueeze(0).expand_as(prefix.prefix_hidden))
            return prefix.bind(model)
        projection = projection or parameterization == "mlp"
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
        cache = getattr(out, "cache", None)  # transformers >= 5.24; past_key_values before
        if cache is None:
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
                "projection_hidden": self.projection_hidden, "parameterization": self.parameterization,
                "hidden_size": self.hidden_size}

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
                     parameterization=cfg.get("parameterization"), hidden_size=cfg.get("hidden_size"),
                     dtype=dtype or first.dtype, device=device)
        prefix.load_state_dict(state)
        return prefix
