"""Checkpoints of an enabled model: ``model.save_pretrained`` (installed by ``enable``, called by every Trainer
checkpoint) writes what was trained; ``load_pretrained`` (``hf_model.py``, with ``enable``) reads it back with the
helpers here.

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

from .trainable import SUBMODULE, set_saved_keys

PREFIX_FILENAME = "prefix.safetensors"
BANK_DIRNAME = "prefix_bank"
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
        if binding.layout is not None:  # an encoder-decoder
            meta["layout"] = binding.layout
        with open(os.path.join(directory, META_FILENAME), "w") as f:
            json.dump(meta, f, indent=1)
    return result


def meta(path) -> dict:
    try:
        with open(os.path.join(path, META_FILENAME)) as f:
            return json.load(f)
    except FileNotFoundError:  # written before prefix_attn.json existed: a full checkpoint
        return {"weights": "full", "modules_to_save": []}


def load_trainable(model, path) -> None:
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


def from_full_checkpoint(model_class, path, kwargs):
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
