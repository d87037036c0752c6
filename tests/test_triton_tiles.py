"""The GPU tile configurations, the autotuning space and its cache, and empty inputs, for the Triton backend.

Under TRITON_INTERPRET=1 the launchers use one small tile; here ``tuning.gpu_tiles(True)`` makes the interpreter
run the tiles a GPU compiles (128-row forward tiles, 32 x 128 dK/dV tiles at D = 128, the prefix tail pieces),
so the unmasked fast paths, the diagonal blocks and the ragged tails of the real shapes are checked on the CPU.
"""

import contextlib
import json
import os
import types
import zlib

import pytest
import torch
from oob import bounds_checked
from prefix_grid import Case, check_case

import prefix_attn
from prefix_attn.reference import prefix_attention_reference

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a CUDA GPU or TRITON_INTERPRET=1")

if HAS_CUDA or INTERPRET:
    from prefix_attn.triton import launch, tuning


def triton_op(*args, **kwargs):
    return prefix_attn.prefix_attention(*args, backend="triton", **kwargs)


@pytest.fixture
def gpu_tiles():
    tuning.gpu_tiles(True)
    yield
    tuning.gpu_tiles(False)


# Lengths that give full blocks, diagonal blocks and ragged tails with the GPU tiles; P = 70 is one 64-row
# prefix tile and a 16-row tail piece, P = 40 a 32 + 16 tail; D = 40 (masked head dim), 64 and 128.
TILE_CASES = [
    (Case(1, 1, 2, 150, 200, 70, 64, masked=True), torch.float16),
    (Case(1, 1, 2, 150, 200, 70, 64), torch.bfloat16),
    (Case(1, 2, 1, 130, 130, 40, 128), torch.float16),
    (Case(2, 1, 1, 70, 97, 17, 40, masked=True, softcap=20.0), torch.bfloat16),
    (Case(1, 1, 2, 66, 80, 33, 64, causal=False), torch.float32),
    (Case(1, 1, 1, 40, 40, 5, 128, masked=True), torch.float32),
    (Case(1, 1, 4, 1, 300, 200, 64), torch.float16),  # decoding; P = 200: three 64-row tiles and a 16-row tail
    (Case(2, 1, 2, 129, 129, 0, 256), torch.bfloat16),
    (Case(1, 1, 1, 257, 257, 1, 128, masked=True), torch.bfloat16),
    (Case(3, 1, 2, 150, 200, 70, 64, masked=True, entries=4, lengths=True), torch.float16),  # a bank
    (Case(2, 2, 1, 130, 130, 40, 128, entries=2, ids="distinct"), torch.bfloat16),
    (Case(1, 1, 2, 150, 200, 70, 64, masked=True, dropout=0.2), torch.float16),  # dropout
    (Case(2, 1, 1, 70, 97, 17, 40, entries=3, lengths=True, dropout=0.4), torch.float32),
    (Case(1, 1, 3, 150, 150, 113, 96, causal=False), torch.float16),  # D = 96, full, GQA 3 in 16 bits
]


@needs_triton
@pytest.mark.parametrize("case,dtype", TILE_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in TILE_CASES])
def test_gpu_tile_shapes(gpu_tiles, case, dtype):
    """Exact with the GPU tiles; under the interpreter every load and store also stays inside its tensors (a
    stray address there reads host memory silently where a GPU faults)."""
    assert tuning.default("fwd", dtype, case.head_dim) != tuning._INTERPRETER_BLOCKS  # the GPU table
    with bounds_checked() if INTERPRET else contextlib.nullcontext():
        check_case(triton_op, case, dtype, device=DEVICE, seed=zlib.crc32(str(case).encode()) % 1000)


@needs_triton
def test_gpu_tiles_deterministic(gpu_tiles):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(DEVICE, torch.float16).requires_grad_() for s in
               ((2, 2, 96, 64), (2, 1, 96, 64), (2, 1, 96, 64), (1, 70, 64), (1, 70, 64))]
    grads = []
    for _ in range(2):
        for t in tensors:
            t.grad = None
        triton_op(*tensors).float().square().sum().backward()
        grads.append([t.grad.clone() for t in tensors])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("num_prefix,expected", [
    (10, [(0, 16, 1)]), (16, [(0, 16, 1)]), (48, [(0, 32, 1), (32, 16, 1)]), (64, [(0, 64, 1)]),
    (70, [(0, 64, 1), (64, 16, 1)]), (200, [(0, 64, 3), (192, 16, 1)]), (1, [(0, 16, 1)]),
])
def test_prefix_pieces(num_prefix, expected):
    pieces = launch._prefix_pieces(num_prefix, 64)
    assert pieces == expected
    covered = sum(b * n for _, b, n in pieces)
    assert num_prefix <= covered < num_prefix + 16 or covered == num_prefix


@needs_triton
def test_prefix_splits_keep_enough_work():
    cpu = torch.device("cpu")
    for units in (0, 1, 7, 8, 9, 64, 1000):
        splits = launch._prefix_splits(units, 2, cpu)
        assert splits >= 1
        assert splits == 1 or units // splits >= launch.MIN_UNITS_PER_SPLIT


@needs_triton
@pytest.mark.parametrize("kernel", tuning.KERNELS if (HAS_CUDA or INTERPRET) else [])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 64, 128, 256])
def test_candidates_are_valid(kernel, dtype, head_dim):
    cands = tuning.candidates(kernel, dtype, head_dim)
    assert cands[0] == tuning.default(kernel, dtype, head_dim) and len(set(cands)) == len(cands)
    for c in cands:
        for size in (c.block_m, c.block_n):
            assert size >= 16 and size & (size - 1) == 0
        assert c.num_warps in (4, 8) and c.num_stages >= 1


@needs_triton
def test_autotune_picks_fastest_and_caches(tmp_path, monkeypatch):
    """The tuner times each candidate once per key, keeps the fastest, and reads it back from the JSON file."""
    cache = tmp_path / "tune.json"
    monkeypatch.setenv("PREFIX_ATTN_AUTOTUNE", "1")
    monkeypatch.setenv("PREFIX_ATTN_AUTOTUNE_CACHE", str(cache))
    assert tuning.set_autotune(None)  # the environment is read at import and by set_autotune
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake-gpu")
    cands = tuning.candidates("fwd", torch.float16, 64)
    fastest = cands[len(cands) // 2]
    timed = []

    def bench(fn):
        cfg = fn()
        timed.append(cfg)
        return 1.0 if cfg == fastest else 2.0

    monkeypatch.setattr(tuning, "_bench", bench)
    tuning.clear_cache()
    device = types.SimpleNamespace(type="cuda")
    dims = (300, 300, 10, True, False, False)
    got = tuning.config("fwd", torch.float16, 64, dims, device, run=lambda cfg: cfg)
    assert got == fastest and timed == cands
    # same bucket (lengths rounded up to powers of two): no new timing
    assert tuning.config("fwd", torch.float16, 64, (260, 511, 16, True, False, False), device, lambda c: c) == fastest
    assert len(timed) == len(cands)
    assert list(json.loads(cache.read_text()).values()) == [list(fastest)]
    tuning.clear_cache()
    tuning._cache_loaded = False  # a new process: read the file
    assert tuning.config("fwd", torch.float16, 64, dims, device, run=lambda cfg: cfg) == fastest
    assert len(timed) == len(cands)
    tuning.clear_cache()
    monkeypatch.setenv("PREFIX_ATTN_AUTOTUNE", "0")
    assert not tuning.set_autotune(None)
    assert tuning.config("fwd", torch.float16, 64, dims, device, run=lambda cfg: cfg) == tuning.default(
        "fwd", torch.float16, 64)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_empty_batch(backend):
    """batch = 0 works forward and backward on every backend; the prefix gradients are zeros."""
    if backend == "triton" and not (HAS_CUDA or INTERPRET):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    device = DEVICE if backend == "triton" else "cpu"
    q = torch.randn(0, 4, 5, 16, device=device, requires_grad=True)
    k = torch.randn(0, 2, 7, 16, device=device, requires_grad=True)
    v = torch.randn(0, 2, 7, 16, device=device, requires_grad=True)
    pk = torch.randn(2, 3, 16, device=device, requires_grad=True)
    pv = torch.randn(2, 3, 16, device=device, requires_grad=True)
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, backend=backend)
    assert out.shape == (0, 4, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert torch.equal(pk.grad, torch.zeros_like(pk)) and torch.equal(pv.grad, torch.zeros_like(pv))
    ref = prefix_attention_reference(q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach())
    assert ref.shape == out.shape


@pytest.mark.skipif(not INTERPRET, reason="the bounds check is an interpreter tool")
def test_bounds_check_catches_a_stray_access():
    import triton
    import triton.language as tl
    from oob import OutOfBounds

    @triton.jit
    def copy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)

    x, y = torch.randn(40), torch.empty(40)
    with bounds_checked() as log:
        copy[(1,)](x, y, 40, BLOCK=64)  # masked to the 40 elements: fine
    assert log.accesses == 2 and torch.equal(x, y)
    with pytest.raises(Exception) as info, bounds_checked():
        copy[(1,)](x, y, 41, BLOCK=64)  # one element past x
    assert isinstance(info.value, OutOfBounds) or "OutOfBounds" in str(info.value)
    assert "1 of 41 active lanes" in str(info.value)


def test_config_memo_follows_the_setters():
    """The memoised table choice changes with override() and gpu_tiles(), and comes back after them."""
    cpu = torch.device("cpu")
    dims = (300, 300, 10, True, False, False)
    base = tuning.config("dq", torch.float16, 64, dims, cpu)
    assert base == tuning.default("dq", torch.float16, 64)
    tuning.override(lambda kernel, cfg: cfg._replace(num_stages=7))
    try:
        assert tuning.config("dq", torch.float16, 64, dims, cpu).num_stages == 7
    finally:
        tuning.override(None)
    assert tuning.config("dq", torch.float16, 64, dims, cpu) == base
    was = tuning.gpu_tiles()
    tuning.gpu_tiles(not was)
    try:
        assert tuning.config("dq", torch.float16, 64, dims, cpu) == tuning.default("dq", torch.float16, 64)
    finally:
        tuning.gpu_tiles(was)
    assert tuning.config("dq", torch.float16, 64, dims, cpu) == base
