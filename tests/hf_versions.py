"""What differs between the transformers releases the Hugging Face tests run on, and the generation oracle.

transformers 5.24 renamed past_key_values to cache (model and layer signatures, model and generate outputs); peft
0.21.2's own generate() drops its prefix there (its prepare step passes past_key_values; peft 0.22 passes cache and
keeps it), so from 5.24 PEFT is the oracle of the forward pass, and generation is checked against decoding without
a cache through the same enabled model, whichever peft is installed.
"""

import torch
import transformers

NEW_CACHE = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)
# from 5.25 Falcon (RoPE checkpoints) runs its attention through AttentionInterface
FALCON_INTERFACE = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 25)
CACHE_KW = "cache" if NEW_CACHE else "past_key_values"


def cache_out(out):
    """The cache of a model or generate output, under either name."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def greedy_without_cache(m, ids, mask, steps, eos=2, pad=0):
    """Greedy decoding by full forwards, no cache: positions from the mask as generate() computes them, a row
    that produced eos padded from then on (as generate does)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        nxt = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        done |= nxt == eos
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids
