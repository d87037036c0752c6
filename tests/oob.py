"""Out-of-bounds checks for Triton kernels under TRITON_INTERPRET=1.

The interpreter reads and writes host memory at whatever address a kernel computes: an access past a tensor
reads garbage or corrupts memory silently, where a GPU raises "illegal memory access". Inside ``bounds_checked()``
every load and store of an interpreted kernel is checked: each active (unmasked) address, with its element
size, must lie inside the storage of one of the kernel's tensor arguments; the first one that does not raises
``OutOfBounds`` naming the kernel, the address and the nearest argument.

    with bounds_checked() as log:
        prefix_attention(...)          # raises OutOfBounds on the first stray access
    log.accesses                       # how many loads / stores were checked
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np


class OutOfBounds(AssertionError):
    pass


class _Log:
    def __init__(self):
        self.accesses = 0
        self.kernel = None
        self.ranges = []  # [(lo, hi, name)] of the running kernel's tensor arguments


def _ranges(fn, args_hst, kwargs_hst):
    names = inspect.getfullargspec(fn).args
    out = []
    for name, arg in list(zip(names, args_hst)) + list(kwargs_hst.items()):
        if hasattr(arg, "untyped_storage"):
            storage = arg.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))
    return out


def _check(log: _Log, ptrs, mask, itemsize: int, what: str):
    active = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]  # unmasked loads: all ones
    log.accesses += 1
    if active.size == 0:
        return
    ok = np.zeros(active.shape, dtype=bool)
    for lo, hi, _ in log.ranges:
        ok |= (active >= lo) & (active + itemsize <= hi)
    if not ok.all():
        bad = int(active[~ok].reshape(-1)[0])
        near = min(log.ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=(0, 0, "?"))
        raise OutOfBounds(f"{log.kernel}: {what} at {bad:#x}, {int((~ok).sum())} of {active.size} active lanes "
                          f"outside every tensor argument (nearest: {near[2]} [{near[0]:#x}, {near[1]:#x}))")


@contextlib.contextmanager
def bounds_checked():
    """Check every load and store of the Triton kernels interpreted inside the block (TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter as interp

    log = _Log()
    builder = interp.interpreter_builder
    executor = interp.GridExecutor
    saved = (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved[0](self, args_dev, kwargs)
        log.kernel = getattr(self.fn, "__name__", str(self.fn))
        log.ranges = _ranges(self.fn, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        _check(log, ptrs, mask, np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return saved[1](ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        _check(log, ptrs, mask, np.asarray(value.data).dtype.itemsize, "store")
        return saved[2](ptrs, value, mask, cache_policy)

    executor._init_args_hst = init_args
    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    try:
        yield log
    finally:
        executor._init_args_hst = saved[0]
        builder.create_masked_load = saved[1]
        builder.create_masked_store = saved[2]
