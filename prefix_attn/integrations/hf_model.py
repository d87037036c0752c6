"""``enable`` / ``disable``: make a :class:`~prefix_attn.PrefixTuning` part of a stock transformers decoder.

After ``enable(model, prefix)``:

* ``model.prefix_attn`` **is** the prefix, a registered submodule: ``model.parameters()`` yields its parameters
  (the only trainable ones with ``freeze_model=True``), ``model.to()``, ``model.zero_grad()``, gradient
  clipping, ``DistributedDataParallel``, accelerate and ``transformers.Trainer`` see it like any other weight,
  and ``model.state_dict()`` carries it under ``prefix_attn.*`` keys (``prefix_attn.prefix_kv``, or
  ``prefix_attn.embedding.weight`` / ``prefix_attn.transform.{0,2}.{weight,bias}`` with ``projection=True``).
* the model runs attention through ``attn_implementation="prefix_attn"`` (see ``transformers.py`` here);
* two hooks on the decoder (the module that runs the layers, usually ``model.base_model``): before its
  forward, ``position_ids`` are shifted by ``P`` as PEFT does (OPT: counted over the mask, as PEFT's longer
  mask does) and the prefix K/V of all layers is computed once (one MLP evaluation in projection mode); after
  it (also when it raises), that K/V is dropped. It is never state that outlives the forward: a deep copy or a
  pickle of the model at any time carries the prefix parameters only;
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
import weakref
from typing import Dict, List, Optional

import torch

from ..bank import PrefixBank
from ..prefix import PrefixShape, PrefixTuning, prefix_shape_from_config
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

PREFIX_FILENAME = "prefix.safetensors"
BANK_DIRNAME = "prefix_bank"


class _Binding:
    """Settings of one ``enable`` call, set on the model and on each attention layer.

    A plain object on purpose (not a Module): the prefix is registered once, as ``model.prefix_attn``; this
    only points at it. ``kv`` (``[L, 2, Hkv, P, D]``) is held while the decoder's forward runs. After it, in
    projection mode with autograd on, only a weak reference to the graph node that saved it is kept (valid
    while that graph is alive and the prefix parameters are unchanged), so activation checkpointing recomputes
    a layer with the very K/V its forward used: a second MLP evaluation inside the recomputed region would not
    match the saved graph. Neither is ever pickled or deep-copied.
    """

    def __init__(self, prefix, previous_attn, unfrozen: List[str], ignore_attention_dropout: bool):
        self.prefix = prefix
        self.is_bank = isinstance(prefix, PrefixBank)
        self.row_ids: Optional[torch.Tensor] = None  # a bank: this call's prefix_ids [B] (kept for recompute)
        self.generate_ids: Optional[torch.Tensor] = None  # a bank inside generate(): the rows before expansion
        self.packed = None  # (cu_seqlens int32 [S + 1], longest) of a packed one-row batch, for this forward
        self.seq_idx = None  # the seq_idx of this forward, once checked against the packing
        self.lengths: Dict[torch.device, torch.Tensor] = {}  # a bank: its entries' lengths, per device
        self.in_call = False
        self.previous_attn = previous_attn
        self.unfrozen = unfrozen  # names of model parameters whose requires_grad enable() turned off
        self.ignore_attention_dropout = ignore_attention_dropout
        self.modules_to_save: List[str] = []  # names of model modules kept trainable (saved with the prefix)
        self.save_full_model = False  # save_pretrained writes every weight (else the trainable ones only)
        self.previous_ignore = None  # the model's own _keys_to_ignore_on_save, restored by disable
        self.kv: Optional[torch.Tensor] = None
        self.kv_after = None  # (weakref to the last forward's kv, parameter versions when it was computed)
        self.depth = 0  # nested decoder forwards
        self.handles = []
        self.attention_modules = []

    def __getstate__(self) -> Dict:
        state = self.__dict__.copy()
        state["kv"] = state["kv_after"] = state["row_ids"] = state["generate_ids"] = state["packed"] = None
        state["seq_idx"] = None
        state["lengths"] = {}
        state["depth"] = 0
        state["in_call"] = False
        return state

    def set_ids(self, prefix_ids, device) -> None:
        """Take a call's ``prefix_ids`` (LongTensor [B], or a list of entry numbers / names)."""
        if prefix_ids is None:
            self.row_ids = None
            return
        if not self.is_bank:
            raise ValueError("prefix_ids given, but this model is enabled with a single PrefixTuning; enable it "
                             "with a prefix_attn.PrefixBank to choose a prefix per row")
        self.row_ids = self.prefix.ids(prefix_ids, device=device)

    def ids(self, batch: int) -> torch.Tensor:
        if self.row_ids is None and self.generate_ids is not None:
            rows = self.generate_ids.shape[0]
            if rows and batch % rows == 0:  # generate() repeats each row for its beams / return sequences
                return self.generate_ids.repeat_interleave(batch // rows)
        if self.row_ids is None:
            raise ValueError(f"this model is enabled with a PrefixBank ({len(self.prefix)} entries): pass "
                             f"prefix_ids=... (a LongTensor [batch] or a list of entry names) to the call or to "
                             f"generate()")
        if self.row_ids.shape[0] != batch:
            raise ValueError(f"prefix_ids has {self.row_ids.shape[0]} entries but the batch has {batch} rows "
                             f"(with num_beams or num_return_sequences, pass prefix_ids as a tensor so generate() "
                             f"expands it)")
        return self.row_ids

    def offsets(self, batch: int, device):
        """The position shift of each row: its own prefix length (PEFT's, per adapter); an int for one prefix."""
        if not self.is_bank:
            return self.num_virtual_tokens
        return self.bank_args(batch, device)["prefix_lengths"].long()[self.ids(batch).to(device)][:, None]

    def bank_args(self, batch: int, device) -> Dict:
        """prefix_ids / prefix_lengths for prefix_attention, {} for one prefix."""
        if not self.is_bank:
            return {}
        lengths = self.lengths.get(device)
        if lengths is None:  # one host-to-device copy per device, not one per layer and forward
            lengths = self.lengths[device] = self.prefix.lengths(device)
        return {"prefix_ids": self.ids(batch).to(device), "prefix_lengths": lengths}

    def _versions(self):
        return tuple(p._version for p in self.prefix.parameters())

    def begin_forward(self) -> None:
        if self.depth == 0:
            kv = self.prefix.key_value(self.attention_modules)
            self.kv_after = None
            if kv.grad_fn is not None and not torch.compiler.is_compiling():
                kv = _HoldForBackward.apply(kv)
                self.kv_after = (weakref.ref(kv.grad_fn), self._versions())
            self.kv = kv
        self.depth += 1

    def end_forward(self) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.kv = None

    def _kv_of_graph(self) -> Optional[torch.Tensor]:
        """The K/V the last forward computed, while its graph holds it and the parameters are unchanged."""
        if self.kv_after is None:
            return None
        ref, versions = self.kv_after
        node = ref()
        if node is None or versions != self._versions():
            return None
        try:
            return node.saved_tensors[0]
        except RuntimeError:  # the graph was freed by backward
            return None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens

    def key_value(self, layer_idx: int):
        """``([Hkv, P, D], [Hkv, P, D])`` of one layer: the K/V of the running forward, or computed now (an
        attention layer called on its own, or recomputed by activation checkpointing after the forward)."""
        kv = self.kv if self.kv is not None else self._kv_of_graph()
        if kv is None:
            kv = self.prefix.key_value(self.attention_modules)
        kv = kv[layer_idx]
        return kv[0], kv[1]


class _HoldForBackward(torch.autograd.Function):
    """Identity that keeps its input alive for as long as the graph that used it (see ``_Binding``)."""

    @staticmethod
    def forward(ctx, kv):
        ctx.save_for_backward(kv)
        return kv.view_as(kv)

    @staticmethod
    def backward(ctx, grad):
        return grad


_SIGNATURES: Dict[type, List[str]] = {}


class _DecoderHooks:
    """Forward pre-hook and post-hook of the decoder; a module-level class so the model pickles."""

    def __init__(self, binding: _Binding, mask_positions: bool = False):
        self.binding = binding
        self.mask_positions = mask_positions  # OPT: positions counted over the attention mask

    def before(self, module, args, kwargs):
        if args:  # bind positionals by name so position_ids can be read and replaced
            names = _SIGNATURES.get(type(module))
            if names is None:
                names = _SIGNATURES.setdefault(type(module), list(inspect.signature(module.forward).parameters))
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        position_ids = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if "prefix_ids" in kwargs or not self.binding.in_call:  # the decoder called directly
            self.binding.set_ids(kwargs.pop("prefix_ids", None), tokens.device)
        cache = _cache_of(kwargs)
        self.binding.packed = _packed_sequences(position_ids, mask, cache)
        seq_idx = kwargs.get("seq_idx")
        self.binding.seq_idx = None
        if seq_idx is not None:  # TRL packing: checked here once, not in every layer
            from .transformers import check_seq_idx  # noqa: PLC0415

            check_seq_idx(seq_idx, self.binding.packed, tokens.shape[0], tokens.shape[1])
            self.binding.seq_idx = seq_idx
        if self.binding.packed is not None and self.binding.is_bank:
            raise NotImplementedError("packed sequences (position_ids restarting inside a row) with a PrefixBank: "
                                      "not supported; pad the batch instead")
        # one prefix: P; a bank: each row's own entry length, [B, 1]
        num_prefix = self.binding.offsets(tokens.shape[0], tokens.device)
        if position_ids is not None:
            # PEFT: the prefix occupies positions 0..P-1, so given positions are shifted by P
            kwargs["position_ids"] = position_ids + num_prefix
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if self.mask_positions and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                # OPT counts positions over its 2-D mask (cumsum(mask) * mask - 1); under PEFT that mask starts
                # with P ones and the cache with P slots: real tokens at P + cumsum - 1, pads at -1
                m = mask.long()
                kwargs["position_ids"] = ((m.cumsum(-1) + num_prefix) * m - 1)[:, past:]
            else:
                # what the stock model does when position_ids is None, plus PEFT's shift by P
                kwargs["position_ids"] = (torch.arange(tokens.shape[1], device=tokens.device)
                                          + past).unsqueeze(0) + num_prefix
        self.binding.begin_forward()  # once per forward, outside any checkpointed layer
        return args, kwargs

    def after(self, module, args, output):
        self.binding.end_forward()
        return None


def _cache_of(kwargs):
    """The KV cache of a decoder call: ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before; still
    accepted, deprecated, by 5.24)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _packed_sequences(position_ids, mask, cache):
    """(cu_seqlens, longest) when one row packs several examples (transformers' DataCollatorWithFlattening:
    position_ids restarting at 0, no attention mask, no cache), else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or mask is not None:
        return None
    if cache is not None and cache.get_seq_length() > 0:
        return None
    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() <= 1 and (starts.numel() == 0 or int(starts[0]) == 0):
        return None  # one example: the padded path is the same
    total = pos.numel()
    if int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 for the first example")
    bounds = torch.cat([starts, torch.tensor([total], device=starts.device)])
    lengths = bounds[1:] - bounds[:-1]
    expected = torch.cat([torch.arange(int(n), device=pos.device) for n in lengths.tolist()])
    if not torch.equal(pos, expected):
        raise ValueError("packed position_ids must count 0, 1, 2, ... within each example")
    return bounds.to(torch.int32), int(lengths.max())


class _CallHooks:
    """Forward pre-hook and post-hook of the model itself: take ``prefix_ids`` out of the call's kwargs (the
    model's own forward never sees it), so it reaches the decoder hook and the attention layers."""

    def __init__(self, binding: _Binding):
        self.binding = binding

    def before(self, module, args, kwargs):
        if self.binding.in_call:
            return None
        device = next(iter(module.parameters())).device
        self.binding.set_ids(kwargs.pop("prefix_ids", None), device)
        self.binding.in_call = True
        return args, kwargs

    def after(self, module, args, output):
        self.binding.in_call = False
        return None


# ---------------------------------------------------------------------------------------------- enable
def enable(model, prefix: PrefixTuning, *, freeze_model: bool = True, ignore_attention_dropout: bool = False,
           modules_to_save: Optional[List[str]] = None, save_full_model: bool = False):
    """Run ``model``'s attention through ``prefix_attention`` with ``prefix``; returns the same model object.

    ``prefix`` may be a :class:`~prefix_attn.PrefixBank`: then every call names each row's entry,
    ``model(..., prefix_ids=ids)`` / ``model.generate(..., prefix_ids=ids)`` (a LongTensor ``[batch]``, or a list
    of entry numbers or names), and each row's positions are offset by its own entry's length, as PEFT would
    with that adapter.

    Args:
        model:   a stock transformers decoder (``GPT2LMHeadModel``, ``LlamaForCausalLM``, their base models,
                 ...), not a PEFT wrapper
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

    Calling ``enable`` on an enabled model replaces its prefix.
    """
    from . import transformers as hf

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
    if getattr(config, "kv_lora_rank", None) is not None:
        raise NotImplementedError(f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank): its "
                                  f"keys and values have different head sizes; prefix_attn does not support it")
    prefix.check_compatible(config)
    modules = attention_modules(model)
    shape = prefix_shape_from_config(config)
    found = sorted(m.layer_idx for m in modules)
    if found != list(range(shape.num_layers)):
        raise ValueError(f"expected one attention layer per index 0..{shape.num_layers - 1} in "
                         f"{type(model).__name__}, found layer_idx {found}")
    for m in modules:  # the config can say one thing and the weights another
        kv_out = _kv_out_features(m)
        if kv_out is not None and kv_out != shape.num_kv_heads * shape.head_dim:
            raise ValueError(f"{type(m).__name__} {m.layer_idx} projects keys to {kv_out} features but the "
                             f"prefix has {PrefixShape.describe(prefix.shape)}")

    for m in prefix.modules():  # hidden-state prefixes read this model's frozen key/value projections
        if isinstance(m, PrefixTuning) and m.parameterization == "hidden":
            m.bind(modules)
    runner = _runner(model, modules)
    mask_positions = _position_rule(runner)
    hf.register()
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
    binding = _Binding(prefix, previous, unfrozen, ignore_attention_dropout)
    binding.modules_to_save, binding.save_full_model = saved, bool(save_full_model)
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    if config._attn_implementation != hf.ATTN_IMPLEMENTATION:
        _restore(model, binding)
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation='{hf.ATTN_IMPLEMENTATION}' "
                           f"(its attention does not go through transformers' AttentionInterface)")
    model.add_module(SUBMODULE, prefix)
    for m in modules:
        m._prefix_attn_binding = binding
    binding.attention_modules = modules  # in layer order: what a hidden-state prefix projects through
    hooks = _DecoderHooks(binding, mask_positions)
    calls = _CallHooks(binding)
    binding.handles = [model.register_forward_pre_hook(calls.before, with_kwargs=True),
                       model.register_forward_hook(calls.after, always_call=True),
                       runner.register_forward_pre_hook(hooks.before, with_kwargs=True),
                       runner.register_forward_hook(hooks.after, always_call=True)]
    model._prefix_attn_binding = binding
    from .checkpoints import save_pretrained  # noqa: PLC0415 - it imports this module

    model.save_pretrained = functools.partial(save_pretrained, model)
    model.print_trainable_parameters = functools.partial(print_trainable_parameters, model)
    model.get_nb_trainable_parameters = functools.partial(get_nb_trainable_parameters, model)
    binding.previous_ignore = model.__dict__.get("_keys_to_ignore_on_save", _NOT_SET)
    set_saved_keys(model)
    if binding.is_bank and hasattr(model, "generate"):
        model.generate = functools.partial(generate, model)
    return model


def generate(model, *args, prefix_ids=None, **kwargs):
    """``model.generate`` of a model enabled with a PrefixBank: ``prefix_ids`` (one per input row) is held for
    the whole generation and repeated for each row's beams / return sequences, as generate() repeats the rows."""
    binding = model._prefix_attn_binding
    binding.generate_ids = None if prefix_ids is None else binding.prefix.ids(prefix_ids, device=model.device)
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        binding.generate_ids = None


def _restore(model, binding: _Binding) -> None:
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
    for m in binding.attention_modules:
        if getattr(m, "_prefix_attn_binding", None) is binding:
            del m._prefix_attn_binding
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
