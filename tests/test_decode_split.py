"""Split-KV decoding on the Triton backend (prefix_attn/triton/decode_launch.py, decode.split_forward): the prefix
and each row's text keys cut into splits that are the work items of one launch of the forward kernel (SPLIT_KV),
merged per query by a second launch. Checked against the float64 reference with the grid's rule (2x plain
PyTorch's own error at that precision), with split sizes forced small so that the interpreter runs several text
and prefix splits, several query tiles and the combine."""

import os

import pytest
import torch
from prefix_grid import FLOOR, Case, case_args, dtype_id, make_inputs, reference_fn

from prefix_attn import decode, ops, prefix_attention
from prefix_attn.reference import prefix_attention_reference

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
if "triton" not in ops.available_backends() or not ops.available_backends()["triton"].startswith("ok"):
    pytest.skip("Triton backend unavailable", allow_module_level=True)

from prefix_attn.triton import decode_launch  # noqa: E402
from prefix_attn.triton import kernels as triton_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# len_q 1 and 3 (and 16: four query tiles of a GQA-4 row); P 0, 1, 17; text 1, 17, 113; GQA 1 / 2 / 4; padding
# (one row down to a single key); softcap; a bank with per-entry lengths (0 and P among them), every row on one
# entry; non-causal; a head dim that is not a power of two; B = 1
SPLIT_GRID = [
    Case(3, 2, 1, 1, 17, 17, 16, masked=True),
    Case(2, 1, 4, 3, 113, 1, 32, masked=True),
    Case(4, 2, 2, 1, 113, 0, 16),
    Case(2, 2, 2, 3, 17, 0, 24, masked=True, softcap=2.5),
    Case(1, 2, 4, 1, 1, 17, 16),
    Case(3, 1, 1, 1, 1, 1, 16, masked=True),
    Case(5, 1, 2, 3, 17, 17, 16, masked=True, entries=3, lengths=True),
    Case(4, 2, 1, 1, 113, 17, 16, entries=2, ids="same", softcap=1.0),
    Case(3, 2, 4, 3, 17, 17, 32, causal=False, masked=True),
    Case(2, 1, 4, 16, 40, 17, 16),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of one 16-key block and enough programs wanted for every block to be a split (the interpreter's
    tiles are 16 x 16): several text and prefix splits at small lengths."""
    monkeypatch.setattr(decode_launch, "MIN_KEYS_PER_SPLIT", 16)
    monkeypatch.setattr(decode_launch, "PROGRAMS_PER_SM", 1024)


def _spy(monkeypatch):
    taken = []
    real = decode.split_forward
    monkeypatch.setattr(decode, "split_forward", lambda *a, **kw: taken.append(1) or real(*a, **kw))
    return taken


def _plan(case, dtype, q, extra):
    used = len(set(extra["prefix_ids"].tolist())) if "prefix_ids" in extra else 1
    rows = max(extra["prefix_ids"].tolist().count(e) for e in set(extra["prefix_ids"].tolist())) \
        if "prefix_ids" in extra else case.batch
    return decode_launch.plan(case.batch, case.heads_kv, case.group, case.len_q, case.len_k, case.num_prefix, dtype,
                              case.head_dim, decode_launch._sms(q.device), used, rows)


def _check(case, dtype, monkeypatch):
    """The op on the case's inputs (no gradient) against the float64 reference, by the grid's rule; -> its plan."""
    taken = _spy(monkeypatch)
    q, k, v, pk, pv, mask, _ = make_inputs(case, dtype, DEVICE)
    extra = case_args(case, DEVICE)
    cap = {"softcap": case.softcap} if case.softcap else {}
    with torch.no_grad():
        got = prefix_attention(q, k, v, pk, pv, causal=case.causal, attention_mask=mask, backend="triton", **extra,
                               **cap)
        want = reference_fn(torch.float64, case.softcap, **extra)(*(t.double() for t in (q, k, v, pk, pv)),
                                                                  causal=case.causal, attention_mask=mask)
        plain = reference_fn(dtype, case.softcap, **extra)(q, k, v, pk, pv, causal=case.causal,
                                                           attention_mask=mask)
    assert taken, "the split-KV decode path was not taken"
    assert got.dtype == dtype and got.shape == q.shape and torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    bound = 2.0 * (plain.double() - want).abs().max().item() + FLOOR[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"{case} {dtype_id(dtype)}: max error {err:.3e} > bound {bound:.3e}"
    return _plan(case, dtype, q, extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SPLIT_GRID, ids=str)
def test_split_decode_grid(case, dtype, small_splits, monkeypatch):
    plan = _check(case, dtype, monkeypatch)
    assert plan.text_splits == -(-case.len_k // 16) and plan.prefix_splits == -(-case.num_prefix // 16)


# The tiles a GPU compiles (BLOCK_N 64 or 32, query tiles of 16 / 32 rows), one key block a split: a prefix of a full
# 64-key block and a ragged tail, five text splits (the last of 44 keys); a bank with lengths at len_q 16 and
# D = 128; a masked head dim in float32
GPU_TILE_CASES = [
    (Case(3, 2, 4, 1, 300, 70, 64, masked=True), torch.bfloat16),
    (Case(2, 1, 2, 16, 130, 40, 128, entries=3, lengths=True, softcap=5.0), torch.float16),
    (Case(2, 2, 1, 3, 100, 17, 40, causal=False, masked=True), torch.float32),
]


@pytest.mark.parametrize("case,dtype", GPU_TILE_CASES, ids=[f"{c}-{dtype_id(d)}" for c, d in GPU_TILE_CASES])
def test_split_decode_with_gpu_tiles(case, dtype, monkeypatch):
    """The GPU's tiles under the interpreter (every load and store inside its tensors there: a stray address reads
    host memory silently where a GPU faults)."""
    import contextlib

    from oob import bounds_checked

    from prefix_attn.triton import tuning

    monkeypatch.setattr(decode_launch, "PROGRAMS_PER_SM", 1024)
    monkeypatch.setattr(decode_launch, "MIN_KEYS_PER_SPLIT", 16)
    tuning.gpu_tiles(True)
    try:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        with bounds_checked() if interpreting else contextlib.nullcontext():
            plan = _check(case, dtype, monkeypatch)
    finally:
        tuning.gpu_tiles(False)
    assert plan.block_n >= 32 and plan.text_splits == -(-case.len_k // plan.block_n)


def test_the_grid_runs_several_splits_and_tiles(small_splits):
    """The grid above exercises what it is for: more than one text split, prefix split and query tile."""
    plans = [_plan(c, torch.float32, torch.empty(0, device=DEVICE), case_args(c, DEVICE)) for c in SPLIT_GRID]
    assert max(p.text_splits for p in plans) >= 8 and max(p.prefix_splits for p in plans) >= 2
    assert any(p.text_items > c.batch * p.text_splits for p, c in zip(plans, SPLIT_GRID))  # several query tiles


def _scratch_bytes(plan, batch, heads_q, len_q, head_dim):
    return plan.splits * batch * heads_q * len_q * (head_dim + 1) * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_a_short_text_does_not_cut_a_long_prefix(dtype):
    """The prefix is sized on its own (a 100-key text once cut a 32k prefix at 128 keys: 257 splits, a 4.3 GB
    scratch at B = 64, Hq = 32, Tq = 16, D = 128): on an H100's 132 SMs the scratch stays small, a shared prefix or
    a bank; one row still splits the prefix to fill the GPU, under MAX_SPLITS per query."""
    from prefix_attn.triton import tuning

    tuning.gpu_tiles(True)
    try:
        for used, rows in ((1, 64), (8, 8), (3, 40)):
            plan = decode_launch.plan(64, 8, 4, 16, 100, 32768, dtype, 128, 132, used, rows)
            assert plan.splits <= 4 and _scratch_bytes(plan, 64, 32, 16, 128) < 256 << 20, plan
            assert plan.grid(8)[0] * 8 >= 132  # still a full wave
        plan = decode_launch.plan(1, 8, 4, 1, 100, 32768, dtype, 128, 132)
        assert 8 <= plan.prefix_splits and plan.splits <= decode_launch.MAX_SPLITS, plan
        assert plan.prefix_splits == -(-32768 // plan.prefix_keys_per_split) and plan.text_splits == 1
    finally:
        tuning.gpu_tiles(False)


def test_splits_per_query_are_capped(small_splits, monkeypatch):
    """More splits wanted than MAX_SPLITS: the keys per split grow, text and prefix share the cap; the result is
    unchanged."""
    monkeypatch.setattr(decode_launch, "MAX_SPLITS", 6)
    case = Case(2, 2, 2, 3, 113, 70, 16, masked=True)
    plan = _check(case, torch.float32, monkeypatch)
    assert plan.splits <= 6 and plan.text_splits >= 2 and plan.prefix_splits >= 2, plan
    assert plan.keys_per_split > 16 and plan.prefix_keys_per_split > 16


def test_a_bank_entry_with_fewer_rows_than_the_most(small_splits):
    """A bank whose entries hold 3 and 2 rows of 12 queries (16-row tiles): the smaller entry's third tile has no
    query (its key range is empty, it stores nothing); several prefix splits; out and lse as the reference's."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 8, 3, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(5, 2, 20, 16, generator=g).to(DEVICE) for _ in range(2))
    pk, pv = (torch.randn(3, 2, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    ids = torch.tensor([2, 0, 2, 2, 0], device=DEVICE)
    lengths = torch.tensor([33, 5, 40], dtype=torch.int32, device=DEVICE)
    plan = decode_launch.plan(5, 2, 4, 3, 20, 40, torch.float32, 16, decode_launch._sms(q.device), 2, 3)
    assert plan.block_m == 16 and plan.prefix_splits >= 2 and plan.prefix_items == 2 * plan.prefix_splits * 3
    out, lse = decode_launch.decode_fwd(q, k, v, pk, pv, None, True, 0.25, prefix_ids=ids, prefix_lengths=lengths)
    want, want_lse = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), softmax_scale=0.25,
                                                prefix_ids=ids, prefix_lengths=lengths, return_lse=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", ["one", "many"])
def test_lse_and_a_query_that_sees_nothing(splits, small_splits, monkeypatch):
    """The launcher's lse equals the reference's (natural log); P = 0 and a fully padded row: output 0, lse +inf."""
    if splits == "one":
        monkeypatch.setattr(decode_launch, "MIN_KEYS_PER_SPLIT", 1 << 20)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 2, 16, generator=g), torch.randn(3, 2, 40, 16, generator=g),
               torch.randn(3, 2, 40, 16, generator=g))
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    mask = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[2, :30] = False
    for num_prefix in (0, 5):
        pk, pv = torch.randn(2, num_prefix, 16).to(DEVICE), torch.randn(2, num_prefix, 16).to(DEVICE)
        out, lse = decode_launch.decode_fwd(q, k, v, pk, pv, mask, True, 0.25)
        want, want_lse = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), softmax_scale=0.25,
                                                    attention_mask=mask, return_lse=True)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse.masked_fill(want_lse == float("-inf"), float("inf")),
                                   atol=1e-5, rtol=1e-5)
        if num_prefix == 0:
            assert torch.equal(out[1], torch.zeros_like(out[1])) and (lse[1] == float("inf")).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
def test_nan_spreads_as_in_plain_attention(small_splits):
    """A NaN query and a NaN key make NaN outputs exactly where the reference has them."""
    q, k, v, pk, pv, _, _ = make_inputs(Case(4, 2, 2, 1, 40, 17, 16), torch.float32, DEVICE)
    q[0, 1, 0, 3] = float("nan")
    k[2, 1, 30, 0] = float("nan")
    pv[0, 4, 2] = float("nan")
    with torch.no_grad():
        got = prefix_attention(q, k, v, pk, pv, backend="triton")
        want = prefix_attention_reference(q, k, v, pk, pv)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """The torch functions the package itself calls (the interpreter's own calls aside); a function mode does not
    turn the op off its direct path as a dispatch mode would."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import traceback

        frames = [f.filename for f in traceback.extract_stack(limit=12)[:-1]]
        ours = next((f for f in reversed(frames) if os.sep + "prefix_attn" + os.sep in f
                     or os.sep + "triton" + os.sep in f), "")
        if os.sep + "prefix_attn" + os.sep in ours:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# what the package may call without a device kernel: allocations, views, shapes, strides, pointers
_NO_KERNEL = {"empty", "empty_like", "view", "__getitem__", "unsqueeze", "stride", "size", "dim", "data_ptr",
              "is_contiguous", "__get__", "to", "numel", "element_size", "type", "is_floating_point", "get_device",
              "is_complex", "__len__", "__index__", "__hash__", "__eq__", "storage_offset", "is_inference"}


@pytest.mark.parametrize("bank", [False, True])
def test_a_decode_call_is_two_launches(bank, monkeypatch):
    """One decode call (len_q = 1, GQA, padded cache, softcap; a shared prefix or a bank with lengths): the split
    kernel and the combine, no other Triton launch and no torch compute kernel (the bank's row plan is built once
    per prefix_ids tensor, by the first call)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the interpreter's launches (on a GPU cached launches skip JITFunction.run)")
    taken = _spy(monkeypatch)
    launches = []
    cls = type(triton_kernels._prefix_attn_fwd_kernel)
    real_run = cls.run
    monkeypatch.setattr(cls, "run", lambda self, *a, **kw: launches.append(self.fn.__name__) or real_run(self, *a,
                                                                                                         **kw))
    q, k, v, pk, pv, mask, _ = make_inputs(Case(8, 2, 4, 1, 50, 17, 16, masked=True, entries=3 if bank else 0,
                                                lengths=bank), torch.bfloat16)
    extra = case_args(Case(8, 2, 4, 1, 50, 17, 16, entries=3 if bank else 0, lengths=bank))
    with torch.no_grad():
        prefix_attention(q, k, v, pk, pv, attention_mask=mask, softcap=2.0, backend="triton", **extra)
        launches.clear()
        with _TorchCalls() as calls:
            prefix_attention(q, k, v, pk, pv, attention_mask=mask, softcap=2.0, backend="triton", **extra)
    assert taken
    assert launches == ["_prefix_attn_fwd_kernel", "_prefix_attn_combine_kernel"], launches
    compute = [c for c in calls.calls if c not in _NO_KERNEL]
    assert not compute, compute


def test_compiled_decode_step_matches_eager(small_splits):
    """Under torch.compile (no gradient) the split path is one opaque custom op: no graph break, eager's output."""
    q, k, v, pk, pv, mask, _ = make_inputs(Case(4, 2, 2, 1, 40, 17, 16, masked=True), torch.float32, DEVICE)

    def step(q, k, v):
        return prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="triton")

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
        want = step(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [Case(8, 8, 4, 1, 4096, 64, 128, masked=True), Case(1, 8, 4, 1, 4096, 64, 128),
                                  Case(32, 12, 1, 1, 1024, 64, 64, masked=True),
                                  Case(8, 8, 4, 3, 4096, 64, 128, entries=3, lengths=True)], ids=str)
def test_split_decode_at_real_sizes(case, monkeypatch):
    """On a GPU, the Llama-3-8B GQA and GPT-2 decode shapes (4k / 1k cache, P = 64) with the real split rule."""
    _check(case, torch.bfloat16, monkeypatch)
