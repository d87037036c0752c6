"""What of an enabled model is trainable, and so what its checkpoints hold: the prefix (``model.prefix_attn``), the
``modules_to_save`` and whatever else has ``requires_grad``; PEFT's parameter counts."""

from __future__ import annotations

from typing import List, Optional

SUBMODULE = "prefix_attn"  # the enabled model's attribute that holds the prefix
_NOT_SET = object()


def modules_to_save_names(model, names: List[str]) -> List[str]:
    """The dotted names of the modules that ``modules_to_save`` names (PEFT's rule: equal, or ending with
    ``"." + name``); ValueError naming what matched nothing."""
    if isinstance(names, str):
        names = [names]
    found = []
    for key in names:
        hits = [n for n, _ in model.named_modules() if n and (n == key or n.endswith("." + key))]
        if not hits:
            raise ValueError(f"modules_to_save: no module of {type(model).__name__} is named {key!r} (or ends with "
                             f"'.{key}')")
        found += [h for h in hits if h not in found]
    return found


def trainable_keys(model) -> set:
    """State-dict keys of what training changes: the prefix (``prefix_attn.*``) and every parameter with
    ``requires_grad`` (under each of its names, for tied weights)."""
    state = model.state_dict(keep_vars=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k for k, v in state.items() if k.startswith(SUBMODULE + ".") or id(v) in trainable}


def set_saved_keys(model, full: Optional[bool] = None) -> None:
    """What ``save_pretrained`` writes: every weight (``full``), or only :func:`trainable_keys` -- the frozen rest
    goes into the model's ``_keys_to_ignore_on_save``, which is also how Trainer recognises, when it resumes,
    that the missing base weights were left out on purpose."""
    binding = model._prefix_attn_binding
    full = binding.save_full_model if full is None else full
    own = binding.previous_ignore
    base = set() if own is _NOT_SET or own is None else set(own)
    if not full:
        base |= set(model.state_dict(keep_vars=True)) - trainable_keys(model)
    model._keys_to_ignore_on_save = base


def get_nb_trainable_parameters(model):
    """(trainable parameters, all parameters) of an enabled model, as PEFT's method of that name counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model) -> None:
    """PEFT's one-line summary: ``trainable params: ... || all params: ... || trainable%: ...``."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


