"""Each Triton kernel compiles once per dtype, head dim, switch set and tile, not once per shape.

The GPU test grid is replayed through the op with Triton's own binder and a stand-in sm_90 target
(tests/variant_count.py, in a subprocess: the binder of compiled kernels, not the interpreter's); nothing is
compiled. Every specialisation costs a second or more of compiling on the GPU machine, inside a short GPU check.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# What `pytest -m gpu` must compile at most: 39 each of forward, dK/dV and dQ (3 dtypes x 13 switch/head-dim
# sets), 36 prefix-gradient pieces, 9 delta preprocesses, 6 reductions. A new switch or tile raises it knowingly.
GPU_GRID_BOUND = 168


def test_gpu_grid_compiles_no_shape_specialisations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "variant_count.py"), "--json"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"_prefix_attn_fwd_kernel", "_prefix_attn_bwd_preprocess_kernel", "_prefix_attn_bwd_dkdv_kernel",
                "_prefix_attn_bwd_dprefix_kernel", "_prefix_attn_reduce_kernel", "_prefix_attn_bwd_dq_kernel"}
    assert set(summary) == expected, summary
    extra = {name: row for name, row in summary.items() if row["variants"] != row["essential"]}
    assert not extra, f"specialised on runtime values (variants > essential): {extra}"
    total = sum(row["variants"] for row in summary.values())
    assert total <= GPU_GRID_BOUND, f"{total} Triton variants for the GPU grid > {GPU_GRID_BOUND}: {summary}"
