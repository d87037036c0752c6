"""What ``enable`` reads off a transformers model before it changes anything: the module that runs the layers, the
position rule, the attention modules in layer order, PEFT wrappers to refuse; and a config of the model's own."""

from __future__ import annotations

import copy
from typing import Optional

from ..hidden import attention_modules  # noqa: F401  (re-exported)

_PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT",
                    "CPT")


def _runner(model, modules):
    """The module whose forward runs the layers: the smallest PreTrainedModel inside ``model`` that holds every
    attention module. Usually ``model.base_model``; OPT's ``OPTForCausalLM`` calls ``model.decoder`` directly,
    so a hook on ``OPTModel`` would never fire."""
    from transformers import PreTrainedModel

    wanted = {id(m) for m in modules}
    best, best_size = model, None
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        inside = [id(m) for m in sub.modules()]
        if wanted.issubset(inside) and (best_size is None or len(inside) < best_size):
            best, best_size = sub, len(inside)
    return best


def _position_rule(runner) -> Optional[str]:
    """How the model numbers its positions when it is given none, as the decoder hook must mirror under PEFT's
    prefix: "mask" (OPT: counted over the attention mask), "token_ids" (RoBERTa-style embeddings: counted over the
    non-pad tokens from ``padding_idx + 1``), or None (0, 1, 2, ... from the cache length)."""
    embed = getattr(runner, "embed_positions", None)
    if type(embed).__name__ == "OPTLearnedPositionalEmbedding":
        return "mask"
    embeddings = getattr(runner, "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        if not isinstance(getattr(embeddings, "padding_idx", None), int):
            raise NotImplementedError(f"{type(runner).__name__} derives positions from the token ids but its "
                                      f"embeddings have no integer padding_idx; prefix_attn cannot mirror that rule")
        return "token_ids"
    return None


def _kv_out_features(module) -> Optional[int]:
    k_proj = getattr(module, "k_proj", None)
    if k_proj is not None and hasattr(k_proj, "out_features"):
        return k_proj.out_features
    c_attn = getattr(module, "c_attn", None)  # GPT-2: fused q|k|v Conv1D
    if c_attn is not None and hasattr(c_attn, "nf"):
        return c_attn.nf // 3
    return None


def _refuse_peft(model) -> None:
    """A PEFT-wrapped model already applies its own prompt (or would be bypassed): refuse, naming from_peft."""
    peft_config = getattr(model, "peft_config", None)
    is_peft_model = type(model).__module__.startswith("peft.") or peft_config is not None
    if not is_peft_model:
        return
    kinds = set()
    if isinstance(peft_config, dict):
        for cfg in peft_config.values():
            kind = getattr(cfg, "peft_type", None)
            kinds.add(str(getattr(kind, "value", kind)))
    prompt = sorted(k for k in kinds if k in _PROMPT_LEARNING)
    if prompt:
        raise ValueError(
            f"this model already carries a PEFT {'/'.join(prompt)} adapter: enabling prefix_attn on it would "
            f"apply a prompt twice. Convert it instead: prefix = prefix_attn.PrefixTuning.from_peft(peft_model); "
            f"model = peft_model.get_base_model(); prefix_attn.enable(model, prefix)")
    raise ValueError(
        f"prefix_attn.enable takes a transformers model, not a PEFT wrapper ({type(model).__name__}); pass "
        f"peft_model.get_base_model() (its injected layers, e.g. LoRA, stay in place; use freeze_model=False "
        f"to keep them trainable)")


def is_enabled(model) -> bool:
    return getattr(model, "_prefix_attn_binding", None) is not None


def _own_config(model):
    """Give ``model`` and its submodules a copy of their config (and its sub-configs): two models built from one
    config object share it, and switching one's attention implementation must not switch the other's."""
    old = model.config
    new = copy.deepcopy(old)
    pairs = {id(old): new}
    for name, value in vars(old).items():
        if hasattr(value, "to_dict") and hasattr(value, "_attn_implementation") and hasattr(new, name):
            pairs[id(value)] = getattr(new, name)
    for m in model.modules():
        c = m.__dict__.get("config")
        if c is not None and id(c) in pairs:
            m.config = pairs[id(c)]
    return model.config
