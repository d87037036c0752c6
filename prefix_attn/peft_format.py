"""PEFT's prefix-tuning format, both ways: a PEFT model or adapter directory into a ``PrefixTuning``, and a
``PrefixTuning`` into an adapter directory that ``peft.PeftModel.from_pretrained`` loads.

PEFT stores prefix tuning as one ``[P, num_layers * 2 * token_dim]`` matrix (``prompt_embeddings``, ``token_dim =
heads_kv * head_dim``) that it views as ``[P, 2 * num_layers, heads_kv, head_dim]`` with layer ``l``'s keys at
``2l`` and values at ``2l + 1``; ``PrefixTuning.key_value()`` is ``[num_layers, 2, heads_kv, P, head_dim]``.
PEFT's ``SEQ_2_SEQ_LM`` (``num_transformer_submodules=2``) keeps the same matrix but reads it for 4 K/V per layer
(decoder self-attention, cross-attention) from the matrix concatenated with itself, so decoder layer ``j`` reads
slot ``2j mod num_layers``; its cross-attention part is then dropped (``integrations/seq2seq.py``). With an even
number of layers, layers ``j`` and ``j + num_layers / 2`` share a slot and half the slots are never read: an import
gives every layer its own copy, an export needs the sharing layers equal and writes zeros in the unread slots.
Only torch is needed (``safetensors`` to read and write files; ``peft`` only for :func:`from_peft`).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .prefix_shape import PrefixShape, prefix_shape_from_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def to_peft_embeddings(prefix) -> torch.Tensor:
    """``[P, num_layers * 2 * heads_kv * head_dim]``, PEFT's ``prompt_embeddings`` layout."""
    kv = prefix.key_value()
    return kv.permute(3, 0, 1, 2, 4).reshape(prefix.num_virtual_tokens, -1)


def kv_from_peft_embeddings(flat: torch.Tensor, shape: PrefixShape, num_virtual_tokens: int) -> torch.Tensor:
    expected = (num_virtual_tokens, shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim)
    if tuple(flat.shape) != expected:
        raise ValueError(f"PEFT prefix embeddings have shape {tuple(flat.shape)}, expected {expected} "
                         f"for {shape.describe()} and num_virtual_tokens={num_virtual_tokens}")
    kv = flat.reshape(num_virtual_tokens, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
    return kv.permute(1, 2, 3, 0, 4).contiguous()


def seq2seq_slots(num_layers: int):
    """The PEFT slot each decoder layer reads under ``SEQ_2_SEQ_LM`` prefix tuning: ``[2j mod num_layers]``."""
    return [(2 * j) % num_layers for j in range(num_layers)]


def _submodules(peft_config) -> int:
    n = getattr(peft_config, "num_transformer_submodules", 1)
    n = 1 if n is None else int(n)
    if n not in (1, 2):
        raise ValueError(f"PEFT prefix tuning with num_transformer_submodules={n} is not supported")
    return n


def peft_shape(peft_config, model_config) -> PrefixShape:
    """The shape PEFT gave the prefix, checked against the model's own."""
    num_layers = peft_config.num_layers
    heads = peft_config.num_attention_heads
    token_dim = peft_config.token_dim
    seq2seq = _submodules(peft_config) == 2
    if model_config is not None and seq2seq != bool(getattr(model_config, "is_encoder_decoder", False)):
        raise ValueError(f"the PEFT adapter has num_transformer_submodules={_submodules(peft_config)} but the model "
                         f"is {'not ' if seq2seq else ''}an encoder-decoder")
    if token_dim % heads:
        raise ValueError(f"PEFT config token_dim={token_dim} is not a multiple of num_attention_heads={heads}")
    shape = PrefixShape(int(num_layers), int(heads), int(token_dim // heads))
    if model_config is not None:
        model_shape = prefix_shape_from_config(model_config)
        if model_shape != shape:
            raise ValueError(f"the PEFT prefix has {shape.describe()} but the model has {model_shape.describe()}")
    return shape


def from_peft(cls, peft_model, adapter_name: Optional[str] = None):
    name = adapter_name or peft_model.active_adapter
    peft_config = peft_model.peft_config[name]
    peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"adapter {name!r} is {peft_type}, not PREFIX_TUNING")
    shape = peft_shape(peft_config, peft_model.get_base_model().config)
    encoder = peft_model.prompt_encoder[name]
    weight = encoder.embedding.weight
    factory = {"dtype": weight.dtype, "device": weight.device}
    P = peft_config.num_virtual_tokens
    seq2seq = _submodules(peft_config) == 2
    if getattr(encoder, "prefix_projection", False) and hasattr(encoder, "transform"):
        prefix = cls(shape, P, projection=True, projection_dim=weight.shape[1],
                     projection_hidden=encoder.transform[0].out_features, **factory)
        prefix.embedding.load_state_dict(encoder.embedding.state_dict())
        state = encoder.transform.state_dict()
        if seq2seq:  # the output rows of the slot each layer reads
            width = 2 * shape.num_kv_heads * shape.head_dim
            rows = torch.cat([torch.arange(s * width, (s + 1) * width) for s in seq2seq_slots(shape.num_layers)])
            last = len(encoder.transform) - 1
            for key in (f"{last}.weight", f"{last}.bias"):
                state[key] = state[key][rows.to(state[key].device)]
        prefix.transform.load_state_dict(state)
        return prefix
    prefix = cls(shape, P, init="zeros", **factory)
    with torch.no_grad():
        prefix.prefix_kv.copy_(_kv_of_layers(weight.detach(), shape, P, seq2seq))
    return prefix


def _kv_of_layers(flat, shape, P, seq2seq):
    kv = kv_from_peft_embeddings(flat, shape, P)
    return kv[seq2seq_slots(shape.num_layers)] if seq2seq else kv


def from_peft_adapter(cls, path: str, config=None, *, dtype: torch.dtype = torch.float32, device=None):
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        adapter_config = json.load(f)
    if adapter_config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{path} holds a {adapter_config.get('peft_type')} adapter, not PREFIX_TUNING")

    class _Cfg:  # the few fields peft_shape reads
        num_layers = adapter_config["num_layers"]
        num_attention_heads = adapter_config["num_attention_heads"]
        token_dim = adapter_config["token_dim"]
        num_transformer_submodules = adapter_config.get("num_transformer_submodules", 1)

    shape = peft_shape(_Cfg, config)
    seq2seq = _submodules(_Cfg) == 2
    st_path = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(st_path):
        from safetensors.torch import load_file

        state = load_file(st_path)
    else:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    P = adapter_config["num_virtual_tokens"]
    prefix = cls(shape, P, init="zeros", dtype=dtype, device=device)
    with torch.no_grad():
        prefix.prefix_kv.copy_(_kv_of_layers(state["prompt_embeddings"], shape, P, seq2seq))
    return prefix


def save_peft_adapter(prefix, path: str, base_model_name: Optional[str] = None,
                      task_type: str = "CAUSAL_LM") -> str:
    """The current K/V values as a PEFT prefix-tuning adapter directory (``inference_mode``: no MLP);
    ``task_type="SEQ_2_SEQ_LM"`` for an encoder-decoder's ``layout="peft"`` prefix."""
    from safetensors.torch import save_file

    if task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ValueError(f"task_type must be 'CAUSAL_LM' or 'SEQ_2_SEQ_LM', got {task_type!r}")
    seq2seq = task_type == "SEQ_2_SEQ_LM"
    s = prefix.shape
    token_dim = s.num_kv_heads * s.head_dim
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": s.num_kv_heads,
        "num_layers": s.num_layers,
        "num_transformer_submodules": 2 if seq2seq else 1,
        "num_virtual_tokens": prefix.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": task_type,
        "token_dim": token_dim,
    }
    try:
        import peft  # noqa: PLC0415 - optional: only to record the version, as PEFT itself does

        config["peft_version"] = peft.__version__
    except ImportError:
        pass
    with torch.no_grad():
        kv = prefix.key_value().detach()
        if seq2seq:
            kv = _seq2seq_slots_of(kv)
        embeddings = kv.permute(3, 0, 1, 2, 4).reshape(prefix.num_virtual_tokens, -1).contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({"prompt_embeddings": embeddings}, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path


def _seq2seq_slots_of(kv: torch.Tensor) -> torch.Tensor:
    """Per-layer ``[L, 2, Hkv, P, D]`` -> PEFT's SEQ_2_SEQ_LM slots (zeros where no layer reads); ValueError when
    two layers that PEFT gives one slot differ."""
    slots = torch.zeros_like(kv)
    owner = {}
    for j, slot in enumerate(seq2seq_slots(kv.shape[0])):
        if slot in owner and not torch.equal(kv[owner[slot]], kv[j]):
            raise ValueError(f"PEFT's SEQ_2_SEQ_LM layout gives decoder layers {owner[slot]} and {j} one prefix "
                             f"(slot {slot}); this prefix has different ones there, which PEFT cannot represent")
        owner.setdefault(slot, j)
        slots[slot] = kv[j]
    return slots
