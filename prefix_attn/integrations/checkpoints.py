"""Checkpoints of an enabled model: ``model.save_pretrained`` (installed by ``enable``) writes the stock checkpoint
plus the prefix beside it; :func:`load_pretrained` restores both."""

from __future__ import annotations

import os

from ..bank import PrefixBank
from ..prefix import PrefixTuning
from .hf_model import BANK_DIRNAME, PREFIX_FILENAME, SUBMODULE, enable

_MISSING = object()


def save_pretrained(model, save_directory, *args, is_main_process: bool = True, **kwargs):
    """``model.save_pretrained`` of an enabled model: the stock checkpoint (whose weights include the
    ``prefix_attn.*`` tensors, so ``Trainer`` resumes the prefix) and ``prefix.safetensors`` beside it."""
    result = type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        binding = model._prefix_attn_binding
        name = BANK_DIRNAME if binding.is_bank else PREFIX_FILENAME
        binding.prefix.save(os.path.join(os.fspath(save_directory), name))
    return result


def load_pretrained(path, model_class=None, *, prefix_device=None, freeze_model: bool = True,
                    ignore_attention_dropout: bool = False, **from_pretrained_kwargs):
    """Load a checkpoint written by ``save_pretrained`` of an enabled model (or by ``Trainer``) and enable
    its prefix: ``model_class.from_pretrained(path, **from_pretrained_kwargs)`` (default
    ``transformers.AutoModelForCausalLM``) + ``PrefixTuning.load(path/prefix.safetensors)`` + :func:`enable`.

    A stock ``from_pretrained`` of such a checkpoint lists the ``prefix_attn.*`` keys as UNEXPECTED in its load
    report (the stock class has no prefix); this function expects them and restores the prefix.
    """
    import transformers

    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    prefix_file = os.path.join(os.fspath(path), PREFIX_FILENAME)
    bank_dir = os.path.join(os.fspath(path), BANK_DIRNAME)
    if not os.path.isfile(prefix_file) and not os.path.isdir(bank_dir):
        raise FileNotFoundError(f"{prefix_file} not found: {path} was not saved from a prefix_attn-enabled model")
    concrete = model_class
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: the class it will build
    if mapping is not None:
        config = from_pretrained_kwargs.get("config") or transformers.AutoConfig.from_pretrained(path)
        concrete = mapping[type(config)]
    own = concrete.__dict__.get("_keys_to_ignore_on_load_unexpected", _MISSING)
    concrete._keys_to_ignore_on_load_unexpected = list(getattr(concrete, "_keys_to_ignore_on_load_unexpected",
                                                                None) or []) + [rf"^{SUBMODULE}\."]
    try:
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    finally:
        if own is _MISSING:
            del concrete._keys_to_ignore_on_load_unexpected
        else:
            concrete._keys_to_ignore_on_load_unexpected = own
    device = next(iter(model.parameters())).device
    if os.path.isfile(prefix_file):
        prefix = PrefixTuning.load(prefix_file, device=prefix_device or device)
    else:
        prefix = PrefixBank.load(bank_dir, device=prefix_device or device)
    return enable(model, prefix, freeze_model=freeze_model, ignore_attention_dropout=ignore_attention_dropout)
