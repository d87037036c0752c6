"""Full prefix-tuning training step: PEFT's path against ``prefix_attn``'s, on stock transformers models.

    python benchmarks/bench_train_step.py          # GPT-2-small-sized and Llama-shaped models (GPU sizes)
    python benchmarks/bench_train_step.py --quick  # tiny configs, a few steps (what a CPU can do quickly)

Models are built from configs with random weights (nothing is downloaded), all dropouts 0, the model frozen
and only the prefix trained with AdamW. Paths, each on a fresh copy of the same model:

    peft[eager]   get_peft_model(model, PrefixTuningConfig(...)), attn_implementation="eager" (baseline 1)
    peft[sdpa]    the same with attn_implementation="sdpa" (transformers' default)
    prefix_attn   a PrefixTuning with the same prefix values as the PEFT model; prefix_attn.enable(model, ...)

Before timing, every path's loss and prefix gradient on the same batch are compared with peft[eager]'s
("grad err": max |prefix grad - peft[eager]'s| / max |peft[eager]'s|). Reported: median step time,
tokens/s (batch * seq / step), peak memory of the step (CUDA). The "llama" model
has Llama-7B's layer shapes (hidden 4096, 32 heads, head_dim 128, MLP 11008) but --llama-layers layers
(default 8) so that the PEFT eager path fits in memory; GQA with --llama-kv-heads 8.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import traceback

import torch
from common import device_name, git_commit, is_oom, now, result_path, short, sync, wall_times, write_json

import prefix_attn

PATHS = ("peft[eager]", "peft[sdpa]", "prefix_attn")
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def model_configs(args):
    """{name: (config, batch, seq)}."""
    from transformers import GPT2Config, LlamaConfig

    P = args.prefix
    if args.quick and not torch.cuda.is_available():
        seq, batch = 64, 2
        gpt2 = GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=1000,
            n_positions=seq + P,
            bos_token_id=0,
            eos_token_id=0,
        )
        llama = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=seq + P,
        )
        shapes = {"gpt2-small": (gpt2, batch, seq), "llama": (llama, batch, seq)}
    else:
        # GPT-2 small, with room for P positions: both paths put the text after the prefix (as PEFT does)
        gpt2 = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024 + P)
        llama = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=args.llama_layers,
            num_attention_heads=32,
            num_key_value_heads=args.llama_kv_heads,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
        shapes = {"gpt2-small": (gpt2, 8, 1024), "llama": (llama, 4, 2048)}
    for cfg, _, _ in shapes.values():
        for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout"):
            if hasattr(cfg, name):
                setattr(cfg, name, 0.0)
    if args.models:
        shapes = {k: v for k, v in shapes.items() if k in args.models.split(",")}
    return shapes


def build_model(config, attn: str, dtype, device, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = copy.deepcopy(config)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.to(device).train()


def build_path(path: str, config, P: int, dtype, device, seed: int, peft_init=None):
    """(model, trainable params, prefix grad getter in PEFT's [P, L*2*Hkv*D] layout, PEFT init state)."""
    from peft import PrefixTuningConfig, get_peft_model

    if path.startswith("peft"):
        attn = path[5:-1]
        model = get_peft_model(
            build_model(config, attn, dtype, device, seed),
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        )
        emb = model.prompt_encoder[model.active_adapter].embedding
        if peft_init is not None:
            with torch.no_grad():
                emb.weight.copy_(peft_init)
        return model, [p for p in model.parameters() if p.requires_grad], (lambda: emb.weight.grad), model
    # prefix_attn: the same prefix values as the PEFT model, in prefix_attn's direct layout
    try:
        from prefix_attn.integrations import transformers as pa_hf  # noqa: F401
        from prefix_attn.prefix import PrefixTuning
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"prefix_attn's transformers integration is not available: {exc}") from exc
    model = build_model(config, "sdpa", dtype, device, seed)
    prefix = PrefixTuning(model.config, num_virtual_tokens=P, device=device)
    if peft_init is not None:
        with torch.no_grad():
            prefix.prefix_kv.copy_(
                PrefixTuning._kv_from_peft_embeddings(peft_init.to(prefix.prefix_kv.dtype), prefix.shape, P)
            )
    prefix_attn.enable(model, prefix)

    def grad():
        g = prefix.prefix_kv.grad
        return None if g is None else g.permute(3, 0, 1, 2, 4).reshape(P, -1)

    return model, list(prefix.parameters()), grad, None


def time_steps(model, opt, input_ids, args, device) -> float:
    """Median ms of a training step (forward, backward, optimizer step), after args.warmup steps."""

    def step():
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return statistics.median(wall_times(step, args.steps, device)) * 1e3


def run_model(name, config, batch, seq, args, device, dtype) -> list:
    P = args.prefix
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    rows, reference, peft_init = [], None, None
    for path in args.paths:
        row = {
            "model": name,
            "path": path,
            "batch": batch,
            "seq": seq,
            "prefix": P,
            "dtype": str(dtype).replace("torch.", ""),
            "layers": getattr(config, "num_hidden_layers", None) or config.n_layer,
            "status": "ok",
            "step_ms": None,
            "tokens_per_s": None,
            "peak_mib": None,
            "loss": None,
            "loss_diff": None,
            "grad_err": None,
        }
        model = None
        try:
            if path == "prefix_attn" and peft_init is None:
                # the same prefix values as PEFT's: take them from a fresh PEFT model of the same seed
                m, _, _, peft_model = build_path("peft[eager]", config, P, dtype, device, seed=0)
                peft_init = (
                    peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.detach().clone()
                )
                del m, peft_model
            model, params, grad_of_prefix, peft_model = build_path(
                path, config, P, dtype, device, seed=0, peft_init=peft_init
            )
            if peft_model is not None and peft_init is None:
                peft_init = (
                    peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.detach().clone()
                )
            opt = torch.optim.AdamW(params, lr=1e-4)

            # correctness first: loss and prefix gradient on the same batch, against the first path
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            g = grad_of_prefix()
            row["loss"] = loss.item()
            if g is None or not torch.isfinite(loss):
                raise RuntimeError(
                    f"no finite loss / prefix gradient (loss {loss.item()}, grad {g is not None})"
                )
            g = g.detach().float().clone()
            opt.zero_grad(set_to_none=True)
            if reference is None:
                reference = (row["loss"], g)
            else:
                row["loss_diff"] = abs(row["loss"] - reference[0])
                row["grad_err"] = (
                    (g - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30)
                ).item()
                tol = TOL[dtype]
                if row["loss_diff"] > tol * max(1.0, abs(reference[0])) or row["grad_err"] > 4 * tol:
                    row["status"] = (
                        f"mismatch vs {args.paths[0]}: loss diff {row['loss_diff']:.2e}, prefix grad "
                        f"err {row['grad_err']:.2e} (tol {tol:.0e})"
                    )

            ms = time_steps(model, opt, input_ids, args, device)
            row.update(step_ms=ms, tokens_per_s=batch * seq / (ms * 1e-3))
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as exc:  # noqa: BLE001 - record, keep going
            oom = is_oom(exc)
            row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {short(exc, 300, more='')}"
            if not oom and args.verbose:
                traceback.print_exc()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        timing = "" if row["step_ms"] is None else "%.1f ms/step" % row["step_ms"]
        print(f"  {name} {path:12s} {row['status'][:120]}  {timing}", flush=True)
    return rows


def table(results) -> str:
    meta = results["meta"]
    lines = [
        f"== training step, {meta['device_name']} | torch {meta['torch']} | "
        f"transformers {meta['transformers']} | peft {meta['peft']} | {meta['dtype']}, P={meta['prefix']}"
    ]
    if meta["tiny"]:
        lines.append("   TINY configs (--quick without CUDA): not the GPT-2 / Llama sizes")
    lines.append(
        f"   {'model':11s} {'path':12s} {'B x T':>10s} {'ms/step':>9s} {'tokens/s':>10s} "
        f"{'vs peft[eager]':>14s} "
        f"{'peak MiB':>9s} {'loss':>8s} {'grad err':>8s}  status"
    )
    base = {}
    for r in results["rows"]:
        if r["path"] == "peft[eager]" and r["step_ms"]:
            base[r["model"]] = r["step_ms"]
    for r in results["rows"]:
        ratio = base.get(r["model"], 0) / r["step_ms"] if r["step_ms"] and r["model"] in base else None
        lines.append(
            f"   {r['model']:11s} {r['path']:12s} {str(r['batch']) + 'x' + str(r['seq']):>10s} "
            f"{'-' if r['step_ms'] is None else format(r['step_ms'], '9.1f'):>9s} "
            f"{'-' if r['tokens_per_s'] is None else format(r['tokens_per_s'], '10.0f'):>10s} "
            f"{'-' if ratio is None else format(ratio, '.2f') + 'x':>14s} "
            f"{'-' if r['peak_mib'] is None else format(r['peak_mib'], '9.0f'):>9s} "
            f"{'-' if r['loss'] is None else format(r['loss'], '8.4f'):>8s} "
            f"{'-' if r['grad_err'] is None else format(r['grad_err'], '8.1e'):>8s}  {r['status'][:200]}"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps; tiny configs when there is no CUDA")
    p.add_argument("--prefix", type=int, default=64, help="P, virtual tokens")
    p.add_argument("--models", default=None, help="comma list: gpt2-small,llama")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    p.add_argument("--llama-layers", type=int, default=8)
    p.add_argument("--llama-kv-heads", type=int, default=32)
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) / float32 (CPU default) / float16")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    args.paths = args.paths.split(",")
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    try:
        import peft
        import transformers
    except ImportError as exc:
        raise SystemExit(
            f"the training-step benchmark needs transformers and peft: pip install 'prefix_attn[hf]' ({exc})"
        ) from None
    name = device_name(device, cpu=platform.machine())
    results = {
        "meta": {
            "device_name": name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "prefix_attn": prefix_attn.__version__,
            "backends": prefix_attn.available_backends(),
            "date": now(),
            "dtype": str(dtype).replace("torch.", ""),
            "prefix": args.prefix,
            "steps": args.steps,
            "warmup": args.warmup,
            "argv": sys.argv[1:] if argv is None else argv,
            "tiny": args.quick and device.type != "cuda",
            "timing": "median wall time of a step (forward, backward, AdamW step), synchronised",
            "peak_memory": "torch.cuda.max_memory_allocated over the timed steps (weights included)",
        },
        "rows": [],
    }
    results["meta"]["git_commit"] = git_commit()
    for model_name, (config, batch, seq) in model_configs(args).items():
        results["meta"].setdefault("configs", {})[model_name] = config.to_dict()
        results["rows"].extend(run_model(model_name, config, batch, seq, args, device, dtype))
    path = result_path(args.out, "train_step", name)
    write_json(path, results)
    print(f"\nwrote {path}")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
