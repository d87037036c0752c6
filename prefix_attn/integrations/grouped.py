"""Grouped-prompt forward (GRPO / RLOO / DAPO groups): ``N`` prompts with ``G`` completions each, every prompt
computed once.

    prefix_attn.enable_grouped(model)     # once: attention through prefix_attn's op (or enable a prefix)
    out = prefix_attn.grouped_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size=G)
    out.prompt_logits       # [N, Lp, V]
    out.completion_logits   # [N * G, Lc, V]
    out.completion_log_probs(completion_ids)   # [N * G, Lc], GRPO's per-token log-probs

equals, in values and in the gradients of every trainable parameter, the stock call on the repeated batch::

    ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion_ids], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits       # split at Lp

How: the model runs once on one row holding the ``N * Lp`` prompt tokens and then the ``N * G * Lc`` completion
tokens, with the positions the stock call gives them (``0 .. Lp - 1`` for a prompt, ``Lp .. Lp + Lc - 1`` for a
completion). Every attention layer (``attention.prefix_attention_forward``, which finds the :class:`Groups` of this
call among its kwargs) splits its queries, keys and values back into the prompts ``[N, H, Lp, D]`` and the
completions ``[N * G, H, Lc, D]`` (views), runs the prompts' causal attention, and then the completions' with their
prompts' K/V as a bank read in place (``prefix_ids`` = the group of each completion, ``prefix_lengths`` = each
prompt's unpadded length): the prompt's gradient comes back summed over its completions, inside the kernel. So the
embeddings, MLPs and attention projections see each prompt once, not ``G`` times, and no ``[N * G, ...]`` copy of a
prompt is made. Since :class:`Groups` travels with the call's kwargs, activation checkpointing recomputes a layer
with the same split.

With a prefix enabled (``prefix_attn.enable(model, PrefixTuning(...))``) each prompt's entry is the prefix followed
by the prompt (a ``cat`` into ``[N, Hkv, P + Lp, D]`` for K and for V per layer, N not N * G), and positions are
shifted by ``P`` as for any call of that model. Padded prompt keys (any padding side) are moved behind the unpadded
ones in the entry (a gather of ``[N, Hkv, Lp, D]`` for K and for V per layer, only when some prompt is padded): the
kernel reads an entry's first ``prefix_lengths`` slots.

Dropout in training mode: attention dropout runs in the kernels; the embedding and residual dropout of a prompt's
tokens is drawn once and shared by its G completions, where the stock batch draws G independent masks (equal
per row in distribution, not jointly). GRPO is usually trained with dropout off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import checks
from ..ops import prefix_attention
from .attention import ATTN_IMPLEMENTATION, GROUPS_KWARG, grouped_call, register
from .model_parts import _own_config, attention_modules

__all__ = ["GroupedOutput", "Groups", "grouped_forward", "enable_grouped", "disable_grouped", "SUPPORTED_MODEL_TYPES"]

# absolute positions 0, 1, ... over the concatenated row whatever the padding, one self-attention per layer, no
# attention bias: the families whose stock call grouped_forward reproduces (tests/test_grouped.py)
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
_GROUPED = "_prefix_attn_grouped"  # on a stock model: the attention implementation enable_grouped replaced


@dataclass
class GroupedOutput:
    """``prompt_logits [N, Lp, V]`` (``[N, 1, V]``, the last prompt position only, with ``completion_only=True``)
    and ``completion_logits [N * G, Lc, V]``: views of ``logits [R, V]``, the one row the model computed."""

    prompt_logits: torch.Tensor
    completion_logits: torch.Tensor
    group_size: int
    logits: torch.Tensor

    def completion_log_probs(self, completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """float32 ``[N * G, Lc]`` (float64 for float64 logits): log p(completion token j | prompt, tokens < j), as
        GRPO takes them (TRL's per-token log-probs of ``logits[:, Lp - 1:-1] / temperature``): token 0 from the
        prompt's last position (shared by its group, computed once), token j > 0 from completion position j - 1.
        Memory: the chosen logits minus each position's log-sum-exp, computed over blocks of positions in float32;
        the backward writes the logits' gradient in their own dtype, one block at a time (no float32 copy of the
        logits)."""
        rows, length = self.completion_logits.shape[:2]
        if tuple(completion_ids.shape) != (rows, length):
            raise ValueError(f"completion_ids must be [{rows}, {length}], got {list(completion_ids.shape)}")
        n, prompt_len = self.prompt_logits.shape[:2]
        device = completion_ids.device
        first = torch.arange(prompt_len - 1, n * prompt_len, prompt_len, device=device)  # each prompt's last
        start = n * prompt_len + torch.arange(rows, device=device)[:, None] * length  # each completion's first
        # the positions read: each prompt's last, each completion's but its last ([N + N * G * (Lc - 1)], no
        # repeats); where each token's logits are among them
        used = torch.cat([first, (start + torch.arange(length - 1, device=device)[None, :]).reshape(-1)])
        where = torch.cat([torch.arange(n, device=device).repeat_interleave(self.group_size)[:, None],
                           n + torch.arange(rows * (length - 1), device=device).view(rows, length - 1)], 1)
        out = _SelectiveLogProbs.apply(self.logits, used, where.reshape(-1), completion_ids.reshape(-1).long(),
                                       float(temperature))
        return out.view(rows, length)


class _SelectiveLogProbs(torch.autograd.Function):
    """``logits [R, V]``, ``used [U]`` (distinct rows), ``where [M]`` (into ``used``), ``tokens [M]`` -> ``[M]`` in
    float32 (float64 for float64 logits): ``log_softmax(logits[used[where]] / T)`` at ``tokens``, over blocks of
    the used rows (about 2**26 values at a time); rows not used get a zero gradient."""

    @staticmethod
    def _blocks(rows: int, vocab: int):
        step = max(1, (1 << 26) // max(vocab, 1))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]

    @staticmethod
    def _scaled(logits, rows, acc, temperature):
        x = logits.index_select(0, rows).to(acc)
        return x.div_(temperature) if temperature != 1.0 else x

    @staticmethod
    def forward(ctx, logits, used, where, tokens, temperature):
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(used.shape[0], dtype=acc, device=logits.device)
        for a, b in _SelectiveLogProbs._blocks(used.shape[0], logits.shape[1]):
            lse[a:b] = torch.logsumexp(_SelectiveLogProbs._scaled(logits, used[a:b], acc, temperature), -1)
        ctx.save_for_backward(logits, used, where, tokens, lse)
        ctx.temperature = temperature
        return logits[used[where], tokens].to(acc) / temperature - lse[where]

    @staticmethod
    def backward(ctx, grad):
        logits, used, where, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        # d out_m / d logits[u] = ([u = used[where_m]] e_{tokens_m} - [u = used[where_m]] softmax(logits[u] / T)) / T
        g = grad.to(lse.dtype)
        weight = torch.zeros_like(lse).index_add_(0, where, g)  # [U]: the sum of grad over each row's picks
        blocks = _SelectiveLogProbs._blocks(used.shape[0], logits.shape[1])
        order = torch.argsort(where, stable=True)
        starts = torch.tensor([a for a, _ in blocks] + [used.shape[0]], device=where.device)
        bounds = torch.searchsorted(where[order], starts).tolist()  # the one host read of the backward
        out = torch.zeros_like(logits)
        for i, (a, b) in enumerate(blocks):
            block = _SelectiveLogProbs._scaled(logits, used[a:b], lse.dtype, t)
            block.sub_(lse[a:b, None]).exp_().mul_(-weight[a:b, None] / t)
            picks = order[bounds[i]:bounds[i + 1]]  # the picks on these rows: added in float32, rounded once
            block.index_put_((where[picks] - a, tokens[picks]), g[picks] / t, accumulate=True)
            out.index_copy_(0, used[a:b], block.to(logits.dtype))
        return out, None, None, None, None


class Groups:
    """The split of one grouped call, resolved once (one host read of the masks) and read by every layer.

    Per device the layers run on (a model split over devices): ``prompt_keys [N, Lp]`` / ``completion_keys [N * G,
    Lc]`` bool key masks (None when nothing is padded), ``ids [N * G]`` int32 (each completion's prompt), ``order
    [N, Lp]`` int64 (each prompt's unpadded slots first; None when no prompt is padded); ``valid``: each prompt's
    unpadded length (host list).
    """

    def __init__(self, num_prompts: int, group_size: int, prompt_len: int, completion_len: int,
                 prompt_mask: torch.Tensor, completion_mask: torch.Tensor):
        self.n, self.g, self.lp, self.lc = num_prompts, group_size, prompt_len, completion_len
        pmask, cmask = prompt_mask.to(torch.bool), completion_mask.to(torch.bool)
        stats = torch.cat([pmask.sum(1), cmask.all().reshape(1).long()]).tolist()  # the one host read of the call
        self.valid = stats[:num_prompts]
        padded = any(v != prompt_len for v in self.valid)
        self._masks = (pmask if padded else None,
                       torch.argsort((~pmask).to(torch.int8), dim=1, stable=True) if padded else None,
                       None if stats[num_prompts] else cmask)
        self._values = [i for i in range(num_prompts) for _ in range(group_size)]
        self._devices = {}
        self._lengths = {}

    def on(self, device) -> dict:
        """prompt_keys, order, completion_keys, ids on ``device`` (made once per device)."""
        if device not in self._devices:
            prompt_keys, order, completion_keys = (None if t is None else t.to(device) for t in self._masks)
            self._devices[device] = dict(prompt_keys=prompt_keys, order=order, completion_keys=completion_keys,
                                         ids=checks.from_host(self._values, device, row_groups=True))
        return self._devices[device]

    def lengths(self, num_prefix: int, device) -> Optional[torch.Tensor]:
        """int32 ``[N]`` on ``device``: the visible slots of each entry (prefix + unpadded prompt); None when all
        are."""
        key = (num_prefix, device)
        if key not in self._lengths:
            values = [num_prefix + v for v in self.valid]
            padded = any(v != num_prefix + self.lp for v in values)
            self._lengths[key] = checks.from_host(values, device) if padded else None
        return self._lengths[key]

    @staticmethod
    def _entries(prompt: torch.Tensor, prefix: Optional[torch.Tensor], order: Optional[torch.Tensor]) -> torch.Tensor:
        """``prompt [N, Hkv, Lp, D]`` (+ ``prefix [Hkv, P, D]``) -> the bank ``[N, Hkv, P + Lp, D]``."""
        if order is not None:
            prompt = prompt.gather(2, order[:, None, :, None].expand(prompt.shape))
        if prefix is not None and prefix.shape[1]:
            prefix = prefix.to(dtype=prompt.dtype, device=prompt.device)
            prompt = torch.cat([prefix.unsqueeze(0).expand(prompt.shape[0], -1, -1, -1), prompt], 2)
        return prompt

    def attention(self, query, key, value, prefix_k, prefix_v, *, causal: bool, scaling, softcap: float,
                  dropout_p: float) -> torch.Tensor:
        """One layer: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` with ``T = N * Lp + N * G * Lc``,
        ``prefix_k/v [Hkv, P, D]`` or None -> ``[1, T, Hq, D]``."""
        n, g, lp, lc = self.n, self.g, self.lp, self.lc
        total = n * lp + n * g * lc
        if not causal or query.shape[0] != 1 or query.shape[2] != total or key.shape[2] != total:
            raise ValueError(f"grouped_forward: an attention layer got query {tuple(query.shape)} and key "
                             f"{tuple(key.shape)}; expected one causal row of {total} tokens and no cache")

        def split(t, start, rows, length):  # [1, H, T, D] -> [rows, H, length, D], a view
            return t[0, :, start:start + rows * length].unflatten(1, (rows, length)).transpose(0, 1)

        qp, kp, vp = (split(t, 0, n, lp) for t in (query, key, value))
        qc, kc, vc = (split(t, n * lp, n * g, lc) for t in (query, key, value))
        if prefix_k is None:
            prefix_k = prefix_v = key.new_zeros(key.shape[1], 0, key.shape[3])
        elif prefix_k.dtype != query.dtype or prefix_k.device != query.device:
            prefix_k = prefix_k.to(device=query.device, dtype=query.dtype)
            prefix_v = prefix_v.to(device=query.device, dtype=query.dtype)
        common = dict(softmax_scale=scaling, softcap=softcap, dropout_p=dropout_p)
        here = self.on(query.device)
        out_p = prefix_attention(qp, kp, vp, prefix_k, prefix_v, attention_mask=here["prompt_keys"], **common)
        bank_k, bank_v = (self._entries(t, p, here["order"]) for t, p in ((kp, prefix_k), (vp, prefix_v)))
        out_c = prefix_attention(qc, kc, vc, bank_k, bank_v, attention_mask=here["completion_keys"],
                                 prefix_ids=here["ids"], prefix_lengths=self.lengths(prefix_k.shape[1], query.device),
                                 **common)
        out = torch.cat([out_p.transpose(1, 2).flatten(0, 1), out_c.transpose(1, 2).flatten(0, 1)], 0)
        return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- the model
def _check_model(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"grouped_forward supports the decoder families {SUPPORTED_MODEL_TYPES} (positions "
                                  f"0, 1, ... over the concatenated row, one causal self-attention per layer); "
                                  f"{type(model).__name__} (model_type={model_type!r}) is not one of them")
    binding = getattr(model, "_prefix_attn_binding", None)
    if binding is not None and binding.is_bank:
        raise NotImplementedError("grouped_forward on a model enabled with a PrefixBank: not supported (enable it "
                                  "with one PrefixTuning, or with none)")


def enable_grouped(model):
    """Run a stock model's attention through prefix_attn's op (the attention implementation ``"prefix_attn"`` with
    no prefix) until :func:`disable_grouped`, as :func:`grouped_forward` needs: the switch outlives each call, so
    activation checkpointing (of any kind) recomputes the layers in the backward with the same attention. Other
    calls (``generate()``, a plain forward) compute the stock values, through SDPA with a key mask (no sliding
    window shorter than the keys, no softcap: refused with the reason). A no-op on a model enabled with a prefix (it
    runs ``"prefix_attn"`` already) or already switched. Returns the model."""
    _check_model(model)
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        return model
    register()
    previous = _own_config(model)._attn_implementation
    for m in attention_modules(model):
        m._prefix_attn_plain = True
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, _GROUPED, previous)
    return model


def disable_grouped(model):
    """Undo :func:`enable_grouped` (the previous attention implementation); a no-op otherwise."""
    previous = model.__dict__.pop(_GROUPED, None)
    if previous is None:
        return model
    for m in attention_modules(model):
        m.__dict__.pop("_prefix_attn_plain", None)
    binding = getattr(model, "_prefix_attn_binding", None)
    if binding is not None:  # a prefix enabled since: it keeps "prefix_attn"; its disable() restores the stock one
        binding.previous_attn = previous
        return model
    model.set_attn_implementation(previous)
    return model


def _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size):
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    for name, t in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask), ("completion_ids", completion_ids),
                    ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    n, lp = prompt_ids.shape
    rows, lc = completion_ids.shape
    if tuple(prompt_mask.shape) != (n, lp):
        raise ValueError(f"prompt_mask must be [num_prompts={n}, prompt_len={lp}] as prompt_ids, got "
                         f"{tuple(prompt_mask.shape)}")
    if rows != n * group_size:
        raise ValueError(f"completion_ids must be [num_prompts * group_size={n * group_size}, completion_len], got "
                         f"{tuple(completion_ids.shape)} (num_prompts={n}, group_size={group_size})")
    if tuple(completion_mask.shape) != (rows, lc):
        raise ValueError(f"completion_mask must be [{rows}, completion_len={lc}] as completion_ids, got "
                         f"{tuple(completion_mask.shape)}")
    if n == 0 or lp == 0 or lc == 0:
        raise ValueError(f"grouped_forward needs at least one prompt token and one completion token per row; got "
                         f"prompt_ids {tuple(prompt_ids.shape)}, completion_ids {tuple(completion_ids.shape)}")
    for name, t in (("prompt_mask", prompt_mask), ("completion_ids", completion_ids),
                    ("completion_mask", completion_mask)):
        if t.device != prompt_ids.device:
            raise ValueError(f"{name} is on {t.device} but prompt_ids is on {prompt_ids.device}")


def grouped_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, group_size: int, *, completion_only: bool = False,
                    **model_kwargs) -> GroupedOutput:
    """The logits of ``N`` prompts and their ``G`` completions each, every prompt computed once.

    Args:
        model:           a transformers causal LM of a family in ``SUPPORTED_MODEL_TYPES`` (GPT-2, Llama,
                         Mistral, Qwen2, Qwen3), stock or enabled with one ``PrefixTuning``
        prompt_ids:      ``[N, Lp]`` token ids (TRL's GRPO pads them on the left; any padding side works)
        prompt_mask:     ``[N, Lp]``, 1 = token, 0 = padding
        completion_ids:  ``[N * G, Lc]``, rows ``n * G .. n * G + G - 1`` the completions of prompt ``n``
        completion_mask: ``[N * G, Lc]``, 1 = token, 0 = padding (right padding, as TRL builds it)
        group_size:      ``G``
        completion_only: compute the logits of each prompt's last position (``prompt_logits [N, 1, V]``) and of the
                         completions only (TRL's ``logits_to_keep``); ``completion_log_probs`` needs no more
        model_kwargs:    passed to the model's forward (``use_cache`` is always False)

    Returns:
        :class:`GroupedOutput` with ``prompt_logits [N, Lp, V]`` and ``completion_logits [N * G, Lc, V]``, equal to
        the stock call on the concatenated batch (module docstring); padded positions included.

    The model must run its attention through prefix_attn's op: :func:`enable_grouped` once (a stock model), or
    ``prefix_attn.enable(model, prefix)``; otherwise ValueError.
    """
    _check_model(model)
    _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size)
    if "cache" in model_kwargs or "past_key_values" in model_kwargs:
        raise ValueError("grouped_forward runs without a KV cache (it is a training forward)")
    for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "logits_to_keep", "labels",
                 "return_dict"):
        if name in model_kwargs:
            raise ValueError(f"grouped_forward builds {name} itself; do not pass it")
    n, lp = prompt_ids.shape
    rows, lc = completion_ids.shape
    device = prompt_ids.device
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"grouped_forward needs the model's attention to run through prefix_attn's op: call "
                         f"prefix_attn.enable_grouped(model) once first (or prefix_attn.enable(model, prefix)); this "
                         f"model runs attn_implementation={model.config._attn_implementation!r}. The switch must "
                         f"outlive the call: activation checkpointing recomputes the layers in the backward")
    groups = Groups(n, group_size, lp, lc, prompt_mask, completion_mask)
    ids = torch.cat([prompt_ids.reshape(-1), completion_ids.reshape(-1)]).unsqueeze(0)
    positions = torch.cat([torch.arange(lp, device=device).repeat(n),
                           torch.arange(lp, lp + lc, device=device).repeat(rows)]).unsqueeze(0)
    # all ones: the row is one sequence to the prefix hooks (the split is the Groups')
    mask = torch.ones_like(ids)
    kwargs = dict(model_kwargs, use_cache=False, **{GROUPS_KWARG: groups})
    if completion_only:  # each prompt's last position (it predicts the completions' first token), the completions;
        # on the host: an index of any device selects rows of the last layer's output wherever it is
        kwargs["logits_to_keep"] = torch.cat([torch.arange(lp - 1, n * lp, lp),
                                              torch.arange(n * lp, n * lp + rows * lc)])
    with grouped_call():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits
    prompt_len = 1 if completion_only else lp
    logits = logits[0]
    return GroupedOutput(logits[:n * prompt_len].unflatten(0, (n, prompt_len)),
                         logits[n * prompt_len:].unflatten(0, (rows, lc)), group_size, logits)
