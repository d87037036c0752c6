"""The fast launch path (prefix_attn/triton/fastlaunch.py): its key is never coarser than Triton's specialisation,
and with kernels compiled for sm_90 (a stand-in driver, launches no-ops) it hits its cache on the second call,
passes the compiled launcher what the JIT passes, and misses on a change of dtype, head dim, switch, pointer
alignment or stride divisibility.

The compiled part runs tests/fastlaunch_worker.py in a subprocess (TRITON_INTERPRET unset, as the kernels must be
decorated without the interpreter): ~6 s with Triton's cache warm, ~30 s on two cores when it compiles (D = 16).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
triton = pytest.importorskip("triton")


def _param(name, constexpr=False, specialise=True, default=None):
    return types.SimpleNamespace(name=name, is_constexpr=constexpr, do_not_specialize=not specialise,
                                 has_default=default is not None, default=default)


INTS = [0, 1, 2, 15, 16, 17, 32, 33, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**63 - 16,
        2**63, 2**64 - 16]


@pytest.mark.parametrize("specialise", [True, False])
def test_int_key_never_coarser_than_triton(specialise):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from prefix_attn.triton import fastlaunch

    prep = fastlaunch._make_prep([_param("x", specialise=specialise)], 1, (), (int,))
    for a, b in itertools.combinations(INTS, 2):
        spec_a = native_specialize_impl(BaseBackend, a, False, specialise, True)
        spec_b = native_specialize_impl(BaseBackend, b, False, specialise, True)
        if prep((a,), {})[0] == prep((b,), {})[0]:
            assert spec_a == spec_b, (a, b, spec_a, spec_b)


def test_tensor_key_never_coarser_than_triton():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from prefix_attn.triton import fastlaunch

    prep = fastlaunch._make_prep([_param("x")], 1, (), (torch.Tensor,))
    base = torch.empty(64, dtype=torch.float16)
    tensors = [base, base[1:], base[8:], base.view(torch.bfloat16), base.view(torch.int16)[2:],
               torch.empty(8, dtype=torch.float32)]
    for a, b in itertools.combinations(tensors, 2):
        spec_a = native_specialize_impl(BaseBackend, a, False, True, True)
        spec_b = native_specialize_impl(BaseBackend, b, False, True, True)
        if prep((a,), {})[0] == prep((b,), {})[0]:
            assert spec_a == spec_b


def test_prep_fills_defaults_and_keywords_in_parameter_order():
    from prefix_attn.triton import fastlaunch

    params = [_param("X"), _param("n", specialise=False), _param("BLOCK", constexpr=True),
              _param("Y", default="unset"), _param("FLAG", constexpr=True, default=False)]
    x = torch.empty(4)
    prep = fastlaunch._make_prep(params, 2, ("BLOCK", "num_warps"), (torch.Tensor, int, int, int))
    key, full = prep((x, 7), {"BLOCK": 16, "num_warps": 4})
    assert full == (x, 7, 16, "unset", False)
    assert 16 in key and 4 in key
    assert fastlaunch._make_prep(params, 2, ("BLOCK",), (torch.Tensor, tuple, int)) is None  # unsupported kind
    assert fastlaunch._make_prep(params[:3], 1, (), (torch.Tensor,)) is None  # "n" and BLOCK missing


def test_mode():
    from prefix_attn.triton import fastlaunch

    try:
        fastlaunch.set_mode("0")
        assert not fastlaunch.enabled()
        fastlaunch.set_mode("check")
        assert fastlaunch.enabled()
        with pytest.raises(ValueError):
            fastlaunch.set_mode("yes")
    finally:
        fastlaunch.set_mode(None)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="checks the interpreter's path")
def test_interpreter_takes_the_jit_path():
    from prefix_attn.triton import launch

    assert not launch._prefix_attn_fwd_kernel.jit  # an InterpretedFunction: kernel[grid](...) as before


def test_fast_path_matches_the_jit_compiled_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "fastlaunch_worker.py")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    kernels = {"_prefix_attn_fwd_kernel", "_prefix_attn_bwd_preprocess_kernel", "_prefix_attn_bwd_dkdv_kernel",
               "_prefix_attn_bwd_dprefix_kernel", "_prefix_attn_reduce_kernel", "_prefix_attn_bwd_dq_kernel"}
    # what each change must recompile (the kernels that take the changed value)
    must_miss = {
        "base": kernels,
        "dtype": kernels,
        "head_dim": kernels - {"_prefix_attn_reduce_kernel"},
        "switch": {"_prefix_attn_fwd_kernel", "_prefix_attn_bwd_dkdv_kernel", "_prefix_attn_bwd_dq_kernel"},
        # q's: not the reduction's (its switched-off pointers take a fixed dummy, not q)
        "alignment": kernels - {"_prefix_attn_bwd_preprocess_kernel", "_prefix_attn_reduce_kernel"},
        "divisibility": {"_prefix_attn_fwd_kernel", "_prefix_attn_bwd_dkdv_kernel", "_prefix_attn_bwd_dq_kernel"},
    }
    assert set(results) == set(must_miss)
    for case, row in results.items():
        assert row["launches"] == 6, (case, row)  # fwd, delta, dK/dV, one prefix piece, reduction, dQ
        assert set(row["missed_first"]) >= must_miss[case], (case, row)
        assert row["misses_second"] == 0 and row["hits_second"] == 6, (case, row)
        assert row["same_as_jit"], (case, row)
        assert row["jit_hooks_passed"] and row["fast_hooks_none"], (case, row)
        assert row["hooked_same_as_jit"] and row["hook_calls"] == 6, (case, row)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
