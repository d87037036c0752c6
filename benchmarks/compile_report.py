"""Compile every Triton kernel for a CUDA target without a GPU and print its resource use.

    python benchmarks/compile_report.py [--arch 90] [--head-dims 64 128 256]

A stand-in driver reports the target architecture and ``JITFunction.run`` is patched to compile without
launching, so the real launchers (``prefix_attn/triton/launch.py``, ``decode_launch.py``) run unchanged on CPU
tensors (block sizes and argument specialisation are what a real call produces). For each kernel it prints warps,
stages, shared memory and the ptxas register / stack (spill) report from ``cuobjdump``. A compile error fails the run.
``sass`` is the number of SASS instructions in the kernel, ``mma`` how many of them are (H)GMMA/HMMA, ``loops`` the
instructions / MMA instructions of each loop body that holds an MMA (the per-iteration cost). This proves
the kernels compile and fit; it says nothing about numerics or speed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton.jit decorates the kernels

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def loop_sizes(sass: str) -> list:
    """(instructions, MMA instructions) of each innermost loop body that holds an MMA, in program order: the
    per-iteration cost of the kernel's key/query-block loops (a loop is a backward branch to its head)."""
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in lines if int(target.group(1), 16) <= a <= addr]
            mma = sum(o.startswith(("HGMMA", "HMMA")) for o in body)
            if mma:
                loops.append((len(body), mma))
    return loops


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


# ----------------------------------------------------------------------------------------- the stand-in driver
class _Launcher:
    """The compiled launcher of one kernel: counts its calls and keeps the last call's arguments (grid, stream,
    function, metadata, launch metadata, enter / exit hooks, kernel arguments); calls the hooks that are not None
    with the launch metadata, as Triton's C launcher does, and launches nothing."""

    def __init__(self, driver, src, metadata):
        self.driver, self.name = driver, metadata.name

    def __call__(self, *args):
        self.driver.launches += 1
        self.driver.last = (self.name, args)
        launch_metadata, enter, exit_ = args[6:9]
        if enter is not None:
            enter(launch_metadata)
        if exit_ is not None:
            exit_(launch_metadata)


class StandInDriver:
    """What Triton asks of its driver to compile and launch a kernel, for a CUDA target without a GPU: device 0,
    stream 0, a no-op launcher per compiled kernel, H100 limits (228 KiB shared memory, 1024 threads)."""

    def __init__(self, arch: int = 90):
        self.target = GPUTarget("cuda", arch, 32)
        self.launches = 0
        self.last = None
        self.launcher_cls = lambda src, metadata: _Launcher(self, src, metadata)
        self.utils = types.SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (object(), object(), 0, 0, 1024),
            unload_module=lambda module: None,
            get_device_properties=lambda device: {"max_shared_mem": 232448, "multiprocessor_count": 132},
        )

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def install_fake_driver(arch: int, rows: list, compile_fn=None) -> None:
    """Make Triton target sm_<arch> without a GPU. Launches compile (and report into rows) instead of running;
    with compile_fn(fn, key, signature, device, constexprs, options, attrs, warmup) that replaces compiling."""
    driver.set_active(StandInDriver(arch))
    original = jit.JITFunction.run
    if compile_fn is not None:
        jit.JITFunction._do_compile = compile_fn
        jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: original(self, *args, grid=grid,
                                                                                   warmup=True, **kwargs)
        return

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        line = next((part.strip() for part in usage.splitlines() if "REG" in part), "?")
        ops = [m.group(1) for m in _SASS_OP.finditer(sass)]
        mma = sum(op.startswith(("HGMMA", "HMMA")) for op in ops)
        loops = " ".join(f"{n}/{m}" for n, m in loop_sizes(sass)) or "-"
        md = kernel.metadata
        tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in kwargs)
        rows.append((self.__name__, md.num_warps, md.num_stages, md.shared, line, len(ops), mma))
        print(f"  {self.__name__:36s} {tiles:11s} warps={md.num_warps} stages={md.num_stages} smem={md.shared:6d} "
              f"sass={len(ops):5d} mma={mma:3d} loops={loops} | {line}")
        return kernel

    jit.JITFunction.run = compile_only


class VariantCounter:
    """Counts the specialisations Triton would compile, without compiling: the binder runs as in a real launch
    (same cache key), ``_do_compile`` is replaced by a stub that records the key and caches a placeholder.

    ``variants[name]`` is the set of cache keys of a kernel; ``essential[name]`` the set of what a kernel must be
    compiled for (its declared ``tl.constexpr`` values, pointer dtypes, warps and stages). More keys than essential
    variants means Triton specialised on a runtime value (an integer ``== 1`` or ``% 16``)."""

    def __init__(self, arch: int = 90):
        self.variants: dict = {}
        self.essential: dict = {}
        install_fake_driver(arch, [], compile_fn=lambda fn, *args: self._compile(fn, *args))

    def _compile(self, fn, key, signature, device, constexprs, options, attrs, warmup):
        name = fn.__name__
        declared = tuple((p.name, constexprs.get((p.num,))) for p in fn.params if p.is_constexpr)
        pointers = tuple((n, t) for n, t in signature.items() if str(t).startswith("*"))
        self.variants.setdefault(name, set()).add(str(key))
        self.essential.setdefault(name, set()).add((declared, pointers, options.num_warps, options.num_stages))
        placeholder = types.SimpleNamespace(metadata=None)
        fn.device_caches[device][0][key] = placeholder
        return placeholder

    def summary(self) -> dict:
        return {name: {"variants": len(keys), "essential": len(self.essential[name])}
                for name, keys in sorted(self.variants.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 40, 64, 96, 128, 256])
    args = parser.parse_args(argv)
    rows: list = []
    install_fake_driver(args.arch, rows)
    from prefix_attn.triton import decode_launch, launch

    launch._num_sms = lambda index: 132
    failures = 0
    for head_dim in args.head_dims:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            B, Hq, Hkv, Tq, Tk, P = 2, 4, 2, 257, 300, 100  # P = 100: prefix pieces of 64, 32 and 16 rows
            print(f"D={head_dim} {dtype} (B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} Tk={Tk} P={P}, masked)")
            q = torch.empty(B, Hq, Tq, head_dim, dtype=dtype)
            k, v = torch.empty(B, Hkv, Tk, head_dim, dtype=dtype), torch.empty(B, Hkv, Tk, head_dim, dtype=dtype)
            pk, pv = torch.empty(Hkv, P, head_dim, dtype=dtype), torch.empty(Hkv, P, head_dim, dtype=dtype)
            mask = torch.ones(B, Tk, dtype=torch.bool)
            bank = dict(prefix_ids=torch.tensor([1, 0]), prefix_lengths=torch.tensor([P, P // 2]))
            drop = dict(dropout_p=0.1, dropout_seed=torch.tensor(12345))
            variants = (("", 0.0, {}), ("softcap=30.0", 30.0, {}), ("bank: prefix_ids, prefix_lengths", 0.0, bank),
                        ("dropout: dropout_p=0.1", 0.0, drop))
            # plain, SOFTCAP=True, bank with lengths, DROPOUT=True; each causal and full (CAUSAL=False)
            for (label, softcap, extra), causal in itertools.product(variants, (True, False)):
                print(f"  {label or 'plain'}, {'causal' if causal else 'full'}")
                bank_k = pk.unsqueeze(0).expand(2, -1, -1, -1) if "prefix_ids" in extra else pk
                bank_v = pv.unsqueeze(0).expand(2, -1, -1, -1) if "prefix_ids" in extra else pv
                try:
                    out, lse = launch.prefix_attn_fwd(q, k, v, bank_k, bank_v, mask, causal, head_dim**-0.5,
                                                      softcap, **extra)
                    launch.prefix_attn_bwd(torch.empty_like(q), q, k, v, bank_k, bank_v, mask, out, lse, causal,
                                           head_dim**-0.5, softcap, **extra)
                except Exception as exc:  # noqa: BLE001 - report every failing configuration
                    failures += 1
                    print(f"  FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
            print("  varlen: packed sequences")  # VARLEN=True: the same kernels on [total, H, D] tensors
            cu_q, cu_k = torch.tensor([0, 100, Tq], dtype=torch.int32), torch.tensor([0, 120, Tk], dtype=torch.int32)
            pq, pkk = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
            try:
                out, lse = launch.prefix_attn_fwd(pq, pkk, pkk, pk, pv, None, True, head_dim**-0.5, 0.0,
                                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=157,
                                                  max_seqlen_k=180)
                launch.prefix_attn_bwd(torch.empty_like(pq), pq, pkk, pkk, pk, pv, None, out, lse, True,
                                       head_dim**-0.5, 0.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       max_seqlen_q=157, max_seqlen_k=180)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"  FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
            # SPLIT_KV=True and the combine kernel: query tiles of 16 rows (len_q 1, GQA 2) and up to 32 (len_q 16)
            print("  decode: split-KV, len_q 1 shared prefix; len_q 16 bank with lengths, softcap")
            for len_q, softcap, extra in ((1, 0.0, {}), (16, 30.0, bank)):
                bank_k = pk.unsqueeze(0).expand(2, -1, -1, -1) if extra else pk
                try:
                    decode_launch.decode_fwd(torch.empty(B, Hq, len_q, head_dim, dtype=dtype), k, v, bank_k, bank_k,
                                             mask, True, head_dim**-0.5, softcap, **extra)
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    print(f"  FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
    spills = [r for r in rows if "STACK:0 " not in r[4] + " "]
    print(f"\n{len(rows)} kernels compiled for sm_{args.arch} with triton {triton.__version__}, {failures} failed; "
          f"max shared memory {max((r[3] for r in rows), default=0)} B; {len(spills)} with a stack frame (spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
