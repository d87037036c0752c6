"""Checkpoints of an enabled model: ``model.save_pretrained`` (installed by ``enable``, called by every Trainer
checkpoint) writes what was trained; :func:`load_pretrained` puts it back onto a stock base model.

A checkpoint directory holds:

* ``prefix.safetensors`` (or ``prefix_bank/``): the prefix, :meth:`PrefixTuning.save` format;
* ``model.safetensors`` and ``config.json``, the stock files: by default only the trainable tensors (the prefix
  under ``prefix_attn.*``, the ``modules_to_save``, anything else with ``requires_grad``), every weight with
  ``enable(..., save_full_model=True)`` or ``save_pretrained(path, full_model=True)``; Trainer's
  ``resume_from_checkpoint`` loads this file into the running model (the frozen base weights, left out on
  purpose, are the model's ``_keys_to_ignore_on_save``), with its optimizer, scheduler and RNG state;
* ``prefix_attn.json``: which of the two it is, the base model's name or path, the ``modules_to_save``.
"""

from __future__ import annotations

import json
import os

from ..bank import PrefixBank
from ..prefix import PrefixTuning
from .hf_model import BANK_DIRNAME, PREFIX_FILENAME, enable
from .trainable import SUBMODULE, set_saved_keys

META_FILENAME = "prefix_attn.json"
_FORMAT = "prefix_attn.checkpoint/1"
_MISSING = object()


def save_pretrained(model, save_directory, *args, is_main_process: bool = True, full_model=None, **kwargs):
    """``model.save_pretrained`` of an enabled model: the stock files (all weights with ``full_model=True``, else
    the trainable ones; None = the ``enable(..., save_full_model=)`` setting), the prefix, ``prefix_attn.json``."""
    binding = model._prefix_attn_binding
    full = binding.save_full_model if full_model is None else bool(full_model)
    set_saved_keys(model, full)
    try:
        result = type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
    finally:
        set_saved_keys(model)  # back to the enable setting (what Trainer's resume checks)
    if is_main_process:
        directory = os.fspath(save_directory)
        name = BANK_DIRNAME if binding.is_bank else PREFIX_FILENAME
        binding.prefix.save(os.path.join(directory, name))
        meta = {"format": _FORMAT, "weights": "full" if full else "trainable",
                "base_model_name_or_path": getattr(model.config, "_name_or_path", "") or "",
                "modules_to_save": list(binding.modules_to_save)}
        with open(os.path.join(directory, META_FILENAME), "w") as f:
            json.dump(meta, f, indent=1)
    return result


def _meta(path) -> dict:
    try:
        with open(os.path.join(path, META_FILENAME)) as f:
            return json.load(f)
    except FileNotFoundError:  # written before prefix_attn.json existed: a full checkpoint
        return {"weights": "full", "modules_to_save": []}


def _load_trainable(model, path) -> None:
    """The non-prefix tensors of a trainable-only ``model.safetensors`` (the modules_to_save) into ``model``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        return
    extra = {k: v for k, v in load_file(weights).items() if not k.startswith(SUBMODULE + ".")}
    if not extra:
        return
    missing = sorted(set(extra) - set(model.state_dict()))
    if missing:
        raise ValueError(f"{weights} holds weights the model has no place for: {missing[:5]}; is it the base model "
                         f"the checkpoint was trained on?")
    model.load_state_dict(extra, strict=False)


def load_pretrained(path, model_class=None, *, model=None, prefix_device=None, freeze_model: bool = True,
                    ignore_attention_dropout: bool = False, **from_pretrained_kwargs):
    """Restore a checkpoint of an enabled model (``save_pretrained`` or a Trainer checkpoint) and enable it.

    * ``model`` given: a stock base model (not enabled); the checkpoint's trained tensors and prefix go onto it
      (PEFT's ``PeftModel.from_pretrained(base_model, path)``).
    * else: a full checkpoint loads with ``model_class.from_pretrained(path, **from_pretrained_kwargs)`` (default
      ``transformers.AutoModelForCausalLM``); a trainable-only one loads its base model from the name or path it
      recorded (``prefix_attn.json``), then its trained tensors.
    """
    import transformers

    path = os.fspath(path)
    prefix_file = os.path.join(path, PREFIX_FILENAME)
    bank_dir = os.path.join(path, BANK_DIRNAME)
    if not os.path.isfile(prefix_file) and not os.path.isdir(bank_dir):
        raise FileNotFoundError(f"{prefix_file} not found: {path} was not saved from a prefix_attn-enabled model")
    meta = _meta(path)
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    if model is not None:
        if getattr(model, "_prefix_attn_binding", None) is not None:
            raise ValueError("load_pretrained(model=...) takes the stock base model; this one is enabled already "
                             "(prefix_attn.disable(model) first)")
        _load_trainable(model, path)
    elif meta.get("weights") == "trainable":
        base = meta.get("base_model_name_or_path") or ""
        if not base or (os.path.isabs(base) and not os.path.isdir(base)):  # none, or a local path that is gone
            raise ValueError(f"{path} holds the trained tensors only (the prefix and modules_to_save) and names no "
                             f"loadable base model ({base!r}); pass model=<the stock base model>")
        model = model_class.from_pretrained(base, **from_pretrained_kwargs)
        _load_trainable(model, path)
    else:
        model = _from_full_checkpoint(model_class, path, from_pretrained_kwargs)
    device = next(iter(model.parameters())).device
    if os.path.isfile(prefix_file):
        prefix = PrefixTuning.load(prefix_file, device=prefix_device or device)
    else:
        prefix = PrefixBank.load(bank_dir, device=prefix_device or device)
    return enable(model, prefix, freeze_model=freeze_model, ignore_attention_dropout=ignore_attention_dropout,
                  modules_to_save=meta.get("modules_to_save") or None, save_full_model=meta.get("weights") == "full")


def _from_full_checkpoint(model_class, path, kwargs):
    """``from_pretrained`` of a checkpoint that holds every weight plus ``prefix_attn.*`` tensors, which the
    stock class would report as unexpected: they are expected here (the prefix is loaded separately)."""
    import transformers

    concrete = model_class
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: the class it will build
    if mapping is not None:
        config = kwargs.get("config") or transformers.AutoConfig.from_pretrained(path)
        concrete = mapping[type(config)]
    own = concrete.__dict__.get("_keys_to_ignore_on_load_unexpected", _MISSING)
    concrete._keys_to_ignore_on_load_unexpected = list(getattr(concrete, "_keys_to_ignore_on_load_unexpected",
                                                                None) or []) + [rf"^{SUBMODULE}\."]
    try:
        return model_class.from_pretrained(path, **kwargs)
    finally:
        if own is _MISSING:
            del concrete._keys_to_ignore_on_load_unexpected
        else:
            concrete._keys_to_ignore_on_load_unexpected = own
