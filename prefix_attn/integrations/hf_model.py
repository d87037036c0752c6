"""``enable`` / ``disable``: make a :class:`~prefix_attn.PrefixTuning` part of a stock transformers decoder.

After ``enable(model, prefix)``:

* ``model.prefix_attn`` **is** the prefix, a registered submodule: ``model.parameters()`` yields its parameters
  (the only trainable ones with ``freeze_model=True``), ``model.to()``, ``model.zero_grad()``, gradient
  clipping, ``DistributedDataParallel``, accelerate and ``transformers.Trainer`` see it like any other weight,
  and ``model.state_dict()`` carries it under ``prefix_attn.*`` keys (``prefix_attn.prefix_kv``, or
  ``prefix_attn.embedding.weight`` / ``prefix_attn.transform.{0,2}.{weight,bias}`` with ``projection=True``).
* the model runs attention through ``attn_implementation="prefix_attn"`` (``attention.py``);
* two hooks on the decoder (the module that runs the layers, usually ``model.base_model``, ``hooks.py``): before
  its forward, ``position_ids`` are shifted by ``P`` as PEFT does, this forward's values are resolved once and the
  prefix K/V of all layers is computed once; after it (also when it raises), that K/V is dropped. It is never
  state that outlives the forward: a deep copy or a pickle of the model at any time carries the prefix
  parameters only;
* ``model.save_pretrained(path)`` writes the stock checkpoint (``config.json`` has the stock attention
  implementation) whose ``model.safetensors`` also holds the ``prefix_attn.*`` tensors (so Trainer's
  ``resume_from_checkpoint`` restores the prefix), plus the prefix alone in ``path/prefix.safetensors``
  (:meth:`PrefixTuning.save` format). :func:`load_pretrained` restores both.

Everything ``enable`` attaches is a plain Python object, a bound method or a registered module, so the model
stays picklable and deep-copyable; ``disable`` removes all of it.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import List, Optional

from ..bank import PrefixBank
from ..prefix import PrefixShape, PrefixTuning, prefix_shape_from_config
from ..prefix_shape import LAYOUTS
from . import checkpoints
from . import seq2seq as seq2seq_parts
from .attention import ATTN_IMPLEMENTATION, register
from .binding import Binding
from .hooks import CallHooks, DecoderHooks
from .model_parts import (
    _kv_out_features,
    _own_config,
    _position_rule,
    _refuse_peft,
    _runner,
    attention_modules,
    is_enabled,  # noqa: F401  (re-exported)
)
from .trainable import (
    _NOT_SET,
    SUBMODULE,
    get_nb_trainable_parameters,
    modules_to_save_names,
    print_trainable_parameters,
    set_saved_keys,
)


# ---------------------------------------------------------------------------------------------- enable
def enable(model, prefix: PrefixTuning, *, freeze_model: bool = True, ignore_attention_dropout: bool = False,
           modules_to_save: Optional[List[str]] = None, save_full_model: bool = False, layout: str = "peft"):
    """Run ``model``'s attention through ``prefix_attention`` with ``prefix``; returns the same model object.

    ``prefix`` may be a :class:`~prefix_attn.PrefixBank`: then every call names each row's entry,
    ``model(..., prefix_ids=ids)`` / ``model.generate(..., prefix_ids=ids)`` (a LongTensor ``[batch]``, or a list
    of entry numbers or names), and each row's positions are offset by its own entry's length, as PEFT would
    with that adapter.

    Args:
        model:   a stock transformers decoder (``GPT2LMHeadModel``, ``LlamaForCausalLM``, their base models,
                 ...) or a BERT encoder (``BertForSequenceClassification``, ``BertForTokenClassification``:
                 bidirectional attention; keep the head trainable with ``modules_to_save=["classifier"]``), or
                 a BART-family encoder-decoder (``BartForConditionalGeneration``, mBART, PLBart, Marian,
                 Pegasus, Blenderbot); not a PEFT wrapper
        prefix:  a :class:`PrefixTuning` of the model's shape (refused otherwise); registered as
                 ``model.prefix_attn`` and moved to the model's device (its dtype is kept: it is cast to the
                 activations' dtype inside attention)
        freeze_model: ``requires_grad=False`` on every model weight (restored by ``disable``), so the prefix is
                 the only trainable part: an optimizer over ``model.parameters()`` trains exactly the prefix
        ignore_attention_dropout: train without attention dropout (the model's attention dropout probability is
                                  applied in the kernels otherwise; other dropouts are unaffected)
        modules_to_save: names of modules that stay trainable beside the prefix (PEFT's ``modules_to_save``: a
                 classification head, say); a name matches a module whose dotted name is it or ends with
                 ``"." + name``. They are saved and loaded with the prefix.
        save_full_model: ``model.save_pretrained`` (and so every Trainer checkpoint) writes every weight; by
                 default it writes the trainable ones only (the prefix, ``modules_to_save``, whatever else has
                 ``requires_grad``), which :func:`load_pretrained` puts back onto a stock base model
        layout:  encoder-decoders only (``seq2seq.py``): ``"peft"``, a prefix per decoder self-attention layer as
                 PEFT's SEQ_2_SEQ_LM computes it, or ``"li_liang"``, a prefix in the encoder's self-attention, the
                 decoder's self-attention and the cross-attention of every layer (a prefix of
                 ``prefix_shape_from_config(config, layout="li_liang")``)

    Calling ``enable`` on an enabled model replaces its prefix.
    """
    if not isinstance(prefix, (PrefixTuning, PrefixBank)):
        raise TypeError(f"prefix must be a prefix_attn.PrefixTuning or PrefixBank, got {type(prefix).__name__}")
    _refuse_peft(model)
    if is_enabled(model):
        disable(model)
    if hasattr(model, SUBMODULE):
        raise ValueError(f"{type(model).__name__} already has an attribute {SUBMODULE!r}; prefix_attn registers "
                         f"the prefix under that name")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    config = model.config
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "peft" and not seq2seq:
        raise ValueError(f"layout={layout!r} is for encoder-decoders; {type(model).__name__} is not one")
    if seq2seq and isinstance(prefix, PrefixBank):
        raise NotImplementedError("a PrefixBank on an encoder-decoder: not supported (one PrefixTuning only)")
    if seq2seq:
        seq2seq_parts.check_supported(model)
    if getattr(config, "alibi", False):
        raise NotImplementedError(f"{type(model).__name__} uses ALiBi (config.alibi=True): its position bias is "
                                  f"added to the attention mask as float values, and prefix_attn's kernels take no "
                                  f"additive bias; use a RoPE checkpoint of the family (alibi=False)")
    if getattr(config, "kv_lora_rank", None) is not None:
        raise NotImplementedError(f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank): its "
                                  f"keys and values have different head sizes; prefix_attn does not support it")
    shape = prefix_shape_from_config(config, layout)
    prefix.check_compatible(shape)
    modules = attention_modules(model)
    found = sorted(m.layer_idx for m in modules)
    if seq2seq:
        modules = seq2seq_parts.all_attention(model)
        prefixed = seq2seq_parts.prefix_modules(model, modules, layout)
    elif not found:
        raise NotImplementedError(f"{type(model).__name__} has no attention modules with a layer_idx (its attention "
                                  f"does not run through transformers' AttentionInterface one module per layer, as "
                                  f"DeBERTa-v2, DistilBERT and ALBERT); prefix_attn cannot attach a prefix to it")
    elif len(set(found)) < len(found):
        raise NotImplementedError(f"{type(model).__name__} has several attention modules per layer (layer_idx "
                                  f"{found}: self-attention and cross-attention, as a BART-style decoder has); "
                                  f"prefix_attn supports models with one self-attention per layer")
    else:
        prefixed = modules
    if (len(prefixed) if seq2seq else found) != (shape.num_layers if seq2seq else list(range(shape.num_layers))):
        raise ValueError(f"expected one attention layer per index 0..{shape.num_layers - 1} in "
                         f"{type(model).__name__}, found layer_idx {found}")
    for m in prefixed:  # the config can say one thing and the weights another
        kv_out = _kv_out_features(m)
        if kv_out is not None and kv_out != shape.num_kv_heads * shape.head_dim:
            raise ValueError(f"{type(m).__name__} {m.layer_idx} projects keys to {kv_out} features but the "
                             f"prefix has {PrefixShape.describe(prefix.shape)}")

    for m in prefix.modules():  # hidden-state prefixes read this model's frozen key/value projections
        if isinstance(m, PrefixTuning) and m.parameterization == "hidden":
            m.bind(prefixed)
    runner = _runner(model, prefixed)
    # an encoder: PEFT passes the prefix as a cache
    if not seq2seq and not any(getattr(m, "is_causal", True) for m in modules):
        params = inspect.signature(runner.forward).parameters
        if "cache" not in params and "past_key_values" not in params:
            raise NotImplementedError(f"{type(runner).__name__} is an encoder that takes no KV cache: prefix tuning "
                                      f"as PEFT defines it (the prefix K/V as past key values, positions after "
                                      f"them) has no meaning there, so prefix_attn refuses it (ModernBERT is one)")
    position_rule = "embed_positions" if seq2seq else _position_rule(runner)
    register()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else next(iter(prefix.parameters())).device
    if any(p.device != device for p in prefix.parameters()):
        prefix.to(device)
    config = _own_config(model)  # set_attn_implementation writes into the config object, which models share
    previous = config._attn_implementation
    unfrozen = []
    if freeze_model:
        for name, p in model.named_parameters():
            if p.requires_grad:
                unfrozen.append(name)
                p.requires_grad_(False)
    saved = modules_to_save_names(model, modules_to_save or [])
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    binding = Binding(prefix, previous, unfrozen, ignore_attention_dropout)
    binding.modules_to_save, binding.save_full_model = saved, bool(save_full_model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if config._attn_implementation != ATTN_IMPLEMENTATION:
        _restore(model, binding)
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation='{ATTN_IMPLEMENTATION}' "
                           f"(its attention does not go through transformers' AttentionInterface)")
    model.add_module(SUBMODULE, prefix)
    slots = {id(m): i for i, m in enumerate(prefixed)}
    for m in modules:
        m._prefix_attn_binding = binding
        m._prefix_attn_slot = slots.get(id(m))  # its layer of the prefix; None: no prefix (seq2seq.py)
    binding.attention_modules = prefixed  # in the prefix's layer order: what a hidden-state prefix projects through
    binding.all_modules = modules
    binding.layout = layout if seq2seq else None
    hooks = DecoderHooks(binding, position_rule)
    calls = CallHooks(binding)
    binding.handles = [model.register_forward_pre_hook(calls.before, with_kwargs=True),
                       model.register_forward_hook(calls.after, always_call=True),
                       runner.register_forward_pre_hook(hooks.before, with_kwargs=True),
                       runner.register_forward_hook(hooks.after, always_call=True)]
    if seq2seq:  # the decoder's positions start after the prefix, as PEFT's (its prefix is the decoder's past)
        embed = seq2seq_parts.position_embedding(model)
        binding.handles.append(embed.register_forward_pre_hook(seq2seq_parts.PositionShift(binding),
                                                               with_kwargs=True))
    model._prefix_attn_binding = binding
    model.save_pretrained = functools.partial(checkpoints.save_pretrained, model)
    model.print_trainable_parameters = functools.partial(print_trainable_parameters, model)
    model.get_nb_trainable_parameters = functools.partial(get_nb_trainable_parameters, model)
    binding.previous_ignore = model.__dict__.get("_keys_to_ignore_on_save", _NOT_SET)
    set_saved_keys(model)
    if binding.is_bank and hasattr(model, "generate"):
        model.generate = functools.partial(generate, model)
    return model


def load_pretrained(path, model_class=None, *, model=None, prefix_device=None, freeze_model: bool = True,
                    ignore_attention_dropout: bool = False, **from_pretrained_kwargs):
    """Restore a checkpoint of an enabled model (``save_pretrained`` or a Trainer checkpoint) and enable it.

    * ``model`` given: a stock base model (not enabled); the checkpoint's trained tensors and prefix go onto it
      (PEFT's ``PeftModel.from_pretrained(base_model, path)``).
    * else: a full checkpoint loads with ``model_class.from_pretrained(path, **from_pretrained_kwargs)`` (default
      ``transformers.AutoModelForCausalLM``); a trainable-only one loads its base model from the name or path it
      recorded (``prefix_attn.json``), then its trained tensors.

    An encoder-decoder's checkpoint records its ``layout``; load it with
    ``model_class=transformers.AutoModelForSeq2SeqLM``.
    """
    import transformers

    path = os.fspath(path)
    prefix_file = os.path.join(path, checkpoints.PREFIX_FILENAME)
    bank_dir = os.path.join(path, checkpoints.BANK_DIRNAME)
    if not os.path.isfile(prefix_file) and not os.path.isdir(bank_dir):
        raise FileNotFoundError(f"{prefix_file} not found: {path} was not saved from a prefix_attn-enabled model")
    meta = checkpoints.meta(path)
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    if model is not None:
        if getattr(model, "_prefix_attn_binding", None) is not None:
            raise ValueError("load_pretrained(model=...) takes the stock base model; this one is enabled already "
                             "(prefix_attn.disable(model) first)")
        checkpoints.load_trainable(model, path)
    elif meta.get("weights") == "trainable":
        base = meta.get("base_model_name_or_path") or ""
        if not base or (os.path.isabs(base) and not os.path.isdir(base)):  # none, or a local path that is gone
            raise ValueError(f"{path} holds the trained tensors only (the prefix and modules_to_save) and names no "
                             f"loadable base model ({base!r}); pass model=<the stock base model>")
        model = model_class.from_pretrained(base, **from_pretrained_kwargs)
        checkpoints.load_trainable(model, path)
    else:
        model = checkpoints.from_full_checkpoint(model_class, path, from_pretrained_kwargs)
    device = next(iter(model.parameters())).device
    if os.path.isfile(prefix_file):
        prefix = PrefixTuning.load(prefix_file, device=prefix_device or device)
    else:
        prefix = PrefixBank.load(bank_dir, device=prefix_device or device)
    return enable(model, prefix, freeze_model=freeze_model, ignore_attention_dropout=ignore_attention_dropout,
                  modules_to_save=meta.get("modules_to_save") or None, save_full_model=meta.get("weights") == "full",
                  layout=meta.get("layout", "peft"))


def generate(model, *args, prefix_ids=None, **kwargs):
    """``model.generate`` of a model enabled with a PrefixBank: ``prefix_ids`` (one per input row) is held for
    the whole generation and repeated for each row's beams / return sequences, as generate() repeats the rows."""
    binding = model._prefix_attn_binding
    binding.generate_ids = None if prefix_ids is None else binding.prefix.ids(prefix_ids, device=model.device)
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        binding.generate_ids = None


def _restore(model, binding: Binding) -> None:
    params = dict(model.named_parameters())
    for name in binding.unfrozen:
        if name in params:
            params[name].requires_grad_(True)
    binding.unfrozen = []
    if model.config._attn_implementation != binding.previous_attn:
        model.set_attn_implementation(binding.previous_attn)


def disable(model):
    """Undo :func:`enable`: the previous attention implementation, the model's ``requires_grad`` flags, no
    hooks, no ``prefix_attn`` submodule and no prefix reference left on the model. Returns the model; a no-op
    on a model that is not enabled. The prefix module itself is untouched (keep a reference to reuse it)."""
    binding = getattr(model, "_prefix_attn_binding", None)
    if binding is None:
        return model
    for handle in binding.handles:
        handle.remove()
    binding.handles = []
    for m in binding.all_modules:
        if getattr(m, "_prefix_attn_binding", None) is binding:
            del m._prefix_attn_binding
            m.__dict__.pop("_prefix_attn_slot", None)
    if getattr(model, SUBMODULE, None) is binding.prefix:
        delattr(model, SUBMODULE)
    for name in ("save_pretrained", "generate", "print_trainable_parameters", "get_nb_trainable_parameters"):
        model.__dict__.pop(name, None)
    if binding.previous_ignore is _NOT_SET:
        model.__dict__.pop("_keys_to_ignore_on_save", None)
    else:
        model._keys_to_ignore_on_save = binding.previous_ignore
    del model._prefix_attn_binding
    _restore(model, binding)
    binding.kv = None
    return model
