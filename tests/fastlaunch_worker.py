"""The fast launch path against Triton's JIT, with kernels compiled for sm_90 and a no-op launcher (run by
tests/test_fastlaunch.py in a subprocess: TRITON_INTERPRET must be unset before the kernels are decorated).

    python tests/fastlaunch_worker.py    # prints one JSON line: {case: {...}}

For each case (a base call, then one change each of dtype, head dim, a switch, pointer alignment, an int stride's
divisibility) every launch of ``prefix_attn_fwd`` + ``prefix_attn_bwd`` is made three times: through the JIT
(``PREFIX_ATTN_FAST_LAUNCH=0``), then twice through the fast path. Recorded per case: the fast path's misses and
hits over its two calls (and which kernels missed on the first), and whether each fast launch passed the compiled
launcher the same grid, stream, function, metadata and kernel arguments as the JIT launch (tensors compared by
dtype, shape, strides and, for the inputs, data pointer; the launch metadata and hooks are None on the fast path when
no hook is registered); then once more with a launch hook registered (metadata and hooks passed, the hook called
once a launch).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import host_overhead  # noqa: E402
import torch  # noqa: E402


def _norm(x, inputs):
    if isinstance(x, torch.Tensor):
        ptr = x.data_ptr() if any(x.data_ptr() == t.data_ptr() for t in inputs) else None
        return ("tensor", str(x.dtype), tuple(x.shape), tuple(x.stride()), ptr)
    return (type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else id(x))


def _record(driver, calls, inputs):
    """The launches of ``calls()``: [(kernel name, grid, stream, function id, metadata, hooks, kernel args)]."""
    launches = []

    def spy(name, args):
        *grid, stream, function, metadata, launch_md, enter, exit_ = args[:9]
        hooks = tuple(h is None for h in (launch_md, enter, exit_))
        launches.append((name, tuple(grid), stream, id(function), id(metadata), hooks,
                         tuple(_norm(a, inputs) for a in args[9:])))

    driver.spy = spy
    calls()
    driver.spy = None
    return launches


def main() -> int:
    from triton import knobs  # noqa: PLC0415

    from prefix_attn.triton import fastlaunch, launch  # noqa: PLC0415

    def inputs(dtype=torch.bfloat16, head_dim=16, offset=0, pad=0):
        B, H, T, P = 1, 2, 32, 16
        flat = torch.empty(B * H * T * head_dim + 8, dtype=dtype)
        q = flat[offset:offset + B * H * T * head_dim].view(B, H, T, head_dim)  # offset 1: not 16-byte aligned
        # pad 8: k and v rows 24 elements apart, a stride not divisible by 16
        k, v = (torch.empty(B, H, T, head_dim + pad, dtype=dtype)[..., :head_dim] for _ in range(2))
        pk, pv = (torch.empty(H, P, head_dim, dtype=dtype) for _ in range(2))
        return q, k, v, pk, pv

    cases = {
        "base": (inputs(), {}),
        "dtype": (inputs(dtype=torch.float16), {}),
        "head_dim": (inputs(head_dim=32), {}),
        "switch": (inputs(), {"causal": False}),
        "alignment": (inputs(offset=1), {}),
        "divisibility": (inputs(pad=8), {}),
    }
    results = {}
    with host_overhead.stand_in() as driver:
        original = driver.launcher_cls

        def launcher_cls(src, metadata):
            inner = original(src, metadata)

            def call(*args):
                inner(*args)
                if getattr(driver, "spy", None):
                    driver.spy(metadata.name, args)
            return call

        driver.launcher_cls = launcher_cls
        for name, (tensors, opts) in cases.items():
            q, k, v, pk, pv = tensors
            causal = opts.get("causal", True)

            def calls(q=q, k=k, v=v, pk=pk, pv=pv, causal=causal):
                out, lse = launch.prefix_attn_fwd(q, k, v, pk, pv, None, causal, 0.25, 0.0)
                launch.prefix_attn_bwd(torch.empty_like(q), q, k, v, pk, pv, None, out, lse, causal, 0.25, 0.0)

            fastlaunch.set_mode("0")
            jit = _record(driver, calls, tensors)
            fastlaunch.set_mode("1")
            before = {kern.__name__: (kern.misses, kern.hits) for kern in fastlaunch._kernels}
            first = _record(driver, calls, tensors)
            middle = {kern.__name__: (kern.misses, kern.hits) for kern in fastlaunch._kernels}
            second = _record(driver, calls, tensors)
            after = {kern.__name__: (kern.misses, kern.hits) for kern in fastlaunch._kernels}
            heard = []
            hook = heard.append  # a launch hook registered (as a profiler does): metadata and hooks passed again
            knobs.runtime.launch_enter_hook.add(hook)
            hooked = _record(driver, calls, tensors)
            knobs.runtime.launch_enter_hook.remove(hook)
            fastlaunch.set_mode("check")
            _record(driver, calls, tensors)  # raises if a cached kernel is not the JIT's
            fastlaunch.set_mode(None)

            def strip(launches):  # the fast path passes None for metadata and hooks: compare the rest
                return [(n, g, s, f, m, a) for n, g, s, f, m, _, a in launches]

            results[name] = {
                "launches": len(jit),
                "missed_first": sorted(n for n in middle if middle[n][0] > before[n][0]),
                "hits_first": sum(middle[n][1] - before[n][1] for n in middle),
                "misses_second": sum(after[n][0] - middle[n][0] for n in after),
                "hits_second": sum(after[n][1] - middle[n][1] for n in after),
                "same_as_jit": strip(first) == strip(jit) and strip(second) == strip(jit),
                "jit_hooks_passed": all(x[5] == (False, False, False) for x in jit),
                "fast_hooks_none": all(x[5] == (True, True, True) for x in second),
                "hooked_same_as_jit": strip(hooked) == strip(jit) and all(x[5] == (False, False, False)
                                                                           for x in hooked),
                "hook_calls": len(heard),
            }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
