"""Count reads of tensor values on the host (each one a synchronisation when the tensor is on a GPU).

``with HostReads() as reads: ...`` patches the ways Python code reads a tensor's values: ``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``bool()`` / ``int()`` / ``float()`` / ``operator.index`` of a tensor, ``nonzero``,
``unique`` and ``torch.equal``; ``reads.count`` is the number of such calls made from the package's or
transformers' code (the nearest such frame on the stack decides; calls from inside Triton, e.g. its interpreter
reading the arguments of a launch, are not the package's). ``reads.where`` lists them by file and line.
"""

from __future__ import annotations

import collections
import os
import sys

import torch

_PACKAGE = os.sep + "prefix_attn" + os.sep
_COUNTED = (_PACKAGE, os.sep + "transformers" + os.sep)
_NOT_OURS = (os.sep + "triton" + os.sep,)
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")
_FUNCTIONS = ("equal", "nonzero", "unique")


class HostReads:
    def __init__(self):
        self.where = collections.Counter()
        self._saved = []
        self._busy = False

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _caller(self):
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if any(p in name for p in _NOT_OURS) and _PACKAGE not in name:
                return None
            if any(p in name for p in _COUNTED):
                if name.endswith(os.path.join("tests", "host_reads.py")):
                    return None
                return f"{name.split(os.sep + 'site-packages' + os.sep)[-1]}:{frame.f_lineno}"
            frame = frame.f_back
        return None

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if not self._busy:  # a read inside a counted read (torch.unique calling .item()) is the same read
                self._busy = True
                try:
                    where = self._caller()
                    if where is not None:
                        self.where[where] += 1
                    return fn(*args, **kwargs)
                finally:
                    self._busy = False
            return fn(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved.append((torch.Tensor, name, original if name in torch.Tensor.__dict__ else None))
            setattr(torch.Tensor, name, self._wrap(original))
        for name in _FUNCTIONS:
            original = getattr(torch, name)
            self._saved.append((torch, name, original))
            setattr(torch, name, self._wrap(original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            if original is None:  # inherited (from torch._C.TensorBase): remove the patch
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved = []
        return False
