"""Count the Triton specialisations a set of GPU tests compiles, without a GPU and without compiling.

    python tests/variant_count.py [--grid gpu|suite] [--json]

Each case of the grid runs through ``prefix_attn.prefix_attention(..., backend="triton")`` forward and backward,
as its test does, on CPU tensors: Triton's own binder computes each launch's cache key for a stand-in sm_90
target (``benchmarks/compile_report.VariantCounter``) and nothing is compiled or launched. ``gpu`` is the grid of
``pytest -m gpu`` (``GPU_GRID`` x dtypes), ``suite`` adds the small grids that tests/test_triton.py runs on a GPU.
Prints per kernel the number of variants (cache keys) and of essential variants (declared constexprs, pointer
dtypes, warps, stages); more variants than essential ones is a specialisation on a runtime value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels' binder, not the interpreter's
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "benchmarks"), os.path.join(HERE, "..")]

from compile_report import VariantCounter  # noqa: E402


def grid(name: str):
    import prefix_grid as g  # noqa: PLC0415

    cases = list(g.GPU_GRID)
    if name == "suite":
        cases += g.GRID + g.SOFTCAP_GRID + g.BANK_GRID + g.DROPOUT_GRID
    return [(case, dtype) for case in cases for dtype in g.DTYPES]


def count(name: str = "gpu") -> dict:
    counter = VariantCounter(90)
    from prefix_grid import run_case  # noqa: PLC0415

    import prefix_attn  # noqa: PLC0415
    from prefix_attn import backends  # noqa: PLC0415
    from prefix_attn.triton import launch  # noqa: PLC0415

    backends.triton_interpreting = lambda: True  # let the op take CPU tensors to the Triton launchers
    launch._num_sms = lambda index: 132  # an H200's SM count (the prefix reduction's split)

    def op(*args, **kwargs):
        return prefix_attn.prefix_attention(*args, backend="triton", **kwargs)

    for case, dtype in grid(name):
        run_case(op, case, dtype, device="cpu", seed=1)
    return counter.summary()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("gpu", "suite"), default="gpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    summary = count(args.grid)
    if args.json:
        print(json.dumps(summary))
        return 0
    for name, row in summary.items():
        print(f"{name:40s} variants={row['variants']:4d} essential={row['essential']:4d}")
    print(f"total: {sum(r['variants'] for r in summary.values())} variants, "
          f"{sum(r['essential'] for r in summary.values())} essential")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
