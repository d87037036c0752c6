"""Two processes (gloo, 127.0.0.1) training an enabled tiny GPT-2 under DistributedDataParallel or FSDP2
(``fully_shard`` per block and at the root), for test_hf_training.py.

Each rank runs one forward/backward on its half of a batch; DDP / FSDP average the prefix gradient over the
ranks, which equals the gradient of the whole batch in one process (equal token counts per rank).
"""

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _model():
    import transformers

    import prefix_attn

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(1)
    prefix = prefix_attn.PrefixTuning(model.config, 5, init_std=0.5)
    return prefix_attn.enable(model, prefix)


def _batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 101, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on rank 0's first row, rank 1's first row likewise
    mask[2, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def single_process_grad() -> torch.Tensor:
    model = _model()
    ids, mask, labels = _batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return model.prefix_attn.prefix_kv.grad.clone()


def _worker(rank: int, port: int, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            wrapped = fully_shard(model)
        ids, mask, labels = (t.chunk(WORLD)[rank] for t in _batch())
        wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grad = model.prefix_attn.prefix_kv.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2: a sharded DTensor
        if rank == 0:
            torch.save({"grad": grad.clone(), "trainable": trainable}, out)
        # no rank tears its group down while the other may still be in a collective (gloo aborts that rank:
        # "terminate called without an active exception"); on the success path only, so a failed rank never hangs
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(out: str, mode: str = "ddp", timeout: float = 240.0) -> None:
    """Spawn the two ranks (``mode`` "ddp" or "fsdp2") and wait at most ``timeout`` seconds; raise if either
    fails."""
    ctx = mp.start_processes(_worker, args=(_free_port(), out, mode), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"DDP ranks did not finish in {timeout} s")
    if not os.path.exists(out):
        raise RuntimeError("rank 0 wrote no result")
