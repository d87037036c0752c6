"""The per-model binding: the settings of one ``enable`` call, and the values resolved once per forward.

``enable`` (``hf_model.py``) sets one :class:`Binding` on the model and on each attention layer. The decoder's
pre-hook (``hooks.py``) calls :meth:`Binding.resolve` once per forward: with a bank, each row's entry as int32 ids
on the device (validated once) and the entries' lengths; the packing of a packed row (found by the hook). Every
attention layer of that forward then passes the very same tensors to the op, whose value checks and the bank's
row grouping for the backward are memoised per tensor (``prefix_attn.checks``): no host read per layer.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch

from .. import checks
from ..bank import PrefixBank


class Binding:
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
        self.step: Optional[tuple] = None  # (batch, device, bank args) resolved for the running forward
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
        self.attention_modules = []  # the modules that read the prefix, in its layer order
        self.all_modules = []  # every attention module running "prefix_attn" (an encoder-decoder's too)
        self.layout = None  # an encoder-decoder's layout ("peft" / "li_liang")
        self.position_shift = 0  # an encoder-decoder: what the decoder's positions are shifted by, this forward

    def __getstate__(self) -> Dict:
        state = self.__dict__.copy()
        state["kv"] = state["kv_after"] = state["row_ids"] = state["generate_ids"] = state["packed"] = None
        state["seq_idx"] = None
        state["lengths"] = {}
        state["step"] = None
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

    def row_values(self, batch: int) -> List[int]:
        """This forward's entry per row as a host list: one read per ids tensor (PrefixBank.ids read it already
        when it checked the range), none under generate() after its first step."""
        if self.row_ids is None and self.generate_ids is not None:
            rows = self.generate_ids.shape[0]
            if rows and batch % rows == 0:  # generate() repeats each row for its beams / return sequences
                return [v for v in checks.host_list(self.generate_ids) for _ in range(batch // rows)]
        if self.row_ids is None:
            raise ValueError(f"this model is enabled with a PrefixBank ({len(self.prefix)} entries): pass "
                             f"prefix_ids=... (a LongTensor [batch] or a list of entry names) to the call or to "
                             f"generate()")
        if self.row_ids.shape[0] != batch:
            raise ValueError(f"prefix_ids has {self.row_ids.shape[0]} entries but the batch has {batch} rows "
                             f"(with num_beams or num_return_sequences, pass prefix_ids as a tensor so generate() "
                             f"expands it)")
        return checks.host_list(self.row_ids)

    def offsets(self, batch: int, device):
        """The position shift of each row: its own prefix length (PEFT's, per adapter); an int for one prefix."""
        if not self.is_bank:
            return self.num_virtual_tokens
        args = self.bank_args(batch, device)
        return args["prefix_lengths"].long()[args["prefix_ids"].long()][:, None]

    def resolve(self, batch: int, device) -> None:
        """Once per forward (the decoder hook): the bank's per-row arguments of this batch, kept for every layer
        (and for activation checkpointing's recompute after the forward)."""
        self.step = None
        if self.is_bank:
            self.step = (batch, device, self._bank_args(batch, device))

    def bank_args(self, batch: int, device) -> Dict:
        """prefix_ids / prefix_lengths for prefix_attention, {} for one prefix: those of this forward when it
        resolved them, else made now (an attention layer called on its own)."""
        if not self.is_bank:
            return {}
        if self.step is not None and self.step[0] == batch and self.step[1] == device:
            return self.step[2]
        return self._bank_args(batch, device)

    def _bank_args(self, batch: int, device) -> Dict:
        lengths = self.lengths.get(device)
        if lengths is None:  # one host-to-device copy per device, its values known on the host
            entry_p = [m.num_virtual_tokens for m in self.prefix.entries]
            lengths = self.lengths[device] = checks.trust(self.prefix.lengths(device))
            checks.known(lengths, "min_max", (min(entry_p), max(entry_p)))
        values = self.row_values(batch)
        # made from the host list: its range and the row grouping of the backward are known without a read
        return {"prefix_ids": checks.from_host(values, device, row_groups=True), "prefix_lengths": lengths}

    def _versions(self):
        return tuple(p._version for p in self.prefix.parameters())

    def begin_forward(self) -> None:
        if self.depth == 0:
            kv = self.prefix.key_value(self.attention_modules)
            self.kv_after = None
            if kv.grad_fn is not None and not torch.compiler.is_compiling():
                kv = HoldForBackward.apply(kv)
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


class HoldForBackward(torch.autograd.Function):
    """Identity that keeps its input alive for as long as the graph that used it (see ``Binding``)."""

    @staticmethod
    def forward(ctx, kv):
        ctx.save_for_backward(kv)
        return kv.view_as(kv)

    @staticmethod
    def backward(ctx, grad):
        return grad
