"""Host time per call of the Triton path, measured on the CPU: kernels compiled for sm_90, launches no-ops.

    python benchmarks/host_overhead.py [--repeat N] [--number N] [--tiny] [--out results/host_overhead.md]

A stand-in driver (``StandInDriver``) makes Triton target sm_90 without a GPU: the kernels really compile, the
launchers in ``prefix_attn/triton/launch.py`` and Triton's own launch path run unchanged on CPU tensors, and only
the last step, the compiled launcher that would call ``cuLaunchKernelEx``, is a no-op that counts the launch. So
what is measured is the Python and torch work a GPU call costs its host thread: argument binding, specialisation
keys, output allocation, the op layer, autograd. Not included: the C launcher's argument parsing (~1.5 us a launch
on the GPU machine, issue 38), ``torch.cuda.device`` switching and the CUDA caching allocator (here: the CPU one).

Cases (bf16, causal, prefix P = 64):

* ``train gpt2``: ``prefix_attention`` forward + backward through autograd (``torch.autograd.grad`` of all five
  inputs), GPT-2 layer shape B=8 H=12 T=1024 D=64;
* ``decode llama B=1`` / ``B=8``: no grad, one new query on a 4k cache, Llama-3-8B GQA (Hq=32, Hkv=8, D=128);
* ``decode gpt2 B=32``: no grad, one new query on a 1k cache, H=12, D=64;
* ``yardstick sdpa``: a tiny no-grad ``F.scaled_dot_product_attention`` ([1, 1, 4, 16] float32, computed on the
  CPU): one host-cheap op call on this machine. Every case is also given as a multiple of it.

Host time is the CPU time of the calling thread (``time.thread_time_ns``: robust to other processes on the machine),
wall time is given beside it. Median over ``--repeat`` rounds of ``--number`` calls. Per call also: kernel launches
(counted by the stand-in) and aten ops called from Python (``torch.profiler``: those of the op layer, the
launchers and autograd, not the ops an aten op calls itself). With ``prefix_attn.triton.fastlaunch`` present,
each Triton case runs with the fast launch path off (Triton's ``JITFunction.run`` every launch) and on.

Targets (issue 38): training call <= 6x the yardstick, decode call <= 2x, launches per training call <= 6.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

os.environ.pop("TRITON_INTERPRET", None)  # before triton.jit decorates the kernels: the real (compiled) path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from compile_report import StandInDriver  # noqa: E402

TARGETS = {"train": 6.0, "decode": 2.0}
MAX_TRAIN_LAUNCHES = 6


@contextlib.contextmanager
def stand_in(arch: int = 90):
    """Triton targets sm_<arch> with a ``StandInDriver``, the ``triton`` backend accepts CPU tensors and the
    launchers see an H100's 132 SMs; all undone on exit. Yields the driver (``driver.launches`` counts launches)."""
    from triton.runtime import driver as config  # noqa: PLC0415

    from prefix_attn import backends  # noqa: PLC0415
    from prefix_attn.triton import launch  # noqa: PLC0415

    previous, num_sms = config._active, launch._num_sms
    fake = StandInDriver(arch)
    config.set_active(fake)
    lifted = backends.triton_interpreting
    backends.triton_interpreting = lambda: True  # the check that refuses CPU tensors without the interpreter
    launch._num_sms = lambda index: 132  # an H100's (torch.cuda would be asked on the GPU)
    try:
        yield fake
    finally:
        backends.triton_interpreting = lifted
        launch._num_sms = num_sms
        config._active = previous


def fast_launch_module():
    """``prefix_attn.triton.fastlaunch``, or None where this checkout has none."""
    try:
        from prefix_attn.triton import fastlaunch  # noqa: PLC0415
    except ImportError:
        return None
    return fastlaunch


# ----------------------------------------------------------------------------------------- the cases
def _train_case(batch, heads, seq, head_dim, prefix, dtype=torch.bfloat16):
    import prefix_attn  # noqa: PLC0415

    def leaf(*shape):
        return torch.empty(*shape, dtype=dtype).requires_grad_()

    q, k, v = (leaf(batch, heads, seq, head_dim) for _ in range(3))
    pk, pv = leaf(heads, prefix, head_dim), leaf(heads, prefix, head_dim)
    dout = torch.empty(batch, heads, seq, head_dim, dtype=dtype)
    leaves = (q, k, v, pk, pv)

    def call():
        out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
        return torch.autograd.grad(out, leaves, dout)

    return call


def _decode_case(batch, heads_q, heads_kv, cache, head_dim, prefix, dtype=torch.bfloat16):
    import prefix_attn  # noqa: PLC0415

    q = torch.empty(batch, heads_q, 1, head_dim, dtype=dtype)
    k, v = (torch.empty(batch, heads_kv, cache, head_dim, dtype=dtype) for _ in range(2))
    pk, pv = (torch.empty(heads_kv, prefix, head_dim, dtype=dtype) for _ in range(2))

    def call():
        with torch.no_grad():
            return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")

    return call


def _yardstick():
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    return call


def cases(tiny: bool) -> Dict[str, tuple]:
    """{name: (kind, factory)}; kind "train", "decode" or "yardstick". ``tiny``: small shapes (D=16) that compile
    in seconds, for the smoke test; the decode one still takes the decode path (two launches)."""
    if tiny:
        return {
            "train tiny B=1 H=2 T=32 D=16": ("train", lambda: _train_case(1, 2, 32, 16, 16)),
            "decode tiny B=8 Hq=4 Hkv=2 cache 64 D=16": ("decode", lambda: _decode_case(8, 4, 2, 64, 16, 16)),
            "yardstick sdpa [1, 1, 4, 16]": ("yardstick", _yardstick),
        }
    return {
        "train gpt2 B=8 H=12 T=1024 D=64": ("train", lambda: _train_case(8, 12, 1024, 64, 64)),
        "decode llama B=1 Hq=32 Hkv=8 cache 4k D=128": ("decode", lambda: _decode_case(1, 32, 8, 4096, 128, 64)),
        "decode llama B=8 Hq=32 Hkv=8 cache 4k D=128": ("decode", lambda: _decode_case(8, 32, 8, 4096, 128, 64)),
        "decode gpt2 B=32 H=12 cache 1k D=64": ("decode", lambda: _decode_case(32, 12, 12, 1024, 64, 64)),
        "yardstick sdpa [1, 1, 4, 16]": ("yardstick", _yardstick),
    }


# ----------------------------------------------------------------------------------------- measuring
def host_times(call: Callable[[], object], repeat: int, number: int) -> Dict[str, float]:
    """Median per-call thread CPU time and wall time (us) over ``repeat`` rounds of ``number`` calls, the garbage
    collector off while timing (as ``timeit``)."""
    cpu, wall = [], []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(number):
                call()
            c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
            cpu.append((c1 - c0) / number / 1e3)
            wall.append((w1 - w0) / number / 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall)}


def aten_ops(call: Callable[[], object]) -> int:
    """The aten ops one call issues from Python (``torch.profiler`` events ``aten::*`` with no aten op above them):
    the op layer's, the launchers' (inside the custom ops too) and autograd's, not what an aten op calls inside."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def measure_case(call, driver, repeat: int, number: int) -> dict:
    call()  # compiles on the first call (sm_90), fills every cache
    call()
    before = driver.launches if driver is not None else 0
    call()
    launches = (driver.launches - before) if driver is not None else 0
    return {**host_times(call, repeat, number), "launches": launches, "ops": aten_ops(call)}


def run(repeat: int, number: int, tiny: bool) -> List[dict]:
    """One row per (case, launch path); the yardstick's row first."""
    fast = fast_launch_module()
    rows = []
    with stand_in() as driver:
        for name, (kind, factory) in cases(tiny).items():
            call = factory()
            if kind == "yardstick":
                rows.insert(0, {"case": name, "kind": kind, "path": "-", **measure_case(call, None, repeat,
                                                                                         number)})
                continue
            paths = ["jit", "fast"] if fast is not None else ["jit"]
            for path in paths:
                if fast is not None:
                    fast.set_mode("1" if path == "fast" else "0")
                rows.append({"case": name, "kind": kind, "path": path,
                             **measure_case(call, driver, repeat, number)})
        if fast is not None:
            fast.set_mode(None)  # back to the environment's choice
    yard = rows[0]["cpu_us"]
    for row in rows:
        row["ratio"] = row["cpu_us"] / yard
        target = TARGETS.get(row["kind"])
        row["target"] = "-" if target is None else f"<= {target:g}x"
        row["met"] = "-" if target is None else ("yes" if row["ratio"] <= target and (
            row["kind"] != "train" or row["launches"] <= MAX_TRAIN_LAUNCHES) else "no")
    return rows


def markdown(rows: List[dict], repeat: int, number: int) -> str:
    import triton  # noqa: PLC0415

    lines = [
        "# Host time per call (stand-in driver: kernels compiled for sm_90, launches no-ops)",
        "",
        f"CPU: {common.cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
        f"triton {triton.__version__}; {common.now()}; commit {common.git_commit()}",
        "",
        f"`python benchmarks/host_overhead.py --repeat {repeat} --number {number}`: median of {repeat} rounds of "
        f"{number} calls; host = thread CPU time, wall beside it (provisional on a shared machine). Path `jit`: "
        f"Triton's `JITFunction.run` at every launch; `fast`: `prefix_attn.triton.fastlaunch`.",
        "",
        "| case | path | host us | wall us | x yardstick | target | met | launches | aten ops |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['path']} | {r['cpu_us']:.1f} | {r['wall_us']:.1f} | {r['ratio']:.1f} | "
                     f"{r['target']} | {r['met']} | {r['launches']} | {r['ops']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds (the median is reported)")
    parser.add_argument("--number", type=int, default=20, help="calls per round")
    parser.add_argument("--tiny", action="store_true", help="small shapes (D=16): the smoke test")
    parser.add_argument("--out", default=None, help="Markdown file to write (its folder is created)")
    args = parser.parse_args(argv)
    text = markdown(run(args.repeat, args.number, args.tiny), args.repeat, args.number)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
