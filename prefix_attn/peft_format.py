"""PEFT's prefix-tuning format, both ways: a PEFT model or adapter directory into a ``PrefixTuning``, and a
``PrefixTuning`` into an adapter directory that ``peft.PeftModel.from_pretrained`` loads.

PEFT stores prefix tuning as one ``[P, num_layers * 2 * token_dim]`` matrix (``prompt_embeddings``, ``token_dim =
heads_kv * head_dim``) that it views as ``[P, 2 * num_layers, heads_kv, head_dim]`` with layer ``l``'s keys at
``2l`` and values at ``2l + 1``; ``PrefixTuning.key_value()`` is ``[num_layers, 2, heads_kv, P, head_dim]``.
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


def peft_shape(peft_config, model_config) -> PrefixShape:
    """The shape PEFT gave the prefix, checked against the model's own."""
    num_layers = peft_config.num_layers
    heads = peft_config.num_attention_heads
    token_dim = peft_config.token_dim
    if getattr(peft_config, "num_transformer_submodules", 1) not in (None, 1):
        raise ValueError("only decoder-only PEFT prefix tuning (num_transformer_submodules=1) is supported")
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
    if getattr(encoder, "prefix_projection", False) and hasattr(encoder, "transform"):
        prefix = cls(shape, P, projection=True, projection_dim=weight.shape[1],
                     projection_hidden=encoder.transform[0].out_features, **factory)
        prefix.embedding.load_state_dict(encoder.embedding.state_dict())
        prefix.transform.load_state_dict(encoder.transform.state_dict())
        return prefix
    prefix = cls(shape, P, init="zeros", **factory)
    with torch.no_grad():
        prefix.prefix_kv.copy_(kv_from_peft_embeddings(weight.detach(), shape, P))
    return prefix


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
    st_path = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(st_path):
        from safetensors.torch import load_file

        state = load_file(st_path)
    else:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    P = adapter_config["num_virtual_tokens"]
    prefix = cls(shape, P, init="zeros", dtype=dtype, device=device)
    with torch.no_grad():
        prefix.prefix_kv.copy_(kv_from_peft_embeddings(state["prompt_embeddings"], shape, P))
    return prefix


def save_peft_adapter(prefix, path: str, base_model_name: Optional[str] = None) -> str:
    """The current K/V values as a PEFT prefix-tuning adapter directory (``inference_mode``: no MLP)."""
    from safetensors.torch import save_file

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
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prefix.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }
    try:
        import peft  # noqa: PLC0415 - optional: only to record the version, as PEFT itself does

        config["peft_version"] = peft.__version__
    except ImportError:
        pass
    with torch.no_grad():
        embeddings = to_peft_embeddings(prefix).detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({"prompt_embeddings": embeddings}, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path
