"""``PrefixBank``: several prefixes for one model, chosen per batch row.

    bank = prefix_attn.PrefixBank({"summarize": prefix_a, "translate": prefix_b})   # P may differ per entry
    prefix_attn.enable(model, bank)
    model(input_ids, attention_mask=mask, prefix_ids=torch.tensor([0, 1, 1]))        # or ["summarize", ...]
    model.generate(input_ids, attention_mask=mask, prefix_ids=ids, num_beams=4)      # beams keep their row's

The bank holds the :class:`~prefix_attn.PrefixTuning` modules it was given (``bank[0]`` / ``bank["summarize"]``
is that very object), so their parameters are what trains, and an entry can be saved or enabled alone
afterwards. Per forward, :meth:`key_value` stacks the entries into one ``[num_layers, 2, N, heads_kv, P_max,
head_dim]`` bank (entries shorter than ``P_max`` zero-padded, their extra slots hidden by ``lengths``); each row
reads its entry in place inside the attention kernels, never gathered into a per-row copy.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import checks
from .prefix import PrefixShape, PrefixTuning

__all__ = ["PrefixBank"]

_INDEX = "bank.json"


class PrefixBank(nn.Module):
    """An ordered set of prefixes of one model shape.

    Args:
        prefixes: a list of :class:`PrefixTuning` (named ``"0"``, ``"1"``, ...) or a ``{name: PrefixTuning}``
                  dict (insertion order gives the entry numbers); all of one model shape, ``P`` may differ
    """

    def __init__(self, prefixes: Union[Sequence[PrefixTuning], Mapping[str, PrefixTuning]]):
        super().__init__()
        if isinstance(prefixes, Mapping):
            names, mods = [str(n) for n in prefixes], list(prefixes.values())
        else:
            mods = list(prefixes)
            names = [str(i) for i in range(len(mods))]
        if not mods:
            raise ValueError("a PrefixBank needs at least one prefix")
        for name, m in zip(names, mods):
            if not isinstance(m, PrefixTuning):
                raise TypeError(f"bank entry {name!r} must be a prefix_attn.PrefixTuning, got {type(m).__name__}")
            if m.shape != mods[0].shape:
                raise ValueError(f"bank entry {name!r} has shape {m.shape.describe()}, entry {names[0]!r} has "
                                 f"{mods[0].shape.describe()}: a bank holds prefixes of one model shape")
        if len(set(names)) != len(names):
            raise ValueError(f"bank entry names must be unique, got {names}")
        self.entries = nn.ModuleList(mods)
        self.names = names

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: Union[int, str]) -> PrefixTuning:
        return self.entries[self.index(key)]

    def index(self, key: Union[int, str]) -> int:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no bank entry named {key!r}; entries: {self.names}")
            return self.names.index(key)
        i = int(key)
        if not 0 <= i < len(self.entries):
            raise IndexError(f"bank entry {i} out of range: the bank has {len(self.entries)} entries")
        return i

    def ids(self, keys, device=None) -> torch.Tensor:
        """``prefix_ids`` as a LongTensor ``[B]`` from entry numbers and/or names (a tensor passes through)."""
        if isinstance(keys, torch.Tensor):
            if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
                raise ValueError(f"prefix_ids must be an integer tensor [batch], got {keys.dtype} of shape "
                                 f"{tuple(keys.shape)}")
            if torch.compiler.is_compiling():
                return keys.to(device=device or keys.device, dtype=torch.long)
            values = checks.host_list(keys)  # one host read per ids tensor (memoised)
            if values and (min(values) < 0 or max(values) >= len(self.entries)):
                raise ValueError(f"prefix_ids must lie in [0, {len(self.entries)}) (the bank's entries), got "
                                 f"values from {min(values)} to {max(values)}")
            ids = keys.to(device=device or keys.device, dtype=torch.long)
            checks.known(ids, "list", values)
            return ids
        return torch.tensor([self.index(k) for k in keys], dtype=torch.long, device=device)

    @property
    def shape(self) -> PrefixShape:
        return self.entries[0].shape

    @property
    def num_virtual_tokens(self) -> int:
        """The longest entry's ``P`` (the bank's slot count)."""
        return max(m.num_virtual_tokens for m in self.entries)

    def lengths(self, device=None) -> torch.Tensor:
        """int32 ``[N]``: each entry's own ``P``."""
        return torch.tensor([m.num_virtual_tokens for m in self.entries], dtype=torch.int32, device=device)

    def check_compatible(self, config_or_shape) -> None:
        for m in self.entries:
            m.check_compatible(config_or_shape)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: P={m.num_virtual_tokens}" for n, m in zip(self.names, self.entries))
        return f"{len(self)} entries ({sizes})"

    # ------------------------------------------------------------------ values
    def key_value(self, attention_modules=None) -> torch.Tensor:
        """``[num_layers, 2, N, heads_kv, P_max, head_dim]``, differentiable into every entry
        (``attention_modules``: see :meth:`PrefixTuning.key_value`)."""
        p_max = self.num_virtual_tokens
        kvs = []
        for m in self.entries:
            kv = m.key_value(attention_modules)  # [L, 2, Hkv, P, D]
            if kv.shape[3] < p_max:
                kv = torch.nn.functional.pad(kv, (0, 0, 0, p_max - kv.shape[3]))
            kvs.append(kv)
        return torch.stack(kvs, dim=2)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str) -> str:
        """A directory: ``bank.json`` (names in entry order) and one :meth:`PrefixTuning.save` file per entry."""
        os.makedirs(path, exist_ok=True)
        files = []
        for i, m in enumerate(self.entries):
            files.append(f"entry_{i}.safetensors")
            m.save(os.path.join(path, files[-1]))
        with open(os.path.join(path, _INDEX), "w") as f:
            json.dump({"format": "prefix_attn.bank/1", "names": self.names, "files": files}, f, indent=1)
        return path

    @classmethod
    def load(cls, path: str, *, device=None, dtype: Optional[torch.dtype] = None) -> "PrefixBank":
        """Inverse of :meth:`save`."""
        index = os.path.join(path, _INDEX)
        if not os.path.isfile(index):
            raise FileNotFoundError(f"{index} not found: {path} is not a saved PrefixBank")
        with open(index) as f:
            meta = json.load(f)
        entries = {name: PrefixTuning.load(os.path.join(path, file), device=device, dtype=dtype)
                   for name, file in zip(meta["names"], meta["files"])}
        return cls(entries)

    @classmethod
    def from_peft_adapters(cls, paths: Mapping[str, str], config=None, *, dtype: torch.dtype = torch.float32,
                           device=None) -> "PrefixBank":
        """A bank of saved PEFT prefix-tuning adapter directories, ``{name: path}`` (see
        :meth:`PrefixTuning.from_peft_adapter`)."""
        entries: Dict[str, PrefixTuning] = {
            name: PrefixTuning.from_peft_adapter(p, config, dtype=dtype, device=device) for name, p in paths.items()}
        return cls(entries)
