"""Compile every Triton kernel variant that a grid of public-op calls reaches, for sm_90 without a GPU, and report
each memory instruction of the LLVM IR with a ``poison`` operand.

    python benchmarks/poison_scan.py [--arch 90] [--quick] [--json FILE]

A ``poison`` address in a load, a store or an asynchronous copy is a compiled-code bug the interpreter cannot
see (it has no software pipeliner and no LLVM): LLVM folded an undefined value (a division by a constant 0, say)
into an address, and on the GPU the instruction reads or writes wherever its never-written registers point. The
first GPU run crashed this way in every 16-bit non-causal backward (illegal memory access in the dK/dV kernel).

The public ops run unchanged on CPU tensors with the ``triton`` backend: the stand-in driver of
``compile_report.py`` makes Triton target sm_<arch>, and each launch compiles its kernel (the real specialisation
of a real call) instead of running it. Run it with the Triton the GPU machine has (the Makefile's side install:
``PYTHONPATH=.triton36``); exit status 1 when any poison operand (or a compile error) is found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton.jit decorates the kernels
os.environ["PREFIX_ATTN_FAST_LAUNCH"] = "0"  # every launch through JITFunction.run (compiled, never launched)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from compile_report import install_fake_driver  # noqa: E402

# an instruction that touches memory: a load or store (plain, atomic, masked intrinsic) or inline PTX that does
_MEMORY = re.compile(r"(=\s*load\b|^\s*store\b|atomicrmw|cmpxchg|@llvm\.masked\.(load|store|gather|scatter)"
                     r"|asm[^\"]*\"[^\"]*\b(ld|st|cp\.async|red|atom|cp\.reduce|cp\.bulk)\.)")


def poisoned(llir: str) -> list:
    """The memory instructions of an LLVM IR module with a ``poison`` operand, stripped."""
    return [line.strip() for line in llir.splitlines() if "poison" in line and _MEMORY.search(line)]


@triton.jit
def _poison_control_kernel(X, OUT, N, ZERO_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """The pattern of the first GPU crash, for a test that the scan can fail: a pipelined loop of 16-bit tile loads
    whose trip count LLVM proves 0 (ZERO_COUNT) and whose body divides by that count."""
    tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    a = tl.load(X + tile)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    if ZERO_COUNT:
        count = tl.maximum(tl.minimum(0, N), 0)
    else:
        count = N
    for u in range(0, 2 * count):
        row = u // count + (u % count) * BLOCK
        acc += tl.dot(a, tl.load(X + row * BLOCK + tile))
    tl.store(OUT + tile, acc)


def control(scanner: "Scanner") -> tuple:
    """(poisoned lines with ZERO_COUNT=True, with ZERO_COUNT=False) of the control kernel: the scan must find the
    first and not the second."""
    x = torch.empty(64 * 64, dtype=torch.float16)
    found = []
    for zero in (True, False):
        _poison_control_kernel[(1,)](x, x.float(), 3, ZERO_COUNT=zero, BLOCK=64, num_stages=3)
        found.append(next(lines for (name, switches, _), lines in scanner.kernels.items()
                          if name == "_poison_control_kernel" and f"ZERO_COUNT={zero}" in switches))
    return tuple(found)


def _switches(kwargs: dict) -> str:
    """The launch's keywords (compile-time switches, tiles, warps, stages) as one label."""
    return " ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if isinstance(v, (bool, int, str)))


class Scanner:
    """Installs the stand-in driver; every kernel launched afterwards is compiled and its LLVM IR scanned once
    per specialisation."""

    def __init__(self, arch: int = 90):
        original = jit.JITFunction.run
        install_fake_driver(arch, [])
        self.kernels: dict = {}  # (name, switches, dtypes) -> list of poisoned lines

        def compile_and_scan(fn, *args, grid, warmup, **kwargs):
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            dtypes = ",".join(sorted({str(a.dtype).replace("torch.", "") for a in args
                                      if isinstance(a, torch.Tensor) and a.is_floating_point()}))
            key = (fn.__name__, _switches(kwargs), dtypes)
            if key not in self.kernels:
                self.kernels[key] = poisoned(kernel.asm["llir"])
            return kernel

        jit.JITFunction.run = compile_and_scan
        from prefix_attn import backends
        from prefix_attn.triton import launch

        backends.triton_interpreting = lambda: True  # the triton backend accepts CPU tensors (compiled, not run)
        launch._num_sms = lambda index: 132

    def bad(self) -> dict:
        return {k: v for k, v in self.kernels.items() if v}


def _inputs(B, Hq, Hkv, Tq, Tk, P, D, dtype, grad, bank=0):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    q, k, v = t(B, Hq, Tq, D), t(B, Hkv, Tk, D), t(B, Hkv, Tk, D)
    pshape = (bank, Hkv, P, D) if bank else (Hkv, P, D)
    return q, k, v, t(*pshape), t(*pshape)


SWITCHES = ("plain", "mask", "bank", "dropout", "softcap", "packed", "decode", "decode_bank")


def call(dtype, D, P, causal, switch) -> None:
    """One public-op call: a training call (forward + backward) with one switch on, or a decode call (no grad,
    1 and 4 queries per row, a longer cache)."""
    import prefix_attn

    if switch == "packed":  # three sequences (one empty) packed along the token axis
        cu_q = torch.tensor([0, 30, 30, 77], dtype=torch.int32)
        cu_k = torch.tensor([0, 40, 45, 93], dtype=torch.int32)
        q, k, v = (torch.randn(n, h, D, dtype=dtype, requires_grad=True) for n, h in ((77, 4), (93, 2), (93, 2)))
        pk, pv = (torch.randn(2, P, D, dtype=dtype, requires_grad=True) for _ in range(2))
        out = prefix_attn.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, 47, 48, causal=causal,
                                                  backend="triton")
        out.sum().backward()
        return
    if switch.startswith("decode"):
        extra = {}
        if switch == "decode_bank":
            extra = dict(prefix_ids=torch.tensor([0, 1] * 4), prefix_lengths=torch.tensor([P, 5]))
        for len_q in (1, 4):
            q, k, v, pk, pv = _inputs(8, 8, 2, len_q, 300, P, D, dtype, False, bank=2 if extra else 0)
            with torch.no_grad():
                prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton", **extra)
        return
    extra = {}
    if switch == "mask":
        mask = torch.ones(2, 93, dtype=torch.bool)
        mask[0, :5] = False
        extra = dict(attention_mask=mask)
    elif switch == "bank":
        extra = dict(prefix_ids=torch.tensor([2, 0]), prefix_lengths=torch.tensor([P, 3, max(P - 1, 0)]))
    elif switch == "dropout":
        extra = dict(dropout_p=0.1, dropout_seed=7)
    elif switch == "softcap":
        extra = dict(softcap=30.0)
    q, k, v, pk, pv = _inputs(2, 4, 2, 77, 93, P, D, dtype, True, bank=3 if switch == "bank" else 0)
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=causal, backend="triton", **extra)
    out.sum().backward()


def grid(quick: bool = False) -> list:
    """(dtype, D, P, causal, switch) of the calls. Full: fp16, bf16, fp32 x D 64/96/128 x causal and full x every
    switch (P = 17; P = 0 and 113 plain: prefix pieces of 64/32/16 rows). Quick (the suite's): every switch in
    fp16 and bf16 at D 64 and 128, fp32 and D 96 plain, causal and full."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    calls = []
    for dtype in dtypes:
        for D in (64, 96, 128):
            for causal in (True, False):
                for P in (0, 17, 113):
                    for switch in SWITCHES:
                        if switch.startswith("decode") and not causal or switch != "plain" and P != 17:
                            continue
                        if quick and (dtype == torch.float32 or D == 96 or P == 0) and switch != "plain":
                            continue
                        if quick and P == 0:
                            continue
                        calls.append((dtype, D, P, causal, switch))
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="D 64/128 and P 17 only")
    parser.add_argument("--json", help="write {kernels, poisoned, calls, control} here")
    args = parser.parse_args(argv)
    scanner = Scanner(args.arch)
    with_zero, without = control(scanner)  # the scan sees the crash's pattern, and only where it is
    print(f"control kernel: {len(with_zero)} poisoned memory instructions with a zero trip count, {len(without)} "
          f"without")
    if not with_zero or without:
        print("FAILED: the scan does not tell the control kernel's two variants apart")
        return 2
    del scanner.kernels[next(k for k in scanner.kernels if "ZERO_COUNT=True" in k[1])]
    labels = grid(args.quick)
    for spec in labels:
        call(*spec)
    bad = scanner.bad()
    for (name, switches, dtypes), lines in sorted(bad.items()):
        print(f"POISON {name} [{dtypes}] {switches}: {len(lines)} memory instructions, e.g.\n    {lines[0][:300]}")
    print(f"{len(labels)} public-op calls, {len(scanner.kernels)} kernel variants compiled for sm_{args.arch} with "
          f"triton {triton.__version__}; {len(bad)} with poisoned memory operands")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "calls": len(labels), "kernels": len(scanner.kernels),
                       "control": len(with_zero),
                       "poisoned": [{"kernel": n, "switches": s, "dtypes": d, "lines": len(v), "example": v[0]}
                                    for (n, s, d), v in sorted(bad.items())]}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
