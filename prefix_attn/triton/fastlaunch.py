"""Kernel launches without Triton's per-call work: the compiled kernel of a specialisation, called directly.

    FastKernel(jit_fn)[grid](*args, **kwargs)    # as jit_fn[grid](*args, **kwargs)
    FastKernel(jit_fn).run(grid, *args, **kwargs)  # the same, without packing ~60 arguments twice (~1 us)

``grid`` a tuple of 1 to 3 ints; ``args`` the kernel's runtime arguments, in order (tensors, ints, floats, bools);
``kwargs`` its ``tl.constexpr`` arguments by name and the launch options (``num_warps``, ``num_stages``).

Why: a ``JITFunction.run`` binds ~50 arguments, computes Triton's specialisation of each (type, 16-byte alignment
of pointers, ``== 1`` / ``% 16`` of integers), looks up the compiled kernel and builds launch metadata: ~50 us of
host time a launch at the forward kernel's 51 arguments, where the compiled launcher itself takes ~1.5 us (issue
38). The first launch of each specialisation goes through ``JITFunction.run`` (which compiles and launches it);
after that the key is built here, in Python, from the same facts Triton specialises on, and the cached
``CompiledKernel``'s launcher is called directly, as torch inductor's generated launchers do.

The key, per kernel and call shape (how many positional arguments, which keywords in which order, the type of
every argument): the current device (as the JIT's per-device cache), the values of constexpr arguments and of
launch options, and for every runtime argument what Triton 3.6 to 3.9 specialise on (``native_specialize_impl``):
a tensor's dtype and 16-byte alignment (``data_ptr() % 16``); an int's range (i32 / i64 / u64) and, unless the
parameter is in ``do_not_specialize``, ``x == 1`` and ``x % 16 == 0`` (keyed as the value below 17, the residue mod
16 up to 2**31, the value above); nothing for floats, bools and None (their type decides). The key is never coarser
than Triton's: two calls with one key get one compiled kernel (a finer key costs a JIT call, not a compile). A call
shape with an argument of another kind (a tuple, a tensor descriptor), and a kernel with ``pre_run_hooks``, always
take the JIT path. The launcher gets every parameter's value in order, defaults filled in, as from the JIT.

``launch_enter_hook`` / ``launch_exit_hook`` (Triton 3.6+: a ``HookChain``, never None, so the JIT builds launch
metadata for every launch): when no hook is registered, the launch metadata is not built and the hooks are passed
as None; with one registered (a profiler), both are built and called as the JIT does.

Not seen after the first launch of a key (call :func:`clear`): changed values of the kernel's global constants,
Triton's debug / instrumentation knobs, a stage-inspection hook, or a new Triton driver.

``PREFIX_ATTN_FAST_LAUNCH`` (read at import; :func:`set_mode` changes it at run time):

* ``1`` (default): the fast path;
* ``0``: every launch through ``JITFunction.run`` (triage: rules this module out);
* ``check``: the fast path, and each cached launch also asks the JIT (``warmup=True``, no launch) which compiled
  kernel it would run, raising ``RuntimeError`` if it is not the cached one (tests, triage).

Under ``TRITON_INTERPRET=1`` kernels are interpreted functions, not ``JITFunction``: always ``kernel[grid](...)``.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Dict, Optional

from triton.runtime import driver as _driver
from triton.runtime.jit import JITFunction

try:  # Triton with triton.knobs (3.6, 3.9): launch hooks are HookChains
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
except ImportError:  # older Triton: the JIT path only
    _knobs = _HookChain = None

ENV_VAR = "PREFIX_ATTN_FAST_LAUNCH"
MAX_ENTRIES = 4096  # per kernel; past it the cache is emptied (keys from ever-changing huge strides, say)


def _env_mode() -> str:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "check"):
        raise ValueError(f"{ENV_VAR}={value!r}: must be 0, 1 or check")
    return value


_state = {"mode": _env_mode()}
_kernels: "weakref.WeakSet[FastKernel]" = weakref.WeakSet()
_lock = threading.Lock()


def enabled() -> bool:
    """Whether launches take the fast path (mode "1" or "check")."""
    return _state["mode"] != "0"


def set_mode(mode: Optional[str]) -> None:
    """"1", "0" or "check" (see the module docstring); None: back to ``PREFIX_ATTN_FAST_LAUNCH``."""
    if mode is None:
        mode = _env_mode()
    if mode not in ("0", "1", "check"):
        raise ValueError(f"mode must be '0', '1', 'check' or None, got {mode!r}")
    _state["mode"] = mode


def clear() -> None:
    """Forget every cached specialisation (the next launch of each goes through the JIT)."""
    for kernel in list(_kernels):
        kernel.clear()


_CONSTEXPR_KINDS = (bool, int, float, str, type(None))


def _fact_source(name: str, kind: type, specialise: bool) -> Optional[str]:
    """The key expressions of runtime argument ``name`` of type ``kind`` (see the module docstring), "" for none,
    None if its kind is not supported."""
    import torch  # noqa: PLC0415

    if issubclass(kind, torch.Tensor):  # the address mod 16: finer than Triton's "divisible by 16", as cheap
        return f"{name}.dtype, {name}.data_ptr() & 15, "
    if kind is bool or kind is float or kind is type(None):
        return ""
    if kind is int:
        if not specialise:  # the range only: i32 when x >> 31 is 0 or -1
            return f"{name} >> 31, "
        # below 17 the value itself (1 is a constexpr to Triton), then the residue mod 16 while i32, above the
        # value: finer than Triton's (range, == 1, % 16 == 0) and half the cost of computing exactly those
        return f"{name} if {name} < 17 else ({name} & 15) + 32 if {name} < 0x80000000 else ({name},), "
    return None


def _make_prep(params, nargs: int, kwnames: tuple, kinds: tuple, launch: bool = False):
    """``prep(args, kwargs) -> (key, launch_args)`` for one call shape: ``nargs`` positional arguments, keyword
    arguments ``kwnames`` in this order, all of types ``kinds`` (positional, then keyword). ``launch_args`` holds
    every parameter's value in order (defaults filled in), as the JIT passes them to the compiled launcher. None if
    the shape is not supported (the JIT then launches every call of it).

    ``launch=True``: ``(prep, go)`` with ``go(args, kwargs, entries, device, stream, g0, g1, g2)``, the whole cached
    launch in one generated function, as torch inductor's launchers: the key computed inline, the entry looked up
    (KeyError: not compiled yet) and its launcher called with every argument spelled out (no hooks: the caller
    checks that none is registered); returns the entry."""
    index = {p.name: i for i, p in enumerate(params)}
    if nargs > len(params):
        return None
    head = []
    if nargs:
        head.append(f"    {''.join(f'v{i}, ' for i in range(nargs))}= args")
    kind_of = dict(enumerate(kinds[:nargs]))
    options = []
    for name, kind in zip(kwnames, kinds[nargs:]):
        if name not in index:
            if kind not in _CONSTEXPR_KINDS:
                return None
            options.append(name)  # num_warps, num_stages, ...
            continue
        i = index[name]
        if i in kind_of:
            return None
        head.append(f"    v{i} = kw[{name!r}]")
        kind_of[i] = kind
    key, full, scope = [], [], {}
    for i, p in enumerate(params):
        if i not in kind_of:
            if not p.has_default:
                return None
            scope[f"d{i}"] = p.default  # a constant of this call shape
            full.append(f"d{i}")
            continue
        full.append(f"v{i}")
        if p.is_constexpr:
            if kind_of[i] not in _CONSTEXPR_KINDS:
                return None
            key.append(f"v{i}, ")
        else:
            src = _fact_source(f"v{i}", kind_of[i], not p.do_not_specialize)
            if src is None:
                return None
            key.append(src)
    key += [f"kw[{name!r}], " for name in options]
    key_src, full_src = "".join(key), "".join(f"{x}, " for x in full)
    lines = ["def prep(args, kw):", *head, f"    return ({key_src}), ({full_src})"]
    if launch:
        lines += ["def go(args, kw, entries, device, stream, g0, g1, g2):", *head,
                  f"    e = entries[device, ({key_src})]",
                  f"    e.launcher(g0, g1, g2, stream, e.function, e.metadata, None, None, None, {full_src})",
                  "    return e"]
    exec("\n".join(lines), scope)  # noqa: S102 - generated from the kernel's parameter list only
    return (scope["prep"], scope["go"]) if launch else scope["prep"]


class _Entry:
    __slots__ = ("launcher", "function", "metadata", "kernel")

    def __init__(self, kernel):
        self.launcher, self.function, self.metadata = kernel.run, kernel.function, kernel.packed_metadata
        self.kernel = kernel


class FastKernel:
    """One ``triton.jit`` kernel with a cache of its compiled specialisations (see the module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", repr(fn))
        self.jit = isinstance(fn, JITFunction) and _knobs is not None
        self._preps: Dict[tuple, tuple] = {}
        self.hits = self.misses = 0
        _kernels.add(self)

    def clear(self) -> None:
        with _lock:
            self._preps = {}

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)  # as the JIT's kernel[grid](...)

    def run(self, grid, *args, **kwargs):
        """Launch on the current device and stream, as ``fn[grid](*args, **kwargs)``."""
        mode = _state["mode"]
        if mode == "0" or not self.jit:
            return self.fn[grid](*args, **kwargs)
        runtime = _knobs.runtime
        enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
        quiet = ((enter is None or (type(enter) is _HookChain and not enter.calls))
                 and (exit_ is None or (type(exit_) is _HookChain and not exit_.calls)))
        try:
            prep, go, entries = self._preps[(*map(type, args), *kwargs, *map(type, kwargs.values()))]
            drv = _driver.active
            device = drv.get_current_device()
            if quiet and mode == "1":  # the common case: one generated function keys and launches
                n = len(grid)
                entry = go(args, kwargs, entries, device, drv.get_current_stream(device), grid[0],
                           grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
                self.hits += 1
                return entry.kernel
            key, full = prep(args, kwargs)
            entry = entries[device, key]
        except (KeyError, TypeError, AttributeError, ValueError):
            return self._miss(grid, args, kwargs)
        if mode == "check":
            self._check(entry, grid, args, kwargs)
        self.hits += 1
        stream = drv.get_current_stream(device)
        n = len(grid)
        g0, g1, g2 = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
        if not quiet:  # a profiler is listening: metadata and hooks as the JIT passes them
            metadata = entry.kernel.launch_metadata(grid, stream, *full)
            entry.launcher(g0, g1, g2, stream, entry.function, entry.metadata, metadata, enter, exit_, *full)
        else:
            entry.launcher(g0, g1, g2, stream, entry.function, entry.metadata, None, None, None, *full)
        return entry.kernel

    def _miss(self, grid, args, kwargs):
        """The JIT launches (compiling if needed); its compiled kernel is kept under this call's key when it really
        launched (a compile-only patch of ``JITFunction.run`` returns one that never loaded: not kept)."""
        kernel = self.fn[grid](*args, **kwargs)
        self.misses += 1
        if hasattr(kernel, "result"):  # an async compile's future
            kernel = kernel.result()
        if getattr(kernel, "function", None) is None or self.fn.pre_run_hooks:
            return kernel
        kinds = (*map(type, args), *map(type, kwargs.values()))
        sig = (*kinds[:len(args)], *kwargs, *kinds[len(args):])
        with _lock:
            if sig not in self._preps:
                made = _make_prep(list(self.fn.params), len(args), tuple(kwargs), kinds, launch=True)
                self._preps[sig] = (*made, {}) if made is not None else (None, None, None)
            prep, _, entries = self._preps[sig]
            if prep is None:
                return kernel
            if len(entries) >= MAX_ENTRIES:
                entries.clear()
            entries[_driver.active.get_current_device(), prep(args, kwargs)[0]] = _Entry(kernel)
        return kernel

    def _check(self, entry, grid, args, kwargs):
        expected = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
        if hasattr(expected, "result"):
            expected = expected.result()
        if expected is not entry.kernel:
            raise RuntimeError(f"{ENV_VAR}=check: {self.__name__}: the cached compiled kernel is not the one "
                               f"Triton's JIT would launch for these arguments")
