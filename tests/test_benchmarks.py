"""The benchmark suite on the CPU: its baselines compute prefix attention correctly, and it runs end to end.

The baselines are checked in float64 against ``prefix_attention_reference`` (outputs and all five gradients),
including GQA, P = 0 and len_q < len_k; then the suite runs on a tiny shape and must write valid JSON/CSV.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

import pytest
import torch

from prefix_attn.reference import prefix_attention_reference

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _load(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("bench_attention")

# (batch, heads_q, heads_kv, len_q, len_k, P, head_dim)
CASES = [
    (2, 4, 4, 17, 17, 5, 16),
    (2, 4, 2, 17, 17, 3, 16),  # GQA 2
    (1, 8, 2, 13, 13, 7, 32),  # GQA 4
    (2, 4, 4, 17, 17, 0, 16),  # no prefix
    (2, 4, 2, 9, 9, 0, 8),  # no prefix, GQA
    (2, 4, 2, 5, 17, 6, 16),  # len_q < len_k: bottom-right aligned queries
]
IDS = [f"B{b}-Hq{hq}-Hkv{hkv}-Tq{tq}-Tk{tk}-P{p}-D{d}" for b, hq, hkv, tq, tk, p, d in CASES]


def _inputs(case, seed=0):
    b, hq, hkv, tq, tk, p, d = case
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, tq, d), (b, hkv, tk, d), (b, hkv, tk, d), (hkv, p, d), (hkv, p, d)]
    leaves = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]
    dout = torch.randn(b, hq, tq, d, generator=gen, dtype=torch.float64)
    return leaves, dout


def _check_against_reference(fn, case, tol=1e-10):
    leaves, dout = _inputs(case)
    scale = case[-1] ** -0.5
    want = prefix_attention_reference(*leaves, causal=True, softmax_scale=scale)
    got = fn(*leaves)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    g_want = torch.autograd.grad(want, leaves, dout)
    g_got = torch.autograd.grad(got, leaves, dout)
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), g_got, g_want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("softmax_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_eager_baseline_matches_reference(case, softmax_dtype):
    """Exact with a float64 softmax; within float32 rounding with transformers' float32 softmax."""
    b, hq, hkv, tq, tk, p, d = case
    mask = bench.additive_prefix_mask(tq, tk, p, torch.float64, "cpu")

    def peft(q, k, v, pk, pv):
        return bench.peft_eager_attention(q, k, v, pk, pv, mask, d**-0.5, softmax_dtype=softmax_dtype)

    _check_against_reference(peft, case, tol=1e-10 if softmax_dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sdpa_baseline_matches_reference(case):
    b, hq, hkv, tq, tk, p, d = case
    sdpa = bench.make_sdpa("auto", (b, hq, tq, d), tk, p, d**-0.5, hq // hkv)
    _check_against_reference(sdpa, case)


# (batch, heads_q, heads_kv, len_q, len_k, P, head_dim) for the zero-row padding of sdpa_flash / sdpa_cudnn
SQUARE_CASES = [
    (2, 3, 3, 17, 17, 0, 16),
    (2, 3, 3, 17, 17, 1, 16),
    (2, 3, 3, 17, 17, 5, 8),
    (2, 6, 2, 17, 17, 0, 16),  # GQA 3
    (2, 6, 2, 17, 17, 1, 16),
    (1, 3, 1, 17, 17, 5, 16),  # MQA (GQA 3)
    (2, 6, 2, 5, 17, 5, 16),  # len_q < len_k: the queries are the last rows
    (2, 3, 3, 1, 17, 1, 8),  # one query, as in decoding
]
SQUARE_IDS = [f"B{b}-Hq{hq}-Hkv{hkv}-Tq{tq}-Tk{tk}-P{p}-D{d}" for b, hq, hkv, tq, tk, p, d in SQUARE_CASES]


@pytest.mark.parametrize("gqa", [None, False], ids=["gqa-probed", "repeat_kv"])
@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
@pytest.mark.parametrize("case", SQUARE_CASES, ids=SQUARE_IDS)
def test_sdpa_square_baseline_matches_reference(case, backend, gqa):
    """The padding behind sdpa_flash / sdpa_cudnn (zero query rows in front, square is_causal=True, rows dropped) is
    exact, output and all five gradients, through the same builder with a CPU SDPA backend forced: the CPU's math
    kernel and its own flash kernel (which the GPU methods do not run; CUDA's flash and cuDNN need a GPU)."""
    from torch.nn.attention import SDPBackend

    b, hq, hkv, tq, tk, p, d = case
    fn = bench.make_sdpa_square(getattr(SDPBackend, backend), (b, hq, tq, d), tk, hkv, d**-0.5, torch.float64, "cpu",
                                gqa=gqa)
    _check_against_reference(fn, case)


def test_sdpa_square_refuses_more_queries_than_keys():
    from torch.nn.attention import SDPBackend

    with pytest.raises(ValueError, match="len_q 9 > len_k 8"):
        bench.make_sdpa_square(SDPBackend.MATH, (1, 2, 9, 8), 8, 2, 8**-0.5, torch.float64, "cpu")
    xs = [torch.randn(1, 2, 9, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(2, 3, 8),
          torch.randn(2, 3, 8)]
    with pytest.raises(ValueError, match="len_q 9 > len_k 8"):
        bench.sdpa_square(*xs)


def test_sdpa_flash_and_cudnn_are_unavailable_on_the_cpu():
    import argparse

    methods = bench.build_methods(argparse.Namespace(quick=True), (1, 4, 9, 8), 1, 9, 3, torch.float32,
                                  torch.device("cpu"), 8**-0.5, 2, "torch", ["sdpa_flash", "sdpa_cudnn"])
    assert methods == {name: f"SDPA's {name[5:]} kernel is CUDA-only (the padding is tested on the CPU's SDPA)"
                       for name in ("sdpa_flash", "sdpa_cudnn")}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("packed", [False, True], ids=["expanded", "packed"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_flex_baselines_forward_match_reference(case, packed):
    """FlexAttention uncompiled, forward only (it has no CPU backward): the two mask_mods are right."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    b, hq, hkv, tq, tk, p, d = case
    fn = bench.make_flex(packed, (b, hq, tq, d), b, tk, p, d**-0.5, hq // hkv, "cpu", compiled=False)
    leaves, _ = _inputs(case)
    xs = [t.detach() for t in leaves]
    want = prefix_attention_reference(*xs, causal=True, softmax_scale=d**-0.5)
    with torch.no_grad():
        got = fn(*xs)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_flops_convention():
    fwd, bwd = bench.attention_flops(8, 12, 1024, 1024, 64, 64)
    assert fwd == 4 * 8 * 12 * 1024 * 64 * (64 + 1024 / 2)
    assert bwd == 2.5 * fwd


def test_suite_runs_on_a_tiny_shape_and_writes_json(tmp_path):
    results = bench.main(
        [
            "--shapes",
            "tiny",
            "--prefix",
            "0,5",
            "--modes",
            "fwd,bwd,fwdbwd",
            "--methods",
            "prefix_attn,peft_eager,sdpa[auto],sdpa_flash,sdpa_cudnn,flash_attn",
            "--device",
            "cpu",
            "--cpu-min-run-time",
            "0.005",
            "--out",
            str(tmp_path),
            "--no-table",
        ]
    )
    files = sorted(os.listdir(tmp_path))
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1 and json_files[0].startswith("attention_"), files
    with open(tmp_path / json_files[0]) as f:
        saved = json.load(f)
    meta = saved["meta"]
    for key in ("device_name", "torch", "triton", "date", "git_commit", "prefix_attn_backend", "flops"):
        assert meta.get(key), key
    rows = saved["rows"]
    timed = [r for r in rows if r["method"] in ("prefix_attn", "peft_eager", "sdpa[auto]")]
    assert len(timed) == 3 * 2 * 3  # methods x P x modes
    for r in timed:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0
        if r["method"] != "prefix_attn":
            assert r["err_vs_prefix_attn"] is not None and r["err_vs_prefix_attn"] < 1e-3
    for name in ("flash_attn", "sdpa_flash", "sdpa_cudnn"):  # CUDA-only: recorded with the reason, not timed
        unavailable = [r for r in rows if r["method"] == name]
        assert len(unavailable) == 2 * 3 and all(r["status"].startswith("unavailable: ") for r in unavailable)
    assert {t["status"] for t in saved["targets"]} <= {"met", "missed", "no data"}
    assert len(saved["targets"]) == 5
    assert saved == json.loads(json.dumps(results, default=str))
    with open(tmp_path / json_files[0].replace(".json", ".csv")) as f:
        lines = [line for line in f if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    assert "== targets" in bench.summary(saved)

    pytest.importorskip("matplotlib")
    plot = _load("plot")
    written = plot.main([str(tmp_path / json_files[0])])
    assert written and all(os.path.getsize(p) > 0 for p in written)


def test_train_step_benchmark_runs_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    train = _load("bench_train_step")
    results = train.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--prefix",
            "4",
            "--models",
            "llama",
            "--out",
            str(tmp_path),
        ]
    )  # the tiny llama has GQA
    rows = results["rows"]
    assert {r["path"] for r in rows} == {"peft[eager]", "peft[sdpa]", "prefix_attn"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0
        if r["path"] != "peft[eager]":
            assert r["grad_err"] < 1e-4 and r["loss_diff"] < 1e-4  # same prefix, same loss and gradient
    assert any(f.startswith("train_step_") and f.endswith(".json") for f in os.listdir(tmp_path))


def test_bank_benchmark_baseline_and_quick_run(capsys):
    """gather + expand/concat + SDPA computes the bank op (float64, outputs and the bank gradient), and the
    benchmark's quick run prints its table."""
    bench = _load("bench_bank")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bank = [torch.randn(4, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ids = torch.tensor([3, 0, 3])
    got = bench.gather_sdpa(q, k, v, *bank, ids)
    want = prefix_attention_reference(q, k, v, *bank, prefix_ids=ids)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.sum(), bank)
    g2 = torch.autograd.grad(want.sum(), bank)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    from prefix_attn.ops import _cpu_status

    if _cpu_status()[0] is None:
        pytest.skip("the native CPU kernel is not built")
    sys.argv = ["bench_bank.py", "--quick"]
    bench.main()
    out = capsys.readouterr().out
    assert "bank-1 / shared" in out and "gather-sdpa / bank-B" in out
    assert out.strip().splitlines()[-1].startswith("| 4 | 8 | 256 | 64 | 32 |")


def test_packed_benchmark_quick_run(capsys):
    pytest.importorskip("transformers")
    bench = _load("bench_packed")
    bench.main(["--quick", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "| padded |" in out and "| packed |" in out and "padding fraction" in out


def test_dropout_benchmark_quick_run(capsys):
    """The benchmark's SDPA context row computes dropout-free attention at p = 0 like the op, and the quick run
    (correctness against float64 with the same mask first) prints its table."""
    bench = _load("bench_dropout")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(2, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(bench.sdpa_dropout(q, k, v, pk, pv, 0.0), prefix_attention_reference(q, k, v, pk, pv))
    from prefix_attn.ops import _cpu_status

    if _cpu_status()[0] is None:
        pytest.skip("the native CPU kernel is not built")
    bench.main(["--quick", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "p=0.1 / p=0" in out and out.strip().splitlines()[-1].startswith("| 2 | 4 | 128 | 64 | 16 |")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_benchmarks_run_on_a_tiny_shape(dtype):
    """bench_cpu.py's correctness gate and side-by-side timing, and profile_cpu.py's phases, end to end."""
    from prefix_attn import cpu as cpu_backend

    if not cpu_backend.is_available()[0]:
        pytest.skip("native CPU kernel unavailable")
    bench_cpu, profile_cpu = _load("bench_cpu"), _load("profile_cpu")
    cfg = (2, 2, 9, 16, 3)  # batch, heads, len, head_dim, P
    old = bench_cpu.DTYPE
    bench_cpu.DTYPE = dtype
    try:
        errs = bench_cpu.check(cfg)
        timing = bench_cpu.time_pair(cfg, rounds=2, warmup=1)
    finally:
        bench_cpu.DTYPE = old
    assert set(errs) == {"cpu", "sdpa"} and timing["ratio_median"] > 0
    phases = profile_cpu.phases(cfg, dtype, rounds=1)
    assert all(phases[k] > 0 for k in ("fwd", "bwd", "bwd dq", "bwd dkv", "bwd prefix"))
    assert bench_cpu.mm_rate(n=64, repeats=3) > 0


def test_decode_benchmarks_run_on_a_tiny_shape(monkeypatch, capsys):
    """bench_decode_cpu.py (its float64 check of every variant, shared prefix and bank) and bench_generate.py end
    to end on tiny shapes."""
    from prefix_attn import cpu as cpu_backend

    if not cpu_backend.is_available()[0]:
        pytest.skip("native CPU kernel unavailable")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    decode_bench, generate_bench = _load("bench_decode_cpu"), _load("bench_generate")
    monkeypatch.setattr(decode_bench, "SHAPES", [(16, 4, 2, 9, 33, 16, 0), (1, 2, 2, 5, 7, 8, 0), (1, 2, 2, 5, 7, 8, 0),
                                                 (1, 2, 2, 5, 7, 8, 0), (16, 4, 4, 5, 17, 8, 3)])
    decode_bench.main(["--quick", "--rounds", "1"])
    decode_bench.main(["--quick", "--rounds", "1", "--len-q", "3"])
    decode_bench.threshold(1, len_qs=(1,), batches=(2,))
    generate_bench.main(["--quick", "--batch", "3", "--prefix", "6", "--prompt", "4", "--new", "2"])
    out = capsys.readouterr().out
    assert "| 1 | B2 Hq32 Hkv8 T512 P1024 D128 |" in out
    assert "| B16 Hq4 Hkv2 T9 P33 D16 |" in out and "| B16 Hq4 Hkv4 T5 P17 D8 bank3 |" in out
    assert "| gpt2 |" in out and "| llama |" in out and "| no |" not in out  # PEFT's tokens, where it runs


def test_grouped_benchmark_runs_on_a_tiny_shape(capsys):
    """bench_grouped.py end to end (its agreement check first), and its peak-memory child process."""
    import argparse

    pytest.importorskip("transformers")
    bench = _load("bench_grouped")
    bench.main(["--quick", "--prompts", "2", "--group", "3", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "| all |" in out and "| completions |" in out and "| NO " not in out
    args = argparse.Namespace(prompts=2, group=3, prompt_len=16, completion_len=4, layers=1, width=64, vocab=64)
    assert bench.peak_memory(args, "grouped", "all") > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_profile_calls_runs_on_a_tiny_shape(tmp_path):
    """profile_calls.py (the GPU check's host-against-device profile) end to end on the CPU: a training and a decode
    call of the tiny shape, their host time from the profiler's trace, the table and the traces written."""
    profile_calls = _load("profile_calls")
    assert profile_calls.main(["--device", "cpu", "--shapes", "tiny", "--calls", "2", "--prefix", "5",
                               "--dtype", "float32", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("profile_*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["shape"], r["call"]) for r in rows] == [("tiny", "train"), ("tiny", "decode")]
    for r in rows:
        assert 0 < r["host_us"] <= r["wall_us"] * 1.05 and r["device_us"] is None  # no CUDA activity on a CPU
    assert (tmp_path / "trace_tiny_train.json").exists() and (tmp_path / "trace_tiny_decode.json").exists()
    assert "| tiny | decode |" in json_path.with_suffix(".md").read_text()
