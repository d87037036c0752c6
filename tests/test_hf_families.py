"""Every causal-LM family: prefix_attn either matches PEFT's prefix tuning exactly or refuses clearly.

For each family a tiny random model (2 layers, hidden 64, float32) runs twice: as a PEFT prefix-tuning model,
and as the stock model with ``prefix_attn.enable`` and the same prefix values (``PrefixTuning.from_peft``).
"match" families must agree on logits at every position of a left- and right-padded batch, the loss, the prefix
gradient and left-padded greedy generation; "refuse" families must raise at ``enable`` or at the first call with
a message that says why. The table in docs/huggingface.md is this file's FAMILIES.
"""

import copy
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import prefix_attn  # noqa: E402
from prefix_attn import PrefixTuning  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_versions import CACHE_KW, FALCON_INTERFACE, NEW_CACHE, cache_out, greedy_without_cache  # noqa: E402

T = transformers
P = 5
# from 5.24 GPT-J and CodeGen run attention through AttentionInterface, from 5.25 Falcon (hf_versions.py)
VOCAB = 101
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def cfg(cls, drop=(), **kw):
    d = {**COMMON, **kw}
    for key in drop:
        d.pop(key)
    return cls(**d)


def model(name):
    b = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=96,
                                                       bos_token_id=1, eos_token_id=2, attn_pdrop=0.0)),
        "llama": lambda: T.LlamaForCausalLM(cfg(T.LlamaConfig)),
        "mistral": lambda: T.MistralForCausalLM(cfg(T.MistralConfig, sliding_window=64)),
        "mixtral": lambda: T.MixtralForCausalLM(cfg(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(cfg(T.Qwen2Config)),
        "qwen3": lambda: T.Qwen3ForCausalLM(cfg(T.Qwen3Config, head_dim=16)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(cfg(T.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32, shared_expert_intermediate_size=32)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(cfg(T.Qwen3MoeConfig, head_dim=16, num_experts=4,
                                                       num_experts_per_tok=2, moe_intermediate_size=32)),
        "gemma": lambda: T.GemmaForCausalLM(cfg(T.GemmaConfig, head_dim=16)),
        # logit softcapping 2.0 (on N(0, 0.5) prefixes it is active), eager attention as Gemma 2 recommends
        "gemma2": lambda: T.Gemma2ForCausalLM(cfg(T.Gemma2Config, head_dim=16, sliding_window=64,
                                                  attn_logit_softcapping=2.0, attn_implementation="eager")),
        "gemma3_text": lambda: T.Gemma3ForCausalLM(cfg(T.Gemma3TextConfig, head_dim=16, sliding_window=64,
                                                       layer_types=["sliding_attention", "full_attention"])),
        "phi": lambda: T.PhiForCausalLM(cfg(T.PhiConfig, resid_pdrop=0.0, embd_pdrop=0.0)),
        "phi3": lambda: T.Phi3ForCausalLM(cfg(T.Phi3Config)),
        "phimoe": lambda: T.PhimoeForCausalLM(cfg(T.PhimoeConfig, num_local_experts=4, num_experts_per_tok=2)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64,
                                                    num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64,
                                                    max_position_embeddings=96, dropout=0.0, attention_dropout=0.0,
                                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(cfg(T.GPTNeoXConfig, drop=("num_key_value_heads",))),
        "stablelm": lambda: T.StableLmForCausalLM(cfg(T.StableLmConfig)),
        "starcoder2": lambda: T.Starcoder2ForCausalLM(cfg(T.Starcoder2Config, sliding_window=None)),
        "olmo": lambda: T.OlmoForCausalLM(cfg(T.OlmoConfig)),
        "olmo2": lambda: T.Olmo2ForCausalLM(cfg(T.Olmo2Config)),
        "olmoe": lambda: T.OlmoeForCausalLM(cfg(T.OlmoeConfig, num_experts=4, num_experts_per_tok=2)),
        "cohere": lambda: T.CohereForCausalLM(cfg(T.CohereConfig)),
        "cohere2": lambda: T.Cohere2ForCausalLM(cfg(T.Cohere2Config, sliding_window=64,
                                                    layer_types=["sliding_attention", "full_attention"])),
        "glm": lambda: T.GlmForCausalLM(cfg(T.GlmConfig, head_dim=16)),
        "glm4": lambda: T.Glm4ForCausalLM(cfg(T.Glm4Config, head_dim=16)),
        "granite": lambda: T.GraniteForCausalLM(cfg(T.GraniteConfig)),
        "persimmon": lambda: T.PersimmonForCausalLM(cfg(T.PersimmonConfig, drop=("num_key_value_heads",))),
        "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=96, multi_query=True, bos_token_id=1,
            eos_token_id=2)),
        "biogpt": lambda: T.BioGptForCausalLM(T.BioGptConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "codegen": lambda: T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=96, n_ctx=96, rotary_dim=8,
                                                                bos_token_id=1, eos_token_id=2)),
        # refused before 5.24
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=96, rotary_dim=8, bos_token_id=1, eos_token_id=2)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, bos_token_id=1, eos_token_id=2)),
        "falcon_alibi": lambda: T.FalconForCausalLM(T.FalconConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            bos_token_id=1, eos_token_id=2)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                                          bos_token_id=1, eos_token_id=2)),
        "gpt_oss": lambda: T.GptOssForCausalLM(cfg(T.GptOssConfig, head_dim=16, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=64)),
        "gemma2_short_window": lambda: T.Gemma2ForCausalLM(cfg(T.Gemma2Config, head_dim=16, sliding_window=8,
                                                               attn_implementation="eager")),
        "gemma4_text": lambda: T.Gemma4ForCausalLM(cfg(
            T.Gemma4TextConfig, head_dim=16, global_head_dim=32, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=VOCAB)),
        "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(cfg(
            T.DeepseekV3Config, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1)),
        "roberta": lambda: T.RobertaForCausalLM(T.RobertaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=96, is_decoder=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "bart": lambda: T.BartForCausalLM(T.BartConfig(
            vocab_size=VOCAB, d_model=64, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
            encoder_attention_heads=4, decoder_ffn_dim=96, encoder_ffn_dim=96, max_position_embeddings=96,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, is_decoder=True, is_encoder_decoder=False)),
    }[name]
    torch.manual_seed(0)
    return b().eval()


MATCH = ["gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
         "gemma3_text", "phi", "phi3", "phimoe", "opt", "gpt_neox", "stablelm", "starcoder2", "olmo", "olmo2",
         "olmoe", "cohere", "cohere2", "glm", "glm4", "granite", "persimmon", "gpt_bigcode", "biogpt", "roberta"]
# family: (where it is refused, exception types, what the message says)
REFUSE = {
    "gptj": ("enable", RuntimeError, "AttentionInterface"),
    "codegen": ("enable", RuntimeError, "AttentionInterface"),
    "falcon": ("enable", RuntimeError, "AttentionInterface"),
    "falcon_alibi": ("enable", NotImplementedError, "ALiBi"),
    "bloom": ("enable", RuntimeError, "AttentionInterface"),
    "gpt_oss": ("call", NotImplementedError, "attention sinks"),
    "gemma2_short_window": ("call", (NotImplementedError, ValueError), "sliding window"),
    "gemma4_text": ("enable", ValueError, "per layer"),
    "deepseek_v3": ("enable", NotImplementedError, "latent attention"),
    "bart": ("enable", NotImplementedError, "one self-attention per layer"),
}


if NEW_CACHE:  # GPT-J and CodeGen run their attention through AttentionInterface
    MATCH += [REFUSE.pop("gptj") and "gptj", REFUSE.pop("codegen") and "codegen"]
if FALCON_INTERFACE:  # Falcon (RoPE; multi-query by default) runs its attention through AttentionInterface
    MATCH += [REFUSE.pop("falcon") and "falcon"]


def padded_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def peft_and_ours(name):
    base = model(name)
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(0.0, 0.5)
    prefix = PrefixTuning.from_peft(pm)
    prefix_attn.enable(ours, prefix)
    return pm.eval(), ours.eval(), prefix


@pytest.mark.parametrize("name", MATCH)
def test_matches_peft(name):
    pm, ours, prefix = peft_and_ours(name)
    ids, mask, labels = padded_batch()
    a = pm(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    scale = max(1.0, a.logits.abs().max().item())
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5 * scale, rtol=1e-5)  # padded positions too
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    g = pm.prompt_encoder["default"].embedding.weight.grad
    expected = PrefixTuning._kv_from_peft_embeddings(g, prefix.shape, P)
    torch.testing.assert_close(prefix.prefix_kv.grad, expected, atol=1e-6, rtol=1e-4)
    prompts, prompt_mask = left_padded_prompts()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(input_ids=prompts, attention_mask=prompt_mask, **kw)
        if NEW_CACHE:  # peft 0.21.2's generate drops its prefix here: the same model without a cache is the oracle
            assert torch.equal(got, greedy_without_cache(ours, prompts, prompt_mask, 5))
        else:
            assert torch.equal(got, pm.generate(input_ids=prompts, attention_mask=prompt_mask, **kw))


@pytest.mark.parametrize("name", MATCH)
def test_cached_decoding_step_by_step_equals_full_forward(name):
    """What sampling loops, eval harnesses and servers do: prefill, then one token at a time with the cache and
    no position_ids. Each step's logits equal the full forward's at that position (the new token is numbered
    P + past, under either name of the cache argument)."""
    _, ours, _ = peft_and_ours(name)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        full = ours(input_ids=ids, use_cache=False).logits
        out = ours(input_ids=ids[:, :8], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :8], atol=2e-5, rtol=1e-5)
        cache = cache_out(out)
        for t in range(8, 12):
            out = ours(input_ids=ids[:, t:t + 1], use_cache=True, **{CACHE_KW: cache})
            scale = max(1.0, full[:, t].abs().max().item())
            torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5 * scale, rtol=1e-5)
            cache = cache_out(out)


@pytest.mark.parametrize("name", sorted(REFUSE))
def test_refused_clearly(name):
    where, exc, message = REFUSE[name]
    m = model(name)
    ids, mask, _ = padded_batch()
    if where == "enable":
        with pytest.raises(exc, match=message):
            prefix_attn.enable(m, PrefixTuning(m.config, P))
        assert m.config._attn_implementation != "prefix_attn" and not hasattr(m, "prefix_attn")
    else:
        prefix_attn.enable(m, PrefixTuning(m.config, P))
        with pytest.raises(exc, match=message), torch.no_grad():
            m(input_ids=ids, attention_mask=mask)


def test_gemma2_softcap_strong_prefix():
    """Gemma 2 with large prefix values, where capping changes the scores a lot: same logits as PEFT."""
    base = model("gemma2")
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(0.0, 3.0)
    prefix_attn.enable(ours, PrefixTuning.from_peft(pm))
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        a = pm(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
        ours.config.attn_logit_softcapping = None  # the cap really acts: without it the logits move
        for m in ours.modules():
            if hasattr(m, "attn_logit_softcapping"):
                m.attn_logit_softcapping = None
        c = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    assert (c - a).abs().max() > 2e-4  # about 7e-4 here; the match above is ~2e-7


def test_unimplemented_attention_kwargs_are_refused_by_name():
    from prefix_attn.integrations import transformers as hf

    m = model("llama")
    prefix_attn.enable(m, PrefixTuning(m.config, P))
    attn = m.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    ok = hf.prefix_attention_forward(attn, q, kv, kv, None, scaling=0.25, num_items_in_batch=7, position_ids=None,
                                     output_attentions=False, sliding_window=None, softcap=None)[0]
    assert ok.shape == (1, 3, 4, 16)
    for kwargs, message in [({"s_aux": torch.zeros(4)}, "attention sinks"),
                            ({"cu_seq_lens_q": torch.tensor([0, 3])}, "packed sequences"),
                            ({"is_causal": False}, "non-causal"),
                            ({"some_new_bias": torch.zeros(1)}, "'some_new_bias'")]:
        with pytest.raises(NotImplementedError, match=message):
            hf.prefix_attention_forward(attn, q, kv, kv, None, scaling=0.25, **kwargs)
