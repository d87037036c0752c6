"""grouped_forward against the stock call on the concatenated batch (prompts repeated G times): values at every
position and the gradients of every trainable parameter, float64, padded prompts and completions, GPT-2 and the
Llama family, with and without a prefix, under activation checkpointing and bf16 autocast."""

import copy
import os
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from test_transformers_integration import VOCAB, tiny_model  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402

N, G, LP, LC = 2, 3, 9, 6


def batch(seed=0, prompt_pad=True, completion_pad=True, n=N, g=G, lp=LP, lc=LC):
    """TRL's GRPO layout: prompts left-padded, completions right-padded."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (n, lp), generator=gen)
    pmask = torch.ones(n, lp, dtype=torch.long)
    if prompt_pad and n > 1:
        pmask[1, :4] = 0
    completion = torch.randint(3, VOCAB, (n * g, lc), generator=gen)
    cmask = torch.ones(n * g, lc, dtype=torch.long)
    if completion_pad and n * g > 2:
        cmask[1, lc - 2:] = 0
        cmask[2, 1:] = 0
    return prompt, pmask, completion, cmask


def weights(seed, n=N, g=G, lp=LP, lc=LC, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, lp, VOCAB, generator=gen, dtype=dtype),
            torch.randn(n * g, lc, VOCAB, generator=gen, dtype=dtype))


def grouped_loss(model, inputs, w, g=G, **kw):
    """grouped_forward and the weighted sum of its logits; a stock model is switched with enable_grouped for the
    call (and back: the backward needs no switch without activation checkpointing)."""
    switch = model.config._attn_implementation != "prefix_attn"
    if switch:
        prefix_attn.enable_grouped(model)
    try:
        out = prefix_attn.grouped_forward(model, *inputs, g, **kw)
    finally:
        if switch:
            prefix_attn.disable_grouped(model)
    pmask, cmask = inputs[1], inputs[3]
    loss = (out.completion_logits * w[1] * cmask[..., None]).sum() + (out.prompt_logits * w[0] * pmask[..., None]).sum()
    return out, loss


def stock_loss(model, inputs, w, g=G, with_prompt=True):
    prompt, pmask, completion, cmask = inputs
    lp = prompt.shape[1]
    logits = model(input_ids=torch.cat([prompt.repeat_interleave(g, 0), completion], 1),
                   attention_mask=torch.cat([pmask.repeat_interleave(g, 0), cmask], 1)).logits
    prompt_logits, completion_logits = logits[::g, :lp], logits[:, lp:]
    loss = (completion_logits * w[1] * cmask[..., None]).sum()
    if with_prompt:
        loss = loss + (prompt_logits * w[0] * pmask[..., None]).sum()
    return prompt_logits, completion_logits, loss


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def max_rel(a, b):
    """The largest |a - b| of a tensor or dict of tensors, relative to the largest |b| of that tensor."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(max_rel(a[k], b[k]) for k in a)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _rms_norm_in_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_model(kind, **overrides):
    """A tiny model in float64 throughout: Llama-family RMSNorm casts to float32 by design, whatever the model's
    dtype (stock eager and sdpa differ by ~1e-7 there); here it computes in the model's dtype, on both sides."""
    if kind == "qwen3":  # q/k RMSNorm, GQA 6:2
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=96, **overrides))
    else:
        model = tiny_model(kind, **overrides)
    model = model.double()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm_in_dtype, m)
    return model


TOL = 1e-10  # relative to the largest value of each tensor: float64 rounding


def assert_matches_stock(model, inputs, w, g=G, tol=TOL, grad_tol=TOL):
    """grouped_forward's logits and the gradients of every trainable parameter against the stock call's, each
    within ``tol`` / ``grad_tol`` relative to its largest value; returns (output, gradients)."""
    want_p, want_c, want_loss = stock_loss(model, inputs, w, g=g)
    want_loss.backward()
    want_g = grads(model)
    out, loss = grouped_loss(model, inputs, w, g=g)
    loss.backward()
    got = grads(model)
    assert max_rel(out.prompt_logits.detach(), want_p.detach()) <= tol
    assert max_rel(out.completion_logits.detach(), want_c.detach()) <= tol
    assert max_rel(got, want_g) <= grad_tol, {k: max_rel(got[k], want_g[k]) for k in got}
    return out, got


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
def test_matches_the_stock_concatenated_call(kind):
    model = float64_model(kind).eval()
    with pytest.raises(ValueError, match="enable_grouped"):
        prefix_attn.grouped_forward(model, *batch(), G)
    assert_matches_stock(model, batch(), weights(1))
    assert_matches_stock(model, batch(seed=3, prompt_pad=False, completion_pad=False), weights(2))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 17, 1), (3, 1, 5, 7), (2, 2, 1, 3)])
def test_odd_shapes(shape):
    n, g, lp, lc = shape
    model = float64_model("llama").eval()
    assert_matches_stock(model, batch(seed=5, n=n, g=g, lp=lp, lc=lc), weights(6, n, g, lp, lc), g=g)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
def test_with_a_prefix_enabled(kind):
    """Base weights and prefix trainable: every completion sees the prefix, its prompt and itself."""
    model = float64_model(kind).eval()
    prefix = PrefixTuning(model.config, num_virtual_tokens=5, dtype=torch.float64)
    with torch.no_grad():
        prefix.prefix_kv.normal_(0.0, 0.5)
    prefix_attn.enable(model, prefix, freeze_model=False)
    _, got = assert_matches_stock(model, batch(seed=7), weights(8))
    assert "prefix_attn.prefix_kv" in got and len(got) == len(list(model.parameters()))


def test_completion_only_log_probs_and_the_prompt_computed_once():
    model = float64_model("gpt2").eval()
    inputs = batch(seed=9)
    seen = []
    handle = model.transformer.wte.register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
    prefix_attn.enable_grouped(model)
    full = prefix_attn.grouped_forward(model, *inputs, G)
    only = prefix_attn.grouped_forward(model, *inputs, G, completion_only=True)
    prefix_attn.disable_grouped(model)
    handle.remove()
    assert seen == [N * LP + N * G * LC] * 2  # each prompt token embedded once, not G times
    assert only.prompt_logits.shape == (N, 1, VOCAB) and only.completion_logits.shape == (N * G, LC, VOCAB)
    assert max_rel(only.completion_logits, full.completion_logits) <= TOL  # lm_head over fewer rows
    assert max_rel(only.prompt_logits, full.prompt_logits[:, -1:]) <= TOL
    # GRPO's per-token log-probs (TRL: log_softmax(logits[:, Lp - 1:-1] / T) at the completion tokens)
    prompt, pmask, completion, cmask = inputs
    logits = model(input_ids=torch.cat([prompt.repeat_interleave(G, 0), completion], 1),
                   attention_mask=torch.cat([pmask.repeat_interleave(G, 0), cmask], 1)).logits
    want = torch.log_softmax(logits[:, LP - 1:-1] / 0.7, -1).gather(-1, completion[..., None])[..., 0]
    for out in (full, only):
        got = out.completion_log_probs(completion, temperature=0.7)
        assert got.shape == (N * G, LC)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="completion_ids must be"):
        only.completion_log_probs(completion[:, 1:])


@pytest.mark.parametrize("kind,reentrant", [("gpt2", False), ("llama", False), ("llama", True)])
def test_activation_checkpointing(kind, reentrant):
    model = float64_model(kind)
    inputs, w = batch(seed=11), weights(12)
    reference = copy.deepcopy(model).eval()
    _, _, want_loss = stock_loss(reference, inputs, w)
    want_loss.backward()
    want = grads(reference)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # dropouts are 0 in tiny_model: train mode only turns checkpointing on
    prefix_attn.enable_grouped(model)
    for _ in range(2):  # enable_grouped stays; a plain forward and generate() still run
        _, loss = grouped_loss(model, inputs, w)
        loss.backward()
        got = grads(model)
        assert max_rel(got, want) <= TOL, {k: max_rel(got[k], want[k]) for k in got}
    model.eval()
    ids = torch.cat([inputs[0][:1], inputs[2][:1]], 1)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-11, rtol=0)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False),
                               reference.generate(ids, max_new_tokens=3, do_sample=False))
    prefix_attn.disable_grouped(model)
    assert model.config._attn_implementation == "sdpa"


def test_enable_grouped_then_a_prefix():
    """enable_grouped, then enable with a prefix, then disable_grouped and disable: the stock model again."""
    model = float64_model("gpt2").eval()
    ids = batch()[0]
    want = model(ids).logits
    prefix_attn.enable_grouped(model)
    prefix_attn.enable(model, PrefixTuning(model.config, num_virtual_tokens=3, dtype=torch.float64))
    prefix_attn.disable_grouped(model)
    assert model.config._attn_implementation == "prefix_attn"
    prefix_attn.disable(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)


def test_bf16_autocast_within_stock_error():
    """Under bf16 autocast, grouped and stock runs against the float64 stock run: ours within 2x (logits) / 3x
    (gradients) of the stock error."""
    model = tiny_model("llama").eval()
    inputs, w = batch(seed=13), weights(14, dtype=torch.float32)
    exact = float64_model("llama").eval()
    _, want_c, want_loss = stock_loss(exact, inputs, tuple(x.double() for x in w))
    want_loss.backward()
    want = {k: v.float() for k, v in grads(exact).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stock_c, loss = stock_loss(model, inputs, w)
    loss.backward()
    stock_g = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = grouped_loss(model, inputs, w)
    loss.backward()
    got = grads(model)
    valid = inputs[3].bool()
    err = (out.completion_logits.float() - want_c.float())[valid].abs().max()
    stock_err = (stock_c.float() - want_c.float())[valid].abs().max()
    assert err <= 2 * stock_err + 1e-6
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 3 * (stock_g[k] - want[k]).abs().max() + 1e-6, k


def test_triton_backend(monkeypatch):
    """The same split through the Triton kernels (the interpreter on a CPU), float32."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    model = tiny_model("llama").eval()
    assert_matches_stock(model, batch(seed=15), weights(16, dtype=torch.float32), tol=1e-5, grad_tol=1e-4)


def test_selective_log_probs_in_blocks(monkeypatch):
    """completion_log_probs' block-wise log-softmax: float64 values and gradients as log_softmax + gather, with rows
    picked several times and several blocks; in bfloat16 the gradient is the float32 one rounded once."""
    from prefix_attn.integrations.grouped import _SelectiveLogProbs

    monkeypatch.setattr(_SelectiveLogProbs, "_blocks", staticmethod(lambda rows, vocab: [(0, 3), (3, 4), (4, rows)]))
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(9, 11, generator=gen, dtype=torch.float64)).requires_grad_()
    used = torch.tensor([0, 5, 2, 6, 3, 8])  # rows 1, 4 and 7 unused: zero gradient
    where = torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5])
    tokens = torch.tensor([1, 1, 4, 0, 10, 3, 3, 7, 2])
    g = torch.randn(9, generator=gen, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        got = _SelectiveLogProbs.apply(logits, used, where, tokens, temperature)
        (dgot,) = torch.autograd.grad(got, logits, g)
        want = torch.log_softmax(logits / temperature, -1)[used[where], tokens]
        (dwant,) = torch.autograd.grad(want, logits, g)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(dgot, dwant, atol=1e-12, rtol=1e-12)
    half = logits.detach().bfloat16().requires_grad_()
    (dhalf,) = torch.autograd.grad(_SelectiveLogProbs.apply(half, used, where, tokens, 1.0), half, g.float())
    ref = half.detach().float().requires_grad_()
    (dref,) = torch.autograd.grad(torch.log_softmax(ref, -1)[used[where], tokens], ref, g.float())
    assert dhalf.dtype == torch.bfloat16
    torch.testing.assert_close(dhalf.float(), dref.bfloat16().float(), atol=1e-6, rtol=0.01)


def test_no_mask_of_the_whole_row(monkeypatch):
    """A sliding-window model (Mistral's default 4096) builds no [T, T] mask of the packed row."""
    from prefix_attn.integrations import attention

    model = tiny_model("mistral", sliding_window=4096).eval()
    prefix_attn.enable_grouped(model)

    def refuse(*args, **kwargs):
        raise AssertionError("sdpa_mask built a mask of the whole packed row")

    monkeypatch.setattr(attention, "sdpa_mask", refuse)
    out = prefix_attn.grouped_forward(model, *batch(), G)
    assert out.completion_logits.shape == (N * G, LC, VOCAB)


def test_refusals():
    inputs = batch()
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                             ffn_dim=32, num_attention_heads=2))
    with pytest.raises(NotImplementedError, match="model_type='opt'"):
        prefix_attn.grouped_forward(opt, *inputs, G)
    model = prefix_attn.enable_grouped(tiny_model("gpt2").eval())
    with pytest.raises(ValueError, match=r"completion_ids must be \[num_prompts \* group_size=4"):
        prefix_attn.grouped_forward(model, *inputs, 2)
    with pytest.raises(ValueError, match="prompt_mask must be"):
        prefix_attn.grouped_forward(model, inputs[0], inputs[1][:, :3], inputs[2], inputs[3], G)
    with pytest.raises(ValueError, match="completion_mask must be"):
        prefix_attn.grouped_forward(model, inputs[0], inputs[1], inputs[2], inputs[3][:1], G)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        prefix_attn.grouped_forward(model, *inputs, 0)
    with pytest.raises(ValueError, match="builds attention_mask itself"):
        prefix_attn.grouped_forward(model, *inputs, G, attention_mask=inputs[1])
    with pytest.raises(ValueError, match="completion_mask is on meta"):
        prefix_attn.grouped_forward(model, inputs[0], inputs[1], inputs[2], inputs[3].to("meta"), G)
    prefix_attn.disable_grouped(model)
    bank = prefix_attn.PrefixBank({"a": PrefixTuning(model.config, num_virtual_tokens=2)})
    prefix_attn.enable(model, bank)
    with pytest.raises(NotImplementedError, match="PrefixBank"):
        prefix_attn.grouped_forward(model, *inputs, G)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu():
    """On a GPU (Triton kernels): float32 logits and gradients against the stock call on the same device."""
    model = tiny_model("llama").cuda().eval()
    inputs = tuple(t.cuda() for t in batch(seed=17))
    w = tuple(t.cuda() for t in weights(18, dtype=torch.float32))
    assert_matches_stock(model, inputs, w, tol=1e-4, grad_tol=1e-3)
